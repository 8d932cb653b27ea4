"""Search routes: JSON, multipart upload and batch; all go through the micro-batcher."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

from fastapi import APIRouter, Depends, File, Form, UploadFile
from umr.server.threads import in_thread
from fastapi.responses import Response

from umr.index.errors import ReaderBehind, UmrError
from umr.retrieval.engine import Engine, Query
from umr.server.auth import requires
from umr.server.batching import Pending
from umr.server.errors import ApiError, declared, refusal
from umr.server.request_checks import require_json
from umr.server.schemas import BatchSearchRequest, BatchSearchResponse, Hit, SearchRequest, SearchResponse
from umr.server.state import ServerState, state

router = APIRouter(dependencies=[requires("read")])
log = logging.getLogger("umr.server")


async def prepare(st: ServerState, eng: Engine, q: Query):
    """Decode and preprocess outside the model thread; every failure here is the request's own."""
    st.batcher.preparing += 1
    try:
        if q.image is None:
            # Text is prepared on the event loop: the tower encoders only check it here and
            # tokenise in the batched forward; the MLLM encoder applies its chat template and
            # tokenises here, work on at most max_text_chars that is not worth a thread hop.
            return eng.prepare_query(q, st.limits)
        return await in_thread(eng.prepare_query, q, st.limits)
    except UmrError as e:
        raise refusal(e, "query") from None
    finally:
        st.batcher.preparing -= 1


def validate(st: ServerState, req: SearchRequest) -> list[str] | None:
    """Everything about the query that needs no decoding; returns its document modalities."""
    st.checks.k(req.k)
    st.checks.query(req.text, req.image, req.instruction)
    st.checks.filter(req.filter)
    return st.checks.modalities(req.modality)


async def pending_for(st: ServerState, eng: Engine, req: SearchRequest, modalities: list[str] | None) -> Pending:
    image = st.checks.base64_image(req.image, "image") if req.image else None
    prepared = await prepare(st, eng, Query(req.text, image, req.instruction))
    return Pending(eng, prepared, req.k, modalities, req.filter, req.calibrated)


async def run(st: ServerState, pendings: list[Pending]) -> list:
    """Every query's hits; the first that failed raises, answered by server/errors.py's table
    when umr refused it on purpose and as itself otherwise (the server's fault: 5xx)."""
    results = await st.batcher.run(pendings)
    behind = [i for i, r in enumerate(results) if isinstance(r, ReaderBehind)]
    if behind and st.follower is not None:
        for i, r in zip(behind, await again_after_reopening(st, [pendings[i] for i in behind],
                                                            [results[i] for i in behind])):
            results[i] = r
    for i, r in enumerate(results):
        if isinstance(r, BaseException):
            with numbered(i if len(pendings) > 1 else None):
                raise refusal(r, "search") from None
    return results


async def again_after_reopening(st: ServerState, pendings: list[Pending], refused: list) -> list:
    """Queries a read-only server refused because its writer compacted a segment they searched
    since the follower last looked: run again once the follower has reopened the index, where
    the query, prepared by the old engine's encoder, suits the new one; else `refused`."""
    old = pendings[0].engine
    try:
        await st.follower.catch_up()
    except Exception:  # noqa: BLE001 - e.g. opened mid-compaction; the follower tries again, the refusal stands
        log.exception("reopening the index after its writer compacted it failed")
        return refused
    new = st.engine
    if new is old or new.encoder is not old.encoder:
        return refused
    return await st.batcher.run([dataclasses.replace(p, engine=new, future=None) for p in pendings])


@contextlib.contextmanager
def numbered(i: int | None):
    """A batch's errors name the query they are about (`queries[i]`) in the message and in a
    `query` field of the error body."""
    try:
        yield
    except ApiError as e:
        if i is not None and e.query is None:
            e.message, e.query = f"queries[{i}]: {e.message}", i
        raise


def json_response(model) -> Response:
    """The model serialised by pydantic-core directly: returning the model itself would have
    FastAPI validate every hit again against the response model (documented, not re-checked)."""
    return Response(model.model_dump_json(), media_type="application/json")


def response(eng: Engine, hits, t0: float) -> Response:
    return json_response(SearchResponse.model_construct(
        results=[Hit.of(h) for h in hits], took_ms=round((time.perf_counter() - t0) * 1000, 3),
        encoder_version=eng.version))


@router.post("/v1/search", response_model=SearchResponse, responses=declared(400, 401, 403, 409, 413, 415, 422, 429, 503),
             dependencies=[Depends(require_json)])
async def search(req: SearchRequest, st: ServerState = Depends(state)):
    """Search with text, a base64 image, or both (fused), optionally with an instruction."""
    t0 = time.perf_counter()
    modalities = validate(st, req)
    eng = st.engine
    return response(eng, (await run(st, [await pending_for(st, eng, req, modalities)]))[0], t0)


@router.post("/v1/search/image", response_model=SearchResponse, responses=declared(400, 401, 403, 409, 413, 422, 429, 503))
async def search_image(file: UploadFile = File(...), text: str | None = Form(None), k: int = Form(10),
                       instruction: str | None = Form(None), modality: str | None = Form(None),
                       calibrated: bool = Form(True), st: ServerState = Depends(state)):
    """Search with an uploaded image file (multipart), optionally with text."""
    t0 = time.perf_counter()
    st.checks.k(k)
    st.checks.text(text, "text")
    st.checks.text(instruction, "instruction")
    modalities = st.checks.modalities(modality)
    data = await file.read(st.settings.max_image_bytes + 1)
    if len(data) > st.settings.max_image_bytes:
        raise ApiError(413, "limit_image_bytes",
                       f"image is over the limit of {st.settings.max_image_bytes} bytes (max_image_bytes)")
    eng = st.engine
    prepared = await prepare(st, eng, Query(text, data, instruction))
    return response(eng, (await run(st, [Pending(eng, prepared, k, modalities, None, calibrated)]))[0], t0)


@router.post("/v1/search/batch", response_model=BatchSearchResponse, responses=declared(400, 401, 403, 409, 413, 415, 422, 429, 503),
             dependencies=[Depends(require_json)])
async def search_batch(req: BatchSearchRequest, st: ServerState = Depends(state)):
    """Several queries in one request, encoded in one forward."""
    t0 = time.perf_counter()
    if not 1 <= len(req.queries) <= st.settings.max_batch_queries:
        raise ApiError(422, "limit_batch_queries", f"a batch holds 1 to {st.settings.max_batch_queries} queries "
                                                   f"(max_batch_queries), got {len(req.queries)}")
    modalities = []
    for i, q in enumerate(req.queries):  # all checked before any image is decoded
        with numbered(i):
            modalities.append(validate(st, q))
    eng = st.engine
    pendings = []
    for i, (q, m) in enumerate(zip(req.queries, modalities)):
        with numbered(i):
            pendings.append(await pending_for(st, eng, q, m))
    results = await run(st, pendings)
    return json_response(BatchSearchResponse.model_construct(
        results=[[Hit.of(h) for h in r] for r in results], took_ms=round((time.perf_counter() - t0) * 1000, 3),
        encoder_version=eng.version))
