"""The FastAPI application: routes, error shape, request ids."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from api.admission import AdmissionMiddleware
from api.body_limit import BodyLimitMiddleware
from api.errors import install_handlers
from api.idempotency import IdempotencyMiddleware
from api.keys import AuthMiddleware
from api.metrics import MetricsMiddleware, RouteTemplateMiddleware
from api.openapi import declare_bearer_auth
from api.request_id import RequestIdMiddleware
from api.routes import checkpoints, dashboard, files, graders, health, jobs, models, uploads
from api.routes import streams as stream_routes
from api.routes import webhooks as webhook_routes
from api.services import Services
from api.settings import Settings, load_settings

THREAD_HEADROOM = 20


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Sync routes and their sessions run in anyio's default thread pool: one thread per
        # admitted request (api/admission.py), plus headroom for the work outside admission
        # (stream polls and chunk reads, health checks). 20 + 20 is anyio's own default, 40.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = settings.api_places + settings.api_upload_places + THREAD_HEADROOM
        services.key_cache.start()
        # What is alive now (modules, routes, schemas, the pool) lives as long as the
        # process: out of the collector's sight, a full collection no longer walks it while
        # every request waits (p99 at 64 clients, one process: 216 -> 170 ms; benchmarks.md).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            services.key_cache.stop()
            await services.reads.dispose()

    app = FastAPI(
        lifespan=lifespan,
        title="alignd",
        version="0.1.0",
        description="Alignment fine-tuning as a service; /v1 is a superset of OpenAI's fine-tuning API.",
        # One schema per model, as requests take it (api/openapi.py): the method blocks show
        # only what a job stored, which a serialization-mode schema could not describe.
        separate_input_output_schemas=False,
    )
    services = app.state.services = Services.build(settings)
    install_handlers(app)
    declare_bearer_auth(app)
    # Innermost: it reads the route the router chose, for MetricsMiddleware (api/metrics.py).
    app.add_middleware(RouteTemplateMiddleware)
    # Innermost first: idempotency needs the principal that auth leaves in the scope, and the
    # request id must be outermost so that 401 and 429 answers carry it too.
    app.add_middleware(IdempotencyMiddleware, sessions=services.sessions)
    # Key lookups only read: autocommit sessions (api/db.py), and a cache before them.
    app.add_middleware(
        AuthMiddleware,
        sessions=services.read_sessions,
        settings=settings,
        cache=services.key_cache,
    )
    # Outside auth, which takes a connection too; at most the pool's size (api/admission.py).
    app.add_middleware(
        AdmissionMiddleware,
        capacity=settings.api_places,
        upload_capacity=settings.api_upload_places,
        queue_timeout_s=settings.api_queue_timeout_s,
    )
    # Before auth: an oversized body is refused from its Content-Length, whoever sends it.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_json_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    # Outermost: every answer counts, a refused one too (api/metrics.py).
    app.add_middleware(MetricsMiddleware)
    # The router tries these in order, for every request: the job routes, which clients poll,
    # first (their paths overlap no other router's, so the order changes no match).
    for module in (jobs, files, uploads, checkpoints, models, graders, health):
        app.include_router(module.router)
    app.include_router(stream_routes.router)
    app.include_router(webhook_routes.router)
    # The web dashboard at /: open, as /healthz is (it holds no data; it signs in with a key).
    app.include_router(dashboard.router)
    return app
