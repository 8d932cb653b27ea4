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
elif how == "cli":  # any command, even one refused: the CLI asks before it runs it
    from umr.cli import main
    kept = main(["index", "info", "/nonexistent/umr-index"]) == 2
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
def test_freed_memory_is_reused_and_the_cli_asks_for_it():
    default = run("none")
    assert default["faults"] > 8 * PAGES  # each block faulted in afresh: what made a forward spend half its time in the kernel
    called = run("call")
    assert called["kept"] is True and called["faults"] < PAGES // 4  # the same pages, reused
    cli = run("cli")
    assert cli["kept"] is True and cli["faults"] < PAGES // 4
    refused = run("call", malloc="system")  # UMR_MALLOC=system keeps glibc's defaults
    assert refused["kept"] is False and refused["faults"] > 8 * PAGES
