"""Freed memory kept for reuse: why a CPU forward no longer spends half its time in the kernel.

glibc's malloc serves every allocation over its mmap threshold (at most 32 MB) with a fresh
mapping and unmaps it when freed. An image tower's activations for a batch are such blocks
(64 x 32 x 112 x 112 floats is 103 MB), so every forward mapped its activations again, and the
kernel zero-filled each page on first touch: lit-base's forward of 64 images took 650,000
page faults and as much system time as computing (1.0 s user + 1.0 s system per batch on 2
cores). Serving every block from the heap, and leaving freed memory there instead of giving
it back, lets the next batch reuse the same pages: 17,000 faults, 0.02 s system, the forward
about twice as fast. The process keeps its peak (a build's batch adds about 0.5 GB) rather
than returning it between batches, as jemalloc and tcmalloc, which PyTorch suggests for CPU
inference, also do.

umr's commands that run encoder forwards (umr.cli.runs_forwards), `umr serve`, Ray's model
actors and the benchmarks ask for this. Commands that only move stored vectors do not: their
large arrays come in uneven sizes that a heap cannot reuse as it reuses a batch's, and a
2M-vector import peaked 30% higher with it. A phase of such a command whose blocks are equal
(an import's batches of rows) keeps freed memory while it runs (`keeping_freed_memory`) and
gives it back after. A program that imports umr decides for itself, with `keep_freed_memory()`
or glibc's MALLOC_MMAP_MAX_=0 and MALLOC_TRIM_THRESHOLD_ in its environment. UMR_MALLOC=system
leaves glibc's defaults everywhere.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
KEEP_UP_TO = 2**31 - 1  # the most mallopt takes: freed memory at the heap's top is returned past 2 GB
# glibc's values once its own adjusting has met a freed block of 32 MiB or more (malloc/malloc.c:
# DEFAULT_MMAP_MAX, DEFAULT_MMAP_THRESHOLD_MAX, and a trim threshold of twice the mmap threshold)
GLIBC_MMAP_MAX, GLIBC_MMAP_THRESHOLD, GLIBC_TRIM_THRESHOLD = 65536, 32 << 20, 64 << 20
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_kept = False  # whether keep_freed_memory took effect in this process


@cache
def _glibc():
    """The C library where it is glibc; None elsewhere (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded: find_library would run ldconfig at every start
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse, for the rest of
    the process. Returns whether it took effect: not where the C library is not glibc, nor
    where UMR_MALLOC=system asks for glibc's defaults."""
    global _kept
    libc = _glibc()
    if libc is None or os.environ.get("UMR_MALLOC", "") == "system":
        return False
    _kept = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO))
    return _kept


@contextmanager
def keeping_freed_memory() -> Iterator[bool]:
    """Keep freed memory for one phase of equal large blocks, then give it back.

    An import's batches of 65,536 rows are such blocks: kept, a 2M import's ingest ran 1.35x as
    fast (bench/imports.py), its peak memory within 2%. What follows it (FAISS training, the recall
    tuning's uneven arrays) is where kept memory raised the peak, so glibc's own values return,
    and the heap is trimmed, when the phase ends. A process that already keeps freed memory
    (keep_freed_memory, or glibc's MALLOC_ variables in its environment) is left as it is.
    Yields whether the phase keeps freed memory."""
    libc = _glibc()
    if _kept or libc is None or any(k in os.environ for k in MALLOC_ENV):  # the process's own choice stands
        yield _kept
    elif not keep_freed_memory():  # UMR_MALLOC=system
        yield False
    else:
        try:
            yield True
        finally:
            _restore_glibc(libc)


def _restore_glibc(libc) -> None:
    """glibc's values back, and the freed memory returned. Setting any of them turns glibc's
    adjusting of its mmap threshold off for good, so they are set where that adjusting ends in a
    process that moves large arrays (an import's, after its first batch): blocks of 32 MiB and
    more mapped and unmapped when freed, up to 64 MiB of free heap kept. Left at the threshold
    it stood at (128 KiB in a fresh process), an import's FAISS training and tuning mapped every
    block afresh and took twice the page faults."""
    global _kept
    libc.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
    libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
    _kept = False
    libc.malloc_trim(0)


def release_free_memory() -> None:
    """Give the free memory of this process's heap back to the system (glibc's malloc_trim).

    Called first thing in a forked child: the free memory it inherited is where its parent's
    next forward will be written, and while a child still maps those pages, every page the
    parent writes is copied first (copy-on-write) -- a second set of page faults, once per
    fork, that keeping freed memory had just removed."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
