# Shared settings of the VideoLLaMA2 recipes: every path and size comes from the environment.
# Sourced by the other scripts with their arguments; run them from your VideoLLaMA2 checkout (as
# upstream's scripts/).
# shellcheck shell=bash

# shellcheck disable=SC2034  # the scripts that source this file use these
RECIPES=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The arguments, as upstream's scripts/custom/*.sh take them: [NODES [GPUS_PER_NODE [NODE_RANK]]]
# (upstream's ARG_WORLD_SIZE, ARG_NPROC_PER_NODE, ARG_RANK), and --dry-run anywhere among them.
DRY_RUN=0
_positional=()
for _arg in "$@"; do
    case "$_arg" in
        --dry-run) DRY_RUN=1 ;;
        *[!0-9]* | "")
            echo "unexpected argument '$_arg': the recipes take [NODES [GPUS_PER_NODE [NODE_RANK]]] and --dry-run" >&2
            exit 2
            ;;
        *) _positional+=("$_arg") ;;
    esac
done
if (( ${#_positional[@]} > 3 )); then
    echo "too many arguments (${_positional[*]}): the recipes take [NODES [GPUS_PER_NODE [NODE_RANK]]] and --dry-run" >&2
    exit 2
fi
# As upstream: the cluster's WORLD_SIZE (nodes) and NPROC_PER_NODE when both are set, and its RANK (this
# node) when MASTER_ADDR, MASTER_PORT and RANK are all set, take the place of the arguments. NODES,
# GPUS and NODE_RANK, when set, win over both.
_nodes=${_positional[0]:-1}
_gpus=${_positional[1]:-8}
_rank=${_positional[2]:-0}
if [[ -n "${WORLD_SIZE:-}" && -n "${NPROC_PER_NODE:-}" ]]; then
    _nodes=$WORLD_SIZE
    _gpus=$NPROC_PER_NODE
fi
if [[ -n "${MASTER_ADDR:-}" && -n "${MASTER_PORT:-}" && -n "${RANK:-}" ]]; then
    _rank=$RANK
fi

# The model: VARIANT picks upstream's recipe, each setting can still be overridden.
VARIANT=${VARIANT:-qwen2-16f}
case "$VARIANT" in
    qwen2-16f)   # VideoLLaMA2.1-7B-16F: scripts/custom/finetune.sh
        _model_type=videollama2_qwen2
        _model=Qwen/Qwen2-7B-Instruct
        _tower=google/siglip-so400m-patch14-384
        _projector=stc_connector_v35
        _frames=16
        _adapter=DAMO-NLP-SG/VideoLLaMA2.1-7B-16F-Base/mm_projector.bin
        _run=siglip_tcv35_7b_16f
        ;;
    mistral-8f)  # VideoLLaMA2-7B: scripts/vllava/finetune.sh of the Mistral release
        _model_type=videollama2
        _model=mistralai/Mistral-7B-Instruct-v0.2
        _tower=openai/clip-vit-large-patch14-336
        _projector=stc_connector
        _frames=8
        _adapter=DAMO-NLP-SG/VideoLLaMA2-7B-Base/mm_projector.bin
        _run=clip_tc_7b_8f
        ;;
    *)
        echo "unknown VARIANT=$VARIANT: use qwen2-16f (VideoLLaMA2.1-7B-16F) or mistral-8f (VideoLLaMA2-7B)" >&2
        exit 2
        ;;
esac
MODEL_TYPE=${MODEL_TYPE:-$_model_type}
MODEL=${MODEL:-$_model}                       # the LLM before multimodal training = the teacher
VISION_TOWER=${VISION_TOWER:-$_tower}
PROJECTOR_TYPE=${PROJECTOR_TYPE:-$_projector}
NUM_FRAMES=${NUM_FRAMES:-$_frames}
PRETRAIN_ADAPTER=${PRETRAIN_ADAPTER:-$_adapter}   # the stage-1 connector
RUN_NAME=${RUN_NAME:-${_run}_regate}
DATA_DIR=${DATA_DIR:-datasets}
DATA_PATH=${DATA_PATH:-$DATA_DIR/videollava_sft/videochatgpt_llavaimage_tune.json}
DATA_FOLDER=${DATA_FOLDER:-$DATA_DIR/videollava_sft/}
OUTP_DIR=${OUTP_DIR:-work_dirs}
REF_CACHE=${REF_CACHE:-$OUTP_DIR/refcache-videollama2-$VARIANT}
GPUS=${GPUS:-$_gpus}            # per node
NODES=${NODES:-$_nodes}
NODE_RANK=${NODE_RANK:-$_rank}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-16666}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-128}
BATCH=${BATCH:-4}               # per GPU; upstream: 4 x 8 GPUs x 4 accumulation steps = 128
MAX_LENGTH=${MAX_LENGTH:-2048}
REGATE=${REGATE:-1}             # 0: the upstream baseline, unchanged
read -r -a REGATE_ARGS <<< "${REGATE_ARGS:-}"   # e.g. "--keep-ratio 0.5 --cycle 128 --dense-steps 16 --warmup 100"
export WANDB_PROJECT=${WANDB_PROJECT:-videollama2_regate}

# As upstream: the accumulation steps that make the global batch.
if (( GLOBAL_BATCH_SIZE % (NODES * GPUS * BATCH) != 0 )); then
    echo "GLOBAL_BATCH_SIZE=$GLOBAL_BATCH_SIZE is not a multiple of NODES*GPUS*BATCH=$((NODES * GPUS * BATCH))" >&2
    exit 2
fi
GRAD_ACCUM=${GRAD_ACCUM:-$((GLOBAL_BATCH_SIZE / (NODES * GPUS * BATCH)))}

# Upstream's model and data arguments, as its finetune scripts pass them (score and train must agree).
DATA_ARGS=(
    --model_type "$MODEL_TYPE"
    --model_path "$MODEL"
    --vision_tower "$VISION_TOWER"
    --mm_projector_type "$PROJECTOR_TYPE"
    --data_path "$DATA_PATH"
    --data_folder "$DATA_FOLDER"
    --mm_vision_select_layer -2
    --image_aspect_ratio pad
    --num_frames "$NUM_FRAMES"
    --model_max_length "$MAX_LENGTH"
)

# Upstream's training arguments (scripts/custom/finetune.sh), less the data arguments above.
TRAIN_ARGS=(
    --pretrain_mm_mlp_adapter "$PRETRAIN_ADAPTER"
    --bf16 True
    --tf32 True
    --fp16 False
    --num_train_epochs 1
    --per_device_train_batch_size "$BATCH"
    --per_device_eval_batch_size 4
    --gradient_accumulation_steps "$GRAD_ACCUM"
    --save_strategy steps
    --save_steps 500
    --save_total_limit 99
    --learning_rate 2e-5
    --weight_decay 0.
    --warmup_ratio 0.03
    --lr_scheduler_type cosine
    --logging_steps 1
    --gradient_checkpointing True
    --dataloader_num_workers 4
    --report_to "${REPORT_TO:-tensorboard}"
    --run_name "$RUN_NAME"
)

launcher() {
    # torchrun starts `python -m regate_plugin` on every GPU of this node (run from the checkout:
    # upstream's videollama2 package is imported from the working directory, as by train.py).
    printf '%s\n' torchrun --nnodes "$NODES" --nproc_per_node "$GPUS" --master_addr "$MASTER_ADDR" \
        --master_port "$MASTER_PORT" --node_rank "$NODE_RANK" -m regate_plugin
}

run_train() {
    # run_train UPSTREAM_ARGS...: regate train with ReGATE on (or off: REGATE=0); DRY_RUN=1 prints it.
    local mode=(--regate --ref-cache "$REF_CACHE" "${REGATE_ARGS[@]}")
    if [[ "$REGATE" == "0" ]]; then
        mode=(--no-regate)
    fi
    local launch
    mapfile -t launch < <(launcher)
    local cmd=("${launch[@]}" train --target videollama2 "${mode[@]}" -- "$@")
    if (( DRY_RUN )); then
        printf 'command:'
        printf ' %q' "${cmd[@]}"
        printf '\n'
        regate train --target videollama2 "${mode[@]}" --dry-run -- "$@"
    else
        exec "${cmd[@]}"
    fi
}
