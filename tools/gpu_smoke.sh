#!/usr/bin/env bash
# GPU smoke run in one command, for a short slot on one GPU (H100/H200; a stock CUDA image with torch and
# Python 3.12, no SGLang, Transformer Engine or Ray, no network). Runs tools/gpu_smoke.py's parts (actor vs HF
# log-probs in bf16 on CUDA, a train step's MFU and the torch engine at Qwen2.5-0.5B's shape, weight-sync GB/s
# against a device copy, the CUDA IPC hand-off) in under 8 minutes and writes one JSON: $OUT/gpu_smoke.json
# when OUT is set, else ./gpu_smoke.json. Without CUDA it stops at once with one line.
#
# What it covers: one GPU, megatron-core's LOCAL layers in bf16 (not Transformer Engine), the torch rollout
# engine, and a plain torch CUDA IPC hand-off between two processes. What it does NOT cover: SGLang (no server,
# no /update_weights_from_tensor flattened_bucket load, no memory saver), Transformer Engine / FP8 (no FP8 GEMMs,
# no TE cached FP8 weight copies, no FP8 rollout weights), THD packing (TE's packed-sequence attention), the NCCL
# weight update to disaggregated engines, and anything across GPUs (TP/PP/DP, Ray). The run prints the same
# two lists first and writes them into the JSON (COVERS, DOES_NOT_COVER in tools/gpu_smoke.py).
#
# What the parts import beyond the image's torch (megatron-core, transformers, safetensors, and math-verify for
# the grading phase) comes from wheels in ./.whl (git-ignored), fetched beforehand on a machine with network:
#     tools/gpu_smoke.sh fetch-wheels        # here: resolve PINS and their dependencies for Python 3.12 and
#                                            # download them into .whl, less torch and what torch requires
#     tools/gpu_smoke.sh                     # there: install the wheels into a scratch dir, run the parts
# PYTHON picks the interpreter (default python3), WHEELS the wheel folder (default .whl).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/.whl}"
# What the parts import besides torch and the standard library (tests/test_gpu_smoke.py checks this against the
# imports of every module they reach): megatron-core as the cpu-py312 stack CI tests (setup.py); transformers as
# the GPU image pins it (containers/constraints-gpu.txt) with the safetensors it needs; math-verify and its parsers
# as that stack has them; xxhash for the checkpoint checksums (megatron_zero/utils/files.py). Their own dependencies
# are resolved at fetch time.
PINS=(megatron-core==0.19.2 transformers==5.19.0 safetensors==0.8.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0
      antlr4-python3-runtime==4.13.2 xxhash==4.1.0)

if [[ "${1:-}" == "fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    SCRATCH="$(mktemp -d)"
    # pip resolves the pins with every dependency for the GPU machine's Python and platform (metadata only;
    # nothing is installed); the install there is --no-deps, so each resolved wheel is downloaded, except torch and
    # what torch requires, which the image brings (wheels_to_fetch in tools/gpu_smoke.py).
    "$PYTHON" -m pip install --dry-run --ignore-installed --quiet "${TARGET[@]}" --target "$SCRATCH/target" \
        --report "$SCRATCH/report.json" "${PINS[@]}"
    mapfile -t FETCH < <("$PYTHON" "$ROOT/tools/gpu_smoke.py" --wheels-to-fetch "$SCRATCH/report.json")
    "$PYTHON" -m pip download --no-deps "${TARGET[@]}" -d "$WHEELS" "${FETCH[@]}"
    rm -rf "$SCRATCH"
    exit 0
fi
if [[ $# -gt 0 ]]; then
    echo "gpu_smoke: unknown argument '$1'; use no argument (run the smoke) or 'fetch-wheels'" >&2
    exit 2
fi

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_smoke: no CUDA device visible to torch ($PYTHON: torch.cuda.is_available() is False or torch is" \
         "missing); run this on a GPU machine (docs/benchmarks.md, 'GPU smoke run')" >&2
    exit 2
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c 'import megatron.core, transformers, safetensors' 2>/dev/null; then
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "gpu_smoke: megatron-core, transformers or safetensors is not installed and $WHEELS holds no wheels;" \
             "run 'tools/gpu_smoke.sh fetch-wheels' on a machine with network and carry .whl here" >&2
        exit 2
    fi
    SITE="$(mktemp -d)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE:$PYTHONPATH"
fi

OUT_DIR="${OUT:-.}"
export PYTHONUNBUFFERED=1
# The parts' own limits add up to 450 s; this one stops the whole run should anything outlast them.
timeout --kill-after=10 470 "$PYTHON" "$ROOT/tools/gpu_smoke.py" --out "$OUT_DIR/gpu_smoke.json" 2>&1 \
    | tee "$OUT_DIR/gpu_smoke.log"
