#!/usr/bin/env bash
# The one GPU run (issues 22, 31): install the carried wheels offline (the box lacks trl, datasets,
# bitsandbytes...), then benchmarks/gpu_check.py. From the repo root on the GPU box:
#   bash benchmarks/gpu_check.sh OUT [gpu_check.py options]
# Issue 31's benchmark alone (about 8 minutes): bash benchmarks/gpu_check.sh OUT --no-functional
# Checked first on a CPU (tiny model, about 15 minutes on 2 busy cores):
#   OMP_NUM_THREADS=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh OUT --cpu --no-functional --budget 900
# Prepared on a CPU machine first: what the box lacks as cp312 wheels in .whl/ (kept out of git):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
#     trl datasets dill multiprocess bitsandbytes pydantic pydantic_core annotated-types typing-inspection gguf \
#     liger-kernel nltk fastapi starlette uvicorn annotated-doc opentelemetry-api   (pinned to .venv's versions)
#   pip wheel --no-deps -w .whl rouge-score        (sdist only on PyPI)
# and the builtin tokenizer's files (tokenizer.json, tokenizer_config.json, chat_template.jinja) in .gpu/tokenizer.
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
