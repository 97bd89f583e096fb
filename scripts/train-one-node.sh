#!/usr/bin/env bash
# One machine, all its GPUs: train, score, merge. Any failing step stops the script with that step's exit code
# (2 bad input, 1 failed run, 130 interrupted), so a scheduler or CI sees the failure.
#
#   scripts/train-one-node.sh recipes/mistral-7b-lora.yaml            # every visible GPU
#   CUDA_VISIBLE_DEVICES=0,1 scripts/train-one-node.sh my-recipe.yaml # two of them
set -euo pipefail
recipe=${1:?usage: $0 RECIPE.yaml [extra ftune train options]}
shift
gpus=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")

# launches accelerate; rank 0 writes the run directory and prints the summary (--json: on stdout)
ftune train "$recipe" --num-processes "$gpus" --json "$@" > train-summary.json
run_dir=$(python -c "import json; print(json.load(open('train-summary.json'))['run_dir'])")
ftune eval "$run_dir" --compare-base --json > "$run_dir/eval-summary.json"
ftune merge-adapter "$run_dir" -o "$run_dir/merged"      # full-precision merge (QLoRA too)
echo "done: $run_dir/merged"
