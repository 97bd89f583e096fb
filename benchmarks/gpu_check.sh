#!/usr/bin/env bash
# Issue 22's one GPU run: install the carried wheels offline (the box lacks trl, datasets, bitsandbytes...), then
# benchmarks/gpu_check.py. From the repo root on the GPU box: bash benchmarks/gpu_check.sh OUT [gpu_check.py options]
# Prepared on a CPU machine first (BENCHMARKS.md, "GPU"): cp312 wheels in .whl/, the builtin tokenizer in .gpu/tokenizer.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT [options]}
shift
py=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
tok=()
[ -d .gpu/tokenizer ] && tok=(--tokenizer .gpu/tokenizer)
mkdir -p "$out"
$py benchmarks/gpu_check.py --out "$out" "${tok[@]}" "$@" 2>&1 | tee "$out/check.log"
