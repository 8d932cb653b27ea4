"""What every route reads: the live engine (replaced whole by an encoder swap), the settings,
metrics, the batcher and the request checks."""
from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from retrieval.engine import Engine
from retrieval.images import ImageLimits
from server.batching import QueryBatcher
from server.metrics import Metrics
from server.request_checks import RequestChecks
from server.settings import ServerSettings


@dataclass
class ServerState:
    engine: Engine
    settings: ServerSettings
    metrics: Metrics
    batcher: QueryBatcher
    checks: RequestChecks
    limits: ImageLimits


def state(request: Request) -> ServerState:
    return request.app.state.umr
