"""Index info, health and Prometheus metrics."""
from __future__ import annotations

import os
import re
from pathlib import PurePosixPath, PureWindowsPath

from fastapi import APIRouter, Depends
from umr.server.threads import in_thread
from fastapi.responses import Response

from umr.server.auth import requires
from umr.server.errors import declared
from umr.server.state import ServerState, state

router = APIRouter()


def without_paths(value):
    """The index info as clients see it: where files lie on the server is the server's business,
    so absolute paths (the index folder, corpora, encoder folders) are cut to their last part."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items() if k != "path"}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return PurePosixPath(value).name
    if isinstance(value, str) and re.match(r"^[A-Za-z]:[\\/]", value):
        return PureWindowsPath(value).name
    return value


@router.get("/v1/index", dependencies=[requires("read")], responses=declared(401, 403, 429))
async def index_info(st: ServerState = Depends(state)):
    info = without_paths(await in_thread(st.engine.info))
    info["serving"] = {"mode": st.engine.store.mode, "replica": st.settings.replica_name, "pid": os.getpid(),
                       "relays_writes": st.forwarder is not None,
                       "follows": st.follower.info() if st.follower is not None else None}
    return info


@router.get("/healthz")
async def healthz(st: ServerState = Depends(state)):
    out = {"status": "ok", "documents": st.engine.store.count(), "encoder_version": st.engine.version}
    if st.settings.replica_name:
        out["replica"] = st.settings.replica_name
    return out


@router.get("/metrics", dependencies=[requires("read")], responses=declared(401, 403, 429))
async def prometheus(st: ServerState = Depends(state)):
    return Response(st.metrics.render(), media_type="text/plain; version=0.0.4")
