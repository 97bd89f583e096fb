"""CLI start-up: wall time of `ftune --help` and `ftune validate` (median of 5 runs each, warm file cache).

Run: python benchmarks/startup.py   (prints a Markdown section)
"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FTUNE = str(Path(sys.executable).parent / "ftune")
PROBE = """import sys, runpy
sys.argv = ["ftune", *sys.argv[1:]]
try:
    runpy.run_module("finetune_cli", run_name="__main__")
except SystemExit:
    pass
print("torch" in sys.modules, file=sys.stderr)
"""


def timed(args: list[str], repeats: int = 5) -> tuple[float, float, float]:
    subprocess.run([FTUNE, *args], capture_output=True)  # warm the file cache
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([FTUNE, *args], capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def imports_torch(args: list[str]) -> bool:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    return out.stderr.strip().splitlines()[-1] == "True"


def main() -> None:
    print("## CLI start-up\n")
    print("| command | wall seconds (median of 5, min-max) | imports torch |")
    print("|---|---|---|")
    for args in (["--help"], ["validate", str(ROOT / "recipes/quickstart.yaml")]):
        med, lo, hi = timed(args)
        shown = " ".join(args).replace(str(ROOT) + "/", "")
        print(f"| `ftune {shown}` | {med:.2f} ({lo:.2f}-{hi:.2f}) | {'yes' if imports_torch(args) else 'no'} |")
    print(
        "\n`ftune validate` reads and tokenizes the data (the tokenizer comes from `tokenizers`, loaded without "
        "transformers' model config, which would import torch); torch is imported only when a recipe asks for "
        "something that depends on the hardware (bf16/fp16, 8-bit optimizers, 8-bit QLoRA, Liger).\n"
    )


if __name__ == "__main__":
    main()
