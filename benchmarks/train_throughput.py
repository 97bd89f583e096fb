"""Training throughput: `ftune train` against a plain TRL SFTTrainer script, side by side, A B A B.

Workload: LoRA (r 16, all linear layers) on the builtin SmolLM2-135M, one epoch over a mix of short (one
exchange) and long (five exchanges) conversations built from the shipped quickstart data, batch 4 x 2
accumulation, the same seed. Both train on the same learned tokens (ftune's masks, handed to TRL as labels),
so their losses are comparable. Each run is its own process: we report training-loop seconds, learned
tokens per second, peak RSS of the process, the final loss, and the median and spread of several runs.

Then each of ftune's speed switches is flipped alone from its default (one run each, in the same session),
and the machine's matmul peak is measured, to state a CPU "MFU".

Run: python benchmarks/train_throughput.py [--repeats 2] [--features]   (prints a Markdown section)
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
_SCRIPT = Path(sys.executable).parent / "ftune"
FTUNE = [str(_SCRIPT)] if _SCRIPT.exists() else [PY, "-m", "finetune_cli"]  # not installed: run from the checkout
BATCH, ACCUM, SHORT, LONG, TURNS = 4, 2, 16, 16, 5


def build_data(folder: Path) -> Path:
    """SHORT one-exchange and LONG five-exchange conversations, interleaved, from the quickstart train data."""
    rows = [json.loads(line) for line in (ROOT / "recipes/data/quickstart/train.jsonl").read_text().splitlines()]
    out = []
    for i in range(SHORT):
        out.append(rows[i])
    for i in range(LONG):
        pieces = rows[SHORT + i * TURNS : SHORT + (i + 1) * TURNS]
        messages = [pieces[0]["messages"][0]]  # the system prompt once
        for r in pieces:
            messages += [m for m in r["messages"] if m["role"] != "system"]
        out.append({"messages": messages})
    mixed = [out[i // 2] if i % 2 == 0 else out[SHORT + i // 2] for i in range(SHORT + LONG)]
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    return path


def tokenize(
    data: Path, folder: Path, model: str = "smollm2-135m-instruct", max_length: int = 1024
) -> tuple[Path, dict]:
    """ftune's tokenization of the data (for the baseline) and the token counts of one epoch."""
    from finetune_cli import models
    from finetune_cli.data import jsonl
    from finetune_cli.data.masking import IGNORE, tokenize_all

    tok = models.load_tokenizer(models.resolve(model))
    examples, _ = tokenize_all(tok, jsonl.read(data), max_length, "assistant")
    path = folder / "tokenized.jsonl"
    path.write_text("".join(json.dumps({"input_ids": e["input_ids"], "labels": e["labels"]}) + "\n" for e in examples))
    lengths = [len(e["input_ids"]) for e in examples]
    learned = sum(sum(1 for x in e["labels"][1:] if x != IGNORE) for e in examples)
    counts = {"examples": len(examples), "tokens": sum(lengths), "learned": learned, "lengths": lengths}
    return path, {**counts, "vocab": len(tok)}


def recipe(folder: Path, data: Path, name: str, sets: dict, base: str = "smollm2-135m-instruct") -> Path:
    sets = dict(sets)
    dropout, method = sets.pop("dropout", 0.0), sets.pop("method", "lora")
    max_length = sets.pop("max_length", 1024)
    training = {"max_steps": STEPS, "batch_size": BATCH, "gradient_accumulation": ACCUM, "learning_rate": 2e-4,
                "save_steps": None, "warmup_ratio": 0.0, "lr_scheduler": "linear", **sets}  # fmt: skip
    lora = f"method:\n  name: {method}\n  r: 16\n  alpha: 32\n  dropout: {dropout}\n"
    text = (
        f"model:\n  base: {base}\n"
        f"data:\n  train: {data}\n  max_length: {max_length}\n  cache: false\n"
        + ("method:\n  name: full\n" if method == "full" else lora)
        + "training:\n"
        + "".join(f"  {k}: {json.dumps(v) if v is not None else 'null'}\n" for k, v in training.items())
    )
    path = folder / f"{name}.yaml"
    path.write_text(text + f"output:\n  dir: {folder / ('run-' + name)}\n")
    return path


def run(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    """Start `cmd`, wait for it with os.wait4 and return (stdout, peak RSS in MiB)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
        return out.read(), usage.ru_maxrss / 1024


def ftune_run(path: Path, env: dict | None = None) -> dict:
    out, rss = run([*FTUNE, "train", str(path), "--overwrite", "--samples", "0", "--json"], env)
    info = json.loads(out)
    losses = [json.loads(line)["loss"] for line in Path(info["run_dir"], "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]  # fmt: skip
    return {"seconds": info["train_seconds"], "final_loss": info["final_loss"], "rss": rss, "losses": losses,
            "gpu_mib": info.get("peak_gpu_memory_mib")}  # fmt: skip


def baseline_run(model: str, tokenized: Path, fp32: bool, full: bool = False, qlora: bool = False) -> dict:
    cmd = [PY, str(ROOT / "benchmarks/trl_baseline.py"), "--model", model, "--data", str(tokenized)]
    cmd += ["--fp32"] * fp32 + ["--full"] * full + ["--qlora"] * qlora
    cmd += ["--batch-size", str(BATCH), "--grad-accum", str(ACCUM), "--steps", str(STEPS), "--lr", "2e-4"]
    out, rss = run(cmd)
    info = json.loads(out.strip().splitlines()[-1])
    return {"seconds": info["train_seconds"], "final_loss": info["final_loss"], "rss": rss, "bf16": info["bf16"],
            "losses": info["losses"], "gpu_mib": info.get("peak_gpu_mib")}  # fmt: skip


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Best TFLOP/s of an n x n x n matmul in `dtype` on this machine (all threads), or of 8192^3 on a GPU; a
    dtype this CPU only emulates (a 256^3 product taking over 0.1 s) is measured on 512^3 so the benchmark does
    not stall."""
    import torch

    dtype = getattr(torch, dtype_name)
    if device == "cpu":
        sync = lambda: None  # noqa: E731
        t = time.perf_counter()
        torch.randn(256, 256, dtype=dtype) @ torch.randn(256, 256, dtype=dtype)
        if time.perf_counter() - t > 0.1:
            n, repeats = 512, 2
    else:
        sync, n = torch.cuda.synchronize, 8192
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    a @ b
    best = 0.0
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e12)
    return best


SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3}  # fmt: skip


def useful_flops(counts: dict, shape: dict = SMOLLM2, vocab: int = 49152, full: bool = False) -> float:
    """Work a step must do: forward 2 FLOPs per weight per token through the decoder's linear layers and
    backward 2 more for activation gradients (+2 for weight gradients when the weights train, `full`), the LM
    head forward and backward on the learned positions only, and causal attention (QK^T and AV:
    2*layers*d*n^2 forward per sequence, twice that backward). LoRA's own matmuls (r=16) are under 2% and left
    out."""
    d, ff, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linear = layers * (2 * d * d + 2 * d * kv + 3 * d * ff)
    attention = sum(3 * 2 * layers * d * n * n for n in counts["lengths"])
    passes = 6 if full else 4
    return passes * linear * counts["tokens"] + passes * d * vocab * counts["learned"] + attention


def summary(runs: list[dict], key: str) -> tuple[float, float, float]:
    values = [r[key] for r in runs]
    return statistics.median(values), min(values), max(values)


def main() -> None:
    global STEPS
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--features", action="store_true", help="also flip each speed switch alone")
    args = parser.parse_args()
    STEPS = (SHORT + LONG) // (BATCH * ACCUM)  # one epoch: both see every example once, whatever the order

    from finetune_cli import models

    model = models.resolve("smollm2-135m-instruct")
    folder = Path(tempfile.mkdtemp(prefix="ftune-bench-"))
    data = build_data(folder)
    tokenized, counts = tokenize(data, folder)
    default = recipe(folder, data, "ftune", {})

    from finetune_cli.training.methods import cpu_has_native_bf16

    # TRL's default on CPU is bf16 autocast. Without native bf16 (AMX / AVX512-BF16) a bf16 matmul is emulated
    # (measured below): a 4-step run did not finish in 17 minutes, so the baseline here is TRL with bf16=False,
    # the fastest plain TRL setting on such a machine.
    fp32_baseline = not cpu_has_native_bf16()
    ours, base = [], []
    for _ in range(args.repeats):  # A B A B
        ours.append(ftune_run(default))
        base.append(baseline_run(model, tokenized, fp32_baseline))
    for r in ours + base:
        r["learned_per_s"] = counts["learned"] / r["seconds"]

    import torch

    peaks = {name: matmul_peak(name) for name in ("float32", "bfloat16")}
    flops = useful_flops(counts)
    o, b = summary(ours, "learned_per_s"), summary(base, "learned_per_s")
    os_, bs = summary(ours, "seconds"), summary(base, "seconds")
    orss, brss = summary(ours, "rss"), summary(base, "rss")
    ol, bl = summary(ours, "final_loss"), summary(base, "final_loss")
    best_peak = max(peaks.values())
    print("## Training throughput: ftune vs a plain TRL script (CPU, LoRA)\n")
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.backends.cpu.get_cpu_capability()} kernels. Model: builtin SmolLM2-135M, LoRA r 16 on all linear "
        f"layers. Data: {counts['examples']} conversations ({SHORT} of one exchange, {LONG} of {TURNS}), "
        f"{counts['tokens']:,} tokens, {counts['learned']:,} learned, lengths {min(counts['lengths'])}-"
        f"{max(counts['lengths'])}; one epoch = {STEPS} steps of {BATCH} x {ACCUM} accumulation, same seed and "
        f"learning rate, LoRA dropout 0 (PEFT's default). Baseline: `benchmarks/trl_baseline.py`, TRL's defaults, "
        f"padded batches, bf16 autocast {'off (bf16=False: this CPU has no native bf16)' if fp32_baseline else 'on'}"
        f". {args.repeats} runs each, alternating A B A B, each its own process.\n"
    )
    print("| | learned tokens/s (median, min-max) | training seconds | peak RSS MiB | final loss |")
    print("|---|---|---|---|---|")
    for name, s, t, m, loss in (("ftune", o, os_, orss, ol), ("TRL baseline", b, bs, brss, bl)):
        print(f"| {name} | {s[0]:,.0f} ({s[1]:,.0f}-{s[2]:,.0f}) | {t[0]:.1f} ({t[1]:.1f}-{t[2]:.1f}) | "
              f"{m[0]:,.0f} ({m[1]:,.0f}-{m[2]:,.0f}) | {loss[0]:.4f} ({loss[1]:.4f}-{loss[2]:.4f}) |")  # fmt: skip
    print(
        f"\nRatio ftune / baseline: **{o[0] / b[0]:.2f}x** learned tokens/s, peak RSS {orss[0] / brss[0]:.2f}x. "
        f"Loss per step, first run: ftune {[round(x, 3) for x in ours[0]['losses']]}, "
        f"baseline {[round(x, 3) for x in base[0]['losses']]}.\n"
    )
    speed, memory, loss_gap = o[0] / b[0], orss[0] / brss[0], abs(ol[0] - bl[0]) / bl[0]
    print(
        f"Goals: learned tokens/s at least 2x the baseline's: **{verdict(speed >= 2)}** ({speed:.2f}x); peak "
        f"memory no more than the baseline's: **{verdict(memory <= 1)}** ({memory:.2f}x); the same final loss "
        f"(within 1%): **{verdict(loss_gap <= 0.01)}** ({ol[0]:.4f} vs {bl[0]:.4f}).\n"
    )
    native = peaks["bfloat16"] > peaks["float32"]
    print(
        f"Matmul peak on this machine ({torch.get_num_threads()} threads): float32 {peaks['float32']:.3f} TFLOP/s, "
        f"bfloat16 {peaks['bfloat16']:.4f} TFLOP/s{'' if native else ' (no native bf16: emulated)'}. Useful work "
        f"of the epoch (see `useful_flops`): {flops / 1e12:.2f} TFLOP. Achieved: ftune {flops / os_[0] / 1e12:.3f} "
        f"TFLOP/s = **{100 * flops / os_[0] / 1e12 / best_peak:.1f}% MFU** of the {'bf16' if native else 'fp32'} "
        f"matmul peak; baseline {flops / bs[0] / 1e12:.3f} TFLOP/s = {100 * flops / bs[0] / 1e12 / best_peak:.1f}%.\n"
    )
    if not args.features:
        return
    print("### Each speed switch alone (one run each, learned tokens/s; same workload)\n")
    print("| recipe change from the defaults | learned tokens/s | vs defaults | peak RSS MiB | final loss |")
    print("|---|---|---|---|---|")
    ref = o[0]
    print(f"| (defaults) | {ref:,.0f} | 1.00x | {orss[0]:,.0f} | {ol[0]:.4f} |")
    for label, sets, env in FEATURES:
        if sets.get("precision") == "bf16" and fp32_baseline:
            print(f"| {label} | not run: no native bf16 on this CPU (matmul {peaks['bfloat16']:.4f} TFLOP/s) | | | |")
            continue
        r = ftune_run(recipe(folder, data, "feature", sets), env)
        rate = counts["learned"] / r["seconds"]
        print(f"| {label} | {rate:,.0f} | {rate / ref:.2f}x | {r['rss']:,.0f} | {r['final_loss']:.4f} |")
    print()


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


FEATURES = [
    ("`training.packing: false` (padded batches)", {"packing": False}, None),
    ("`training.packing: false`, `training.group_by_length: true`", {"packing": False, "group_by_length": True}, None),
    ("`training.micro_batch_tokens: null` (whole packed rows)", {"micro_batch_tokens": None}, None),
    ("`training.micro_batch_tokens: 1024`", {"micro_batch_tokens": 1024}, None),
    ("`FTUNE_MALLOC=0` (glibc's default memory release)", {}, {"FTUNE_MALLOC": "0"}),
    ("`method.dropout: 0.05`", {"dropout": 0.05}, None),
    ("`training.precision: bf16` (autocast)", {"precision": "bf16"}, None),
    ("`training.gradient_checkpointing: true`", {"gradient_checkpointing": True}, None),
    ("`training.compile: true`", {"compile": True}, None),
]


if __name__ == "__main__":
    main()
