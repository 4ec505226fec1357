#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on the GPU machine, which has Python
# 3.12 and no network: Megatron-Core 0.16.1 and the newest 0.19.x, plus what the pinned
# Megatron-LM's megatron/training imports that the GPU image lacks (pydantic and its needs,
# for the megatron_lm stage; megatron/rl imports it). Pinned versions; --no-deps.
#
#   benchmarks/carry_wheels.sh [DEST=.whl]     then run the GPU check with carry=[".whl", ...]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO/.whl}"
PY="${PYTHON:-python3}"
WHEELS=(megatron-core==0.16.1 megatron-core==0.19.2
        pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
        typing-extensions==4.15.0)
mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$DEST" "$spec"
done
ls -1 "$DEST"
du -sh "$DEST"
