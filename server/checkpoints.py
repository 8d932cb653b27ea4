"""Background FAISS checkpoints, so a restart replays a bounded number of rows.

Adds are durable in the document store at once; the FAISS files are checkpoints of it, and
rows newer than a checkpoint are replayed on open. Checkpointing only at shutdown would make
every restart after a crash replay everything since the last clean one. A checkpoint writes
only dirty segments, atomically, outside the lock searches take.
"""
from __future__ import annotations

import asyncio
import logging
import time

from umr.server.threads import in_thread

from umr.server.tasks import cancel

log = logging.getLogger("umr.server")


class Checkpointer:
    def __init__(self, state, every_rows: int, every_s: float, poll_s: float = 0.5):
        self.state, self.every_rows, self.every_s, self.poll_s = state, every_rows, every_s, poll_s
        self.done = 0
        self._task: asyncio.Task | None = None

    def due(self) -> bool:
        store = self.state.engine.store
        if store.dirty_since is None:
            return False
        by_rows = self.every_rows > 0 and store.rows_since_checkpoint >= self.every_rows
        by_time = self.every_s > 0 and time.monotonic() - store.dirty_since >= self.every_s
        return by_rows or by_time

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            if not self.due():
                continue
            try:
                await in_thread(self.state.engine.checkpoint)
                self.done += 1
            except Exception:  # noqa: BLE001 - logged; the rows stay durable in the document store
                log.exception("background checkpoint failed; retrying at the next interval")

    def start(self) -> None:
        if self.state.engine.store.mode == "write" and (self.every_rows > 0 or self.every_s > 0):
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await cancel(self._task)
