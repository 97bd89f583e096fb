"""GPU training throughput (issue 31): `ftune train` against the plain TRL script (`benchmarks/trl_baseline.py`) on
a random-init Llama of about 1B parameters (TinyLlama's shape: 22 layers, hidden 2048, 32 heads / 4 KV heads),
bf16, batch 4 x 2 accumulation, LoRA r 16 on all linear layers. No weights are downloaded: the model is built
from a config next to a tokenizer (default: the builtin SmolLM2's).

Both sides run with the same callback (`profile_step.StepClock`): steps timed from the end of step 4 to the last
step's end with `torch.cuda.synchronize()` at each boundary (steps 1-4, compiling included, reported apart as
warm-up), learned tokens (labels not -100) counted per micro-batch, the loss of every step from the first, peak
memory (max allocated and reserved). The first run of each side also traces step 3 with torch.profiler (top
kernels by CUDA time: OUT/profile-ftune.txt, OUT/profile-trl.txt) and counts step 4's host syncs under
`torch.cuda.set_sync_debug_mode("warn")`. Two data sets: conversations of about 1.9k tokens, and mixed lengths
(log-normal, median 300 tokens, clipped to 2048). Every run is its own process, in this order (the first ones
matter most): ftune defaults and TRL A B A B, then on the mixed set; ftune's packed / padded batches on it,
gradient checkpointing flipped from ftune's default, packed / padded on the long rows, QLoRA and full fine-tuning
against TRL's, compile flipped (a variant equal to the defaults is not run again). Each result is appended to
OUT/bench.jsonl as it ends, so a killed run keeps what finished; a run whose expected time (the longest run so
far) would pass `--budget` is skipped, and each run is stopped at it.
Prints a Markdown section ending in the line BENCHMARKS.md quotes.

Run: python benchmarks/gpu_throughput.py [--out DIR] [--tokenizer DIR] [--budget 480] [--steps 30]
     [--variants main,mixed,packing,qlora,full,gradient_checkpointing,compile]
     [--cpu]   (a 2-layer model, short rows, 6 steps of 2 x 2 on the CPU: checks the script in minutes)
"""

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import train_throughput as tt

LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4}  # fmt: skip
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # fmt: skip
BENCH = Path(__file__).resolve().parent
LOSS_TOLERANCE = 0.02  # equal loss: every step's loss within 2% of the other side's (bf16, different kernels)
PROFILE_STEP, SYNC_STEP, FIRST_TIMED = 3, 4, 5
# (name, data set, method, ftune's recipe changes, sides in order); variants with one side compare with TRL's
# runs of the same data and method
VARIANTS = [
    ("main", "rows", "lora", {}, None),  # None: ftune and TRL, A B A B, --repeats times
    ("mixed", "mixed", "lora", {}, ("ftune", "trl")),
    ("packing", "mixed", "lora", {"packing": True}, ("ftune",)),
    ("packing", "mixed", "lora", {"packing": False}, ("ftune",)),
    ("gradient_checkpointing", "rows", "lora", {"gradient_checkpointing": True}, ("ftune",)),
    ("gradient_checkpointing", "rows", "lora", {"gradient_checkpointing": False}, ("ftune",)),
    ("packing", "rows", "lora", {"packing": True}, ("ftune",)),
    ("packing", "rows", "lora", {"packing": False}, ("ftune",)),
    ("qlora", "rows", "qlora", {}, ("ftune", "trl")),
    ("full", "rows", "full", {}, ("ftune", "trl")),
    ("compile", "rows", "lora", {"compile": True}, ("ftune",)),
    ("compile", "rows", "lora", {"compile": False}, ("ftune",)),
]


def build_model(folder: Path, tokenizer, shape: dict, device: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1B weights takes seconds on a GPU, a minute on a CPU
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = folder / "llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_data(path: Path, tokenizer, lengths: list[int]) -> Path:
    """One conversation per target length: the quickstart's exchanges under one system prompt, as many as fit
    (at least one)."""
    rows = [json.loads(line) for line in (tt.ROOT / "recipes/data/quickstart/train.jsonl").read_text().splitlines()]

    def size(messages):
        return len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])

    system = size(rows[0]["messages"][:1])
    extra = [size(r["messages"]) - system for r in rows]  # tokens an exchange adds to a conversation
    out, i = [], 0
    for target in lengths:
        messages, n = list(rows[i % len(rows)]["messages"]), system + extra[i % len(rows)]
        i += 1
        while n + extra[i % len(rows)] <= target:
            messages += [m for m in rows[i % len(rows)]["messages"] if m["role"] != "system"]
            n += extra[i % len(rows)]
            i += 1
        out.append({"messages": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def mixed_lengths(count: int, longest: int, seed: int = 0) -> list[int]:
    """Long-tailed target lengths: log-normal, median longest/7 (300 of 2048), sigma 1, clipped to 50..longest."""
    rng = random.Random(seed)
    return [min(longest, max(50, round(rng.lognormvariate(math.log(longest / 7), 1.0)))) for _ in range(count)]


def run(cmd: list[str], timeout: float) -> tuple[str | None, str]:
    """Run cmd; (its stdout or None, the end of its stderr or why it stopped)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"stopped at the budget ({timeout:.0f} s)"
    if p.returncode != 0:
        return None, f"exit {p.returncode}: {' '.join(p.stderr.split())[-600:]}"
    return p.stdout, ""


def measure(ctx: dict, side: str, data: str, method: str, sets: dict, first: bool, timeout: float) -> dict:
    """One run, its own process: ftune (`profile_step.py`, ftune train's code) or the TRL script."""
    probes = ["--profile-step", str(PROFILE_STEP), "--sync-step", str(SYNC_STEP)] if first else []
    folder, (jsonl, tokenized) = ctx["folder"], ctx["data"][data]
    if side == "ftune":
        # every step logged, as the TRL script does: per-step losses (free: the clock syncs at each step's end)
        sets = {"method": method, "max_length": ctx["length"], "logging_steps": 1, **sets}
        recipe = tt.recipe(folder, jsonl, "ftune", sets, base=str(ctx["model"]))
        result = folder / "ftune.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(BENCH / "profile_step.py"), str(recipe), "--json", str(result), *probes]
        stdout, error = run(cmd, timeout)
        text = result.read_text() if stdout is not None and result.exists() else None
    else:
        cmd = [sys.executable, str(BENCH / "trl_baseline.py"), "--model", str(ctx["model"]), "--data", str(tokenized),
               "--batch-size", str(tt.BATCH), "--grad-accum", str(tt.ACCUM), "--steps", str(tt.STEPS), "--lr", "2e-4",
               *probes]  # fmt: skip
        cmd += ["--full"] * (method == "full") + ["--qlora"] * (method == "qlora") + ["--fp32"] * (not ctx["cuda"])
        stdout, error = run(cmd, timeout)
        text = stdout.strip().splitlines()[-1] if stdout else None
    return json.loads(text) if text else {"error": error or "no result"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, help="folder for bench.jsonl and the profiles (default: a new temporary one)")
    p.add_argument("--tokenizer", help="a tokenizer folder with a chat template (default: the builtin SmolLM2's)")
    p.add_argument("--repeats", type=int, default=2, help="A B A B pairs of the main comparison")
    p.add_argument("--steps", type=int, help="optimizer steps a run (default 30; 6 with --cpu)")
    p.add_argument("--budget", type=float, default=480, help="seconds for everything; runs that would not fit skip")
    p.add_argument("--variants", default=",".join(dict.fromkeys(v[0] for v in VARIANTS)))
    p.add_argument("--cpu", action="store_true", help="check the script on a CPU: tiny model, short data")
    args = p.parse_args()
    deadline = time.time() + args.budget
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the runs too
    import torch
    from transformers import AutoTokenizer

    from finetune_cli import models

    cuda = torch.cuda.is_available()
    out = args.out or Path(tempfile.mkdtemp(prefix="ftune-gpu-bench-out-"))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or models.resolve("smollm2-135m-instruct"))
    shape, length = (TINY, 512) if args.cpu else (LLAMA_1B, 2048)
    tt.BATCH, tt.ACCUM = (2, 2) if args.cpu else (4, 2)
    tt.STEPS = args.steps or (6 if args.cpu else 30)
    examples = tt.STEPS * tt.BATCH * tt.ACCUM  # one epoch: every step sees new rows
    folder = Path(tempfile.mkdtemp(prefix="ftune-gpu-bench-"))
    ctx = {"folder": folder, "length": length, "cuda": cuda, "data": {}, "counts": {}}
    ctx["model"] = build_model(folder, tokenizer, shape, "cuda" if cuda else "cpu")
    targets = {"rows": [int(length * 0.93)] * examples, "mixed": mixed_lengths(examples, length)}
    for name, lengths in targets.items():
        jsonl = build_data(folder / f"{name}.jsonl", tokenizer, lengths)
        (folder / name).mkdir()
        tokenized, ctx["counts"][name] = tt.tokenize(jsonl, folder / name, str(ctx["model"]), length)
        ctx["data"][name] = (jsonl, tokenized)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    peak = tt.matmul_peak("bfloat16", device="cuda") if cuda else tt.matmul_peak("float32")
    if cuda:
        torch.cuda.empty_cache()  # what building the model and the peak took goes back to the runs
    wanted = set(args.variants.split(","))
    plan = []  # (variant, data, method, sets, side)
    for name, data, method, sets, sides in VARIANTS:
        if name in wanted:
            for side in sides or ("ftune", "trl") * args.repeats:
                plan.append((name, data, method, sets, side))
    results, walls = [], []
    jsonl_out = out / "bench.jsonl"
    for name, data, method, sets, side in plan:
        entry = {"variant": name, "data": data, "method": method, "side": side, "sets": sets}
        default = next((r for r in results if r["variant"] in ("main", "mixed") and r["data"] == data and
                        r["side"] == "ftune" and "settings" in r), None)  # fmt: skip
        left = deadline - time.time()
        if sets and default and all(default["settings"].get(k) == v for k, v in sets.items()):
            entry["skipped"] = "the defaults"
        elif walls and max(walls) > left:
            entry["skipped"] = f"budget: {left:.0f} s left, a run takes up to {max(walls):.0f} s"
        else:
            first = not any(r["side"] == side and "steps" in r for r in results)
            started = time.time()
            entry.update(measure(ctx, side, data, method, sets, first, left))
            entry["wall_seconds"] = round(time.time() - started, 1)
            walls.append(entry["wall_seconds"])
            if entry.get("profile"):
                (out / f"profile-{side}.txt").write_text(entry["profile"])
            if entry.get("timed_seconds"):
                work = {"tokens": entry["timed_tokens"], "learned": entry["timed_learned_tokens"],
                        "lengths": entry["timed_lengths"]}  # fmt: skip
                flops = tt.useful_flops(work, shape, len(tokenizer), full=method == "full")
                entry["mfu"] = flops / entry["timed_seconds"] / 1e12 / peak
        results.append(entry)
        with jsonl_out.open("a") as f:
            f.write(json.dumps({k: v for k, v in entry.items() if k not in ("profile", "timed_lengths")}) + "\n")
        rate = f"{entry['learned_per_s']:,.0f} learned tokens/s" if entry.get("learned_per_s") else None
        print(f"[{args.budget - (deadline - time.time()):5.0f} s] {name} {data} {method} {side} {sets or ''}: "
              f"{entry.get('skipped') or entry.get('error') or rate}", file=sys.stderr, flush=True)  # fmt: skip
    report(results, ctx, shape, device, peak, out)


def report(results: list[dict], ctx: dict, shape: dict, device: str, peak: float, out: Path) -> None:
    ran = [r for r in results if r.get("learned_per_s")]
    mem = "allocated_mib" if ctx["cuda"] else "rss_mib"
    print(f"## Training throughput on a GPU: ftune vs a plain TRL script ({device})\n")
    datasets = "; ".join(
        f"{name}: {c['examples']} conversations, {c['tokens']:,} tokens ({c['learned']:,} learned), lengths "
        f"{min(c['lengths'])}-{max(c['lengths'])}, median {statistics.median(c['lengths']):.0f}"
        for name, c in ctx["counts"].items()
    )
    print(
        f"Model: random-init Llama, {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, bf16 weights, "
        f"LoRA r 16 on all linear layers. Data ({datasets}). {tt.STEPS} steps of {tt.BATCH} x {tt.ACCUM}; figures of "
        f"steps {FIRST_TIMED}-{tt.STEPS} (CUDA synchronized at each step's end), warm-up = steps 1-"
        f"{FIRST_TIMED - 1} with compiling. Baseline: `benchmarks/trl_baseline.py`, TRL's defaults (padded batches, "
        f"gradient checkpointing). Each run its own process, in the order listed. "
        f"{'bf16' if ctx['cuda'] else 'fp32'} matmul peak measured here: {peak:.3g} TFLOP/s.\n"
    )
    print("| variant | data | method | side | settings | learned tokens/s | warm-up s | peak allocated MiB | "
          "peak reserved MiB | final loss | host syncs | MFU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        head = f"| {r['variant']} | {r['data']} | {r['method']} | {r['side']} | {label(r['sets']) or 'defaults'}"
        if not r.get("learned_per_s"):
            print(f"{head} | {r.get('skipped') or r.get('error', 'no figures')} | | | | | | |")
            continue
        pk = r["peak"]
        s = r.get("settings", {})
        resolved = f"packing {s.get('packing')}, gc {s.get('gradient_checkpointing')}, compile {s.get('compile')}"
        print(f"{head} ({resolved}) | {r['learned_per_s']:,.0f} | {r['warmup_seconds']:.1f} | "
              f"{pk.get('allocated_mib', pk['rss_mib']):,.0f} | {pk.get('reserved_mib', pk['rss_mib']):,.0f} | "
              f"{r['losses'][-1]:.4f} | {'' if r['host_syncs'] is None else r['host_syncs']} | "
              f"{100 * r['mfu']:.1f}% |")  # fmt: skip

    def med(rows, key):
        return statistics.median(key(r) for r in rows) if rows else None

    print("\nftune / TRL, medians of each side's runs of the same data and method:\n")
    line = None

    def key(r):
        return r["variant"], r["data"], r["method"], label(r["sets"])

    for variant, data, method, sets in dict.fromkeys(key(r) for r in ran):
        ours = [r for r in ran if r["side"] == "ftune" and key(r) == (variant, data, method, sets)]
        base = [r for r in ran if r["side"] == "trl" and (r["data"], r["method"]) == (data, method)]
        if not ours or not base:
            continue
        speed = med(ours, lambda r: r["learned_per_s"]) / med(base, lambda r: r["learned_per_s"])
        memory = med(ours, lambda r: r["peak"].get(mem)) / med(base, lambda r: r["peak"].get(mem))
        a, b = med(ours, lambda r: r["losses"][-1]), med(base, lambda r: r["losses"][-1])
        gap = max(abs(x - y) / abs(y) for x, y in zip(ours[0]["losses"], base[0]["losses"]) if None not in (x, y))
        order = "same" if ours[0]["batch_learned"] == base[0]["batch_learned"] else "DIFFERENT"
        print(f"- {variant} {sets or 'defaults'} ({data}, {method}): learned "
              f"tokens/s **{speed:.2f}x**, peak memory {memory:.2f}x, final loss {a:.4f} vs {b:.4f}; per-step losses "
              f"(first runs) differ by at most {100 * gap:.2f}% (step 1: {ours[0]['losses'][0]:.4f} vs "
              f"{base[0]['losses'][0]:.4f}): {'equal' if gap <= LOSS_TOLERANCE else 'NOT equal'} within "
              f"{100 * LOSS_TOLERANCE:.0f}%; data order {order} (learned tokens of every micro-batch)")  # fmt: skip
        if variant == "main":
            day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
            line = (f"GPU LoRA 1B ({device}, {day}): ftune/TRL learned tokens/s {speed:.2f}x, peak memory "
                    f"{memory:.2f}x, final loss {a:.4f} vs {b:.4f}")  # fmt: skip
    main_runs = [r for r in ran if r["variant"] == "main"]
    for side in ("ftune", "trl"):
        first = next((r for r in main_runs if r["side"] == side), None)
        if first:
            print(f"\nLoss per step, {side}'s first run: {[round(x, 4) for x in first['losses']]}")
            if first.get("sync_sites"):
                print(f"Host syncs of step {SYNC_STEP} by place ({side}): {first['sync_sites']}")
    for side in ("ftune", "trl"):
        path = out / f"profile-{side}.txt"
        if path.exists():
            print(f"\n### Top kernels of step {PROFILE_STEP}, {side} (torch.profiler)\n\n```")
            print("\n".join(path.read_text().splitlines()[:22]))
            print("```")
    print(f"\n{line or 'GPU LoRA 1B: the main comparison did not finish'}")
    if not ctx["cuda"]:
        print("(--cpu: a check of the script on a tiny model, not a measurement)")


def label(sets: dict) -> str:
    return json.dumps(sets) if sets else ""


if __name__ == "__main__":
    main()
