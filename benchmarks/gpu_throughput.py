"""GPU training throughput: `ftune train` against the plain TRL script on a random-init Llama of about 1B
parameters (TinyLlama's shape: 22 layers, hidden 2048, 32 heads / 4 KV heads, untied embeddings), bf16,
conversations of about 2,048 tokens, LoRA and full fine-tuning, A B A B. No weights are downloaded: the model
is built from a config and saved next to a tokenizer (default: the builtin SmolLM2's, whose vocabulary it
takes). Reports learned tokens/s, peak GPU memory (max allocated), final loss and MFU of the device's
measured bf16 matmul peak. `make bench` runs it when CUDA is available.

QLoRA (nf4, bf16 compute) is compared with the same TRL script loading the model in 4-bit. `switches`: ftune's
LoRA run again with `training.liger: true` (when liger-kernel is installed) and `training.compile: true`, one run
each.

Run: python benchmarks/gpu_throughput.py [--tokenizer DIR] [--repeats 2] [--methods lora,switches,qlora,full]
     [--tiny]   (--tiny: a 2-layer model and short data, to check the script itself on a CPU.)
"""

import argparse
import json
import tempfile
from pathlib import Path

import train_throughput as tt

LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4}  # fmt: skip
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # fmt: skip


def build_model(folder: Path, tokenizer, shape: dict) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = folder / "llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_data(folder: Path, tokenizer, examples: int, length: int) -> Path:
    """Conversations of the quickstart's exchanges under one system prompt, each grown to about `length` tokens."""
    rows = [json.loads(line) for line in (tt.ROOT / "recipes/data/quickstart/train.jsonl").read_text().splitlines()]
    out, i = [], 0
    for _ in range(examples):
        messages = [rows[i % len(rows)]["messages"][0]]
        while len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]) < length * 0.9:
            messages += [m for m in rows[i % len(rows)]["messages"] if m["role"] != "system"]
            i += 1
        out.append({"messages": messages})
    path = folder / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", help="a tokenizer folder with a chat template (default: the builtin SmolLM2's)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", default="lora,switches,qlora,full", help="switches: LoRA with Liger, with compile")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    import torch
    from transformers import AutoTokenizer

    from finetune_cli import models

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or models.resolve("smollm2-135m-instruct"))
    shape, length = (TINY, 256) if args.tiny else (LLAMA_1B, 2048)
    examples, tt.BATCH, tt.ACCUM = args.examples, 4, 2
    tt.STEPS = examples // (tt.BATCH * tt.ACCUM)
    folder = Path(tempfile.mkdtemp(prefix="ftune-gpu-bench-"))
    model = build_model(folder, tokenizer, shape)
    data = build_data(folder, tokenizer, examples, length)
    tokenized, counts = tt.tokenize(data, folder, str(model), length)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU (script check only)"
    peak = tt.matmul_peak("bfloat16", device="cuda") if cuda else tt.matmul_peak("float32")
    print(f"## Training throughput on a GPU: ftune vs a plain TRL script ({device})\n")
    print(
        f"Model: random-init Llama, {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, vocabulary "
        f"{counts['vocab']:,}, bf16 weights. Data: {counts['examples']} conversations, {counts['tokens']:,} tokens "
        f"({counts['learned']:,} learned), lengths {min(counts['lengths'])}-{max(counts['lengths'])}; one epoch = "
        f"{tt.STEPS} steps of {tt.BATCH} x {tt.ACCUM}. Baseline: `benchmarks/trl_baseline.py` with TRL's defaults "
        f"(bf16 autocast, padded batches, gradient checkpointing). {args.repeats} run(s) each, A B A B. "
        f"{'bf16' if cuda else 'fp32'} matmul "
        f"peak measured on this device: {peak:.3g} TFLOP/s.\n"
    )
    header = "peak GPU memory (max allocated) MiB" if cuda else "peak RSS MiB"
    print(f"| method | | learned tokens/s (median, min-max) | {header} | final loss | MFU |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    methods = [m for m in args.methods.split(",") if m not in ("qlora", "switches") or cuda]  # CUDA-only here
    lora = None
    for method in methods:
        try:
            if method == "switches":
                switches(folder, data, model, length, counts, shape, peak, lora)
                continue
            sets = {"method": method, "max_length": length}
            recipe = tt.recipe(folder, data, f"gpu-{method}", sets, base=str(model))
            ours, base = [], []
            for _ in range(args.repeats):
                ours.append(tt.ftune_run(recipe))
                base.append(tt.baseline_run(str(model), tokenized, not cuda, method == "full", method == "qlora"))
        except SystemExit as exc:  # a method that fails is a finding: report it and go on
            print(f"| {method} | failed: {' '.join(str(exc).split())[-300:]} | | | | |", flush=True)
            continue
        flops = tt.useful_flops(counts, shape, counts["vocab"], full=method == "full")
        rates = {}
        for name, runs in (("ftune", ours), ("TRL baseline", base)):
            for r in runs:
                r["learned_per_s"] = counts["learned"] / r["seconds"]
            s, m = tt.summary(runs, "learned_per_s"), tt.summary(runs, "gpu_mib" if cuda else "rss")
            loss = tt.summary(runs, "final_loss")
            seconds = tt.summary(runs, "seconds")[0]
            rates[name] = (s[0], m[0])
            mfu = 100 * flops / seconds / 1e12 / peak
            print(f"| {method} | {name} | {s[0]:,.0f} ({s[1]:,.0f}-{s[2]:,.0f}) | {m[0]:,.0f} | {loss[0]:.4f} | "
                  f"{mfu:.1f}% |")  # fmt: skip
        (o, om), (b, bm) = rates["ftune"], rates["TRL baseline"]
        print(f"| {method} | ratio | **{o / b:.2f}x** | {om / bm:.2f}x | | |", flush=True)
        ratios[method] = o / b
        lora = o if method == "lora" else lora
    goals = "; ".join(f"{m}: **{tt.verdict(r >= 1.5)}** ({r:.2f}x)" for m, r in ratios.items())
    print(f"\nGoal: learned tokens/s at least 1.5x the baseline's. {goals}.\n")


def switches(folder, data, model, length, counts, shape, peak, lora_rate) -> None:
    """ftune's LoRA run with `training.liger: true` (when liger-kernel is installed), then `training.compile: true`,
    one run each, as rows of the table (the ratio is to ftune's LoRA defaults)."""
    import importlib.util

    todo = [("liger", {"liger": True})] * (importlib.util.find_spec("liger_kernel") is not None)
    flops = tt.useful_flops(counts, shape, counts["vocab"])
    for label, extra in [*todo, ("compile", {"compile": True})]:
        recipe = tt.recipe(folder, data, "gpu-switch", {"method": "lora", "max_length": length, **extra},
                           base=str(model))  # fmt: skip
        try:
            r = tt.ftune_run(recipe)
        except SystemExit as exc:
            print(f"| lora + {label} | ftune | failed: {' '.join(str(exc).split())[-300:]} | | | |", flush=True)
            continue
        rate = counts["learned"] / r["seconds"]
        vs = f" ({rate / lora_rate:.2f}x the defaults)" if lora_rate else ""
        print(f"| lora + {label} | ftune | {rate:,.0f}{vs} | {r['gpu_mib'] or r['rss']:,.0f} | {r['final_loss']:.4f} | "
              f"{100 * flops / r['seconds'] / 1e12 / peak:.1f}% |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
