#!/usr/bin/env bash
# MiniCPM-2.4B-128K: the long-context curriculum as successive branches of the 2.4B stable run,
# on 8 nodes x 8 GPUs (64 ranks), each stage an ordinary `megacpm branch` + `megacpm train`.
#
# Memory per GPU from `megacpm info minicpm-2.4b-128k --world-size 64 --parallel.zero1=true ...`
# (estimates, not measurements; bf16, activation checkpointing, micro-batch 1):
#   stage  seq_len  layout                        activations   total
#   4K     4,096    cp 1 x dp 64                  1.0 GiB       20.1 GiB
#   32K    32,768   cp 4 x dp 16                  2.3 GiB       21.4 GiB
#   128K   131,072  cp 8 x dp 8                   5.1 GiB       24.2 GiB
#   (128K without cp: 33.2 GiB of activations, 52.8 GiB in all)
# Every stage keeps 4,194,304 tokens per step (global batch 1024 / 128 / 32 sequences).
#
# Stage 1 (once): untie the embeddings (the LM head starts as an exact copy of the embedding: the
# logits at the branch step are the parent's), pad the vocabulary 122,753 -> 122,760 (new rows the
# mean of the old ones), and raise the RoPE base (ABF) for 4K -> 32K:
#   megacpm branch runs/minicpm-2.4b/checkpoints/step_200000 runs/128k-stage1 \
#       --model.tie_word_embeddings=false --model.vocab_size=122760 --model.rope_theta=1000000 \
#       --model.max_position_embeddings=32768 \
#       --train.seq_len=32768 --train.global_batch_size=128 --train.micro_batch_size=1 \
#       --parallel.cp=4 --parallel.zero1=true --train.steps=210000 --data.mixture=... (44% long documents)
# Stage 2: NTK-aware scaling for 32K -> 128K (dynamic: the base grows with the length past 65,536):
#   megacpm branch runs/128k-stage1 runs/128k-stage2 \
#       --model.rope_scaling='{type: dynamic, factor: 4.0}' --model.max_position_embeddings=65536 \
#       --train.seq_len=131072 --train.global_batch_size=32 --parallel.cp=8 --train.steps=215000
# A longer train.seq_len continues the data stream at the same token count (the run says where).
#
# Then, on every node (NODE_RANK 0..7, MASTER_ADDR the first node), for each stage's run directory:
set -euo pipefail
RUN=${RUN:?set RUN to the stage's run directory}
torchrun --nnodes=8 --nproc-per-node=8 --node-rank="${NODE_RANK:?set NODE_RANK}" \
    --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR}:29500" \
    -m megacpm train "$RUN"
