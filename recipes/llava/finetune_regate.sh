#!/usr/bin/env bash
# LLaVA-1.5 visual instruction tuning (full fine-tune, ZeRO-3) with ReGATE: upstream's
# scripts/v1_5/finetune.sh, launched through `regate train`. REGATE=0 gives the baseline.
# Usage: [GPUS=8 NODES=1 HOSTFILE=... MODEL=... OUTPUT_DIR=...] bash finetune_regate.sh [--dry-run]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b-regate}

run_train "${EXTRA_ARGS[@]}" \
    --deepspeed "${DEEPSPEED_CONFIG:-$RECIPES/zero3.json}" \
    "${DATA_ARGS[@]}" \
    --pretrain_mm_mlp_adapter "$PRETRAIN_ADAPTER" \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1 \
    --per_device_train_batch_size "$BATCH" \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --evaluation_strategy no \
    --save_strategy steps \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate 2e-5 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --tf32 True \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to "${REPORT_TO:-wandb}"
