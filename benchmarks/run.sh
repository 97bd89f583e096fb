#!/usr/bin/env bash
# make bench: run every benchmark and write BENCHMARKS.md (figures from this machine, this run).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
tmp=$(mktemp)
{
  echo "# Benchmarks"
  echo
  echo "Written by \`make bench\` on $(date -u +%Y-%m-%d). Ratios are measured side by side in one run; absolute"
  echo "figures depend on the machine and its load."
  echo
  "$py" benchmarks/startup.py
  "$py" benchmarks/train_throughput.py --repeats "${REPEATS:-2}" --features
  "$py" benchmarks/eval_throughput.py
  "$py" benchmarks/eval_generate.py
  "$py" benchmarks/classify.py
  "$py" benchmarks/serve_throughput.py
  "$py" benchmarks/data_scale.py --sizes "${DATA_SCALE_SIZES:-1000,50000,200000}"   # ~1 h on 2 cores
  if "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    "$py" benchmarks/gpu_throughput.py --repeats "${REPEATS:-2}"
  fi
  if [ "${GGUF_LLAMACPP:-0}" = 1 ]; then   # builds llama-cpp-python once (~10 min on 2 cores)
    "$py" benchmarks/gguf_llamacpp.py
  fi
  cat benchmarks/notes.md
} > "$tmp"
mv "$tmp" BENCHMARKS.md
cat BENCHMARKS.md
