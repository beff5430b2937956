#!/usr/bin/env bash
# The GPU path in one command (under 8 minutes on one H100/H200), from the repository root or anywhere:
#
#   bash benchmarks/gpu/run.sh            # PYTHON=/path/to/python to pick the interpreter
#
# 1. installs what this machine lacks from our extras, and nothing else: the package itself (no
#    dependencies), transformers/accelerate ([demo]) if absent, flash-attn-4 ([flash4], pure Python)
#    on Hopper/Blackwell, flash-attn ([flash]) only as a prebuilt wheel (never a source build);
#    an install that fails (no network) leaves that backend reported as unavailable;
# 2. benchmarks/gpu/checks.py: parity of every available varlen backend (flash-attn 4 and 2, torch
#    varlen_attn, the SDPA loop; forward and backward, bf16 against fp32, GQA, unequal segments),
#    the hf dense step on CUDA in bf16, one sparse step against delete-and-rerun, and the dense
#    step with Liger-Kernel's kernels against the unpatched Liger model (tolerances in its docstring);
# 3. `regate bench` for the three presets at 7b-width with 4 layers, MFU beside each step time, the
#    engine's host time at LLaVA-665k scale (once);
# writing everything to benchmarks/results/<device>/. Without CUDA it says it skipped and exits 0.
set -uo pipefail

PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/../.." || exit 1

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "benchmarks/gpu/run.sh: skipped: no CUDA device ($PYTHON cannot import torch, or torch.cuda.is_available() is False)"
    exit 0
fi

start=$SECONDS
device=$("$PYTHON" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))')
major=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_capability()[0])')
out=benchmarks/results/$device
mkdir -p "$out"
echo "device: $device (compute capability major $major); results in $out"

has() { "$PYTHON" -c "$1" >/dev/null 2>&1; }
install() {  # install <what> <pip arguments...>: quick to give up without a network
    echo "installing $1 (missing here)"
    timeout 240 "$PYTHON" -m pip install --quiet --timeout 10 --retries 0 "${@:2}" \
        || echo "could not install $1: what needs it is reported unavailable"
}
has 'import regate_plugin.patches.hf, regate_plugin.bench' || install "regate-plugin" --no-deps --no-build-isolation -e .
has 'import transformers, accelerate' || install "the [demo] extra" "transformers>=4.53" "accelerate>=1.1"
if [ "$major" -ge 9 ]; then
    has 'from flash_attn.cute import flash_attn_varlen_func' || install "the [flash4] extra" "flash-attn-4>=4.0.0b40"
fi
has 'from flash_attn import flash_attn_varlen_func' || install "the [flash] extra (wheel only)" --only-binary=:all: "flash-attn>=2.3"
has 'import liger_kernel.transformers' || install "liger-kernel (its check)" --no-deps "liger-kernel>=0.5"

status=0
echo "== checks ($((SECONDS - start)) s)"
timeout 240 "$PYTHON" benchmarks/gpu/checks.py --out "$out" || { echo "checks FAILED or timed out"; status=1; }

host_samples=665000
for preset in long-answer llava-1.5 videollama2-16f; do
    echo "== regate bench --preset $preset ($((SECONDS - start)) s)"
    timeout 130 "$PYTHON" -m regate_plugin bench --preset "$preset" --shape 7b-width --layers 4 --device cuda \
        --host-samples "$host_samples" --json "$out/7b-width-$preset.json" \
        || { echo "bench $preset FAILED or timed out"; status=1; }
    host_samples=0
done

echo "done in $((SECONDS - start)) s: $([ $status -eq 0 ] && echo passed || echo FAILED); results in $out"
exit $status
