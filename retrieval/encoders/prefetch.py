"""Decode and preprocess upcoming batches in worker threads while the model runs the current one.

PIL releases the GIL while decoding and resizing, so threads overlap with the torch forward
without the start-up and pickling cost of processes. Results come back in input order.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from umr.retrieval.device import default_workers

T = TypeVar("T")
R = TypeVar("R")


def apply_each(fn: Callable[[T], R], chunk: list[T]) -> list[R | Exception]:
    """fn of each element, or the exception it raised: one bad item never ends a batch."""
    out: list[R | Exception] = []
    for x in chunk:
        try:
            out.append(fn(x))
        except Exception as e:  # reported per item by the caller
            out.append(e)
    return out


def prefetch_batches(chunks: Iterable[list[T]], fn: Callable[[T], R], workers: int | None = None,
                     ahead: int = 2) -> Iterator[tuple[list[T], list[R | Exception]]]:
    """Yield (chunk, fn applied to each element or the exception it raised), `ahead` chunks in
    flight; `workers` threads (default: one per core, retrieval/device.py)."""
    workers = workers or default_workers()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            # Split each chunk across the workers so one batch decodes in parallel too; never into
            # more parts than items (a one-query call must not start a thread per core).
            parts = max(1, min(workers, len(chunk)))
            pending.append((chunk, parts, [pool.submit(apply_each, fn, chunk[i::parts]) for i in range(parts)]))
            if len(pending) > ahead:
                yield _collect(*pending.popleft())
        while pending:
            yield _collect(*pending.popleft())


def _collect(chunk, parts, futures):
    out = [None] * len(chunk)
    for i, f in enumerate(futures):
        out[i::parts] = f.result()
    return chunk, out
