"""The FastAPI application: routes, error shape, request ids."""

from __future__ import annotations

from fastapi import FastAPI

from api.errors import install_handlers
from api.request_id import RequestIdMiddleware
from api.routes import files, health, jobs, models
from api.services import Services
from api.settings import Settings, load_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    app = FastAPI(
        title="alignd",
        version="0.1.0",
        description="Alignment fine-tuning as a service; /v1 is a superset of OpenAI's fine-tuning API.",
    )
    app.state.services = Services.build(settings)
    install_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    for module in (health, files, jobs, models):
        app.include_router(module.router)
    return app
