# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast bench venv

venv:
	@scripts/venv.sh >/dev/null

demo:
	@V=$$(scripts/venv.sh) && "$$V/bin/umr" demo

test:
	@V=$$(scripts/venv.sh) && "$$V/bin/python" -m pytest -q tests

test-fast:
	@V=$$(scripts/venv.sh) && "$$V/bin/python" -m pytest -q -m "not slow" tests

bench:
	@V=$$(scripts/venv.sh) && for b in bench/*.py; do "$$V/bin/python" $$b || exit 1; done
