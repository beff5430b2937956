#!/usr/bin/env bash
# The text-only teacher pass over $DATASET, once, before training: LLaMA-Factory's own template,
# multimodal plugin and dataset pipeline build every sample (the full and LoRA recipes of a model share it).
# Usage: [RECIPE=qwen2_5vl_7b_full GPUS=8 TEACHER=... DATASET=... DATASET_DIR=...] bash score_reference.sh [--dry-run]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

args=("$RECIPES/$RECIPE.yaml" "${DATA_OVERRIDES[@]}" "${EXTRA_ARGS[@]}")
cmd=(torchrun --nproc_per_node "$GPUS" -m regate_plugin score --target llamafactory --teacher "$TEACHER" --out "$REF_CACHE"
     --batch-size "${SCORE_BATCH:-16}" -- "${args[@]}")
if (( DRY_RUN )); then
    show "${cmd[@]}"
    exit 0
fi
"${cmd[@]}"
regate inspect "$REF_CACHE" --target llamafactory -- "${args[@]}"
