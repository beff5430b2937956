# Shared settings of the ms-swift recipes: every path and size comes from the environment.
# Sourced by the other scripts with their arguments.
# shellcheck shell=bash

# shellcheck disable=SC2034  # used by the scripts that source this file
RECIPES=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPE=${RECIPE:-qwen2_5vl_7b_full}    # a .args file of this folder: qwen2_5vl_7b_{full,lora}, internvl3_5_8b_{full,lora}
DATASET=${DATASET:-./data/train.jsonl} # ms-swift --dataset values: jsonl files or hub ids (space-separated)
TEACHER=${TEACHER:-./teachers/qwen2.5-7b}   # the LLM before multimodal training, with the student's tokenizer
REF_CACHE=${REF_CACHE:-./refcache/${RECIPE%_*}}
OUTPUT_DIR=${OUTPUT_DIR:-./output/$RECIPE-regate}
GPUS=${GPUS:-8}                 # per node
NODES=${NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ZERO=${ZERO:-3}                 # DeepSpeed ZeRO stage: 2 or 3 (ms-swift's own zero2/zero3 configs)
REGATE=${REGATE:-1}             # 0: ms-swift's own training, unchanged (the baseline)
read -r -a REGATE_ARGS <<< "${REGATE_ARGS:-}"   # e.g. "--keep-ratio 0.5 --cycle 128 --dense-steps 16 --warmup 100"
read -r -a DATASETS <<< "$DATASET"

# The recipe: one `--key value` per line, comments after #.
RECIPE_ARGS=()
while read -r -a _line; do
    RECIPE_ARGS+=("${_line[@]}")
done < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$RECIPES/$RECIPE.args")

# The teacher pass and training read the same recipe with the same data (the cache fingerprint checks
# it), so max_length truncation and the visual-token expansion match.
DATA_ARGS=(--dataset "${DATASETS[@]}")

# The torchrun launcher, `show`, and --dry-run anywhere among the script's arguments (the others,
# EXTRA_ARGS, are added as ms-swift arguments).
# shellcheck source=../torchrun_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/../torchrun_launch.sh" "$@"
