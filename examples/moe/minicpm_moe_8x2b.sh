#!/usr/bin/env bash
# MiniCPM-MoE-8x2B continued pretraining on 8 nodes x 8 GPUs (64 ranks), upcycled from a dense 2.4B run.
#
# Layout: ep 8 (each rank of an 8-GPU node holds one expert of every layer: the all-to-all stays on
# NVLink), dp 64 with ZeRO-1 (the experts' optimizer state over the 8 expert-data-parallel ranks,
# the dense state over 64), tp 1, pp 1. `megacpm info minicpm-moe-8x2b --world-size 64
# --parallel.ep=8 --parallel.zero1=true` estimates 22.0 GiB per GPU (weights 5.1, fp32 grads 10.2,
# optimizer 2.4, activations with checkpointing 2.6, loss head 1.7); without EP it is 84.3 GiB, of
# which 51.7 GiB fp32 gradients. These are estimates from `megacpm info`, not measurements.
#
# 1. Once, on one node: turn the dense stable-phase checkpoint into the MoE run (experts copied from
#    each MLP, routers N(0, 0.1^2) from a recorded seed, AdamW moments carried; lineage.json).
#      megacpm upcycle runs/minicpm-2.4b/checkpoints/step_200000 runs/minicpm-moe-8x2b \
#          --model.num_experts=8 --model.num_experts_per_tok=2 --model.moe_aux_loss_coeff=0.01 \
#          --train.steps=330000 --train.global_batch_size=1024 \
#          --parallel.ep=8 --parallel.zero1=true
# 2. On every node (NODE_RANK 0..7, MASTER_ADDR the first node):
set -euo pipefail
RUN=${RUN:-runs/minicpm-moe-8x2b}
torchrun --nnodes=8 --nproc-per-node=8 --node-rank="${NODE_RANK:?set NODE_RANK}" \
    --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR}:29500" \
    -m megacpm train "$RUN"
