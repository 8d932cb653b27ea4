"""What every route reads: the live engine (replaced whole by an encoder swap), the settings,
metrics, the batcher and the request checks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from retrieval.engine import Engine
from retrieval.images import ImageLimits
from server.batching import QueryBatcher
from server.errors import ApiError
from server.metrics import Metrics
from server.request_checks import RequestChecks
from server.settings import ServerSettings

if TYPE_CHECKING:
    from server.auth import Access
    from server.follower import Follower
    from server.forwarding import WriteForwarder


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
