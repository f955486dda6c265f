#!/usr/bin/env bash
# Sparse upcycling in miniature, on a CPU (docs/moe.md): a dense tiny run, upcycled at a stable-phase
# checkpoint into 4 experts top-2 and trained on to the same step, beside the dense run continuing;
# then a tiny MoE and a dense model of the same active compute (intermediate 2 x 640) from scratch.
#   bash examples/moe/upcycle_tiny.sh [ROOT]        # ROOT defaults to runs/moe-demo
set -euo pipefail
root=${1:-runs/moe-demo}
common=(--log.tensorboard=false --log.progress=false)
python -m megacpm train tiny --run.dir="$root/dense" "${common[@]}"
python -m megacpm upcycle "$root/dense/checkpoints/step_100" "$root/upcycled" --model.num_experts=4 \
    --model.num_experts_per_tok=2
python -m megacpm train "$root/upcycled"
python -m megacpm train tiny-moe --run.dir="$root/moe" "${common[@]}"
python -m megacpm train tiny --run.dir="$root/dense-1280" --model.intermediate_size=1280 "${common[@]}"
