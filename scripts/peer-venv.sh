#!/usr/bin/env bash
# Prints the path of the Python that runs clip-retrieval for bench/peer.py, creating its own
# virtual environment when missing (it pins packages umr does not want beside it). torch and
# torchvision are the local pair; setuptools 80.9 still ships pkg_resources, which it imports.
set -euo pipefail
venv=${UMR_PEER_VENV:-$HOME/.cache/umr/peer-clip-retrieval}
if [ ! -x "$venv/bin/clip-retrieval" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 setuptools==80.9.0 clip-retrieval==2.45.0 >&2
fi
echo "$venv/bin/python"
