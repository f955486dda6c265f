#!/usr/bin/env bash
# Train on one node: one process per GPU under torchrun.
#
#   bash examples/launch_1node.sh CONFIG [--section.key=value ...]
#   bash examples/launch_1node.sh examples/minicpm-1.2b-1node.yaml --run.dir=/shared/runs/minicpm-1.2b
#
# CONFIG: a YAML file, a preset name or a run directory. Overrides are passed to `megacpm train`.
# NPROC_PER_NODE (default 8): processes (GPUs) on this node.
#
# Run the same command again to resume from RUN_DIR/checkpoints/latest. To stop and keep the work,
# press Ctrl-C once or `kill -TERM` the torchrun process: torchrun forwards the signal, every rank
# finishes its step, a checkpoint is saved and the workers exit (torchrun itself then reports the
# signal and exits non-zero; that is expected).
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    echo "usage: $0 CONFIG [--section.key=value ...]" >&2
    exit 2
fi
config=$1
shift

nproc=${NPROC_PER_NODE:-8}

# torchrun SIGKILLs workers still running this many seconds after it forwarded SIGTERM / SIGINT
# (torchrun's default, 30 s, is shorter than finishing a 1-2.4B step and writing a checkpoint).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}
# Fewer out-of-memory failures from a fragmented CUDA caching allocator.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# --standalone: a c10d rendezvous on this host, on a free port.
exec torchrun --standalone --nproc_per_node="$nproc" -m megacpm train "$config" "$@"
