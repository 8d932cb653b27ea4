#!/usr/bin/env bash
# The GPU path in one script, under 5 minutes on a machine with an NVIDIA GPU: the project's
# venv (scripts/venv.sh), faiss-gpu in place of faiss-cpu when a wheel can be had (from PyPI,
# or from $UMR_WHEELS, a folder of wheels, on a machine without the internet), then
# bench/gpu_check.py: an index of the flickr8k-1k images built with lit-base on the GPU and on
# the CPU, both served, images/s, query latency and recall of the GPU build against the CPU's.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none)" >&2
  exit 1
fi
V=$(scripts/venv.sh)
if ! "$V/bin/python" -c "import faiss, sys; sys.exit(0 if hasattr(faiss, 'StandardGpuResources') else 1)" 2>/dev/null; then
  FIND=()
  [ -n "${UMR_WHEELS:-}" ] && FIND=(--no-index --find-links "$UMR_WHEELS")
  if timeout 120 "$V/bin/pip" download -q "${FIND[@]}" --no-deps -d /tmp/umr-faiss-gpu "faiss-gpu-cu12>=1.14" 2>/dev/null; then
    "$V/bin/pip" uninstall -y -q faiss-cpu
    "$V/bin/pip" install -q --no-deps /tmp/umr-faiss-gpu/faiss_gpu*.whl
  else
    echo "gpu_check: no faiss-gpu wheel reachable: encoders on the GPU, FAISS on the CPU" >&2
  fi
fi
"$V/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
timeout 280 "$V/bin/python" bench/gpu_check.py
