#!/usr/bin/env bash
# VideoLLaMA2 fine-tuning (full, ZeRO-3) with ReGATE: upstream's scripts/custom/finetune.sh through
# `regate train`. VARIANT=qwen2-16f (VideoLLaMA2.1-7B-16F, default) or mistral-8f (VideoLLaMA2-7B).
# REGATE=0 gives the baseline. Run from your VideoLLaMA2 checkout.
# Usage: [VARIANT=... GPUS=8 NODES=1 NODE_RANK=0 MASTER_ADDR=... MODEL=... OUTPUT_DIR=...] \
#            bash finetune_regate.sh [NODES [GPUS_PER_NODE [NODE_RANK]]] [--dry-run]
# As upstream's: `bash finetune_regate.sh 2 8 1` on the second of two nodes of 8 GPUs; the cluster's
# WORLD_SIZE, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT and RANK are read as upstream reads them.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
OUTPUT_DIR=${OUTPUT_DIR:-$OUTP_DIR/$WANDB_PROJECT/finetune_$RUN_NAME}

run_train \
    --deepspeed "${DEEPSPEED_CONFIG:-$RECIPES/zero3.json}" \
    "${DATA_ARGS[@]}" \
    --output_dir "$OUTPUT_DIR" \
    "${TRAIN_ARGS[@]}"
