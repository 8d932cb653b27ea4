"""The FastAPI app: routes for search, documents, index info, health and metrics.

Input is untrusted: every size is bounded before work is done, images are decoded with pixel
limits in worker threads, nothing is fetched from a URL or read from a path in a request, and
any violation is a 4xx JSON error naming the limit while the server keeps serving.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from index.errors import IndexError_, NotFound
from retrieval.encoders.base import EncoderError
from retrieval.engine import Engine, Query
from retrieval.images import BadImage, ImageLimits
from retrieval.items import Item, parse_modalities
from server.batching import Pending, QueryBatcher
from server.metrics import Metrics
from server.schemas import (ActivateEncoder, BatchSearchRequest, BatchSearchResponse, Document, DocumentsAdded, DocumentsIn, Hit,
                            SearchRequest, SearchResponse)
from server.settings import ServerSettings


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class BodyLimit:
    """Pure ASGI middleware: refuse bodies over the limit before they are buffered."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                resp = _error(413, "limit_body_bytes",
                              f"request body is {int(value)} bytes, over the limit of {self.max_bytes} (max_body_bytes)")
                return await resp(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, "limit_body_bytes", f"request body is over the limit of {self.max_bytes} bytes")
            return msg

        return await self.app(scope, limited, send)


class RequestMetrics:
    """Pure ASGI middleware (no extra task per request): count and time requests by route."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


def _hit(h) -> Hit:
    d = h.doc
    return Hit(id=d.id, score=round(h.score, 6), cosine=None if h.cosine is None else round(h.cosine, 6), rerank=h.details,
               modality=d.modality, text=d.text, image=d.image, metadata=d.metadata)


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = Metrics()
    batcher = QueryBatcher(settings, metrics)
    limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()
        await run_in_threadpool(app.state.engine.checkpoint)

    app = FastAPI(title="umr", version="0.1.0", lifespan=lifespan,
                  description="Universal multimodal retrieval: search images, texts and image+text items.")
    app.state.engine, app.state.settings, app.state.metrics, app.state.batcher = engine, settings, metrics, batcher

    # -- errors ---------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e.status, e.code, e.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            if err.get("type") == "extra_forbidden":
                parts.append(f"unknown field '{loc}'")
            else:
                parts.append(f"{loc or 'body'}: {err.get('msg')}")
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, "http_error", str(e.detail))

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)

    # -- helpers --------------------------------------------------------------------------
    def require_json(request: Request) -> None:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type must be application/json, got {ctype or 'none'!r}")

    def check_text(text: str | None, field: str) -> None:
        if text is not None and len(text) > settings.max_text_chars:
            raise ApiError(413, "limit_text_chars",
                           f"{field} has {len(text)} characters, over the limit of {settings.max_text_chars} (max_text_chars)")

    def check_k(k: int) -> None:
        if not 1 <= k <= settings.max_k:
            raise ApiError(422, "limit_k", f"k must be between 1 and {settings.max_k} (max_k), got {k}")

    def decode_b64(data: str, field: str) -> bytes:
        if len(data) * 3 // 4 > settings.max_image_bytes:
            raise ApiError(413, "limit_image_bytes",
                           f"{field} is about {len(data) * 3 // 4} bytes, over the limit of {settings.max_image_bytes} (max_image_bytes)")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_base64", f"{field} is not valid base64") from None

    def modalities_of(m) -> list[str] | None:
        try:
            return parse_modalities(m)
        except ValueError as e:
            raise ApiError(422, "invalid_modality", str(e)) from None

    async def prepare(eng: Engine, q: Query):
        batcher.preparing += 1
        try:
            if q.image is None:  # text is only tokenised in the batched forward: nothing to offload
                return eng.prepare_query(q, limits)
            return await run_in_threadpool(eng.prepare_query, q, limits)
        except BadImage as e:
            code = "limit_image_pixels" if "pixels" in str(e) else ("limit_image_bytes" if "bytes" in str(e) else "invalid_image")
            status = 413 if code.startswith("limit") else 400
            raise ApiError(status, code, f"image: {e}") from None
        except (EncoderError, ValueError) as e:
            raise ApiError(400, "invalid_query", str(e)) from None
        finally:
            batcher.preparing -= 1

    def validate(req: SearchRequest) -> None:
        check_k(req.k)
        check_text(req.text, "text")
        check_text(req.instruction, "instruction")
        if not (req.text and req.text.strip()) and not req.image:
            raise ApiError(422, "empty_query", "a query needs text, image or both")

    async def pending_for(eng: Engine, req: SearchRequest) -> Pending:
        image = decode_b64(req.image, "image") if req.image else None
        prepared = await prepare(eng, Query(req.text, image, req.instruction))
        return Pending(eng, prepared, req.k, modalities_of(req.modality), req.filter, req.calibrated)

    async def run(pendings: list[Pending]):
        try:
            return await batcher.run(pendings)
        except (ValueError, IndexError_) as e:
            raise ApiError(400, "invalid_search", str(e)) from None

    # -- routes ---------------------------------------------------------------------------
    @app.post("/v1/search", response_model=SearchResponse, dependencies=[Depends(require_json)])
    async def search(req: SearchRequest):
        """Search with text, a base64 image, or both (fused), optionally with an instruction."""
        t0 = time.perf_counter()
        validate(req)
        eng = app.state.engine
        hits = (await run([await pending_for(eng, req)]))[0]
        return SearchResponse(results=[_hit(h) for h in hits], took_ms=round((time.perf_counter() - t0) * 1000, 3),
                              encoder_version=eng.version)

    @app.post("/v1/search/image", response_model=SearchResponse)
    async def search_image(file: UploadFile = File(...), text: str | None = Form(None), k: int = Form(10),
                           instruction: str | None = Form(None), modality: str | None = Form(None),
                           calibrated: bool = Form(True)):
        """Search with an uploaded image file (multipart), optionally with text."""
        t0 = time.perf_counter()
        check_k(k)
        check_text(text, "text")
        check_text(instruction, "instruction")
        data = await file.read(settings.max_image_bytes + 1)
        if len(data) > settings.max_image_bytes:
            raise ApiError(413, "limit_image_bytes", f"image is over the limit of {settings.max_image_bytes} bytes (max_image_bytes)")
        eng = app.state.engine
        prepared = await prepare(eng, Query(text, data, instruction))
        hits = (await run([Pending(eng, prepared, k, modalities_of(modality), None, calibrated)]))[0]
        return SearchResponse(results=[_hit(h) for h in hits], took_ms=round((time.perf_counter() - t0) * 1000, 3),
                              encoder_version=eng.version)

    @app.post("/v1/search/batch", response_model=BatchSearchResponse, dependencies=[Depends(require_json)])
    async def search_batch(req: BatchSearchRequest):
        """Several queries in one request, encoded in one forward."""
        t0 = time.perf_counter()
        if not 1 <= len(req.queries) <= settings.max_batch_queries:
            raise ApiError(422, "limit_batch_queries",
                           f"a batch holds 1 to {settings.max_batch_queries} queries (max_batch_queries), got {len(req.queries)}")
        for q in req.queries:
            validate(q)
        eng = app.state.engine
        pendings = [await pending_for(eng, q) for q in req.queries]
        results = await run(pendings)
        return BatchSearchResponse(results=[[_hit(h) for h in r] for r in results],
                                   took_ms=round((time.perf_counter() - t0) * 1000, 3), encoder_version=eng.version)

    @app.post("/v1/documents", response_model=DocumentsAdded, dependencies=[Depends(require_json)])
    async def add_documents(req: DocumentsIn):
        """Add or replace documents. Durable once this returns 200."""
        if not 1 <= len(req.documents) <= settings.max_documents_per_request:
            raise ApiError(422, "limit_documents",
                           f"send 1 to {settings.max_documents_per_request} documents per request (max_documents_per_request)")
        items = []
        for d in req.documents:
            check_text(d.text, f"document {d.id} text")
            image = decode_b64(d.image, f"document {d.id} image") if d.image else None
            if image is None and not (d.text and d.text.strip()):
                raise ApiError(422, "empty_document", f"document {d.id} has neither text nor image")
            items.append(Item(d.id, d.text, image, d.metadata))
        try:
            added = await run_in_threadpool(app.state.engine.add, items, limits)
        except BadImage as e:
            raise ApiError(400, "invalid_image", f"image: {e}") from None
        except (ValueError, EncoderError, IndexError_) as e:
            raise ApiError(400, "invalid_document", str(e)) from None
        return DocumentsAdded(added=added)

    @app.get("/v1/documents/{doc_id:path}", response_model=Document)
    async def get_document(doc_id: str):
        try:
            return Document(**(await run_in_threadpool(app.state.engine.get, doc_id)).to_dict())
        except NotFound as e:
            raise ApiError(404, "not_found", str(e)) from None

    @app.delete("/v1/documents/{doc_id:path}")
    async def delete_document(doc_id: str):
        gone = await run_in_threadpool(app.state.engine.delete, [doc_id])
        if not gone:
            raise ApiError(404, "not_found", f"no document with id {doc_id!r}")
        return {"deleted": gone}

    def require_admin(authorization: str | None = Header(None), x_api_key: str | None = Header(None)) -> None:
        if not settings.admin_key:
            raise ApiError(403, "admin_disabled", "admin endpoints are off: start the server with UMR_ADMIN_KEY or --admin-key-file")
        given = x_api_key or (authorization[7:] if authorization and authorization.lower().startswith("bearer ") else None)
        if not given or not hmac.compare_digest(given.encode(), settings.admin_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong admin API key (Authorization: Bearer KEY or X-API-Key)")

    def swap_engine(version: int) -> dict:
        old: Engine = app.state.engine
        store = old.store
        store.refresh_registrations()
        try:
            rec = store.version(version)
        except IndexError_:
            raise ApiError(404, "unknown_version", f"encoder version {version} is not registered; run `umr update --no-activate` first") from None
        if version == old.version:
            return {"active_version": version, "previous_version": old.version, "changed": False}
        from retrieval.encoders import load_recorded

        new = Engine(store, load_recorded(rec))  # loads weights and compensators; serving goes on meanwhile
        for seg_id, comps in new.compensators.items():
            if not comps:
                raise ApiError(409, "no_compensators", f"version {version} has no compensator into segment {seg_id}; "
                                                       "run `umr update` for it first")
        if old.reranker is not None:
            try:
                new.use_reranker(old.reranker, old.rerank_depth, old.rerank_weight)
            except ValueError as e:
                raise ApiError(409, "reranker", str(e)) from None
        with old.write_lock:
            store.activate(version)
            app.state.engine = new  # requests already running keep the engine they captured
        return {"active_version": version, "previous_version": old.version, "changed": True,
                "compensators": new.info()["query_encoder"]["compensators"]}

    @app.post("/v1/admin/encoder", dependencies=[Depends(require_admin), Depends(require_json)])
    async def activate_encoder(req: ActivateEncoder):
        """Activate a registered encoder version with no downtime."""
        try:
            return await run_in_threadpool(swap_engine, req.version)
        except (EncoderError, IndexError_) as e:
            raise ApiError(409, "activation_failed", str(e)) from None

    @app.get("/v1/index")
    async def index_info():
        return await run_in_threadpool(app.state.engine.info)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "documents": app.state.engine.store.count(), "encoder_version": app.state.engine.version}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
