#!/usr/bin/env bash
# The text-only teacher pass over LLaVA-1.5's fine-tuning data, once, before training.
# Usage: [GPUS=8 MODEL=... DATA_PATH=...] bash score_reference.sh [--dry-run]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

cmd=(torchrun --nproc_per_node "$GPUS" -m regate_plugin score --target llava --teacher "$MODEL" --out "$REF_CACHE"
     --batch-size "${SCORE_BATCH:-16}" -- "${DATA_ARGS[@]}")
if (( DRY_RUN )); then
    printf 'command:'
    printf ' %q' "${cmd[@]}"
    printf '\n'
    exit 0
fi
"${cmd[@]}"
regate inspect "$REF_CACHE" --target llava -- "${DATA_ARGS[@]}"
