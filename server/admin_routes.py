"""Admin routes: activating another registered encoder version with no downtime."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from umr.server.threads import in_thread

from umr.index.errors import UmrError
from umr.retrieval.engine_swap import activate, engine_for_version
from umr.server.auth import requires
from umr.server.errors import declared, refusal
from umr.server.forwarding import relayed
from umr.server.request_checks import require_json
from umr.server.schemas import ActivateEncoder
from umr.server.state import ServerState, state

router = APIRouter()


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


@router.post("/v1/admin/encoder", dependencies=[requires("admin"), Depends(require_json)],
             responses=declared(401, 403, 404, 409, 415, 422, 429))
async def activate_encoder(req: ActivateEncoder, request: Request, st: ServerState = Depends(state)):
    """Activate a registered encoder version with no downtime."""
    if st.forwarder is not None:
        return await relayed(request, st)
    try:
        return await in_thread(swap, st, req.version)
    except UmrError as e:  # a damaged index stays the server's fault: 500 (server/errors.py)
        raise refusal(e, "activation") from None
