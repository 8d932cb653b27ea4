"""Document routes: add (durable on 200), get, delete."""
from __future__ import annotations

import functools
import io

from fastapi import APIRouter, Depends, Query, Request
from umr.server.threads import in_thread
from fastapi.responses import FileResponse, Response

from umr.index.errors import NotFound, UmrError
from umr.retrieval.images import BadImage, open_image
from umr.retrieval.items import Item
from umr.server.auth import requires
from umr.server.errors import ApiError, declared, refusal
from umr.server.forwarding import relayed
from umr.server.request_checks import require_json
from umr.server.schemas import Document, DocumentsAdded, DocumentsIn
from umr.server.state import ServerState, state

router = APIRouter()
MAX_THUMBNAIL = 1024
CACHE = {"Cache-Control": "private, max-age=3600"}


def media_type(path: str) -> str:
    from PIL import Image

    with Image.open(path) as img:
        return Image.MIME.get(img.format or "", "application/octet-stream")


@functools.lru_cache(maxsize=512)
def thumbnail(path: str, mtime_ns: int, size: int) -> bytes:
    """JPEG with its longest side `size`; cached by path, modification time and size (a
    results page asks for the same thumbnails again and again; 512 of them are a few MB)."""
    from PIL import Image

    img = open_image(path, min_side=size).copy()
    img.thumbnail((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def refuse_if_read_only(st: ServerState) -> None:
    if st.engine.store.mode != "write":
        raise ApiError(403, "read_only", "this server serves its index read-only (umr serve --read-only): "
                                         "send writes to the server that holds the index's write lock")


@router.post("/v1/documents", response_model=DocumentsAdded, responses=declared(400, 401, 403, 409, 413, 415, 422, 429),
             dependencies=[requires("write"), Depends(require_json)])
async def add_documents(req: DocumentsIn, request: Request, st: ServerState = Depends(state)):
    """Add or replace documents. Durable once this returns 200; a request with one bad document
    stores none of them."""
    if st.forwarder is not None:
        return await relayed(request, st)
    refuse_if_read_only(st)
    limit = st.settings.max_documents_per_request
    if not 1 <= len(req.documents) <= limit:
        raise ApiError(422, "limit_documents", f"send 1 to {limit} documents per request (max_documents_per_request)")
    items = []
    for d in req.documents:
        st.checks.document(d.id, d.text, bool(d.image), d.metadata)
        image = st.checks.base64_image(d.image, f"document {d.id[:80]!r} image") if d.image else None
        items.append(Item(d.id, d.text, image, d.metadata))
    try:
        added = await in_thread(st.engine.add, items, st.limits)
    except UmrError as e:  # IndexMismatch: another encoder version was activated while these were embedded
        raise refusal(e, "document") from None
    return DocumentsAdded(added=added)


@router.get("/v1/documents/{doc_id:path}/image", response_class=Response, dependencies=[requires("read")],
            responses={**declared(401, 403, 404, 422, 429), 200: {"content": {"image/*": {}}, "description": "The image"}})
async def document_image(doc_id: str, size: int | None = Query(None, ge=16, le=MAX_THUMBNAIL,
                                                                description="Longest side of a JPEG thumbnail"),
                         st: ServerState = Depends(state)):
    """The stored image of a document, or a thumbnail of it (`?size=`)."""
    try:
        doc = await in_thread(st.engine.get, doc_id)
    except NotFound as e:
        raise refusal(e) from None
    path = st.engine.image_path(doc)
    if path is None:
        raise ApiError(404, "no_image", f"document {doc_id!r} has no image")
    try:
        if size is None:
            return FileResponse(path, media_type=await in_thread(media_type, str(path)), headers=CACHE)
        data = await in_thread(thumbnail, str(path), path.stat().st_mtime_ns, size)
    except (OSError, BadImage):
        raise ApiError(404, "image_missing", f"the image of document {doc_id!r} is missing or unreadable on the server") from None
    return Response(data, media_type="image/jpeg", headers=CACHE)


@router.get("/v1/documents/{doc_id:path}", response_model=Document, responses=declared(401, 403, 404, 429),
            dependencies=[requires("read")])
async def get_document(doc_id: str, st: ServerState = Depends(state)):
    try:
        return Document.of(await in_thread(st.engine.get, doc_id))
    except NotFound as e:
        raise refusal(e) from None


@router.delete("/v1/documents/{doc_id:path}", responses=declared(401, 403, 404, 429), dependencies=[requires("write")])
async def delete_document(doc_id: str, request: Request, st: ServerState = Depends(state)):
    if st.forwarder is not None:
        return await relayed(request, st)
    refuse_if_read_only(st)
    gone = await in_thread(st.engine.delete, [doc_id])
    if not gone:
        raise ApiError(404, "not_found", f"no document with id {doc_id!r}")
    return {"deleted": gone}
