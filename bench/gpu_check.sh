#!/usr/bin/env bash
# The GPU path in one script, under 5 minutes on a machine with an NVIDIA GPU, with or without a
# package index. Where the machine's python3 already has a torch that sees the GPU, that torch is
# used (it was built for the machine's CUDA; the project's pinned CPU pair is not): a venv over
# the system packages, the other dependencies from $UMR_WHEELS (a folder of wheels) when set,
# else from PyPI, and umr itself from this checkout (PYTHONPATH, nothing to build). Otherwise the
# project's venv (scripts/venv.sh). faiss-gpu for torch's CUDA major replaces faiss-cpu when a
# wheel can be had; without one, encoders run on the GPU and FAISS on the CPU, and the report says so.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none)" >&2
  exit 1
fi
FIND=()
[ -n "${UMR_WHEELS:-}" ] && FIND=(--no-index --find-links "$UMR_WHEELS")
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  V=${UMR_GPU_VENV:-$HOME/.cache/umr/venv-gpu}
  [ -x "$V/bin/python" ] || python3 -m venv --system-site-packages "$V"
  # Every dependency but torch and torchvision (the machine's own stay), and faiss (below).
  mapfile -t DEPS < <(python3 -c "
import re
text = open('pyproject.toml').read()  # no tomllib before Python 3.11: the dependencies block by pattern
deps = re.findall(r'^\s+\"([^\"]+)\"', text.split('dependencies = [', 1)[1].split(']', 1)[0], re.M)
print('\n'.join(d for d in deps if re.split('[<>=! ]', d)[0] not in ('torch', 'torchvision', 'faiss-cpu')))")
  "$V/bin/pip" install -q "${FIND[@]}" "${DEPS[@]}" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  V=$(scripts/venv.sh)
fi
CUDA_MAJOR=$("$V/bin/python" -c "import torch; print((torch.version.cuda or '').split('.')[0])")
case "$CUDA_MAJOR" in 12) FAISS_GPU="faiss-gpu-cu12>=1.8" ;; 13) FAISS_GPU="faiss-gpu-cu13-cuvs>=1.15" ;; *) FAISS_GPU="" ;; esac
if ! "$V/bin/python" -c "import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)" 2>/dev/null; then
  if [ -n "$FAISS_GPU" ] && timeout 120 "$V/bin/pip" install -q "${FIND[@]}" "$FAISS_GPU" 2>/dev/null; then
    "$V/bin/pip" uninstall -y -q faiss-cpu 2>/dev/null || true
    "$V/bin/pip" install -q --force-reinstall --no-deps "${FIND[@]}" "$FAISS_GPU"
  else
    echo "gpu_check: no faiss-gpu wheel for CUDA ${CUDA_MAJOR:-?} reachable: encoders on the GPU, FAISS on the CPU" >&2
    "$V/bin/python" -c "import faiss" 2>/dev/null || "$V/bin/pip" install -q "${FIND[@]}" "faiss-cpu>=1.8"
  fi
fi
"$V/bin/python" -c "import torch, faiss; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| faiss', faiss.__version__, 'GPUs', faiss.get_num_gpus())"
timeout 280 "$V/bin/python" bench/gpu_check.py
