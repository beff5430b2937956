#!/usr/bin/env bash
# The text-only teacher pass over $DATASET, once, before training: ms-swift's own dataset loading and
# template encode every sample (the full and LoRA recipes of a model share it).
# Usage: [RECIPE=qwen2_5vl_7b_full GPUS=8 TEACHER=... DATASET=... REF_CACHE=...] bash score_reference.sh [--dry-run]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

args=("${RECIPE_ARGS[@]}" "${DATA_ARGS[@]}" --output_dir "$OUTPUT_DIR" "${EXTRA_ARGS[@]}")
cmd=(torchrun --nproc_per_node "$GPUS" -m regate_plugin score --target swift --teacher "$TEACHER" --out "$REF_CACHE"
     --batch-size "${SCORE_BATCH:-16}" -- "${args[@]}")
if (( DRY_RUN )); then
    show "${cmd[@]}"
    exit 0
fi
"${cmd[@]}"
regate inspect "$REF_CACHE" --target swift -- "${args[@]}"
