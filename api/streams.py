"""Server-sent event streams of a job's events, metric points and log lines; the columnar
metrics series; the plain-text log.

A stream polls the database (every ``sse_poll_s``, in the thread pool so the event loop never
blocks; the same code serves Postgres and SQLite) for rows after its cursor, oldest first.
Every SSE message carries an ``id:``; a client that reconnects with ``Last-Event-ID`` (or
``?after=``) resumes strictly after it, with no gap and no repeat. When the job is terminal the
stream sends what is left, then ``event: done`` with the job object, and ends. A silent stream
sends a ``: keep-alive`` comment every ``sse_keepalive_s``.

Why there can be no gap: a stream reads the job's status, then the rows after its cursor, in
that order; a job's final rows commit with its terminal status, so once a stream has seen the
status it also sees them. And a job's event inserts are serialised on the job's row
(``api.job_events.add_event``), so their ``seq`` order is their commit order: a stream that has read
seq N never later finds a smaller one committed behind it. Log lines and metric points each
have one writer per job (the worker running it).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import StreamingResponse

from api.errors import invalid
from api.job_queries import get_job
from api.job_rendering import render_event, render_job
from api.job_service import TERMINAL
from api.models import Job, JobEvent, JobLog, JobMetric
from api.services import Services

PAGE = 500
KEEPALIVE = b": keep-alive\n\n"
# Asks EventSource clients to reconnect after 1 s when a connection drops.
RETRY_MS = 1000
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Names a metric may not take in the columnar response (they are its own fields).
RESERVED = frozenset({"object", "job_id", "step", "keys", "has_more"})


class JobMetrics(BaseModel):
    """A job's metrics as columns: ``step`` and one array per metric, aligned by index."""

    # The metric arrays are named after the metrics ("train_loss": [...]).
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "additionalProperties": {
                "type": "array",
                "items": {"anyOf": [{"type": "number"}, {"type": "null"}]},
                "description": "One value per step; null where the step lacks the metric.",
            }
        },
    )

    object: Literal["fine_tuning.job.metrics"] = Field(
        description="Always 'fine_tuning.job.metrics'."
    )
    job_id: str = Field(description="The job.")
    keys: list[str] = Field(description="The metrics shown, each an array of its own.")
    step: list[int] = Field(description="The steps, ascending; a step logged twice shows once.")
    has_more: bool = Field(description="More steps follow: ask again with after_step=last step.")

    @model_serializer(mode="wrap")
    def _has_more_last(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # As the columns were always written: the metric arrays before has_more.
        shown: dict[str, Any] = handler(self)
        has_more = shown.pop("has_more")
        return {**shown, "has_more": has_more}


@dataclass(frozen=True)
class Message:
    id: str
    event: str
    data: str
    cursor: int


# (session, job id, cursor, limit) -> the next messages after cursor, oldest first.
Fetch = Callable[[Session, str, int, int], list[Message]]


def sse(data: str | None = None, *, event: str | None = None, id: str | None = None) -> bytes:
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    if event is not None:
        lines.append(f"event: {event}")
    if data is not None:
        lines.extend(f"data: {part}" for part in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


def _finite(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


# ---------------------------------------------------------------------------------------------
# What each stream reads


def fetch_events(session: Session, job_id: str, cursor: int, limit: int) -> list[Message]:
    rows = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.seq > cursor)
        .order_by(JobEvent.seq)
        .limit(limit)
    ).all()
    return [
        Message(
            row.id,
            "fine_tuning.job.event",
            dumps(render_event(row).model_dump(mode="json")),
            row.seq,
        )
        for row in rows
    ]


def render_log(row: JobLog) -> dict[str, Any]:
    return {
        "id": str(row.seq),
        "object": "fine_tuning.job.log",
        "created_at": row.created_at,
        "level": row.level,
        "message": row.line,
    }


def fetch_logs(session: Session, job_id: str, cursor: int, limit: int) -> list[Message]:
    rows = session.scalars(
        select(JobLog)
        .where(JobLog.job_id == job_id, JobLog.seq > cursor)
        .order_by(JobLog.seq)
        .limit(limit)
    ).all()
    return [
        Message(str(row.seq), "fine_tuning.job.log", dumps(render_log(row)), row.seq)
        for row in rows
    ]


def render_metric(row: JobMetric) -> dict[str, Any]:
    values = {k: _finite(v) for k, v in row.values.items() if k not in RESERVED}
    return {
        "object": "fine_tuning.job.metric",
        "step": row.step,
        "created_at": row.created_at,
        **values,
    }


def fetch_metrics(session: Session, job_id: str, cursor: int, limit: int) -> list[Message]:
    rows = session.scalars(
        select(JobMetric)
        .where(JobMetric.job_id == job_id, JobMetric.seq > cursor)
        .order_by(JobMetric.seq)
        .limit(limit)
    ).all()
    return [
        Message(str(row.seq), "fine_tuning.job.metric", dumps(render_metric(row)), row.seq)
        for row in rows
    ]


# ---------------------------------------------------------------------------------------------
# Cursors


def event_cursor(session: Session, job: Job, after: str | None, param: str) -> int:
    """The seq just before the stream's first event: 0, or that of the event ``after``."""
    if not after:
        return 0
    seq = session.scalar(
        select(JobEvent.seq).where(JobEvent.id == after, JobEvent.job_id == job.id)
    )
    if seq is None:
        raise invalid(f"No event '{after}' in job {job.id}.", param=param)
    return int(seq)


def seq_cursor(after: str | None, param: str) -> int:
    """Log lines and metric points are identified by their sequence number."""
    if not after:
        return 0
    try:
        value = int(after)
    except ValueError:
        value = -1
    if value < 0:
        raise invalid(f"'{after}' is not a log line or metric point id.", param=param)
    return value


# ---------------------------------------------------------------------------------------------
# The stream


def _poll(
    services: Services, job_id: str, cursor: int, fetch: Fetch
) -> tuple[str | None, dict[str, Any] | None, list[Message]]:
    with services.sessions() as session:
        # The status first, then the rows: see the module docstring.
        job = session.get(Job, job_id)
        if job is None:
            return None, None, []
        status = job.status
        rendered = render_job(job).model_dump(mode="json") if status in TERMINAL else None
        return status, rendered, fetch(session, job_id, cursor, PAGE)


async def job_stream(
    request: Request, services: Services, job_id: str, cursor: int, fetch: Fetch
) -> AsyncIterator[bytes]:
    settings = services.settings
    yield f"retry: {RETRY_MS}\n\n".encode()
    last_sent = time.monotonic()
    while True:
        if await request.is_disconnected():
            return
        status, job, messages = await run_in_threadpool(_poll, services, job_id, cursor, fetch)
        if status is None:  # the job was deleted under the stream
            return
        for message in messages:
            yield sse(message.data, event=message.event, id=message.id)
            cursor = message.cursor
        if messages:
            last_sent = time.monotonic()
        if len(messages) >= PAGE:
            continue  # more waiting: read on at once
        if job is not None:  # terminal before these rows were read: nothing more will come
            yield sse(dumps(job), event="done")
            return
        if time.monotonic() - last_sent >= settings.sse_keepalive_s:
            yield KEEPALIVE
            last_sent = time.monotonic()
        await anyio.sleep(settings.sse_poll_s)


def stream_response(
    request: Request,
    services: Services,
    owner: str,
    job_id: str,
    after: str | None,
    kind: str,
) -> StreamingResponse:
    """``kind``: events, logs or metrics. Checks the job and the cursor before streaming, so
    an unknown job or cursor is a plain JSON error."""
    param = "Last-Event-ID" if request.headers.get("last-event-id") else "after"
    with services.sessions() as session:
        job = get_job(session, owner, job_id)
        if kind == "events":
            cursor, fetch = event_cursor(session, job, after, param), fetch_events
        elif kind == "logs":
            cursor, fetch = seq_cursor(after, param), fetch_logs
        else:
            cursor, fetch = seq_cursor(after, param), fetch_metrics
    return StreamingResponse(
        job_stream(request, services, job_id, cursor, fetch),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


# ---------------------------------------------------------------------------------------------
# Metrics, columnar


def metrics_columns(
    session: Session,
    job: Job,
    keys: Sequence[str] | None,
    after_step: int | None,
    limit: int,
) -> JobMetrics:
    """``{"object", "job_id", "keys", "step": [...], "<metric>": [...], "has_more"}``.

    One entry per step, ascending; a step logged twice (a job resumed from a checkpoint
    re-logs the steps after it) keeps its latest values. ``null`` where a step lacks a metric
    (or its value was not finite).
    """
    query = select(JobMetric.step, JobMetric.values).where(JobMetric.job_id == job.id)
    if after_step is not None:
        query = query.where(JobMetric.step > after_step)
    by_step: dict[int, dict[str, float]] = {}
    has_more = False
    for step, values in session.execute(query.order_by(JobMetric.step, JobMetric.seq)).yield_per(
        2000
    ):
        if step not in by_step and len(by_step) >= limit:
            has_more = True
            break
        by_step[step] = values
    names = (
        [k for k in dict.fromkeys(keys) if k not in RESERVED]
        if keys
        else sorted({k for values in by_step.values() for k in values} - RESERVED)
    )
    steps = list(by_step)
    columns = {name: [_finite(by_step[step].get(name)) for step in steps] for name in names}
    # model_validate, not keyword arguments: metric names are the user's and may be anything.
    return JobMetrics.model_validate(
        {
            "object": "fine_tuning.job.metrics",
            "job_id": job.id,
            "keys": names,
            "step": steps,
            **columns,
            "has_more": has_more,
        }
    )


# ---------------------------------------------------------------------------------------------
# Logs, as text


def format_log_line(row: JobLog) -> str:
    stamp = datetime.fromtimestamp(row.created_at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    return f"{stamp}Z {row.level.upper():<7} {row.line}\n"


def log_text(services: Services, job_id: str, tail: int | None) -> Iterator[str]:
    """The job's log lines, oldest first, read page by page (never all at once)."""
    if tail is not None:
        with services.sessions() as session:
            rows = session.scalars(
                select(JobLog)
                .where(JobLog.job_id == job_id)
                .order_by(JobLog.seq.desc())
                .limit(tail)
            ).all()
        for row in reversed(rows):
            yield format_log_line(row)
        return
    cursor = 0
    while True:
        with services.sessions() as session:
            rows = session.scalars(
                select(JobLog)
                .where(JobLog.job_id == job_id, JobLog.seq > cursor)
                .order_by(JobLog.seq)
                .limit(PAGE * 4)
            ).all()
        if not rows:
            return
        yield "".join(format_log_line(row) for row in rows)
        cursor = rows[-1].seq
