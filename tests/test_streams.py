"""SSE streams of events, logs and metrics; the columnar metrics; the job log.

Against the real parts: the API over HTTP (an instance of its own with a short keep-alive),
Postgres, Redis and the session's worker process running a real short job.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from api import streams as streams_module
from api.db import make_engine, make_sessionmaker
from api.job_events import add_event
from api.models import Job, JobMetric, now
from api.settings import Settings
from tests.conftest import Api, WorkerProcess, chat_rows, insert_job

KEEPALIVE_S = 0.3


@pytest.fixture(scope="module")
def api(pg_settings: Settings) -> Iterator[Api]:
    instance = Api(pg_settings.model_copy(update={"sse_keepalive_s": KEEPALIVE_S}))
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def sessions(pg_settings: Settings) -> Iterator[Any]:
    engine = make_engine(pg_settings)
    yield make_sessionmaker(engine)
    engine.dispose()


@dataclass
class Message:
    at: float
    id: str | None = None
    event: str | None = None
    data: str | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.data or "null")


class SSEReader:
    """Reads an SSE response in a thread; every message (and comment) lands in ``messages``
    with the time it arrived."""

    def __init__(self, client: httpx.Client, path: str, headers: dict[str, str] | None = None):
        self.messages: queue.Queue[Message | None] = queue.Queue()
        self.status: int | None = None
        self.headers: httpx.Headers | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(client, path, headers or {}), daemon=True
        )
        self._thread.start()
        assert self._ready.wait(10), "the stream did not answer"

    def _run(self, client: httpx.Client, path: str, headers: dict[str, str]) -> None:
        try:
            with client.stream("GET", path, headers=headers, timeout=60) as response:
                self.status, self.headers = response.status_code, response.headers
                self._ready.set()
                current = Message(at=0.0)
                for line in response.iter_lines():
                    if self._stop.is_set():
                        return
                    if line == "":
                        if current.id or current.event or current.data is not None:
                            current.at = time.monotonic()
                            self.messages.put(current)
                        current = Message(at=0.0)
                    elif line.startswith(":"):
                        self.messages.put(Message(at=time.monotonic(), comments=[line]))
                    else:
                        name, _, value = line.partition(":")
                        value = value.removeprefix(" ")
                        if name == "data":
                            current.data = (
                                value if current.data is None else f"{current.data}\n{value}"
                            )
                        elif name in ("id", "event"):
                            setattr(current, name, value)
        finally:
            self._ready.set()
            self.messages.put(None)

    def next(self, timeout: float = 30) -> Message | None:
        return self.messages.get(timeout=timeout)

    def until_done(self, timeout: float = 120) -> list[Message]:
        """Every message up to and including ``event: done`` (comments left out)."""
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.1, deadline - time.monotonic()))
            assert message is not None, f"the stream ended without 'done' after {out!r}"
            if message.comments:
                continue
            out.append(message)
            if message.event == "done":
                return out

    def close(self) -> None:
        self._stop.set()


def job_body(train_id: str) -> dict[str, Any]:
    return {
        "model": "tiny",
        "training_file": train_id,
        "seed": 5,
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}},
        },
        "adapter": {"type": "lora", "r": 2, "alpha": 4},
        "max_seq_len": 64,
    }


def event_ids(api: Api, job_id: str) -> list[str]:
    data = api.http.get(f"fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()
    return [event["id"] for event in reversed(data["data"])]


def test_streams_follow_a_real_job(api: Api, pg_worker: WorkerProcess) -> None:
    train = api.upload(chat_rows(16, seed=7))
    created = api.http.post("fine_tuning/jobs", json=job_body(train["id"]))
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]

    # Follow the job from the start, drop the connection after three events, and resume
    # with Last-Event-ID: together the two connections carry every event exactly once.
    first = SSEReader(api.http, f"fine_tuning/jobs/{job_id}/events/stream")
    assert first.status == 200
    assert first.headers is not None
    assert first.headers["content-type"].startswith("text/event-stream")
    assert first.headers["cache-control"] == "no-cache"
    assert first.headers["x-accel-buffering"] == "no"
    head: list[Message] = []
    while len(head) < 3:
        message = first.next()
        assert message is not None
        if not message.comments:
            head.append(message)
    first.close()
    assert all(m.event == "fine_tuning.job.event" and m.id for m in head)
    assert head[0].json()["message"] == f"Created fine-tuning job: {job_id}"

    second = SSEReader(
        api.http, f"fine_tuning/jobs/{job_id}/events/stream", {"Last-Event-ID": head[-1].id or ""}
    )
    rest = second.until_done()
    done = rest.pop()
    assert done.event == "done" and done.id is None
    final = done.json()
    assert final["object"] == "fine_tuning.job" and final["id"] == job_id
    assert final["status"] == "succeeded", (final, pg_worker.output()[-3000:])

    streamed = [m.id for m in head + rest]
    assert all(m.event == "fine_tuning.job.event" for m in rest)
    assert streamed == event_ids(api, job_id)  # no gap, no repeat, oldest first
    assert [m.json()["id"] for m in head + rest] == streamed
    assert rest[-1].json()["message"] == "The job has successfully completed"

    # A finished job replays from any point (?stream=true is the same stream; ?after= too).
    ids = event_ids(api, job_id)
    replay = SSEReader(
        api.http, f"fine_tuning/jobs/{job_id}/events?stream=true", {"Last-Event-ID": ids[4]}
    ).until_done(timeout=10)
    assert [m.id for m in replay[:-1]] == ids[5:] and replay[-1].event == "done"
    replay = SSEReader(
        api.http, f"fine_tuning/jobs/{job_id}/events/stream?after={ids[-2]}"
    ).until_done(timeout=10)
    assert [m.id for m in replay[:-1]] == ids[-1:]

    # Metrics: columnar, one entry per step (16 rows / batch 4 x 2 epochs = 8 steps).
    metrics = api.http.get(f"fine_tuning/jobs/{job_id}/metrics").json()
    assert metrics["object"] == "fine_tuning.job.metrics"
    assert metrics["step"] == list(range(1, 9))
    assert {"train_loss", "train_mean_token_accuracy"} <= set(metrics["keys"])
    for key in metrics["keys"]:
        assert len(metrics[key]) == 8
    assert all(isinstance(v, float) for v in metrics["train_loss"])
    assert metrics["has_more"] is False
    some = api.http.get(
        f"fine_tuning/jobs/{job_id}/metrics",
        params={"keys": "train_loss,nope", "after_step": 5},
    ).json()
    assert some["step"] == [6, 7, 8] and some["keys"] == ["train_loss", "nope"]
    assert some["train_loss"] == metrics["train_loss"][5:]
    assert some["nope"] == [None, None, None]
    assert "train_mean_token_accuracy" not in some
    paged = api.http.get(f"fine_tuning/jobs/{job_id}/metrics", params={"limit": 3}).json()
    assert paged["step"] == [1, 2, 3] and paged["has_more"] is True
    points = SSEReader(api.http, f"fine_tuning/jobs/{job_id}/metrics/stream").until_done(10)
    assert [m.json()["step"] for m in points[:-1]] == list(range(1, 9))
    assert [m.json()["train_loss"] for m in points[:-1]] == metrics["train_loss"]

    # Logs: the worker's own lines for this job, as text and as a stream.
    response = api.http.get(f"fine_tuning/jobs/{job_id}/logs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert f"alignd.worker: job {job_id} started on" in text, pg_worker.output()[-3000:]
    assert f"alignd.worker: job {job_id} ended at step 8" in text
    other_jobs = [line for line in text.splitlines() if "ftjob-" in line and job_id not in line]
    assert other_jobs == []
    tail = api.http.get(f"fine_tuning/jobs/{job_id}/logs", params={"tail": 1}).text
    assert tail.splitlines() == text.splitlines()[-1:]
    lines = SSEReader(api.http, f"fine_tuning/jobs/{job_id}/logs/stream").until_done(10)
    assert lines[-1].event == "done"
    messages = [m.json()["message"] for m in lines[:-1]]
    assert len(messages) >= 2 and all(m.splitlines()[0] in text for m in messages)
    assert any(m.startswith(f"alignd.worker: job {job_id} started on") for m in messages)
    resumed = SSEReader(
        api.http,
        f"fine_tuning/jobs/{job_id}/logs?stream=true",
        {"Last-Event-ID": lines[0].id or ""},
    ).until_done(10)
    assert [m.id for m in resumed] == [m.id for m in lines[1:]]


def test_keepalive_and_a_new_row_reaches_a_subscriber_within_a_second(
    api: Api, sessions: Any
) -> None:
    job_id = insert_job(sessions, status="running")
    events = SSEReader(api.http, f"fine_tuning/jobs/{job_id}/events/stream")
    metrics = SSEReader(api.http, f"fine_tuning/jobs/{job_id}/metrics/stream")

    # Silence is broken by keep-alive comments, every KEEPALIVE_S.
    comments = []
    deadline = time.monotonic() + 3
    while len(comments) < 2 and time.monotonic() < deadline:
        message = events.next(timeout=3)
        assert message is not None
        if message.comments:
            comments.append(message)
    assert [c.comments for c in comments] == [[": keep-alive"], [": keep-alive"]]
    assert 0.1 < comments[1].at - comments[0].at < 1.0

    # A metric point written by a worker reaches a connected client within 1 s.
    written = time.monotonic()
    with sessions() as session, session.begin():
        session.add(
            JobMetric(
                job_id=job_id, owner="local", created_at=now(), step=1, values={"train_loss": 2.5}
            )
        )
    message = metrics.next(timeout=5)
    while message is not None and message.comments:
        message = metrics.next(timeout=5)
    assert message is not None and message.event == "fine_tuning.job.metric"
    assert message.json()["train_loss"] == 2.5 and message.json()["step"] == 1
    assert message.at - written < 1.0

    # So does an event; and the terminal status ends both streams with the job.
    written = time.monotonic()
    with sessions() as session, session.begin():
        add_event(session, session.get_one(Job, job_id), "Step 1/1: train_loss=2.5", type="metrics")
    message = events.next(timeout=5)
    while message is not None and message.comments:
        message = events.next(timeout=5)
    assert message is not None and message.json()["message"] == "Step 1/1: train_loss=2.5"
    assert message.at - written < 1.0
    with sessions() as session, session.begin():
        job = session.get_one(Job, job_id)
        job.status = "failed"
        job.finished_at = now()
        add_event(session, job, "The job failed: test", level="error")
    tail = events.until_done(timeout=5)
    assert [m.json()["message"] for m in tail[:-1]] == ["The job failed: test"]
    assert tail[-1].json()["status"] == "failed"
    assert metrics.until_done(timeout=5)[-1].json()["id"] == job_id


def test_stream_errors_are_plain_json(api: Api, sessions: Any) -> None:
    job_id = insert_job(sessions, status="succeeded")
    bad = api.http.get(
        f"fine_tuning/jobs/{job_id}/events/stream", headers={"Last-Event-ID": "ftevent-nope"}
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "Last-Event-ID"
    bad = api.http.get(f"fine_tuning/jobs/{job_id}/logs/stream", params={"after": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
    bad = api.http.get(f"fine_tuning/jobs/{job_id}/logs", params={"tail": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tail"
    # A terminal job with nothing to send: done at once.
    done = SSEReader(api.http, f"fine_tuning/jobs/{job_id}/logs/stream").until_done(timeout=5)
    assert [m.event for m in done] == ["done"]
    assert api.http.get(f"fine_tuning/jobs/{job_id}/logs").text == ""

    # Another owner's job is a 404 on every route, streams included.
    other = api.as_owner("someone-else")
    for path in (
        "events/stream",
        "events?stream=true",
        "logs",
        "logs/stream",
        "metrics",
        "metrics/stream",
    ):
        response = other.get(f"fine_tuning/jobs/{job_id}/{path}")
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_a_stream_stops_when_its_client_goes_away(
    api: Api, sessions: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The API runs in this process: count the stream's database polls.
    polls: list[str] = []
    real_poll = streams_module._poll

    def counting_poll(services: Any, job_id: str, *args: Any) -> Any:
        polls.append(job_id)
        return real_poll(services, job_id, *args)

    monkeypatch.setattr(streams_module, "_poll", counting_poll)
    job_id = insert_job(sessions, status="running")
    client = httpx.Client(base_url=api.http.base_url, headers=api.http.headers)
    with client, client.stream("GET", f"fine_tuning/jobs/{job_id}/events/stream") as response:
        lines = response.iter_lines()
        assert next(lines).startswith("retry:")
        wait = time.monotonic() + 5
        while polls.count(job_id) < 3 and time.monotonic() < wait:
            time.sleep(0.05)
        assert polls.count(job_id) >= 3  # polling while connected
    time.sleep(KEEPALIVE_S + 0.5)  # the next write or check notices the disconnect
    settled = polls.count(job_id)
    time.sleep(1.0)
    assert polls.count(job_id) == settled
