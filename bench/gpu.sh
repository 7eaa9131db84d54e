#!/bin/sh
# The GPU figures for the README in one device call (issue: engine goals on an H100/H200).
#
#   sh bench/gpu.sh fetch   # here, with PyPI: the wheels the GPU image lacks, into .whl/ (git-ignored)
#   sh bench/gpu.sh run     # there: install them, then the engine sweep and the latency run, logs in $OUT
#
# The GPU image already has torch, transformers, safetensors, tokenizers, Pillow and requests;
# it lacks pydantic(-settings), structlog and watchdog. Budget: engine sweep <= 5 min, latency ~3 min.
set -eu
cd "$(dirname "$0")/.."
case "${1:-}" in
fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        -d .whl pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv \
        structlog watchdog typing-extensions
    ls .whl
    ;;
run)
    out=${OUT:-/tmp/phicapd-gpu}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    timeout 330 python3 bench/engine.py --device cuda --full-size-random --json "$out/engine.json" 2>&1 |
        tee "$out/engine.txt" || true
    timeout 240 python3 bench/latency.py --full-size-random --device cuda --num-crops 16 --new-tokens 128 \
        --max-batch 32 --backlog 200 --requests 20 2>&1 | tail -n 40 | tee "$out/latency.txt" || true
    ;;
*)
    echo "usage: sh bench/gpu.sh fetch|run" >&2
    exit 2
    ;;
esac
