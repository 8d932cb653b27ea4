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
	@scripts/browser.sh && V=$$(scripts/venv.sh) && "$$V/bin/ruff" check . && "$$V/bin/python" -m pytest -q --durations=20 tests

test-fast:
	@V=$$(scripts/venv.sh) && "$$V/bin/ruff" check . && "$$V/bin/python" -m pytest -q -m "not slow" tests

bench:
	@V=$$(scripts/venv.sh) && for b in bench/*.py; do \
	  case $$b in */__init__.py|*/common.py|*/loadgen.py|*/minimal_server.py|*/peer_clip_retrieval.py|*/gpu_check.py) continue;; esac; \
	  "$$V/bin/python" $$b || exit 1; done
