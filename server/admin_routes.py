"""Admin routes: activating another registered encoder version with no downtime."""
from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Header
from fastapi.concurrency import run_in_threadpool

from index.errors import IndexError_
from retrieval.encoders.base import EncoderError
from retrieval.engine_swap import SwapRefused, activate, engine_for_version
from server.errors import ApiError, declared
from server.request_checks import require_json
from server.schemas import ActivateEncoder
from server.state import ServerState, state

router = APIRouter()


def require_admin(st: ServerState = Depends(state), authorization: str | None = Header(None),
                  x_api_key: str | None = Header(None)) -> None:
    key = st.settings.admin_key
    if not key:
        raise ApiError(403, "admin_disabled", "admin endpoints are off: start the server with UMR_ADMIN_KEY or --admin-key-file")
    given = x_api_key or (authorization[7:] if authorization and authorization.lower().startswith("bearer ") else None)
    if not given or not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong admin API key (Authorization: Bearer KEY or X-API-Key)")


def swap(st: ServerState, version: int) -> dict:
    old = st.engine
    new = engine_for_version(old, version)
    if new is None:
        return {"active_version": version, "previous_version": old.version, "changed": False}

    def publish(engine):  # requests already running keep the engine they captured
        st.engine = engine

    activate(old, new, publish)
    return {"active_version": version, "previous_version": old.version, "changed": True,
            "compensators": new.info()["query_encoder"]["compensators"]}


@router.post("/v1/admin/encoder", dependencies=[Depends(require_admin), Depends(require_json)],
             responses=declared(401, 403, 404, 409, 415, 422))
async def activate_encoder(req: ActivateEncoder, st: ServerState = Depends(state)):
    """Activate a registered encoder version with no downtime."""
    try:
        return await run_in_threadpool(swap, st, req.version)
    except SwapRefused as e:
        raise ApiError(404 if e.reason == "unknown_version" else 409, e.reason, str(e)) from None
    except (EncoderError, IndexError_) as e:
        raise ApiError(409, "activation_failed", str(e)) from None
