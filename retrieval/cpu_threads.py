"""One OpenMP team per server process: threads other than the one answering queries run torch
and FAISS on themselves alone.

GNU OpenMP, under torch's CPU kernels and FAISS, gives every thread that opens a parallel
region a team of helper threads of its own, and once the helpers of all teams outnumber the
cores it stops spin-waiting between regions and parks them in the kernel instead (libgomp's
throttled spin count, config/linux/wait.h). A text forward is a few hundred short regions, so
each then pays a futex wake-up. On this 2-core machine a lone query's MiniLM forward took
9.5 ms while one thread alone had used torch, and 18-19 ms, for the life of the process, as
soon as a second one had (a server loads its model on the main thread, answers on its model
thread, and adds, decodes query images and checkpoints on others); the OpenMP wait policy does
not change it.

So a server keeps the team for the thread that answers queries, and every other thread that
may touch torch or FAISS calls `alone()` first: its work is loading, adds, decoding or
background work, and on a machine this size it gets a core at best beside the queries anyway.
Builds and the CLI run their work on one thread and change nothing.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
# Libraries that keep a thread count: OpenMP runtimes (GNU, Intel, LLVM; bundled copies too) and
# MKL, whose calls name their own thread count and so start a team whatever OpenMP's is (torch
# links it into libtorch_cpu; MKL_Set_Num_Threads_Local takes its count by value, the lower-case
# name is Fortran's and takes a pointer).
_SETTERS = ((re.compile(r"^lib(gomp|iomp5|omp)\b[-.\w]*\.so"), "omp_set_num_threads"),
            (re.compile(r"^lib(mkl_rt|torch_cpu)\b[-.\w]*\.so"), "MKL_Set_Num_Threads_Local"))
_here = threading.local()


def alone() -> int:
    """Run torch and FAISS single-threaded on this thread from now on (OpenMP's and MKL's local
    thread counts are per thread, so other threads keep theirs); returns how many libraries were
    told. Cheap after the first call on a thread, which a server makes on every hop to a pool
    thread."""
    told = getattr(_here, "told", None)
    if told is not None:
        return told
    import torch

    torch.get_num_threads()  # torch's own per-thread set-up first, or its first kernel here would undo ours
    told = 0
    for path, setter in thread_counts():
        try:
            getattr(ctypes.CDLL(path), setter)(1)
        except (OSError, AttributeError):
            continue
        told += 1
    _here.told = told
    return told


def alone_then(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, run after `alone()` on whatever thread calls it."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        alone()
        return fn(*args, **kwargs)

    return run


@functools.cache
def thread_counts() -> frozenset[tuple[str, str]]:
    """(library path, its per-thread setter) for what is mapped into this process: torch's and
    FAISS's OpenMP runtimes, torch's MKL. Read once per process (the memory map takes about
    0.6 ms), with torch and FAISS loaded first so that their runtimes are in it."""
    import faiss  # noqa: F401
    import torch  # noqa: F401

    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            paths = {parts[5].strip() for parts in map(lambda line: line.split(None, 5), f)
                     if len(parts) == 6 and parts[5].startswith("/")}
    except OSError:  # not Linux: nothing known to throttle, nothing done
        return frozenset()
    return frozenset((p, setter) for p in paths for pattern, setter in _SETTERS if pattern.match(os.path.basename(p)))
