#!/usr/bin/env bash
# LLaMA-Factory SFT of $RECIPE (a YAML of this folder) with ReGATE, DeepSpeed ZeRO-$ZERO, launched with
# torchrun through `regate train`. REGATE=0 runs LLaMA-Factory's own training unchanged (the baseline).
# Usage: [RECIPE=... ZERO=3 GPUS=8 NODES=1 REF_CACHE=... OUTPUT_DIR=...] bash finetune_regate.sh [key=value ...] [--dry-run]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

mode=(--regate --ref-cache "$REF_CACHE" "${REGATE_ARGS[@]}")
if [[ "$REGATE" == "0" ]]; then
    mode=(--no-regate)
fi
args=("$RECIPES/$RECIPE.yaml" "${DATA_OVERRIDES[@]}" "deepspeed=$RECIPES/zero$ZERO.json" "output_dir=$OUTPUT_DIR"
      "${EXTRA_ARGS[@]}")
mapfile -t launch < <(launcher)
cmd=("${launch[@]}" train --target llamafactory "${mode[@]}" -- "${args[@]}")
if (( DRY_RUN )); then
    show "${cmd[@]}"
    regate train --target llamafactory "${mode[@]}" --dry-run -- "${args[@]}"
    exit 0
fi
exec "${cmd[@]}"
