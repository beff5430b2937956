# Shared settings of the LLaVA-1.5 recipes: every path and size comes from the environment.
# Sourced by the other scripts with their arguments; run them from your LLaVA checkout (./playground/data as upstream).
# shellcheck shell=bash

# shellcheck disable=SC2034  # RECIPES and DATA_ARGS are used by the scripts that source this file
RECIPES=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODEL=${MODEL:-lmsys/vicuna-7b-v1.5}                      # the LLM before multimodal training = the teacher
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
PRETRAIN_ADAPTER=${PRETRAIN_ADAPTER:-./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin}
DATA_PATH=${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
REF_CACHE=${REF_CACHE:-./checkpoints/refcache-llava-v1.5-mix665k}
GPUS=${GPUS:-8}                 # per node
NODES=${NODES:-1}
HOSTFILE=${HOSTFILE:-}          # deepspeed hostfile for several nodes
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
BATCH=${BATCH:-16}              # per GPU; upstream: 16 x 8 GPUs = 128
GRAD_ACCUM=${GRAD_ACCUM:-1}
MAX_LENGTH=${MAX_LENGTH:-2048}
REGATE=${REGATE:-1}             # 0: the upstream baseline, unchanged
read -r -a REGATE_ARGS <<< "${REGATE_ARGS:-}"   # e.g. "--keep-ratio 0.5 --cycle 128 --dense-steps 16 --warmup 100"

# LLaVA's data arguments, exactly as scripts/v1_5/finetune.sh passes them (score and train must agree).
# shellcheck disable=SC2034
DATA_ARGS=(
    --model_name_or_path "$MODEL"
    --version v1
    --data_path "$DATA_PATH"
    --image_folder "$IMAGE_FOLDER"
    --vision_tower "$VISION_TOWER"
    --mm_projector_type mlp2x_gelu
    --mm_vision_select_layer -2
    --mm_use_im_start_end False
    --mm_use_im_patch_token False
    --image_aspect_ratio pad
    --model_max_length "$MAX_LENGTH"
)

launcher() {
    # deepspeed runs the `regate` console script on every GPU of every node.
    local launch=(deepspeed --num_gpus "$GPUS" --num_nodes "$NODES" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    if [[ -n "$HOSTFILE" ]]; then
        launch+=(--hostfile "$HOSTFILE")
    fi
    launch+=("$(command -v regate || echo regate)")
    printf '%s\n' "${launch[@]}"
}

# --dry-run anywhere among a script's arguments; the others are added to upstream's arguments.
DRY_RUN=0
EXTRA_ARGS=()
for _arg in "$@"; do
    if [[ "$_arg" == "--dry-run" ]]; then
        DRY_RUN=1
    else
        EXTRA_ARGS+=("$_arg")
    fi
done

run_train() {
    # run_train UPSTREAM_ARGS...: regate train with ReGATE on (or off: REGATE=0); DRY_RUN=1 prints it.
    local mode=(--regate --ref-cache "$REF_CACHE" "${REGATE_ARGS[@]}")
    if [[ "$REGATE" == "0" ]]; then
        mode=(--no-regate)
    fi
    local launch
    mapfile -t launch < <(launcher)
    local cmd=("${launch[@]}" train --target llava "${mode[@]}" -- "$@")
    if (( DRY_RUN )); then
        printf 'command:'
        printf ' %q' "${cmd[@]}"
        printf '\n'
        regate train --target llava "${mode[@]}" --dry-run -- "$@"
    else
        exec "${cmd[@]}"
    fi
}
