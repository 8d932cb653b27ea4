"""Document routes: add (durable on 200), get, delete."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from index.document_rules import InvalidDocument
from index.errors import IndexError_, NotFound
from retrieval.encoders.base import EncoderError
from retrieval.images import BadImage
from retrieval.items import Item
from server.errors import ApiError, declared
from server.request_checks import require_json
from server.schemas import Document, DocumentsAdded, DocumentsIn
from server.state import ServerState, state

router = APIRouter()


@router.post("/v1/documents", response_model=DocumentsAdded, responses=declared(400, 409, 413, 415, 422),
             dependencies=[Depends(require_json)])
async def add_documents(req: DocumentsIn, st: ServerState = Depends(state)):
    """Add or replace documents. Durable once this returns 200; a request with one bad document
    stores none of them."""
    limit = st.settings.max_documents_per_request
    if not 1 <= len(req.documents) <= limit:
        raise ApiError(422, "limit_documents", f"send 1 to {limit} documents per request (max_documents_per_request)")
    items = []
    for d in req.documents:
        st.checks.document(d.id, d.text, bool(d.image), d.metadata)
        image = st.checks.base64_image(d.image, f"document {d.id[:80]!r} image") if d.image else None
        items.append(Item(d.id, d.text, image, d.metadata))
    try:
        added = await run_in_threadpool(st.engine.add, items, st.limits)
    except BadImage as e:
        raise ApiError(413 if e.code.startswith("limit") else 400, e.code, f"image: {e}") from None
    except InvalidDocument as e:
        raise ApiError(422, "invalid_document", str(e)) from None
    except IndexError_ as e:
        raise ApiError(409, "index_changed", str(e)) from None
    except (ValueError, EncoderError) as e:
        raise ApiError(400, "invalid_document", str(e)) from None
    return DocumentsAdded(added=added)


@router.get("/v1/documents/{doc_id:path}", response_model=Document, responses=declared(404))
async def get_document(doc_id: str, st: ServerState = Depends(state)):
    try:
        return Document(**(await run_in_threadpool(st.engine.get, doc_id)).to_dict())
    except NotFound as e:
        raise ApiError(404, "not_found", str(e)) from None


@router.delete("/v1/documents/{doc_id:path}", responses=declared(404))
async def delete_document(doc_id: str, st: ServerState = Depends(state)):
    gone = await run_in_threadpool(st.engine.delete, [doc_id])
    if not gone:
        raise ApiError(404, "not_found", f"no document with id {doc_id!r}")
    return {"deleted": gone}
