#!/usr/bin/env bash
# GPU smoke run in one command, for a short slot on one GPU (H100/H200; a stock CUDA image with torch and
# Python 3.12, no SGLang, Transformer Engine or Ray, no network). Runs tools/gpu_smoke.py's parts (actor vs HF
# log-probs in bf16 on CUDA, a train step's MFU and the torch engine at Qwen2.5-0.5B's shape, weight-sync GB/s
# against a device copy, the CUDA IPC hand-off) in under 8 minutes and writes one JSON: $OUT/gpu_smoke.json
# when OUT is set, else ./gpu_smoke.json. Without CUDA it stops at once with one line.
#
# megatron-core (and math-verify, for the grading phase) come from wheels in ./.whl (git-ignored), fetched
# beforehand on a machine with network:
#     tools/gpu_smoke.sh fetch-wheels        # here: pip download into .whl (carry .whl to the GPU machine)
#     tools/gpu_smoke.sh                     # there: install the wheels into a scratch dir, run the parts
# PYTHON picks the interpreter (default python3), WHEELS the wheel folder (default .whl).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/.whl}"
# megatron-core as the cpu-py312 stack CI tests (setup.py); math-verify and its parsers as that stack has them.
PINS=(megatron-core==0.19.2 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2)

if [[ "${1:-}" == "fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${PINS[@]}"
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
if ! "$PYTHON" -c 'import megatron.core' 2>/dev/null; then
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "gpu_smoke: megatron-core is not installed and $WHEELS holds no wheels; run 'tools/gpu_smoke.sh" \
             "fetch-wheels' on a machine with network and carry .whl here" >&2
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
