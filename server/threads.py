"""Work the event loop hands to a pool thread, run there without an OpenMP team of its own
(retrieval/cpu_threads.py): the batcher's model thread keeps the process's only team, so a
lone query's forward is not slowed by every thread that once added, decoded or checkpointed."""
from __future__ import annotations

from typing import Callable, TypeVar

from fastapi.concurrency import run_in_threadpool

from umr.retrieval.cpu_threads import alone_then

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    return await run_in_threadpool(alone_then(fn), *args, **kwargs)
