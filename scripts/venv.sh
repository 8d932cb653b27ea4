#!/usr/bin/env bash
# Prints the path of a virtual environment with umr installed, creating it when missing.
# The environment lives outside the clone, keyed by the dependency list, so CI and repeated
# runs reuse one 7 GB environment; the install step still runs every time, so a missing
# or changed dependency fails here rather than later.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=${UMR_VENV_ROOT:-$HOME/.cache/umr}
# Only what decides the installed packages keys it: the package layout (tool.setuptools) changes
# with the code and is applied by the editable install below.
deps=$(python3 -c 'import json, sys, tomllib; t = tomllib.load(open(sys.argv[1], "rb"))
print(json.dumps([t.get("build-system"), t["project"].get("dependencies"), t["project"].get("optional-dependencies")]))' \
  "$here/pyproject.toml")
key=$( (echo "$deps"; cat "$here/constraints.txt"; python3 --version) | sha256sum | cut -c1-12)
venv=${UMR_VENV:-$root/venv-$key}
mkdir -p "$root"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --upgrade pip >&2
fi
# torch and torchvision first: the only pair that imports here, taken from local disk; the
# constraints keep every later install on that pair.
"$venv/bin/pip" install -q -c "$here/constraints.txt" torch torchvision >&2
"$venv/bin/pip" install -q -c "$here/constraints.txt" -e "$here[test,mllm,distributed]" >&2
echo "$venv"
