"""Data at scale: `ftune validate`, tokenization (cold and from the cache) and the first training step on generated
sets of mixed-length conversations, as JSONL and as Parquet; wall seconds and peak RSS of each, one process each.

Run: python benchmarks/data_scale.py [--sizes 50000,200000] [--work DIR]   (prints a Markdown section)
     python benchmarks/data_scale.py --sizes 1000000 --formats jsonl --validate-only   (validate alone)
     python benchmarks/data_scale.py --sizes 10000,1000000 --stream   (training on an hf: stream, 2 steps)

The training step uses a tiny random 2-layer Llama with SmolLM2's tokenizer and chat template (the data path is
what is measured, not the model): its peak RSS is the data's share plus torch's and the model's small one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FTUNE = [sys.executable, "-m", "finetune_cli"]
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part "
    "model data token learn train answer question river mountain city garden music paper window engine planet"
).split()

TOKENIZE = """
import json, resource, sys, time
def cpu():  # this process and the workers it has reaped
    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
               for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
from finetune_cli import models, recipe as recipes
from finetune_cli.data import cache, jsonl
r = recipes.load(sys.argv[1])
c0, t1 = cpu(), time.perf_counter()
train, evals, _ = jsonl.load(r.data, r.training.seed)
c1, t2 = cpu(), time.perf_counter()
tok = models.load_tokenizer(models.resolve(r.model.base), r.model.chat_template)
c2, t3 = cpu(), time.perf_counter()
examples, stats = cache.tokenize(tok, train, r.data.max_length, r.data.train_on)
c3, t4 = cpu(), time.perf_counter()
print(json.dumps({"read": t2 - t1, "tokenize": t4 - t3, "read_cpu": c1 - c0, "tokenize_cpu": c3 - c2,
                  "cache": stats["cache"], "examples": stats["examples"], "tokens": stats["tokens"],
                  "truncated": stats["truncated"]}))
"""


def conversations(n: int, seed: int = 0):
    """`n` distinct conversations: 1-4 exchanges, user turns ~30 words, replies ~80 (exponential), one in 50 a
    long reply past max_length, half with a system message."""
    rng = random.Random(seed)

    def text(mean: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(int(rng.expovariate(1 / mean)) + 3))

    for i in range(n):
        messages = [{"role": "system", "content": f"You are assistant number {i}."}] if i % 2 else []
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
            messages.append({"role": "user", "content": f"{i}: {text(30)}"})
            messages.append({"role": "assistant", "content": text(1500 if rng.random() < 0.02 else 80)})
        yield {"messages": messages}


def write_data(folder: Path, n: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": folder / "train.jsonl", "parquet": folder / "train.parquet"}
    if all(p.exists() for p in paths.values()):
        return paths
    writer, batch = None, []
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        for conv in conversations(n):
            f.write(json.dumps(conv) + "\n")
            batch.append(conv)
            if len(batch) == 10_000:
                table = pa.Table.from_pylist(batch)
                writer = writer or pq.ParquetWriter(paths["parquet"], table.schema)
                writer.write_table(table)
                batch = []
        if batch:
            table = pa.Table.from_pylist(batch)
            writer = writer or pq.ParquetWriter(paths["parquet"], table.schema)
            writer.write_table(table)
    writer.close()
    return paths


def tiny_model(folder: Path) -> Path:
    """A 2-layer random Llama with the builtin model's tokenizer (as tests/conftest.py builds one), made in a child
    process: this one stays small, and a child's peak RSS starts from its parent's size at fork."""
    if not (folder / "config.json").exists():
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.data_scale import make_model; "
        subprocess.run([sys.executable, "-c", code + f"make_model({str(folder)!r})"], check=True)
    return folder


def make_model(folder: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from finetune_cli import models

    tok = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def recipe(folder: Path, data: Path, model: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        f"model:\n  base: {model}\ndata:\n  train: {data}\n  max_length: 1024\n"
        "training:\n  max_steps: 1\n  batch_size: 4\n  save_steps: null\n"
        f"output:\n  dir: {folder / ('run-' + name)}\n",
        encoding="utf-8",
    )
    return path


def run(args: list[str], env: dict) -> dict:
    """Wall seconds, peak RSS (MiB) and stdout of one child process, reaped with wait4 so that the RSS is its own
    (not the largest of all children so far, as RUSAGE_CHILDREN would say); and the peak PSS of the child with
    its own children (tokenizing workers), sampled twice a second: the memory they take together."""
    peak, stop = [0], threading.Event()

    def sample(pid: int) -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], sum(pss(p) for p in tree(pid)))
            stop.wait(0.5)

    t = time.perf_counter()
    with open(os.devnull, "w") as null:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=null, text=True)
        sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
        sampler.start()
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
    return {
        "seconds": time.perf_counter() - t,
        "cpu": usage.ru_utime + usage.ru_stime,  # wait4: the child's and its reaped workers' together
        "rss": usage.ru_maxrss / 1024,
        "pss": peak[0] / 2**20,
        "out": out,
        "code": proc.returncode,
    }


def tree(pid: int) -> list[int]:
    """The process and its descendants, from /proc/PID/task/*/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages divided among their processes), from smaps_rollup: cheap
    to read twice a second, unlike smaps; 0 for a process that has gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,50000,200000")  # 1,000: what does not grow with the data
    parser.add_argument("--work", default="/tmp/ftune-data-scale")
    parser.add_argument("--formats", default="jsonl,parquet")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--validate-only", action="store_true", help="measure `ftune validate` alone")
    parser.add_argument("--stream", action="store_true", help="train 2 steps on each set as a streamed hf: source")
    parser.add_argument("--report", action="store_true", help="print the report of the results in --work")
    parser.add_argument("--rerun-train", action="store_true", help="measure the training steps of --work again")
    args = parser.parse_args()
    work = Path(args.work)
    base_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.report:
        report(json.loads((work / "results.json").read_text()), work)
        return
    if args.rerun_train:  # the training step again for every row measured, from the caches they left
        rows = json.loads((work / "results.json").read_text())
        for r in rows:
            folder = work / str(r["n"])
            env = {**base_env, "FTUNE_HOME": str(folder / f"home-{r['format']}")}
            r["train"] = run([*FTUNE, "train", str(folder / f"{r['format']}.yaml"), "--overwrite"], env)
            assert r["train"]["code"] == 0, r["train"]
        (work / "results.json").write_text(json.dumps(rows, indent=1, default=str))
        report(rows, work)
        return
    model = tiny_model(work / "tiny-llama")
    if args.stream:
        streamed(work, model, [int(s) for s in args.sizes.split(",")], args.formats.split(","), base_env)
        return
    rows = []
    if args.validate_only:
        print("| examples | source | file MiB | `ftune validate` s, wall / CPU | peak MiB, RSS / PSS of the tree |")
        print("|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        folder = work / str(n)
        t = time.perf_counter()
        paths = write_data(folder, n)
        generated = time.perf_counter() - t
        for fmt, data in ((f, paths[f]) for f in args.formats.split(",")):
            path = recipe(folder, data, model, fmt)
            home = folder / f"home-{fmt}"
            subprocess.run(["rm", "-rf", str(home)], check=True)
            env = {**base_env, "FTUNE_HOME": str(home)}
            validate = run([*FTUNE, "validate", str(path), "--json"], env)
            assert validate["code"] == 0, validate
            validated = json.loads(validate["out"])
            if args.validate_only:
                rows.append({"n": n, "format": fmt, "size_mib": data.stat().st_size / 2**20, "validate": validate})
                rows[-1]["validate_tokens"] = validated["stats"]["tokens"]
                print(
                    f"| {n:,} | {fmt} | {rows[-1]['size_mib']:.0f} | {validate['seconds']:.1f} / {validate['cpu']:.1f} "
                    f"| {validate['rss']:,.0f} / {validate['pss']:,.0f} |"
                )
                continue
            cold = run([sys.executable, "-c", TOKENIZE, str(path)], env)
            hit = run([sys.executable, "-c", TOKENIZE, str(path)], env)
            cold_out, hit_out = json.loads(cold["out"]), json.loads(hit["out"])
            assert cold_out["cache"] == "miss" and hit_out["cache"] == "hit", (cold_out, hit_out)
            train = None if args.skip_train else run([*FTUNE, "train", str(path), "--overwrite"], env)
            if train:
                assert train["code"] == 0, train
            rows.append(
                {
                    "n": n,
                    "format": fmt,
                    "size_mib": data.stat().st_size / 2**20,
                    "generated": generated,
                    "validate": validate,
                    "validate_tokens": validated["stats"]["tokens"],
                    "cold": cold,
                    "cold_out": cold_out,
                    "hit": hit,
                    "hit_out": hit_out,
                    "train": train,
                }
            )
            (work / "results.json").write_text(json.dumps(rows, indent=1, default=str))  # a crash keeps what ran
            print(json.dumps({k: v for k, v in rows[-1].items() if k in ("n", "format")}), file=sys.stderr)
    if not args.validate_only:
        report(rows, work)


def streamed(work: Path, model: Path, sizes: list[int], formats: list[str], env: dict) -> None:
    """`ftune train` of 2 steps on each set as an `hf:` source with `streaming: true` (a dataset folder holding
    the one file), the default shuffle buffer of 10,000 rows: the start and the memory should not grow with the set."""
    print("| examples | source | file MiB | `ftune train`, 2 steps: wall s / CPU s | peak MiB, RSS / PSS of the tree |")
    print("|---|---|---|---|---|")
    for n in sizes:
        folder = work / str(n)
        paths = write_data(folder, n)
        for fmt in formats:
            hub = folder / f"hub-{fmt}"
            hub.mkdir(exist_ok=True)
            if not (hub / paths[fmt].name).exists():
                os.link(paths[fmt], hub / paths[fmt].name)  # the same bytes, alone in a dataset folder
            path = folder / f"stream-{fmt}.yaml"
            path.write_text(
                f"model:\n  base: {model}\ndata:\n  train:\n    - path: hf:{hub}\n      streaming: true\n"
                "  max_length: 1024\ntraining:\n  max_steps: 2\n  batch_size: 4\n  save_steps: null\n"
                f"output:\n  dir: {folder / ('run-stream-' + fmt)}\n",
                encoding="utf-8",
            )
            train = run([*FTUNE, "train", str(path), "--overwrite", "--samples", "0"], env)
            assert train["code"] == 0, train
            size = paths[fmt].stat().st_size / 2**20
            print(
                f"| {n:,} | {fmt} | {size:.0f} | {train['seconds']:.1f} / {train['cpu']:.1f} "
                f"| {train['rss']:,.0f} / {train['pss']:,.0f} |",
                flush=True,
            )


def report(rows: list[dict], work: Path) -> None:
    import platform

    print("## Data at scale (validate, tokenize, first step)\n")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, shared with other work while measuring (absolute "
        "seconds vary with its load). Data: `benchmarks/data_scale.py`, distinct generated conversations of 1-4 "
        "exchanges (user turns ~30 words, replies ~80, one in 50 a ~1,500-word reply), half with a system "
        "message; SmolLM2's tokenizer and chat template, `max_length` 1024. The training step is one optimizer "
        "step of batch 4 (LoRA) on a tiny random 2-layer Llama with SmolLM2's 49k vocabulary, reading the cache "
        "that the tokenizing runs filled; its memory beyond the data's is the step's activations (mostly the "
        "logits of a 49k vocabulary), which follow the lengths of the 4 examples it drew. Each cell is one "
        "fresh process (`python -m finetune_cli ...`, or a script calling `jsonl.load` and `cache.tokenize`).\n"
    )
    print("Seconds, wall / CPU (CPU: the process and its tokenizing workers together; each includes start-up):\n")
    print(
        "| examples | source | file MiB | tokens | `ftune validate` | tokenize cold | of it reading, tokenizing "
        "| from the cache | of it reading, loading | first training step (tokens in the step) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")

    def both(cell: dict) -> str:
        return f"{cell['seconds']:.1f} / {cell['cpu']:.1f}" if "cpu" in cell else f"{cell['seconds']:.1f}"

    for r in rows:
        cold, hit, train = r["cold_out"], r["hit_out"], r["train"]
        run_json = work / str(r["n"]) / f"run-{r['format']}" / "run.json"
        seen = json.loads(run_json.read_text())["tokens_seen"] if train and run_json.exists() else None
        print(
            f"| {r['n']:,} | {r['format']} | {r['size_mib']:.0f} | {cold['tokens']:,} | {both(r['validate'])} "
            f"| {both(r['cold'])} | {cold['read']:.1f}, {cold['tokenize']:.1f} "
            f"| {both(r['hit'])} | {hit['read']:.1f}, {hit['tokenize']:.1f} | "
            + (f"{both(train)} ({seen:,}) |" if train else "- |")
        )
    print("\nPeak memory, MiB: the process's RSS / the PSS of it and its tokenizing workers together:\n")
    print("| examples | source | `ftune validate` | tokenize cold | from the cache | first training step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [r[k] for k in ("validate", "cold", "hit", "train")]
        shown = [f"{c['rss']:,.0f} / {c['pss']:,.0f}" if c else "-" for c in cells]
        print(f"| {r['n']:,} | {r['format']} | " + " | ".join(shown) + " |")
    print("\nCPU milliseconds per example (the whole process for validate, at 1,000 examples mostly start-up):\n")
    print("| examples | source | `ftune validate` | reading | tokenizing |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "cpu" not in r["validate"]:
            continue
        cells = (r["validate"]["cpu"], r["cold_out"]["read_cpu"], r["cold_out"]["tokenize_cpu"])
        print(f"| {r['n']:,} | {r['format']} | " + " | ".join(f"{1000 * x / r['n']:.2f}" for x in cells) + " |")
    print()


if __name__ == "__main__":
    main()
