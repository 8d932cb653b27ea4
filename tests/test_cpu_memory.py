"""Freed memory kept for reuse (retrieval/cpu_memory.py): counted in page faults, not timed.

A 64 MB tensor allocated, filled and freed faults every page in afresh each time under
glibc's defaults (the block is a new mapping each time); with freed memory kept, once the
heap has grown to hold it (a few rounds), not at all. Each case runs in a fresh process: the setting is process-wide.

After a phase that kept freed memory, the heap may still hold free blocks of the phase's size
below a small allocation (C++ tensor headers freed into glibc's per-thread cache pin the heap's
top), and a later block of that size reuses them: 1 run in 6 here. So what the phase promises is
measured where that cannot hide it: the resident memory given back when it ends, and blocks
larger than the whole heap mapped afresh."""
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
if how.split()[0] == "call":
    from umr.retrieval.cpu_memory import keep_freed_memory
    kept = keep_freed_memory()
elif how.startswith("cli "):  # a command refused at once: the CLI decides before it runs it
    from umr.cli import main
    assert main(how.split()[1:]) == 2
    kept = None
elif how.startswith("import "):  # a real import of precomputed vectors, noting how its ingest ran
    import numpy as np
    from umr.retrieval import cpu_memory
    from umr.retrieval.indexing import vector_import
    from umr.cli import main
    work = how.split()[1]
    np.save(f"{work}/emb.npy", np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32))
    open(f"{work}/ids.jsonl", "w").write("".join(f'"v{i}"\n' for i in range(300)))
    ingest, seen = vector_import.ingest_vectors, []
    vector_import.ingest_vectors = lambda *a, **k: (seen.append(cpu_memory._kept), ingest(*a, **k))[1]
    assert main(["index", "build", "--vectors", f"{work}/emb.npy", "--ids", f"{work}/ids.jsonl", "--encoder",
                 "lit-init:16:0", "--out", f"{work}/idx", "--batch-size", "64", "--no-progress"]) == 0
    kept = seen
else:
    kept = None


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def resident_pages():
    return int(open("/proc/self/statm").read().split()[1])


def heap_bytes():  # glibc's mallinfo2().arena: what the main heap holds, used and free
    import ctypes
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = type("mallinfo2", (ctypes.Structure,), {"_fields_": [("arena", ctypes.c_size_t)] + [(f"f{i}", ctypes.c_size_t) for i in range(9)]})
    return libc.mallinfo2().arena


def rounds(n, floats=16 << 20):
    for _ in range(n):
        block = torch.empty(floats)  # 64 MB of float32 by default, over any mmap threshold glibc would pick
        block.fill_(1.0)
        del block


rounds(10)  # torch's first use, and the heap growing to hold the block
answer = {"kept": kept}
floats = 16 << 20
if how.endswith("phase"):  # one phase keeps freed memory (an import's ingest), what follows may not
    from umr.retrieval.cpu_memory import keeping_freed_memory
    with keeping_freed_memory() as answer["phase"]:
        rounds(10)
        before = faults()
        rounds(10)
        answer["inside"] = faults() - before
        resident = resident_pages()
    answer["given_back"] = resident - resident_pages()
    if not kept:  # glibc's values back: a block no free one in the heap can hold is mapped, not taken from the top
        floats = max(floats, (heap_bytes() >> 2) + (4 << 20))
answer["pages"] = floats >> 10
before = faults()
rounds(3, floats)
print(json.dumps({**answer, "faults": faults() - before}))
"""

PAGES = (64 << 20) // 4096  # one 64 MB block's pages


def mapped_afresh(answer: dict) -> bool:
    """Whether each of the 3 blocks measured last faulted its pages in anew (glibc's defaults)."""
    return answer["faults"] > 5 * answer["pages"] // 2


def run(how: str, malloc: str | None = None) -> dict:
    env = {**os.environ, "UMR_MALLOC": malloc} if malloc else {k: v for k, v in os.environ.items() if k != "UMR_MALLOC"}
    done = subprocess.run([sys.executable, "-c", SCENARIO, how], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_and_the_cli_asks_for_it_where_forwards_run():
    default = run("none")
    assert mapped_afresh(default)  # each block faulted in afresh: what made a forward spend half its time in the kernel
    called = run("call")
    assert called["kept"] is True and called["faults"] < PAGES // 4  # the same pages, reused
    for forwards in ("search /nonexistent/umr-index q", "index build /nonexistent/corpus.jsonl --out /nonexistent/i"):
        assert run(f"cli {forwards}")["faults"] < PAGES // 4, forwards  # commands that run an encoder keep it
    # Commands that only move stored vectors keep glibc's defaults: their large arrays of
    # uneven sizes, served from the heap, raised an import's peak memory by 30%.
    for stored in ("index build --vectors /nonexistent/e.npy --ids /nonexistent/i.jsonl --out /nonexistent/i",
                   "index tune /nonexistent/umr-index --target-recall 0.9"):
        assert mapped_afresh(run(f"cli {stored}")), stored
    refused = run("call", malloc="system")  # UMR_MALLOC=system keeps glibc's defaults
    assert refused["kept"] is False and mapped_afresh(refused)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_phase_keeps_freed_memory_while_it_runs_and_gives_it_back_after():
    phase = run("phase")  # an import: its equal batches reuse their pages, FAISS training after them does not
    assert phase["phase"] is True and phase["inside"] < PAGES // 4
    assert phase["given_back"] > PAGES * 9 // 10  # the block it kept, returned when the phase ends
    assert mapped_afresh(phase)  # glibc's defaults again
    within = run("call phase")  # a process that keeps freed memory throughout is left as it is
    assert within["phase"] is True and within["inside"] < PAGES // 4 and within["faults"] < PAGES // 4
    assert within["given_back"] < PAGES // 4
    refused = run("phase", malloc="system")
    assert refused["phase"] is False and refused["inside"] > 8 * PAGES


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_an_import_keeps_freed_memory_while_it_ingests_only(tmp_path):
    done = run(f"import {tmp_path}")
    assert done["kept"] == [True]  # its batches of rows reuse their pages
    assert mapped_afresh(done)  # FAISS training and what follows at glibc's values
