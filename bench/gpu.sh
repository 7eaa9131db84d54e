#!/bin/bash
# The GPU figures for the README in one device call (issue: engine goals on an H100/H200).
#
#   bash bench/gpu.sh fetch   # here, with PyPI: the wheels the GPU image lacks, into .whl/ (git-ignored)
#   bash bench/gpu.sh run     # there: install them, then the stages below, logs in $OUT
#
# The GPU image already has torch, transformers, safetensors, tokenizers, Pillow and requests;
# it lacks pydantic(-settings), structlog, watchdog and prometheus_client (and may have an older
# typing_extensions).
# `run` fits one 600 s device command (about 560 s in all), each stage under its own timeout,
# each one run whatever happened to the one before; every log is written as it goes, so a stage
# that is cut short keeps what it printed:
#   setup        wheels into /tmp/site, nvidia-smi, the import check   -> $OUT/gpu.txt
#   engine       engine sweep, full-size random, compile off (200 s)   -> $OUT/engine.txt, engine.json
#   latency      the daemon's socket latency under a backlog (170 s)   -> $OUT/latency.txt
#   compile      engine with --compile, if time is left                -> $OUT/engine_compile.txt, .json
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
    total=560 # seconds this script may take in all (the device command's limit is 600)
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

    stage "engine: sweep, full-size random, compile off (timeout 200 s)"
    timeout 200 python3 bench/engine.py --device cuda --full-size-random --json "$out/engine.json" 2>&1 |
        tee "$out/engine.txt"
    stage "engine: exit status $?"

    stage "latency: daemon under a backlog, compile off (timeout 170 s)"
    timeout 170 python3 bench/latency.py --full-size-random --device cuda --num-crops 16 --new-tokens 128 \
        --max-batch 32 --backlog 200 --requests 20 --phase-seconds 45 --no-compile 2>&1 |
        tee "$out/latency.txt"
    stage "latency: exit status $?"

    left=$((total - SECONDS - 20))
    if [ "$left" -ge 90 ]; then
        # Warm-up compiles one decode graph per bucket (1, 2, 4, ... up to the largest batch),
        # 45-90 s each at full size: with less than 5 minutes left only batch 1 can finish.
        batches=1
        [ "$left" -ge 300 ] && batches=1,32
        stage "compile: engine --compile --batches $batches (timeout $left s)"
        timeout "$left" python3 bench/engine.py --device cuda --full-size-random --compile --batches "$batches" \
            --no-baselines --json "$out/engine_compile.json" 2>&1 | tee "$out/engine_compile.txt"
        stage "compile: exit status $?"
    else
        stage "compile: skipped, only $left s left"
    fi
    stage "done"
    ;;
*)
    echo "usage: bash bench/gpu.sh fetch|run" >&2
    exit 2
    ;;
esac
