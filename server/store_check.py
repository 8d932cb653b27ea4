"""A document store too large to check before serving (integrity.OPEN_CHECK_MAX_BYTES) is
checked while the server answers, on a connection of its own (so searches go on meanwhile).
Should the check fail, every route, /healthz included, answers 503 `index_damaged` from then
on: a load balancer takes the server out, and no client is served from a damaged store."""
from __future__ import annotations

import asyncio
import logging

from umr.server.threads import in_thread

from umr.index.docstore import DocStore
from umr.server.tasks import cancel

log = logging.getLogger("umr.server")


def problems_of(path: str) -> list[str]:
    docs = DocStore(path, read_only=True)
    try:
        return docs.integrity_problems()
    finally:
        docs.close()


class StoreCheck:
    def __init__(self, state):
        self.state = state
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        docs = self.state.engine.store.docs
        if not docs.checked:
            self._task = asyncio.create_task(self._run(docs.path))

    async def _run(self, path: str) -> None:
        log.info("checking the document store %s in the background (too large to check before serving)", path)
        try:
            problems = await in_thread(problems_of, path)
        except Exception as e:  # noqa: BLE001 - a store that cannot even be opened again is damaged too
            problems = [f"{e.__class__.__name__}: {e}"]
        if problems:
            self.state.damaged = (f"{len(problems)} problem(s), first: {problems[0][:100]}")
            log.error("the document store %s is damaged (%s); answering 503 to every request from now on: restore it "
                      "from a backup (`umr index verify` lists what else is intact)", path, self.state.damaged)
        else:
            log.info("the document store %s passed its integrity check", path)

    async def stop(self) -> None:
        await cancel(self._task)
