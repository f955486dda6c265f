#!/usr/bin/env bash
# Train on several nodes: run this script once on every node, with the same environment except
# NODE_RANK, and the same CONFIG and overrides.
#
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=4 NODE_RANK=0 \
#     bash examples/launch_multinode.sh examples/minicpm-2.4b-4node.yaml --run.dir=/shared/runs/minicpm-2.4b
#   (and NODE_RANK=1, 2, 3 on the other three nodes)
#
# MASTER_ADDR  host name or address of node 0, reachable from every node; it hosts the rendezvous
# MASTER_PORT  a free TCP port on node 0 (default 29500)
# NNODES       number of nodes
# NODE_RANK    0 on the MASTER_ADDR node, 1 .. NNODES-1 on the others
# NPROC_PER_NODE (default 8), RDZV_ID (default megacpm-MASTER_PORT): the same on every node
#
# run.dir (and data.path) must be on a filesystem all nodes share. Resume: start the same commands
# again. Stop and keep the work: send SIGTERM to torchrun on any node (each rank finishes its step,
# a checkpoint is saved, the workers exit).
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    echo "usage: MASTER_ADDR=... [MASTER_PORT=29500] NNODES=... NODE_RANK=... $0 CONFIG [--section.key=value ...]" >&2
    exit 2
fi
config=$1
shift

: "${MASTER_ADDR:?set MASTER_ADDR to the host name or address of node 0}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK (0 on node 0, 1 .. NNODES-1 on the others)}"
master_port=${MASTER_PORT:-29500}
nproc=${NPROC_PER_NODE:-8}
rdzv_id=${RDZV_ID:-megacpm-$master_port}

# With the c10d rendezvous torchrun assigns the ranks itself (it ignores --node_rank); NODE_RANK
# says which node hosts the rendezvous store, so that does not depend on host name matching.
# Global rank 0, which prints the progress, may run on any node; metrics.jsonl in the run
# directory has every logged step.
if [[ $NODE_RANK == 0 ]]; then is_host=1; else is_host=0; fi

# torchrun SIGKILLs workers still running this many seconds after it forwarded SIGTERM / SIGINT
# (torchrun's default, 30 s, is shorter than finishing a 1-2.4B step and writing a checkpoint).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}
# Fewer out-of-memory failures from a fragmented CUDA caching allocator.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# NCCL picks InfiniBand / RoCE when present; on clusters with several interfaces name the ones to use:
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_IB_HCA=mlx5
# export NCCL_DEBUG=WARN   # INFO prints the transports NCCL chose

exec torchrun \
    --nnodes="$NNODES" --nproc_per_node="$nproc" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$master_port" --rdzv_id="$rdzv_id" \
    --rdzv_conf="is_host=$is_host" \
    -m megacpm train "$config" "$@"
