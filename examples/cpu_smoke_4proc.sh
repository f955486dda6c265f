#!/usr/bin/env bash
# CPU smoke test of the parallel engine: 4 processes, tp 2 x pp 2 x dp 1, over gloo, on the `tiny`
# preset and the embedded corpus (nothing is downloaded). 20 steps, under a minute on 2 cores (the
# first run also trains the embedded corpus' tokenizer and caches it under ~/.cache/megacpm).
#
#   bash examples/cpu_smoke_4proc.sh                         # a fresh run directory under /tmp
#   bash examples/cpu_smoke_4proc.sh --run.dir=/tmp/smoke    # extra overrides go last and win
#
# It ends with "done: RUN_DIR at step 20, eval_loss ...". Start it again with the same --run.dir
# and it says the run is complete; add --train.steps=40 to continue it.
set -euo pipefail

run_dir=$(mktemp -d /tmp/megacpm-cpu-smoke.XXXXXX)
export OMP_NUM_THREADS=1   # 4 processes on a small machine: one intra-op thread each

exec torchrun --standalone --nproc_per_node=4 -m megacpm train tiny \
    --run.dir="$run_dir" \
    --parallel.tp=2 --parallel.pp=2 \
    --train.steps=20 --train.seq_len=64 \
    --train.global_batch_size=8 --train.micro_batch_size=2 \
    --train.log_interval=5 --train.eval_interval=10 --train.eval_batches=2 \
    --checkpoint.interval=10 \
    --log.progress=false \
    "$@"
