"""`ftune serve` throughput: 8 clients at once vs the same 8 requests one by one, and a lone request's latency.

Starts `ftune serve smollm2-135m-instruct` (the builtin model) on 127.0.0.1, sends 8 different chat requests
(greedy, max_tokens 64) one after the other and then all at once, alternating A B A B, and reports generated tokens
per second of each (usage.completion_tokens over the wall time) and their ratio; the concurrent answers must equal
the one-by-one answers. Then the latency of one request alone against the same reply from `generate.reply` (what
`ftune generate` runs once its model is loaded) in this process, and `ftune generate`'s whole wall time.
Run: python benchmarks/serve_throughput.py [--repeats N]   (prints a Markdown section)
"""

import argparse
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
QUESTIONS = [  # each answer runs past max_tokens, so the 8 decode the same number of steps in both modes
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your holiday.",
    "Explain why the sky is blue.",
    "Describe your favourite meal and how to cook it.",
    "Write a short story about a robot learning to paint.",
    "Explain how bread is made.",
]
LONE = "Tell me about the moon."


def start_server(log: Path) -> tuple[subprocess.Popen, str]:
    ftune = [sys.executable, "-m", "finetune_cli", "serve", MODEL, "--port", "0", "--max-batch", "8"]
    proc = subprocess.Popen(ftune, stdout=subprocess.DEVNULL, stderr=open(log, "w"), cwd=ROOT)  # noqa: SIM115
    deadline = time.time() + 300
    while time.time() < deadline:
        found = re.search(r"ready at (http://\S+)/v1", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise SystemExit(f"the server did not start:\n{log.read_text()}")


def ask(http: httpx.Client, question: str, max_tokens: int) -> tuple[str, int, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
    r = http.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    out = r.json()
    choice = out["choices"][0]
    return choice["message"]["content"], out["usage"]["completion_tokens"], choice["finish_reason"]


def one_by_one(http, max_tokens):
    t = time.perf_counter()
    answers = [ask(http, q, max_tokens) for q in QUESTIONS]
    return answers, time.perf_counter() - t


def together(http, max_tokens):
    t = time.perf_counter()
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(lambda q: ask(http, q, max_tokens), QUESTIONS))
    return answers, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    log = Path(tempfile.mkdtemp(prefix="ftune-serve-bench-")) / "server.log"
    proc, url = start_server(log)
    try:
        with httpx.Client(base_url=url, timeout=600, trust_env=False) as http:
            ask(http, "Hi.", 4)  # warm-up
            rates = {"one": [], "all": []}
            for _ in range(args.repeats):
                seq, seq_s = one_by_one(http, args.max_tokens)
                par, par_s = together(http, args.max_tokens)
                assert [a[0] for a in par] == [a[0] for a in seq], "batched greedy answers differ from one-by-one"
                tokens = sum(a[1] for a in seq)
                at_length = sum(a[2] == "length" for a in seq)
                rates["one"].append((tokens / seq_s, seq_s))
                rates["all"].append((tokens / par_s, par_s))
            lone = []
            for _ in range(3):
                t = time.perf_counter()
                lone_answer, lone_tokens, _ = ask(http, LONE, args.max_tokens)
                lone.append(time.perf_counter() - t)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    batches = [int(b) for b in re.findall(r"batch=(\d+)", log.read_text())]

    from finetune_cli import rundir
    from finetune_cli.inference import generate

    model, tok = rundir.load(MODEL)
    messages = [{"role": "user", "content": LONE}]
    direct = []
    for _ in range(3):
        t = time.perf_counter()
        reply = generate.reply(model, tok, messages, args.max_tokens)
        direct.append(time.perf_counter() - t)
    assert reply == lone_answer, (reply, lone_answer)
    cli = [sys.executable, "-m", "finetune_cli", "generate", MODEL, "--prompt", LONE]
    t = time.perf_counter()
    subprocess.run([*cli, "--max-new-tokens", str(args.max_tokens)], check=True, capture_output=True, cwd=ROOT)
    cli_s = time.perf_counter() - t

    one = statistics.median(r for r, _ in rates["one"])
    allr = statistics.median(r for r, _ in rates["all"])
    ratio = allr / one
    print("## Serving throughput (`ftune serve`)\n")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU, float32, "
        f"torch threads {torch.get_num_threads()} (server and this process). Model: builtin SmolLM2-135M-Instruct. "
        f"Requests: 8 different chat questions, greedy, max_tokens {args.max_tokens}, {tokens} generated tokens in "
        f"all ({at_length} of 8 answers reach max_tokens); `--max-batch 8`. {args.repeats} alternating runs each, "
        "HTTP through httpx on 127.0.0.1.\n"
    )
    print("| requests | generated tokens/s (median) | wall seconds per run |")
    print("|---|---|---|")
    print(f"| 8 one by one | {one:.1f} | {', '.join(f'{s:.1f}' for _, s in rates['one'])} |")
    print(f"| 8 at once (8 clients) | {allr:.1f} | {', '.join(f'{s:.1f}' for _, s in rates['all'])} |")
    print(
        f"\nRatio at once / one by one: **{ratio:.2f}x** (goal >= 3x: **{'met' if ratio >= 3 else 'not met'}**). "
        f"The answers at once equal the answers one by one, word for word. Largest batch seen: {max(batches)}.\n"
    )
    print("| one request alone (`Tell me about the moon.`, "
          f"{lone_tokens} tokens) | seconds (median of 3) |")  # fmt: skip
    print("|---|---|")
    print(f"| `ftune serve`, HTTP request to answer | {statistics.median(lone):.2f} |")
    print(f"| `generate.reply` (what `ftune generate` runs after loading) | {statistics.median(direct):.2f} |")
    print(f"| `ftune generate` command, start to exit | {cli_s:.2f} |")
    goal = statistics.median(lone) <= statistics.median(direct) * 1.05
    verdict = "met" if goal else "not met"
    print(f"\nLone-request latency no worse than `ftune generate`'s decoding (within 5%): **{verdict}**.\n")


if __name__ == "__main__":
    main()
