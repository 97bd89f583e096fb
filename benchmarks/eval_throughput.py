"""Eval throughput: ftune's batched, length-sorted scoring vs a naive one-sequence-at-a-time loop.

Both score the same examples (the quickstart train + eval chat data on the builtin SmolLM2, i.e.
exactly the learned tokens) with the same model, alternating A B A B; we report the median scored
tokens/s of each, the spread, and their ratio, and check both give the same total NLL.
Run: python benchmarks/eval_throughput.py [--repeats N]   (prints a Markdown section)
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from finetune_cli import models
from finetune_cli.data import jsonl
from finetune_cli.data.masking import IGNORE, tokenize_all
from finetune_cli.evaluation.perplexity import corpus_nll

ROOT = Path(__file__).resolve().parents[1]


def naive(model, examples) -> tuple[float, int]:
    """The loop people write: one sequence per forward, NLL of the learned tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(e["labels"][1:])
            total += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum"))
            count += int((targets != IGNORE).sum())
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    source = models.resolve("smollm2-135m-instruct")
    tok = models.load_tokenizer(source)
    model = models.load_model(source).eval()
    convs = []
    for name in ("train", "eval"):
        convs += jsonl.read(ROOT / "recipes" / "data" / "quickstart" / f"{name}.jsonl")
    examples, stats = tokenize_all(tok, convs, 1024, "assistant")

    fast, slow = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        res = corpus_nll(model, examples, args.batch_size, tok.pad_token_id)
        fast.append(res["tokens"] / (time.perf_counter() - t))
        t = time.perf_counter()
        nll, count = naive(model, examples)
        slow.append(count / (time.perf_counter() - t))
    assert count == res["tokens"] and abs(nll - res["nll"]) / nll < 1e-4, (nll, res["nll"])

    f, s = statistics.median(fast), statistics.median(slow)
    print("## Eval throughput (`ftune eval` scoring)\n")
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"CPU, float32. Data: quickstart train+eval, {len(examples)} conversations, {stats['tokens']:,} tokens, "
        f"{res['tokens']:,} scored. Model: builtin SmolLM2-135M. {args.repeats} alternating runs each.\n"
    )
    print("| scorer | scored tokens/s (median) | spread (min-max) |")
    print("|---|---|---|")
    print(f"| ftune, batch {args.batch_size}, length-sorted | {f:,.0f} | {min(fast):,.0f}-{max(fast):,.0f} |")
    print(f"| naive loop, one sequence per forward | {s:,.0f} | {min(slow):,.0f}-{max(slow):,.0f} |")
    print(
        f"\nRatio ftune / naive: **{f / s:.2f}x**. Same total NLL (relative difference "
        f"{abs(nll - res['nll']) / nll:.1e}).\n"
    )


if __name__ == "__main__":
    main()
