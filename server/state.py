"""What every route reads: the live engine (replaced whole by an encoder swap), the settings,
metrics, the batcher and the request checks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from umr.retrieval.engine import Engine
from umr.retrieval.images import ImageLimits
from umr.server.batching import QueryBatcher
from umr.server.errors import ApiError
from umr.server.metrics import Metrics
from umr.server.request_checks import RequestChecks
from umr.server.settings import ServerSettings

if TYPE_CHECKING:
    from umr.server.auth import Access
    from umr.server.follower import Follower
    from umr.server.forwarding import WriteForwarder


@dataclass
class ServerState:
    engine: Engine
    settings: ServerSettings
    metrics: Metrics
    batcher: QueryBatcher
    checks: RequestChecks
    limits: ImageLimits
    access: "Access"
    follower: "Follower | None" = None  # read-only servers: catching up with the writer
    forwarder: "WriteForwarder | None" = None  # replicas: where writes go
    damaged: str | None = None  # set when the document store failed its check while serving (server/store_check.py)


async def state(request: Request) -> ServerState:
    """Route dependencies are coroutines: FastAPI runs a plain `def` one on a worker thread, a
    thread hop per dependency per request (a search refused after validation took 1.6 ms with
    three of them, 0.73 ms without). A server whose document store failed its check answers
    nothing but 503 from then on."""
    st = request.app.state.umr
    if st.damaged is not None:
        raise ApiError(503, "index_damaged", "the index this server reads failed its integrity check; its operator "
                                             "should restore docs.sqlite from a backup (`umr index verify`)")
    return st
