"""Our job extensions: SSE streams of events, logs and metrics; the columnar metrics series;
the plain-text log. (``GET .../events?stream=true`` is routed here from ``routes/jobs.py``.)"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from api import streams
from api.deps import OwnerDep, ReadSessionDep, ServicesDep
from api.errors import invalid
from api.job_queries import get_job
from api.openapi import ERROR_RESPONSES, streamed

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=ERROR_RESPONSES)

LastEventId = Annotated[str | None, Header(alias="last-event-id")]
MAX_METRIC_STEPS = 100_000
MAX_TAIL = 100_000
SSE = "text/event-stream"
EVENTS_SSE = streamed(
    "Server-sent events: 'fine_tuning.job.event' messages (the event objects), then 'done' "
    "with the job once it has ended.",
    SSE,
)
LOGS_SSE = streamed(
    "Server-sent events: 'fine_tuning.job.log' messages ({id, object, created_at, level, "
    "message}), then 'done' with the job once it has ended.",
    SSE,
)
METRICS_SSE = streamed(
    "Server-sent events: 'fine_tuning.job.metric' messages ({object, step, created_at, "
    "<metric>: value, ...}), then 'done' with the job once it has ended.",
    SSE,
)


@router.get("/{job_id}/events/stream", response_class=StreamingResponse, responses=EVENTS_SSE)
def stream_events(
    request: Request,
    services: ServicesDep,
    owner: OwnerDep,
    job_id: str,
    after: str | None = None,
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    return streams.stream_response(
        request, services, owner, job_id, last_event_id or after, "events"
    )


@router.get("/{job_id}/logs/stream", response_class=StreamingResponse, responses=LOGS_SSE)
def stream_logs(
    request: Request,
    services: ServicesDep,
    owner: OwnerDep,
    job_id: str,
    after: str | None = None,
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    return streams.stream_response(request, services, owner, job_id, last_event_id or after, "logs")


@router.get(
    "/{job_id}/logs",
    response_class=StreamingResponse,
    responses=streamed(
        "The job's log, one line per record ('<time> <LEVEL> <logger>: <message>'); with "
        "stream=true, its lines as server-sent events (as .../logs/stream).",
        "text/plain",
        SSE,
    ),
)
def get_logs(
    request: Request,
    services: ServicesDep,
    owner: OwnerDep,
    job_id: str,
    tail: Annotated[int | None, Query()] = None,
    stream: bool = False,
    after: str | None = None,
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    """The job's log as text/plain (``?tail=N``: the last N lines), or SSE with ``?stream=true``."""
    if stream:
        return streams.stream_response(
            request, services, owner, job_id, last_event_id or after, "logs"
        )
    if tail is not None and not 1 <= tail <= MAX_TAIL:
        raise invalid(f"tail must be between 1 and {MAX_TAIL}.", param="tail")
    with services.sessions() as session:
        get_job(session, owner, job_id)
    return StreamingResponse(
        streams.log_text(services, job_id, tail), media_type="text/plain; charset=utf-8"
    )


@router.get("/{job_id}/metrics/stream", response_class=StreamingResponse, responses=METRICS_SSE)
def stream_metrics(
    request: Request,
    services: ServicesDep,
    owner: OwnerDep,
    job_id: str,
    after: str | None = None,
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    """Every metric point as it is logged (one SSE message per step)."""
    return streams.stream_response(
        request, services, owner, job_id, last_event_id or after, "metrics"
    )


@router.get("/{job_id}/metrics")
def get_metrics(
    session: ReadSessionDep,
    owner: OwnerDep,
    job_id: str,
    keys: str | None = None,
    after_step: int | None = None,
    limit: Annotated[int, Query()] = 10_000,
) -> streams.JobMetrics:
    """Columnar series: ``step`` and one array per metric (``?keys=a,b&after_step=N``)."""
    if not 1 <= limit <= MAX_METRIC_STEPS:
        raise invalid(f"limit must be between 1 and {MAX_METRIC_STEPS}.", param="limit")
    job = get_job(session, owner, job_id)
    names = [k.strip() for k in keys.split(",") if k.strip()] if keys else None
    return streams.metrics_columns(session, job, names, after_step, limit)
