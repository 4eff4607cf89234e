"""Prometheus metrics of the API: requests per route, and the jobs and queues in the database.

Request counts and latencies are ``prometheus_client`` counters and histograms, labelled by
route *template* (``/v1/fine_tuning/jobs/{job_id}``, never the raw path, so that ids do not
make one series each), method and status class (``2xx``). Jobs by status and method and the
queue depths are read from the database when ``/metrics`` is scraped (a custom collector): any
API process answers with the whole service's numbers.

With several API processes (``serve --workers N``) each keeps its own request counters;
``serve`` then points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder and ``/metrics`` sums the
processes' files (prometheus_client's multiprocess mode). docs/operations.md lists every metric.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import workers
from api.models import Job
from api.settings import Settings

REQUESTS = Counter(
    "alignd_http_requests",
    "HTTP requests answered, by route template, method and status class.",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "alignd_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response, by route template and method.",
    ["route", "method"],
    # From a health check (ms) to a large upload or a long download (tens of seconds).
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
# Answered before a route was chosen: a path no route matches, or a request that auth, the
# body limit or admission refused first. One label value, never one per URL.
UNROUTED = "unrouted"
# Where the inner middleware leaves the chosen route's template for the outer one: middlewares
# pass shallow copies of the scope on, so the holder (a dict) is shared, not the scope itself.
ROUTE_KEY = "alignd.route"
# A client may send any method token; anything else is one label value, not one each.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class MetricsMiddleware:
    """Counts and times every HTTP request; outermost, so that 401, 413, 429 and 503 answers
    count too. A streamed response (SSE) is timed until its last byte."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        holder: dict[str, str] = {}

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app({**scope, ROUTE_KEY: holder}, receive, send_status)
        finally:
            route = holder.get("route", UNROUTED)
            method = str(scope.get("method", "GET"))
            method = method if method in METHODS else "other"
            REQUESTS.labels(route, method, f"{status // 100}xx").inc()
            LATENCY.labels(route, method).observe(time.perf_counter() - started)


class RouteTemplateMiddleware:
    """Innermost: once the router has chosen a route (``scope["route"]``), hand its path
    template to MetricsMiddleware. The template is the route's own path: our routers carry
    their prefix themselves (``APIRouter(prefix=...)``), never ``include_router``'s."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            holder = scope.get(ROUTE_KEY)
            route = scope.get("route")
            if holder is not None and route is not None and hasattr(route, "path"):
                holder["route"] = str(route.path)


class DatabaseCollector(Collector):
    """Jobs by status and method, and queued jobs per queue, read at scrape time."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings

    def describe(self) -> list[Any]:
        return []  # collected only when scraped: never at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily(
            "alignd_jobs",
            "Fine-tuning jobs by status and method type.",
            labels=["status", "method"],
        )
        depth = GaugeMetricFamily(
            "alignd_queue_depth",
            "Jobs waiting (status queued) per queue, i.e. per worker class.",
            labels=["queue"],
        )
        method_type = Job.method["type"].as_string()
        with self.sessions() as session:
            counts = session.execute(
                select(Job.status, method_type, func.count()).group_by(Job.status, method_type)
            ).all()
            queued = session.execute(select(Job.extensions).where(Job.status == "queued")).all()
        for status, method, count in counts:
            jobs.add_metric([status, method or "unknown"], count)
        per_queue: dict[str, int] = {self.settings.default_queue: 0}
        for (extensions,) in queued:
            queue = workers.job_queue(self.settings, extensions)
            per_queue[queue] = per_queue.get(queue, 0) + 1
        for queue, count in sorted(per_queue.items()):
            depth.add_metric([queue], count)
        yield jobs
        yield depth


def exposition(sessions: sessionmaker[Session], settings: Settings) -> bytes:
    """The text exposition ``/metrics`` answers: this process's metrics (or, in multiprocess
    mode, every API process's), plus the database's."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    registry.register(DatabaseCollector(sessions, settings))
    return generate_latest(registry)


class _ThisProcess(Collector):
    """The process-wide default registry: the request metrics and process_* of this process."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        return REGISTRY.collect()
