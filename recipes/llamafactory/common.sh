# Shared settings of the LLaMA-Factory recipes: every path and size comes from the environment.
# Sourced by the other scripts with their arguments.
# shellcheck shell=bash

# shellcheck disable=SC2034  # used by the scripts that source this file
RECIPES=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPE=${RECIPE:-qwen2_5vl_7b_full}    # a YAML of this folder: qwen2_5vl_7b_{full,lora}, internvl3_5_8b_{full,lora}
DATASET=${DATASET:-mllm_demo}          # names registered in $DATASET_DIR/dataset_info.json (comma-separated)
DATASET_DIR=${DATASET_DIR:-./data}     # LLaMA-Factory's data folder
MEDIA_DIR=${MEDIA_DIR:-$DATASET_DIR}   # where the records' image paths start
TEACHER=${TEACHER:-./teachers/qwen2.5-7b}   # the LLM before multimodal training, with the student's tokenizer
REF_CACHE=${REF_CACHE:-./refcache/${DATASET//,/+}-${RECIPE%_*}}
OUTPUT_DIR=${OUTPUT_DIR:-./saves/$RECIPE-regate}
GPUS=${GPUS:-8}                 # per node
NODES=${NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ZERO=${ZERO:-3}                 # DeepSpeed ZeRO stage: 2 or 3
REGATE=${REGATE:-1}             # 0: LLaMA-Factory's own training, unchanged (the baseline)
read -r -a REGATE_ARGS <<< "${REGATE_ARGS:-}"   # e.g. "--keep-ratio 0.5 --cycle 128 --dense-steps 16 --warmup 100"

# The data overrides: the teacher pass and training read the same YAML with the same data (the cache
# fingerprint checks it), so cutoff_len and the visual-token expansion match.
DATA_OVERRIDES=("dataset=$DATASET" "dataset_dir=$DATASET_DIR" "media_dir=$MEDIA_DIR")

# The torchrun launcher, `show`, and --dry-run anywhere among the script's arguments (the others,
# EXTRA_ARGS, are added as LLaMA-Factory key=value overrides).
# shellcheck source=../torchrun_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/../torchrun_launch.sh" "$@"
