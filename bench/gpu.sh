#!/bin/bash
# The GPU figures for the README in one device call (issue: engine goals on an H100/H200).
#
#   bash bench/gpu.sh fetch   # here, with PyPI: the wheels the GPU image lacks, into .whl/ (git-ignored)
#   bash bench/gpu.sh run     # there: install them, then the stages below, logs in $OUT
#
# The GPU image already has torch, transformers, safetensors, tokenizers, Pillow and requests;
# it lacks pydantic(-settings), structlog, watchdog and prometheus_client (and may have an older
# typing_extensions).
# `run` fits one 600 s device command (about 540 s in all, room to spare), each stage under its
# own timeout, each one run whatever happened to the one before; every log is written as it goes,
# so a stage that is cut short keeps what it printed. The decisive figures come first:
#   setup        wheels into /tmp/site, nvidia-smi, the import check         -> $OUT/gpu.txt
#   default      the daemon's defaults: compiled, flex attention, batch 32
#                then 48, beside batch 1 and HF generate (230 s)             -> $OUT/engine_default.txt, .json
#   eager        the uncompiled sweep, masked SDPA (110 s)                   -> $OUT/engine_eager.txt, .json
#   latency      caption-file latency idle and under a 400-image backlog,
#                daemon defaults (compiled), the rest of the time            -> $OUT/latency.txt
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
    rm -f .whl/*.whl # one version per package
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        -d .whl pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv \
        structlog watchdog prometheus_client typing-extensions || exit 1
    ls .whl
    ;;
run)
    out=${OUT:-/tmp/phicapd-gpu}
    mkdir -p "$out"
    total=540 # seconds this script may take in all (the device command's limit is 600)
    set -o pipefail
    stage() { printf '\n=== [%3d s] %s\n' "$SECONDS" "$*" | tee -a "$out/gpu.txt"; }
    stage "setup: wheels into /tmp/site"
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        2>&1 | tee -a "$out/gpu.txt"; then
        echo "pip install failed; unpacking the wheels instead" | tee -a "$out/gpu.txt"
        python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in sys.argv[1:]]' \
            .whl/*.whl 2>&1 | tee -a "$out/gpu.txt"
    fi
    export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$out/gpu.txt"
    stage "setup: import check"
    if ! timeout 120 python3 -c "import phicapd.config, phicapd.model.engine; import torch; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$out/gpu.txt"; then
        echo "FAILED: phicapd does not import (see the traceback above; missing wheel in .whl/?)" |
            tee -a "$out/gpu.txt"
        exit 3
    fi

    stage "default: engine compiled, flex attention, batches 1,32,48 + baselines (timeout 230 s)"
    timeout 230 python3 bench/engine.py --device cuda --full-size-random --compile --batches 1,32,48 \
        --json "$out/engine_default.json" 2>&1 | tee "$out/engine_default.txt"
    stage "default: exit status $?"

    stage "eager: engine uncompiled, masked SDPA, batches 8,16,32 (timeout 110 s)"
    timeout 110 python3 bench/engine.py --device cuda --full-size-random --batches 8,16,32 --no-baselines \
        --json "$out/engine_eager.json" 2>&1 | tee "$out/engine_eager.txt"
    stage "eager: exit status $?"

    left=$((total - SECONDS - 10))
    if [ "$left" -ge 100 ]; then
        stage "latency: daemon defaults (compiled), 400-image backlog (timeout $left s)"
        timeout "$left" python3 bench/latency.py --full-size-random --device cuda --num-crops 16 --new-tokens 128 \
            --max-batch 32 --backlog 400 --requests 20 --phase-seconds 40 --compile 2>&1 | tee "$out/latency.txt"
        stage "latency: exit status $?"
    else
        stage "latency: skipped, only $left s left"
    fi
    stage "done"
    ;;
*)
    echo "usage: bash bench/gpu.sh fetch|run" >&2
    exit 2
    ;;
esac
