"""Classification two ways on the shipped support tickets: a label head (`training.objective: classification`,
recipes/smollm2-classify.yaml) against instruction-style SFT, the label as the assistant's reply
(recipes/smollm2-classify-chat.yaml, scored with `ftune eval --generate`'s accuracy and macro F1).

Both train LoRA on the builtin SmolLM2-135M-Instruct with the same 320 tickets and are scored on the same 80.
We report accuracy, macro F1, training rows/s and prediction rows/s of each, run one after the other on this
machine (ratios in one run).
Run: python benchmarks/classify.py [--out runs/bench-classify]   (prints a Markdown section; ~15 min on 2 cores)
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ftune(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "finetune_cli", *args], check=True, capture_output=True, text=True)
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-classify"))
    args = parser.parse_args()
    out = Path(args.out)
    rows = {}
    eval_file = ROOT / "recipes/data/classify/eval.jsonl"
    head = out / "head"
    info = json.loads(
        ftune(
            "train", str(ROOT / "recipes/smollm2-classify.yaml"), "--overwrite", "--json", "--set", f"output.dir={head}"
        )
    )
    result = json.loads(ftune("eval", str(head), "--json"))["results"]["tuned"]
    predicted = ftune("classify", str(head), "--data", str(eval_file))  # rows/s measured on its own below
    assert len(predicted.splitlines()) == result["examples"]
    speed = _classify_speed(head, eval_file)
    seen = json.loads((head / "run.json").read_text())["data"]["train"]["examples"] * 2
    rows["label head (objective: classification)"] = (
        result["accuracy"],
        result["macro_f1"],
        seen / info["train_seconds"],
        speed,
    )
    chat = out / "chat"
    info = json.loads(
        ftune(
            "train",
            str(ROOT / "recipes/smollm2-classify-chat.yaml"),
            "--overwrite",
            "--json",
            "--samples",
            "0",
            "--set",
            f"output.dir={chat}",
        )
    )
    generated = json.loads(
        ftune(
            "eval",
            str(chat),
            "--generate",
            "--json",
            "--max-new-tokens",
            "8",
            "--metrics",
            "accuracy,macro_f1,exact_match",
        )
    )
    tuned = generated["results"]["tuned"]
    per_token = generated["tokens_per_second"]["tuned"]
    answers = [json.loads(x)["prediction"] for x in (chat / "predictions.jsonl").read_text().splitlines()]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(chat / "adapter"))
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
    seen = json.loads((chat / "run.json").read_text())["data"]["train"]["examples"] * 2
    rows["instruction-style SFT (label as the reply)"] = (
        tuned["accuracy"],
        tuned["macro_f1"],
        seen / info["train_seconds"],
        per_token * len(answers) / tokens,
    )
    majority = max(json.loads((head / "run.json").read_text())["data"]["train"]["labels"].values()) / 320
    print("## Classification: a label head vs the label as a reply\n")
    print("Shipped support tickets (4 classes, 320 train, 80 eval, imbalanced 35/30/20/15%), LoRA r 16 on the builtin")
    print("SmolLM2-135M-Instruct, 2 epochs each, batch 16, greedy generation (at most 8 new tokens) for the chat")
    print(f"twin. The majority class alone scores accuracy {majority:.3f}.\n")
    print("| way | eval accuracy | eval macro F1 | training rows/s | prediction rows/s |")
    print("|---|---|---|---|---|")
    for name, (acc, f1, train_speed, predict_speed) in rows.items():
        print(f"| {name} | {acc:.4f} | {f1:.4f} | {train_speed:.2f} | {predict_speed:.1f} |")
    print()


def _classify_speed(run: Path, data: Path) -> float:
    """Rows/s of `ftune classify --data`, as it reports on stderr (model loading not counted)."""
    done = subprocess.run(
        [sys.executable, "-m", "finetune_cli", "classify", str(run), "--data", str(data)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(done.stderr.rsplit("(", 1)[1].split()[0])


if __name__ == "__main__":
    main()
