"""The FastAPI application: routes, error shape, request ids."""

from __future__ import annotations

from fastapi import FastAPI

from api.body_limit import BodyLimitMiddleware
from api.errors import install_handlers
from api.idempotency import IdempotencyMiddleware
from api.keys import AuthMiddleware
from api.request_id import RequestIdMiddleware
from api.routes import files, graders, health, jobs, models, uploads
from api.routes import streams as stream_routes
from api.routes import webhooks as webhook_routes
from api.services import Services
from api.settings import Settings, load_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    app = FastAPI(
        title="alignd",
        version="0.1.0",
        description="Alignment fine-tuning as a service; /v1 is a superset of OpenAI's fine-tuning API.",
        # One schema per model, as requests take it (api/openapi.py): the method blocks show
        # only what a job stored, which a serialization-mode schema could not describe.
        separate_input_output_schemas=False,
    )
    app.state.services = Services.build(settings)
    install_handlers(app)
    # Innermost first: idempotency needs the principal that auth leaves in the scope, and the
    # request id must be outermost so that 401 and 429 answers carry it too.
    app.add_middleware(IdempotencyMiddleware, sessions=app.state.services.sessions)
    app.add_middleware(AuthMiddleware, sessions=app.state.services.sessions, settings=settings)
    # Before auth: an oversized body is refused from its Content-Length, whoever sends it.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_json_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    for module in (health, files, uploads, jobs, models, graders):
        app.include_router(module.router)
    app.include_router(stream_routes.router)
    app.include_router(webhook_routes.router)
    return app
