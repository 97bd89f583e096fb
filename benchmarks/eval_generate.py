"""`ftune eval --generate` throughput: batched, length-sorted generation vs one prompt at a time.

Both answer the quickstart eval prompts with the quickstart run's tuned model (greedy), alternating A B A B; we
report generated tokens/s (median), their ratio, and check the answers are identical.
Run: python benchmarks/eval_generate.py [--run runs/quickstart] [--repeats N] [--batch-size N]
(prints a Markdown section; trains the quickstart run first if it is missing)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from finetune_cli import rundir
from finetune_cli.evaluation import predict
from finetune_cli.inference import generate

ROOT = Path(__file__).resolve().parents[1]


def one_at_a_time(model, tokenizer, prompts, max_new_tokens):
    replies, tokens = [], 0
    for p in prompts:
        reply = generate.reply(model, tokenizer, p, max_new_tokens)
        replies.append(reply)
        # the reply's tokens plus the end-of-turn token that stopped it (or none at the length limit)
        n = len(tokenizer(reply, add_special_tokens=False)["input_ids"])
        tokens += n + (n < max_new_tokens)
    return replies, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=str(ROOT / "runs" / "quickstart"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "run.json").is_file():
        cmd = [sys.executable, "-m", "finetune_cli", "train", str(ROOT / "recipes/quickstart.yaml"), "--samples", "0"]
        subprocess.run(cmd, check=True, capture_output=True)
    rows = [json.loads(x) for x in (ROOT / "recipes/data/quickstart/eval.jsonl").read_text().splitlines() if x]
    prompts, references = predict.split(rows, "eval.jsonl")
    model, tokenizer = rundir.load(str(run))
    speeds = {"one": [], "batched": []}
    answers = {}
    for _ in range(args.repeats):
        for name in ("one", "batched"):
            started = time.perf_counter()
            if name == "one":
                replies, tokens = one_at_a_time(model, tokenizer, prompts, args.max_new_tokens)
            else:
                replies, tokens = generate.replies(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
            speeds[name].append(tokens / (time.perf_counter() - started))
            answers[name] = replies
    one, batched = statistics.median(speeds["one"]), statistics.median(speeds["batched"])
    same = sum(a == b for a, b in zip(answers["one"], answers["batched"]))
    exact = predict.score(answers["batched"], references, ["exact_match"])["exact_match"]
    print("## eval --generate throughput (benchmarks/eval_generate.py)\n")
    print(
        f"Quickstart run, {len(prompts)} eval prompts, greedy, max {args.max_new_tokens} new tokens, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.repeats} repeats A B A B.\n"
    )
    print("| mode | generated tokens/s (median) | runs |")
    print("|---|---|---|")
    print(f"| one prompt at a time (`generate.reply`) | {one:.1f} | {', '.join(f'{x:.1f}' for x in speeds['one'])} |")
    print(
        f"| batched, length-sorted, batch {args.batch_size} | {batched:.1f} | "
        f"{', '.join(f'{x:.1f}' for x in speeds['batched'])} |"
    )
    print(
        f"\nRatio batched / one at a time: **{batched / one:.2f}x**; identical answers: {same}/{len(prompts)}; "
        f"exact match of the tuned model: {100 * exact:.1f}%.\n"
    )


if __name__ == "__main__":
    main()
