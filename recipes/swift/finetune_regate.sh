#!/usr/bin/env bash
# ms-swift SFT of $RECIPE (a .args file of this folder) with ReGATE, DeepSpeed ZeRO-$ZERO, launched with
# torchrun through `regate train`. REGATE=0 runs ms-swift's own training unchanged (the baseline).
# Usage: [RECIPE=... ZERO=3 GPUS=8 NODES=1 DATASET=... REF_CACHE=... OUTPUT_DIR=...] bash finetune_regate.sh [--key value ...] [--dry-run]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

mode=(--regate --ref-cache "$REF_CACHE" "${REGATE_ARGS[@]}")
if [[ "$REGATE" == "0" ]]; then
    mode=(--no-regate)
fi
args=("${RECIPE_ARGS[@]}" "${DATA_ARGS[@]}" --deepspeed "zero$ZERO" --output_dir "$OUTPUT_DIR" "${EXTRA_ARGS[@]}")
mapfile -t launch < <(launcher)
cmd=("${launch[@]}" train --target swift "${mode[@]}" -- "${args[@]}")
if (( DRY_RUN )); then
    show "${cmd[@]}"
    regate train --target swift "${mode[@]}" --dry-run -- "${args[@]}"
    exit 0
fi
exec "${cmd[@]}"
