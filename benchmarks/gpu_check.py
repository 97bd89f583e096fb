"""Every CUDA path through the ftune CLI, then the GPU benchmark, in one run of a few minutes (issue 22).

On the GPU box, from the repository root: `bash benchmarks/gpu_check.sh OUT` (installs carried wheels, then
runs this). What it does, each command a subprocess of the real CLI with its own time limit:
- builds a random-init model of SmolLM2-135M's shape from a tokenizer folder (default: the builtin model's;
  no weights need to travel), and writes recipes for the quickstart data;
- in parallel chains (the GPU holds them all): LoRA (precision auto = bf16), QLoRA nf4, full fine-tuning and
  prompt tuning, each trained then `eval --compare-base`, `generate` and, for the adapters, `merge-adapter`
  and `eval` of the merged model; `eval --generate` and `ftune serve` (one request) on the LoRA run; fp16 with
  paged 8-bit AdamW and gradient checkpointing, QLoRA 8-bit, DPO, Liger kernels and `training.compile`;
- then `benchmarks/gpu_throughput.py` (issue 31: a ~1B Llama, ftune vs the plain TRL script, step-timed, LoRA
  variants, QLoRA and full) with whatever time is left.
Writes OUT/results.json (each step: command, exit code, seconds, the end of its output, what it checked),
OUT/check.log, OUT/bench.md, OUT/bench.jsonl, OUT/profile-*.txt and OUT/runs.tar.gz (run.json, metrics.jsonl,
eval.json, logs of every run). `--no-functional`: the benchmark alone, with the whole budget (issue 31's run).
`--cpu`: the same on a CPU with a 2-layer model and the CPU-only steps, to check this script before a GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FTUNE = [sys.executable, "-m", "finetune_cli"]
DATA = ROOT / "recipes/data"
SMOL = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3}  # fmt: skip
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # fmt: skip
PROMPT = "Hi, this is Omar Khan. I'd like 4 green lamps delivered to Oslo by Sunday, please."

results: list[dict] = []
OUT, ENV = Path("."), {}
lock = threading.Lock()
start = time.time()


def log(text: str) -> None:
    with lock:
        print(f"[{time.time() - start:6.1f}s] {text}", flush=True)


def build_model(folder: Path, tokenizer_dir: str, shape: dict) -> Path:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=end, pad_token_id=tok.pad_token_id,
                         **shape)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=end)
    path = folder / "smol-random"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def recipe(folder: Path, name: str, base: Path, method: dict, training: dict, data: str = "quickstart") -> Path:
    train = {"max_steps": 8, "batch_size": 8, "learning_rate": 1e-3, "logging_steps": 2, "save_steps": 4,
             "seed": 42, **training}  # fmt: skip
    text = {
        "model": {"base": str(base)},
        "data": {"train": str(DATA / data / "train.jsonl"), "eval": str(DATA / data / "eval.jsonl"), "max_length": 256},
        "method": method,
        "training": train,
        "output": {"dir": str(folder / "runs" / name)},
    }
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(text, indent=1))  # JSON is YAML
    return path


def step(chain: str, name: str, argv: list[str], timeout: float, check=None) -> bool:
    """Run one command; record exit code, time, output tail and the check's verdict."""
    t = time.time()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        rc, out = p.returncode, p.stdout[-3000:] + "\n--- stderr ---\n" + p.stderr[-4000:]
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", f"{(e.stdout or b'')[-2000:]!r}\n{(e.stderr or b'')[-3000:]!r}"
    entry = {"chain": chain, "step": name, "argv": argv[3:] if argv[:3] == FTUNE else argv, "rc": rc,
             "seconds": round(time.time() - t, 1), "output": out}  # fmt: skip
    if rc == 0 and check is not None:
        try:
            entry["check"] = check(p.stdout)
        except Exception as exc:  # noqa: BLE001 - a failed check is a result, not a crash
            entry["rc"], entry["check"] = "check failed", repr(exc)
    record(entry)
    log(f"{chain}/{name}: rc={entry['rc']} {entry['seconds']}s {entry.get('check', '')}")
    return entry["rc"] == 0


def record(entry: dict) -> None:
    """Add a step's result and rewrite results.json: whatever stops this run, what ran is on record."""
    with lock:
        results.append(entry)
        (OUT / "results.json").write_text(json.dumps({"environment": ENV, "steps": results}, indent=1, default=str))


def last_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])


def train_check(expect_precision: str | None):
    def check(stdout):
        info = last_json(stdout)
        run = json.loads(Path(info["run_dir"], "run.json").read_text())
        keys = ("status", "device", "precision", "steps", "first_loss", "final_loss", "peak_gpu_memory_mib",
                "train_seconds", "eval_before", "eval_after", "trainable_parameters")  # fmt: skip
        got = {k: run.get(k) for k in keys}
        assert run.get("status") == "completed", run.get("status")
        if expect_precision:
            assert str(run.get("precision")) == expect_precision, run.get("precision")
        return got

    return check


def eval_check(stdout):
    out = last_json(stdout)
    return {k: v for k, v in out.items() if k in ("perplexity", "base_perplexity", "results", "evaluations")} or out


def merged_check(folder: Path):
    def check(_stdout):
        config = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in config, "merged model still quantized"
        from safetensors import safe_open

        dtypes = set()
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as s:
                dtypes |= {str(s.get_slice(k).get_dtype()) for k in list(s.keys())[:50]}
        return {"dtype": config.get("dtype", config.get("torch_dtype")), "tensor_dtypes": sorted(dtypes)}

    return check


def serve(chain: str, target: Path, timeout: float) -> None:
    """`ftune serve` on a free port; one chat completion; the server stopped."""
    t = time.time()
    port = 18000 + os.getpid() % 1000
    proc = subprocess.Popen([*FTUNE, "serve", str(target), "--port", str(port)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    entry = {"chain": chain, "step": "serve", "argv": ["serve", str(target)], "rc": "timeout"}
    try:
        while time.time() - t < timeout:
            try:
                models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2))
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("server exited") from None
                time.sleep(1)
        body = {"model": models["data"][0]["id"], "max_tokens": 16,
                "messages": [{"role": "user", "content": PROMPT}]}  # fmt: skip
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        reply = json.load(urllib.request.urlopen(req, timeout=60))
        entry["rc"], entry["check"] = 0, {"models": [m["id"] for m in models["data"]], "usage": reply.get("usage"),
                                          "finish_reason": reply["choices"][0]["finish_reason"]}  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        entry["rc"], entry["check"] = "failed", repr(exc)
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
        entry["output"], entry["seconds"] = (out or "")[-3000:], round(time.time() - t, 1)
    record(entry)
    log(f"{chain}/serve: rc={entry['rc']} {entry['check']}")


def chains(folder: Path, base: Path, cpu: bool) -> dict:
    lora = {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
    qlora = {**lora, "name": "qlora", "bits": 4, "quant_type": "nf4"}
    auto = "fp32" if cpu else "bf16"
    T = 150  # seconds per command at most

    def trained(chain, name, method, training=None, data="quickstart", precision=auto):
        path = recipe(folder, name, base, method, training or {}, data)
        ok = step(chain, f"train {name}", [*FTUNE, "train", str(path), "--json"], T, train_check(precision))
        return ok, folder / "runs" / name

    def common(chain, run, adapter: bool):
        step(chain, "eval --compare-base", [*FTUNE, "eval", str(run), "--compare-base", "--json"], T, eval_check)
        step(chain, "generate", [*FTUNE, "generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "24"], T)
        if adapter:
            merged = folder / f"merged-{run.name}"
            if step(chain, "merge-adapter", [*FTUNE, "merge-adapter", str(run), "-o", str(merged), "--dtype",
                                              "bfloat16", "--json"], T, merged_check(merged)):  # fmt: skip
                evals = str(DATA / "quickstart/eval.jsonl")
                step(chain, "eval merged", [*FTUNE, "eval", str(merged), "--data", evals, "--json"], T, eval_check)

    def chain_lora():
        ok, run = trained("lora", "lora", lora)
        if ok:
            common("lora", run, True)
            step("lora", "eval --generate", [*FTUNE, "eval", str(run), "--generate", "--compare-base",
                                             "--max-new-tokens", "32", "--json"], T, eval_check)  # fmt: skip
            serve("lora", run, T)

    def chain_qlora():
        ok, run = trained("qlora", "qlora-nf4", qlora)
        if ok:
            common("qlora", run, True)
        if not cpu:
            trained("qlora", "qlora-8bit", {**qlora, "bits": 8})

    def chain_full():
        ok, run = trained("full", "full", {"name": "full"}, {"learning_rate": 1e-4})
        if ok:
            common("full", run, False)

    def chain_prompt():
        ok, run = trained("prompt", "prompt-tuning", {"name": "prompt_tuning", "num_virtual_tokens": 16},
                          {"learning_rate": 3e-2})  # fmt: skip
        if ok:
            common("prompt", run, False)

    def chain_extras():
        if not cpu:
            trained("extras", "lora-fp16-paged8bit-gc", lora, {"precision": "fp16", "optimizer": "paged_adamw_8bit",
                    "gradient_checkpointing": True}, precision="fp16")  # fmt: skip
        dpo = {"objective": "dpo", "beta": 0.1, "eval_steps": 4, "learning_rate": 2e-4}
        ok, run = trained("extras", "dpo", lora, dpo, data="preference")
        if ok:
            step("extras", "eval pairs", [*FTUNE, "eval", str(run), "--compare-base", "--json"], T, eval_check)
        if not cpu:
            trained("extras", "lora-liger", lora, {"liger": True})
        trained("extras", "lora-compile", lora, {"compile": True})

    return {"lora": chain_lora, "qlora": chain_qlora, "full": chain_full, "prompt": chain_prompt,
            "extras": chain_extras}  # fmt: skip


def environment() -> dict:
    import importlib.metadata as md

    import torch

    env = {"python": sys.version.split()[0], "cuda": torch.cuda.is_available()}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "liger-kernel",
                 "pyarrow", "pandas", "fsspec", "huggingface-hub", "tokenizers", "pydantic", "triton"):  # fmt: skip
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    if env["cuda"]:
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = torch.cuda.get_device_capability()
        env["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the builtin model's)")
    p.add_argument("--budget", type=float, default=470, help="seconds for everything, the benchmark included")
    p.add_argument("--functional", type=float, default=200, help="seconds for the functional chains at most")
    p.add_argument("--cpu", action="store_true", help="check the script on a CPU (tiny model, no CUDA steps)")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--no-functional", action="store_true", help="skip the CLI chains: the benchmark alone")
    args = p.parse_args()
    global OUT, ENV
    out = OUT = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # a new folder each time: the runs and merges below never replace anything (no --overwrite)
    folder = Path(tempfile.mkdtemp(prefix="ftune-gpu-check-", dir=os.environ.get("GPU_CHECK_DIR")))
    os.environ.setdefault("FTUNE_HOME", str(folder / "home"))
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ["PYTHONUNBUFFERED"] = "1"
    env = ENV = environment()
    log(f"environment: {json.dumps(env)}")
    tokenizer = args.tokenizer
    if tokenizer is None:
        sys.path.insert(0, str(ROOT))
        from finetune_cli import models

        tokenizer = models.resolve("smollm2-135m-instruct")
    todo = {}
    if not args.no_functional:
        base = build_model(folder, tokenizer, TINY if args.cpu else SMOL)
        log(f"model built at {base}")
        todo = chains(folder, base, args.cpu)
    threads = [threading.Thread(target=fn, name=name) for name, fn in todo.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, start + args.functional - time.time()))
    late = [t.name for t in threads if t.is_alive()]
    if late:
        log(f"functional phase over its {args.functional:.0f} s; still running: {late}")

    left = start + args.budget - time.time()
    if not args.no_bench and left > 60:
        argv = [sys.executable, str(ROOT / "benchmarks/gpu_throughput.py"), "--out", str(out), "--tokenizer",
                tokenizer, "--budget", str(int(left - 30))] + ["--cpu"] * args.cpu  # fmt: skip
        log(f"benchmark with {left:.0f} s left")
        with open(out / "bench.md", "w") as md, open(out / "bench.err", "w") as err:  # written as it goes
            try:
                p = subprocess.run(argv, stdout=md, stderr=err, timeout=left, cwd=ROOT)
                bench = f"exit {p.returncode}"
            except subprocess.TimeoutExpired:
                bench = f"stopped at the budget ({left:.0f} s)"
        log(f"benchmark: {bench}")
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for f in sorted((folder / "runs").glob("*/*")):
            if f.is_file() and f.suffix in (".json", ".jsonl", ".log", ".yaml", ".md"):
                tar.add(f, arcname=str(f.relative_to(folder)))
    failed = [f"{r['chain']}/{r['step']}" for r in results if r["rc"] != 0]
    log(f"done: {len(results)} steps, failed: {failed or 'none'}")


if __name__ == "__main__":
    main()
