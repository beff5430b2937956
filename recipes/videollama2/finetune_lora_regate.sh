#!/usr/bin/env bash
# VideoLLaMA2 LoRA fine-tuning (ZeRO-3) with ReGATE: upstream's scripts/custom/finetune_lora.sh
# through `regate train`. VARIANT=qwen2-16f (default) or mistral-8f. REGATE=0 gives the baseline.
# Usage: [VARIANT=... GPUS=8 NODES=1 MODEL=... OUTPUT_DIR=...] \
#            bash finetune_lora_regate.sh [NODES [GPUS_PER_NODE [NODE_RANK]]] [--dry-run]
# As upstream's: `bash finetune_lora_regate.sh 2 8 1` on the second of two nodes of 8 GPUs; the cluster's
# WORLD_SIZE, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT and RANK are read as upstream reads them.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
OUTPUT_DIR=${OUTPUT_DIR:-$OUTP_DIR/$WANDB_PROJECT/finetune_${RUN_NAME}_lora}

run_train \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --deepspeed "${DEEPSPEED_CONFIG:-$RECIPES/zero3.json}" \
    "${DATA_ARGS[@]}" \
    --output_dir "$OUTPUT_DIR" \
    "${TRAIN_ARGS[@]}"
