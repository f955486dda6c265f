#!/usr/bin/env bash
# MiniCPM's WSD scaling-law method in miniature, on 2 CPU cores (about 15 minutes): one stable run
# per model size (widths 64, 128, 256 at depth 2, muP), five exponential decays branched from each
# (at 80, 160, 240, 320 and 400 steps, each 20% of its branch), and the fit of
# L(N, D) = C_N N^-alpha + C_D D^-beta + L0 to the 15 decayed losses. See docs/wind-tunnel.md.
#
#   bash examples/scaling_law_cpu.sh [OUT]        # default OUT: runs/scaling-law
#
# Rerunning resumes: finished stable runs and branches are skipped.
set -euo pipefail

out=${1:-runs/scaling-law}
here=$(cd "$(dirname "$0")/.." && pwd)

stable_run() {  # width: a stable (constant LR after warmup) muP run with a checkpoint every 80 steps
    local width=$1
    python -m megacpm train tiny --run.dir="$out/w$width" \
        --model.hidden_size="$width" --model.intermediate_size=$((width * 5 / 2)) \
        --model.num_attention_heads=$((width / 64)) --model.num_key_value_heads=$((width / 64)) \
        --model.num_hidden_layers=2 --model.dim_model_base=64 --optim.lr=0.01 \
        --train.steps=400 --train.global_batch_size=8 --train.micro_batch_size=8 --train.seq_len=128 \
        --train.eval_interval=400 --train.num_threads=1 --log.progress=false \
        --schedule.kind=constant --schedule.warmup_steps=40 \
        --checkpoint.interval=80 --checkpoint.keep=0
    python "$here/tools/wsd_grid.py" "$out/w$width" --at 80 160 240 320 400 --decay-frac 0.2 \
        --run --threads 1
}

# Two model sizes at a time, one thread each.
stable_run 256 & first=$!
stable_run 128 & second=$!
wait $first; wait $second   # each wait returns its job's status: a failed size stops the script
stable_run 64

# Without --run the grid tool only collects: every size's points into one CSV.
for width in 64 128 256; do
    python "$here/tools/wsd_grid.py" "$out/w$width" --at 80 160 240 320 400 --decay-frac 0.2 --csv "$out/points.csv"
done
python "$here/tools/scaling_law.py" fit --csv "$out/points.csv" --plot "$out/scaling_law.png"
