"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from sqlalchemy import text

from api.deps import ServicesDep, SessionDep
from api.metrics import exposition
from api.openapi import streamed

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = Field(description="Always 'ok': the process answers.")


class Readiness(BaseModel):
    ready: bool = Field(description="Whether the database and the broker both answer.")
    checks: dict[str, str] = Field(description="'ok', or 'error: <kind>', per dependency.")


@router.get("/healthz")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: a dependency is down."}},
)
def readyz(services: ServicesDep, session: SessionDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc.__class__.__name__}"
    try:
        services.queue.ping()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {exc.__class__.__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses=streamed(
        "Prometheus text exposition (docs/operations.md lists every metric).", "text/plain"
    ),
)
def metrics(services: ServicesDep) -> Response:
    body = exposition(services.sessions, services.settings)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
