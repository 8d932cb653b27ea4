"""The FastAPI app: state, middlewares, error handlers and the routers.

Input is untrusted: every size is bounded before work is done, images are decoded with pixel
and shape limits in worker threads, nothing is fetched from a URL or read from a path in a
request, and any violation is a 4xx JSON error naming the limit while the server keeps serving.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from umr.server.threads import in_thread

from umr.retrieval.engine import Engine
from umr.retrieval.images import ImageLimits
from umr.server import admin_routes, document_routes, info_routes, page_routes, search_routes
from umr.server.auth import Access
from umr.server.batching import QueryBatcher
from umr.server.checkpoints import Checkpointer
from umr.server.follower import Follower
from umr.server.forwarding import WriteForwarder
from umr.server.errors import InternalErrors, install_error_handlers
from umr.server.metrics import Metrics
from umr.server.middleware import BodyLimit, RequestObserver
from umr.server.request_checks import RequestChecks
from umr.server.settings import ServerSettings
from umr.server.state import ServerState
from umr.server.store_check import StoreCheck


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = Metrics()
    st = ServerState(engine=engine, settings=settings, metrics=metrics, batcher=QueryBatcher(settings, metrics),
                     checks=RequestChecks(settings),
                     limits=ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.max_image_aspect),
                     access=Access(settings))

    checkpointer = Checkpointer(st, settings.checkpoint_every_rows, settings.checkpoint_every_s)
    store_check = StoreCheck(st)
    if engine.store.mode == "read":
        st.follower = Follower(st, settings.follow_every_s)
    if settings.writer_url:
        st.forwarder = WriteForwarder(settings.writer_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await st.batcher.start()
        checkpointer.start()
        store_check.start()
        if st.follower is not None:
            st.follower.start()
        yield
        if st.follower is not None:
            await st.follower.stop()
        if st.forwarder is not None:
            await st.forwarder.close()
        await checkpointer.stop()
        await store_check.stop()
        await st.batcher.stop()
        if st.engine.store.mode == "write":
            await in_thread(st.engine.checkpoint)

    app = FastAPI(title="umr", version="0.1.0", lifespan=lifespan,
                  description="Universal multimodal retrieval: search images, texts and image+text items.")
    app.state.umr = st
    app.state.checkpointer = checkpointer
    install_error_handlers(app)
    # Added innermost first: the observer (request id, metrics, log) sees every answer, the 500
    # catcher sits outside the body limit.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(InternalErrors)
    app.add_middleware(RequestObserver, metrics=metrics)
    for module in (search_routes, document_routes, admin_routes, info_routes, page_routes):
        app.include_router(module.router)
    return app


def uvicorn_config(app: FastAPI, trusted_proxies: list[str] | None = None, **options):
    """uvicorn's settings for umr's app. Forwarded-for headers name the client only when they come
    from a proxy the operator trusts (`--trusted-proxy`): uvicorn's default believes them from
    127.0.0.1, so any local client could pose as any address and dodge its key lockout."""
    import uvicorn

    return uvicorn.Config(app, log_config=None, access_log=False, proxy_headers=bool(trusted_proxies),
                          forwarded_allow_ips=",".join(trusted_proxies) if trusted_proxies else None, **options)
