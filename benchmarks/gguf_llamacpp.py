"""GGUF export checked in llama.cpp itself: builds llama-cpp-python (from its PyPI source: cmake and a C compiler,
~10 minutes on 2 cores) once into its own venv, exports the quickstart run as f16 and q8_0 with `ftune export`, and
compares llama.cpp with the HF model: tokenization of hard strings, next-token argmax on the eval prompts, and the
greedy answers to the quickstart's eval prompts (as `ftune generate` gives them), which must stop by themselves.
Prints a Markdown section (export time, file size, peak RSS per quant) for BENCHMARKS.md.

    python benchmarks/gguf_llamacpp.py [--run runs/quickstart] [--venv .venv-llamacpp] [--quants f16 q8_0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRINGS = [
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Zoë, naïve café — 我想在apple工作 😀🚀 нещо на Български",
    "3 33 333 3333 1,000,000.25 2024-05-17",
    "a    b\t\tc\n\n\n  d   \n",
]

# Runs inside the llama-cpp-python venv: reads a job as JSON on stdin, answers JSON on stdout.
WORKER = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(sys.stdin)
llm = Llama(model_path=job["model"], n_ctx=1024, logits_all=True, verbose=False, seed=0)
tokens = [llm.tokenize(s.encode(), add_bos=False, special=True) for s in job["strings"]]
out = {"tokens": tokens, "argmax": [], "answers": []}
for ids in job["sequences"]:
    llm.reset()
    llm.eval(ids)
    out["argmax"].append(np.asarray(llm.scores[: len(ids)]).argmax(-1).tolist())
for prompt in job["prompts"]:
    llm.reset()
    r = llm.create_completion(prompt, max_tokens=job["max_tokens"], temperature=0.0, top_k=1, repeat_penalty=1.0)
    out["answers"].append({"text": r["choices"][0]["text"], "finish": r["choices"][0]["finish_reason"]})
print(json.dumps(out))
"""


def build(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "numpy", "llama-cpp-python"], check=True)
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "quickstart"))
    parser.add_argument("--venv", default=str(ROOT / ".venv-llamacpp"))
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    ftune = [sys.executable, "-m", "finetune_cli"]
    run = Path(args.run)
    if not (run / "run.json").is_file():
        subprocess.run([*ftune, "train", str(ROOT / "recipes" / "quickstart.yaml"), "--samples", "0"], check=True)
    llama_python = build(Path(args.venv))

    import torch

    from finetune_cli import rundir
    from finetune_cli.data.masking import render
    from finetune_cli.inference import generate

    model, tokenizer = rundir.load(str(run))
    model.eval()
    found = rundir.open_target(str(run))
    eval_path = Path(found.recipe.data.eval)  # a run's recipe.yaml holds its data paths resolved
    rows = [json.loads(line) for line in eval_path.read_text().splitlines() if line.strip()][:4]
    chats = [[m for m in r["messages"] if m["role"] != "assistant"][:2] for r in rows]
    prompts = [render(tokenizer, c, add_generation_prompt=True) for c in chats]
    sequences = [tokenizer(render(tokenizer, r["messages"]), add_special_tokens=False)["input_ids"] for r in rows]
    with torch.no_grad():
        hf_argmax = [model(torch.tensor([ids])).logits[0].argmax(-1).tolist() for ids in sequences]
    hf_answers = [
        generate.reply(model, tokenizer, c, args.max_tokens, False, None, None, None, on_text=lambda t: None)
        for c in chats
    ]
    hf_tokens = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in STRINGS]

    lines = [
        "## GGUF export in llama.cpp (benchmarks/gguf_llamacpp.py)",
        "",
        f"`ftune export {run} --format gguf`, then llama.cpp (llama-cpp-python) against the merged HF model on "
        f"{len(rows)} quickstart eval conversations.",
        "",
        "| quant | file MiB | export s | peak RSS MiB | ftune check: mean KL, agreement | tokens equal "
        "| argmax agreement | answers equal | stopped by itself |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for quant in args.quants:
        out = Path(tempfile.mkdtemp(prefix="gguf-bench-")) / quant
        done = subprocess.run(
            [*ftune, "export", str(run), "--format", "gguf", "--quant", quant, "-o", str(out), "--json"],
            check=True,
            capture_output=True,
            text=True,
        )
        info = json.loads(done.stdout)
        job = {
            "model": info["file"],
            "strings": STRINGS,
            "sequences": sequences,
            "prompts": prompts,
            "max_tokens": args.max_tokens,
        }
        worker = subprocess.run(
            [str(llama_python), "-c", WORKER], input=json.dumps(job), capture_output=True, text=True, check=True
        )
        got = json.loads(worker.stdout)
        same = sum(a == b for x, y in zip(got["argmax"], hf_argmax) for a, b in zip(x, y))
        total = sum(len(x) for x in hf_argmax)
        answers_equal = sum(a["text"].strip() == b.strip() for a, b in zip(got["answers"], hf_answers))
        stopped = sum(a["finish"] == "stop" for a in got["answers"])
        check = info.get("check") or {}
        lines.append(
            f"| {quant} | {info['size_bytes'] / 2**20:.1f} | {info['seconds']:.1f} | {info['peak_rss_mib']} | "
            f"{check.get('kl', '-')}, {check.get('agreement', '-')} | {got['tokens'] == hf_tokens} | "
            f"{same / total:.4f} ({total}) | "
            f"{answers_equal}/{len(prompts)} | {stopped}/{len(prompts)} |"
        )
    print("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
