"""Micro-batching: concurrent queries share one encoder forward and one index search call.

One dedicated thread encodes and searches each batch of searches, so the event loop never
blocks on it. It is the only thread of the process with an OpenMP team: what does not go through
here runs single-threaded on the event loop's worker threads (adds embed their documents there,
and with --no-batching each search runs there on its own; retrieval/cpu_threads.py says why).
The forward and the search each use every core, so a second stage (search on its own thread
beside the next forward) would only split the load into two half-size batches (docs/benchmarks.md,
after the search section, has the measurement). A batch starts
as soon as the thread is free. It waits up to `max_wait`
for more queries only while some are still being decoded, or while fewer have arrived than
were waiting at the end of the last batch: under load the clients just answered come straight
back, and waiting for them keeps batches full instead of settling into two alternating halves.
A lone client never waits.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from umr.retrieval.cpu_threads import alone_then
from umr.retrieval.encoders.base import Prepared
from umr.retrieval.engine import Engine
from umr.server.metrics import Metrics
from umr.server.settings import ServerSettings
from umr.server.tasks import cancel

log = logging.getLogger("umr.server")


@dataclass
class Pending:
    engine: Engine  # the engine the request started on: a swap never changes it mid-request
    prepared: Prepared
    k: int
    modalities: list[str] | None
    flt: dict | None
    calibrated: bool = True
    future: asyncio.Future = field(default=None)


class QueryBatcher:
    def __init__(self, settings: ServerSettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="umr-model")
        self.queue: asyncio.Queue[Pending] | None = None
        self.preparing = 0  # requests decoding their input, about to enqueue
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._expect = 1  # queries answered by the last batch plus those that queued meanwhile

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self._arrived = asyncio.Event()
        if self.settings.micro_batching:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await cancel(self._task)
        self.model_thread.shutdown(wait=True)

    async def run(self, items: list[Pending]) -> list:
        """Each item's hits, or the exception that item alone raised (a failing query never
        fails the others, and the caller can say which one failed)."""
        loop = asyncio.get_running_loop()
        if not self.settings.micro_batching:
            try:
                return await loop.run_in_executor(None, alone_then(self._execute), items)
            except Exception as e:  # noqa: BLE001 - isolated below
                if len(items) == 1:
                    return [e]
                return [await self._alone(p, loop.run_in_executor(None, alone_then(self._execute), [p])) for p in items]
        for p in items:
            p.future = loop.create_future()
            self.queue.put_nowait(p)
        self._arrived.set()
        return list(await asyncio.gather(*(p.future for p in items), return_exceptions=True))

    @staticmethod
    async def _alone(p: Pending, run) -> object:
        try:
            return (await run)[0]
        except Exception as e:  # noqa: BLE001 - handed to that query alone
            return e

    async def _gather(self) -> list[Pending]:
        loop = asyncio.get_running_loop()
        max_size = self.settings.batch_max_size
        batch = [await self.queue.get()]
        expect = min(max_size, self._expect)
        deadline = loop.time() + self.settings.batch_max_wait_ms / 1000
        while len(batch) < max_size:
            while len(batch) < max_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            remaining = deadline - loop.time()
            if len(batch) >= max_size or remaining <= 0 or (self.preparing <= 0 and len(batch) >= expect):
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            try:
                results, error = await loop.run_in_executor(self.model_thread, self._execute, batch), None
            except Exception as e:  # noqa: BLE001 - isolated below
                results, error = None, e
            self._expect = len(batch) + self.queue.qsize()
            if error is not None:
                await self._isolate(batch, error)
                continue
            for p, r in zip(batch, results):
                self._settle(p, r)

    async def _isolate(self, batch: list[Pending], error: Exception) -> None:
        """One member's failure must not fail the others: each is rerun on its own, so only the
        one that raised gets the error."""
        if len(batch) == 1:
            self._settle(batch[0], error=error)
            return
        log.warning("a batch of %d failed (%s: %s); rerunning its queries one by one",
                    len(batch), error.__class__.__name__, str(error)[:200])
        loop = asyncio.get_running_loop()
        for p in batch:
            try:
                self._settle(p, (await loop.run_in_executor(self.model_thread, self._execute, [p]))[0])
            except Exception as member_error:  # noqa: BLE001 - handed to that request alone
                self._settle(p, error=member_error)

    @staticmethod
    def _settle(p: Pending, result=None, error: BaseException | None = None) -> None:
        if p.future.done():  # the caller went away
            return
        if error is not None:
            p.future.set_exception(error)
        else:
            p.future.set_result(result)

    def _execute(self, batch: list[Pending]) -> list[list]:
        return self._search(batch, self._encode(batch))

    def _encode(self, batch: list[Pending]) -> list[tuple[list[int], np.ndarray]]:
        """Per engine in the batch (around an encoder swap a batch may span two): its members
        and their query vectors, from one forward."""
        by_engine: dict[int, list[int]] = {}
        for i, p in enumerate(batch):
            by_engine.setdefault(id(p.engine), []).append(i)
        out = []
        for members in by_engine.values():
            t0 = time.perf_counter()
            out.append((members, batch[members[0]].engine.embed([batch[i].prepared for i in members])))
            self.metrics.encode.observe(time.perf_counter() - t0)
            self.metrics.batch_size.observe(len(members))
        return out

    def _search(self, batch: list[Pending], encoded) -> list[list]:
        results: list[list] = [None] * len(batch)
        for members, vectors in encoded:
            t1 = time.perf_counter()
            engine = batch[members[0]].engine
            groups: dict[str, list[int]] = {}
            for j, i in enumerate(members):
                p = batch[i]
                groups.setdefault(json.dumps([p.k, p.modalities, p.flt, p.calibrated], sort_keys=True), []).append(j)
            for js in groups.values():
                p = batch[members[js[0]]]
                hits = engine.search_prepared([batch[members[j]].prepared for j in js], vectors[js], p.k,
                                              p.modalities, p.flt, p.calibrated)
                for j, h in zip(js, hits):
                    results[members[j]] = h
            self.metrics.search.observe(time.perf_counter() - t1)
        return results
