"""A read-only server's catch-up with the index's writer (another process).

Replicas (`umr serve --replicas N`) and `umr serve --read-only` beside a writer open the index
read-only and take no lock; the writer's adds and deletes reach them through the document store,
which this task polls (IndexStore.follow: one SQLite pragma when nothing changed). A change of
shape (another encoder version activated, a compaction) reopens the index and swaps the engine,
as an encoder swap does (retrieval/engine_swap.py), so requests never see a half-applied state.

Visibility: a write is acknowledged once the writer committed it; every follower shows it
within one poll interval plus the time to apply it, and the replica that forwarded the write
catches up before it answers, so its client reads its own write.
"""
from __future__ import annotations

import asyncio
import logging
import time

from umr.server.threads import in_thread

from umr.retrieval.engine_swap import reopened
from umr.server.tasks import cancel

log = logging.getLogger("umr.server")
# Requests that captured the engine a reopen replaced get this long to finish before its
# document store is closed under them.
RETIRE_AFTER_S = 30.0


class Follower:
    def __init__(self, state, poll_s: float):
        self.state, self.poll_s = state, poll_s
        self.rows = self.deaths = self.reopens = 0
        self.last_caught_up: float | None = None  # time.time() of the last completed look
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def catch_up(self) -> None:
        """Apply what the writer committed; one look at a time."""
        async with self._lock:
            engine = self.state.engine
            done = await in_thread(engine.store.follow)
            if done.reopen:
                log.info("reopening the index: %s", done.reopen)
                new = await in_thread(reopened, engine)
                self.state.engine = new
                self.reopens += 1
                asyncio.get_running_loop().call_later(RETIRE_AFTER_S, engine.close)
            self.rows += done.rows
            self.deaths += done.deaths
            self.last_caught_up = time.time()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.catch_up()
            except Exception:  # noqa: BLE001 - logged; the next look tries again
                log.exception("catching up with the index's writer failed; trying again in %.2f s", self.poll_s)

    def info(self) -> dict:
        return {"poll_s": self.poll_s, "rows": self.rows, "deaths": self.deaths, "reopens": self.reopens,
                "last_caught_up": self.last_caught_up}

    def start(self) -> None:
        if self.state.engine.store.mode == "read" and self.poll_s > 0:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await cancel(self._task)
