#!/usr/bin/env bash
# CI's checks of the GPU image without building it (CI has no Docker engine and no GPU):
#   1. containers/constraints-gpu.txt resolves with this package's `gpu` extra for the image's Python 3.12 on
#      x86_64 Linux (glibc 2.35 or newer), and holds containers/pins.py's rules against a resolution of the base
#      image's own package, sglang;
#   2. containers/Dockerfile passes hadolint.
#
#   containers/check.sh    # needs uv and hadolint on PATH (the cpu-py312 extra installs both); PYTHON=... picks
#                          # the Python 3.12 with torch that reads Transformer Engine's sdist (default: python)
#
# The resolution is uv's (`uv pip compile`), not `pip install --dry-run`: without PEP 658 metadata on the index,
# pip's dry run downloads every wheel it considers (about 1.3 GB here, torch and sglang-kernel alone 0.9 GB) and took
# 105 s; uv reads only each wheel's metadata and takes about 25 s for both resolutions. Both are complete
# backtracking resolvers over the same metadata, so the set resolves for one if it resolves for the other.
# What it cannot cover: apex (a git source; its pin is checked in the image build), compiling Transformer Engine's
# PyTorch extension (an sdist whose metadata is read here by running its setup.py against this Python's torch,
# which must be the image's torch 2.14.1 CUDA 13 build: the extension's core-library dependency follows
# torch.version.cuda), and the versions actually inside the base image (the Dockerfile checks those when it builds).
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in uv hadolint; do
    command -v "$tool" >/dev/null || { echo "containers/check.sh needs $tool on PATH: pip install -e '.[cpu-py312]'" >&2; exit 1; }
done
python=$(command -v "${PYTHON:-python}")
"$python" -c 'import sys, torch; assert sys.version_info[:2] == (3, 12) and torch.version.cuda.startswith("13."), sys.version' \
    || { echo "containers/check.sh needs a Python 3.12 with the CUDA 13 torch (the image's); got $python" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
resolve=(uv pip compile --quiet --no-header --no-annotate --python-version 3.12 --python-platform x86_64-manylinux_2_35
         --constraints containers/constraints-gpu.txt)
grep -E '^sglang==' containers/constraints-gpu.txt > "$work/base.in"
"${resolve[@]}" "$work/base.in" -o "$work/base.txt"
# Transformer Engine's PyTorch extension ships only an sdist whose setup.py imports torch: read its metadata with
# this Python's torch, as the image builds it with the base image's torch.
"${resolve[@]}" setup.py --extra gpu --python "$python" --no-build-isolation-package transformer-engine-torch \
    -o "$work/full.txt"
"$python" containers/pins.py check --constraints containers/constraints-gpu.txt --base "$work/base.txt" \
    --full "$work/full.txt" --ignore-url-pins

hadolint containers/Dockerfile
echo "containers/check.sh: constraints resolve and hold, Dockerfile lints clean"
