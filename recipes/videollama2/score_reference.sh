#!/usr/bin/env bash
# The text-only teacher pass over the fine-tuning data, once, before training (no video is decoded).
# VARIANT=qwen2-16f (default) or mistral-8f; run from your VideoLLaMA2 checkout.
# Usage: [VARIANT=... GPUS=8 MODEL=... DATA_PATH=... REF_CACHE=...] bash score_reference.sh [1 [GPUS_PER_NODE]] [--dry-run]
# It runs on one node (the arguments are the finetune scripts'; NODES must be 1).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
if (( NODES != 1 )); then
    echo "the teacher pass runs on one node, not NODES=$NODES: run it once with NODES=1 (or \`bash score_reference.sh 1 $GPUS\`)," \
         "then train on every node" >&2
    exit 2
fi

cmd=(torchrun --nproc_per_node "$GPUS" -m regate_plugin score --target videollama2 --teacher "$MODEL" --out "$REF_CACHE"
     --batch-size "${SCORE_BATCH:-16}" -- "${DATA_ARGS[@]}")
if (( DRY_RUN )); then
    printf 'command:'
    printf ' %q' "${cmd[@]}"
    printf '\n'
    exit 0
fi
"${cmd[@]}"
regate inspect "$REF_CACHE" --target videollama2 -- "${DATA_ARGS[@]}"
