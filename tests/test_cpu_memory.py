"""Freed memory kept for reuse (retrieval/cpu_memory.py): counted in page faults, not timed.

A 64 MB tensor allocated, filled and freed faults every page in afresh each time under
glibc's defaults (the block is a new mapping each time); with freed memory kept, once the
heap has grown to hold it (a few rounds), not at all. Each case runs in a fresh process: the setting is process-wide."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCENARIO = r"""
import json, resource, sys
import torch

how = sys.argv[1]
if how == "call":
    from umr.retrieval.cpu_memory import keep_freed_memory
    kept = keep_freed_memory()
elif how.startswith("cli "):  # a command refused at once: the CLI decides before it runs it
    from umr.cli import main
    assert main(how.split()[1:]) == 2
    kept = None
else:
    kept = None


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rounds(n):
    for _ in range(n):
        block = torch.empty(16 << 20)  # 64 MB of float32, over any mmap threshold glibc would pick
        block.fill_(1.0)
        del block


rounds(10)  # torch's first use, and the heap growing to hold the block
before = faults()
rounds(10)
print(json.dumps({"kept": kept, "faults": faults() - before}))
"""

PAGES = (64 << 20) // 4096  # one 64 MB block's pages


def run(how: str, malloc: str | None = None) -> dict:
    env = {**os.environ, "UMR_MALLOC": malloc} if malloc else {k: v for k, v in os.environ.items() if k != "UMR_MALLOC"}
    done = subprocess.run([sys.executable, "-c", SCENARIO, how], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_and_the_cli_asks_for_it_where_forwards_run():
    default = run("none")
    assert default["faults"] > 8 * PAGES  # each block faulted in afresh: what made a forward spend half its time in the kernel
    called = run("call")
    assert called["kept"] is True and called["faults"] < PAGES // 4  # the same pages, reused
    for forwards in ("search /nonexistent/umr-index q", "index build /nonexistent/corpus.jsonl --out /nonexistent/i"):
        assert run(f"cli {forwards}")["faults"] < PAGES // 4, forwards  # commands that run an encoder keep it
    # Commands that only move stored vectors keep glibc's defaults: their large arrays of
    # uneven sizes, served from the heap, raised an import's peak memory by 30%.
    for stored in ("index build --vectors /nonexistent/e.npy --ids /nonexistent/i.jsonl --out /nonexistent/i",
                   "index tune /nonexistent/umr-index --target-recall 0.9"):
        assert run(f"cli {stored}")["faults"] > 8 * PAGES, stored
    refused = run("call", malloc="system")  # UMR_MALLOC=system keeps glibc's defaults
    assert refused["kept"] is False and refused["faults"] > 8 * PAGES
