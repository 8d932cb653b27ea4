"""Index info, health and Prometheus metrics."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from server.state import ServerState, state

router = APIRouter()


@router.get("/v1/index")
async def index_info(st: ServerState = Depends(state)):
    return await run_in_threadpool(st.engine.info)


@router.get("/healthz")
async def healthz(st: ServerState = Depends(state)):
    return {"status": "ok", "documents": st.engine.store.count(), "encoder_version": st.engine.version}


@router.get("/metrics")
async def prometheus(st: ServerState = Depends(state)):
    return Response(st.metrics.render(), media_type="text/plain; version=0.0.4")
