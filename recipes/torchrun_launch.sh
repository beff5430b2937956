#!/usr/bin/env bash
# What the framework recipes (llamafactory/, swift/) share, sourced by their common.sh with the script's
# arguments after GPUS, NODES, NODE_RANK, MASTER_ADDR and MASTER_PORT are set: the torchrun launcher,
# --dry-run anywhere among the arguments (the others land in EXTRA_ARGS), and `show`.
# shellcheck disable=SC2034  # DRY_RUN and EXTRA_ARGS are used by the scripts that source common.sh

launcher() {
    # torchrun runs `python -m regate_plugin` on every GPU of every node.
    printf '%s\n' torchrun --nnodes "$NODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m regate_plugin
}

DRY_RUN=0
EXTRA_ARGS=()
for _arg in "$@"; do
    if [[ "$_arg" == "--dry-run" ]]; then
        DRY_RUN=1
    else
        EXTRA_ARGS+=("$_arg")
    fi
done

show() {
    # show CMD...: print it as one shell-quoted line.
    printf 'command:'
    printf ' %q' "$@"
    printf '\n'
}
