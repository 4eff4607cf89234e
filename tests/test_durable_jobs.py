"""Jobs survive a lost worker (issue #13), with real ``alignd worker`` processes, Postgres and
Redis, and real ``kill -9``:

- the whole process group of the worker running a job is killed while a second worker runs:
  the second worker's sweep takes the job back and resumes it from its last checkpoint, and
  it succeeds with the loss of an uninterrupted run at every step and no step twice;
- only the pool process training the job is killed: its worker's parent sees it at once and
  the job resumes the same way;
- a job that loses its worker more times than allowed fails with ``worker_lost``.

The workers run with short thresholds (a beat every second, stale after 8 s, a sweep every
second) so that a test takes seconds, not minutes; the defaults are in docs/operations.md.
Each test's workers consume a queue of their own, so no other test's worker takes their jobs.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from api.db import make_engine, make_sessionmaker
from api.models import Job, JobMetric
from api.settings import Settings
from tests.conftest import Api, WorkerProcess, chat_rows

pytestmark = pytest.mark.slow

FAST_RECOVERY = {
    "ALIGND_HEARTBEAT_S": "1",
    "ALIGND_STALE_HEARTBEAT_S": "8",
    "ALIGND_SWEEP_INTERVAL_S": "1",
    "ALIGND_DB_RETRY_S": "4",
    "ALIGND_SLOT_RETRY_S": "1",
}
# 8 rows in batches of 4: 2 steps an epoch, a checkpoint at the end of each (every 2 steps).
# 60 steps: a kill sent once step 5 is seen must land before a fast machine finishes the job
# (CI's ran 48 steps of another job in about a second).
EPOCHS = 30


@pytest.fixture(scope="module")
def sessions(pg_settings: Settings) -> Iterator[Any]:
    engine = make_engine(pg_settings)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def train_file(pg_api: Api) -> str:
    return str(pg_api.upload(chat_rows(8, seed=11))["id"])


class Workers:
    """``alignd worker`` processes on one queue of their own, one slot each (CPU slot ids
    of their own, so that they never wait for each other's slot lock)."""

    def __init__(self, settings: Settings, folder: Path, extra_env: dict[str, str]) -> None:
        self.settings = settings
        self.folder = folder
        self.extra_env = extra_env
        self.queue = f"durable-{secrets.token_hex(3)}"
        self.started: dict[str, WorkerProcess] = {}

    def start(self, name: str, slot: int) -> WorkerProcess:
        hostname = f"{name}@{self.queue}"
        worker = WorkerProcess(
            self.settings,
            self.folder / f"{name}.log",
            self.extra_env,
            args=["--hostname", hostname, "--queues", self.queue, "--gpus", str(slot)],
        )
        self.started[hostname] = worker
        return worker

    def stop(self) -> None:
        for worker in self.started.values():
            worker.stop()

    def logs(self) -> str:
        return "\n".join(f"== {h}\n{w.output()[-3000:]}" for h, w in self.started.items())


@pytest.fixture
def workers(
    pg_settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Workers]:
    extra = getattr(request, "param", {})
    group = Workers(pg_settings, tmp_path, {**FAST_RECOVERY, **extra})
    yield group
    group.stop()


def create_job(api: Api, train_file: str, queue: str) -> str:
    body = {
        "model": "tiny",
        "training_file": train_file,
        "seed": 5,
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": EPOCHS,
                    "batch_size": 4,
                    "learning_rate_multiplier": 10,
                }
            },
        },
        "adapter": {"type": "lora", "r": 4, "alpha": 8},
        "max_seq_len": 64,
        "resources": {"worker_class": queue},
    }
    created = api.http.post("fine_tuning/jobs", json=body)
    assert created.status_code == 200, created.text
    return str(created.json()["id"])


def job_row(sessions: Any, job_id: str) -> Job:
    with sessions() as session:
        job = session.get_one(Job, job_id)
        session.expunge(job)
        return job


def wait_row(sessions: Any, job_id: str, ok: Any, what: str, timeout_s: float = 120) -> Job:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = job_row(sessions, job_id)
        if ok(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id}: never {what}; last: {job.status} step {job.step}")


def messages(api: Api, job_id: str) -> list[str]:
    events = api.http.get(f"fine_tuning/jobs/{job_id}/events", params={"limit": 1000})
    return [event["message"] for event in reversed(events.json()["data"])]


def loss_by_step(api: Api, sessions: Any, job_id: str) -> dict[int, float]:
    """The job's train_loss per step, after checking that no step is stored twice."""
    with sessions() as session:
        repeated = session.execute(
            select(JobMetric.step, func.count())
            .where(JobMetric.job_id == job_id)
            .group_by(JobMetric.step)
            .having(func.count() > 1)
        ).all()
    assert repeated == [], f"steps logged more than once: {repeated}"
    series = api.http.get(f"fine_tuning/jobs/{job_id}/metrics", params={"keys": "train_loss"})
    assert series.status_code == 200, series.text
    data = series.json()
    return dict(zip(data["step"], data["train_loss"], strict=True))


def pool_child(worker: WorkerProcess) -> int:
    """The pid of the worker's one pool process (``--gpus N``: concurrency 1)."""
    children = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == worker.proc.pid and state != "Z":  # not a killed one not yet reaped
            children.append(int(proc.name))
    assert len(children) == 1, children
    return children[0]


@pytest.fixture(scope="module")
def reference(
    pg_api: Api, pg_settings: Settings, train_file: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, float]:
    """The loss curve of the same job run once, uninterrupted."""
    group = Workers(pg_settings, tmp_path_factory.mktemp("reference"), FAST_RECOVERY)
    group.start("ref", 0)
    try:
        job_id = create_job(pg_api, train_file, group.queue)
        job = pg_api.wait_terminal(job_id, timeout_s=300)
        assert job["status"] == "succeeded", (job["error"], group.logs())
    finally:
        group.stop()
    engine = make_engine(pg_settings)
    try:
        curve = loss_by_step(pg_api, make_sessionmaker(engine), job_id)
    finally:
        engine.dispose()
    assert sorted(curve) == list(range(1, 2 * EPOCHS + 1))
    return curve


def assert_same_curve(resumed: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-6), f"step {step}"


def kill_after_a_checkpoint(sessions: Any, job_id: str) -> Job:
    """Wait until the job is running past its second checkpoint (step 4) and mid-way to the
    next; the row then."""
    return wait_row(
        sessions,
        job_id,
        lambda job: job.status == "running" and (job.step or 0) >= 5,
        "ran past step 4",
    )


def test_killed_worker_group_resumes_on_the_other_worker_from_its_checkpoint(
    pg_api: Api, sessions: Any, train_file: str, workers: Workers, reference: dict[int, float]
) -> None:
    first, second = workers.start("a", 0), workers.start("b", 1)
    job_id = create_job(pg_api, train_file, workers.queue)
    running = kill_after_a_checkpoint(sessions, job_id)
    victim = workers.started[str(running.worker)]
    survivor = second if victim is first else first
    os.killpg(victim.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    victim.proc.wait()
    with sessions() as session:
        saved = session.scalar(select(func.max(JobMetric.step)).where(JobMetric.job_id == job_id))
    resumed = wait_row(
        sessions, job_id, lambda job: job.attempts == 2 and job.status == "running", "resumed"
    )
    assert time.monotonic() - killed_at < 60
    assert resumed.worker != running.worker
    assert survivor.proc.poll() is None
    job = pg_api.wait_terminal(job_id, timeout_s=300)
    assert job["status"] == "succeeded", (job["error"], workers.logs())
    text = messages(pg_api, job_id)
    resumed_at = [m for m in text if m.startswith("Resumed at step")]
    assert len(resumed_at) == 1, text
    # The last checkpoint before the kill: every 2 steps, at or below the last step logged.
    step = int(resumed_at[0].split()[3])
    assert step % 2 == 0 and 4 <= step <= (saved or 0), (step, saved)
    assert resumed_at[0].endswith("after the worker was lost (attempt 2)")
    # The job object says so too.
    assert job["attempts"] == 2 and "heartbeat" in str(job["last_error"]), job
    assert_same_curve(loss_by_step(pg_api, sessions, job_id), reference)


def test_killed_training_process_resumes_at_once_from_its_checkpoint(
    pg_api: Api, sessions: Any, train_file: str, workers: Workers, reference: dict[int, float]
) -> None:
    worker = workers.start("solo", 0)
    job_id = create_job(pg_api, train_file, workers.queue)
    kill_after_a_checkpoint(sessions, job_id)
    os.kill(pool_child(worker), signal.SIGKILL)
    killed_at = time.monotonic()
    # The worker's parent requeues it at once, without waiting for the heartbeat to go stale.
    wait_row(sessions, job_id, lambda job: job.attempts == 2, "claimed again", timeout_s=60)
    assert time.monotonic() - killed_at < 8  # sooner than ALIGND_STALE_HEARTBEAT_S
    job = pg_api.wait_terminal(job_id, timeout_s=300)
    assert job["status"] == "succeeded", (job["error"], workers.logs())
    assert "the worker process died" in str(job_row(sessions, job_id).last_error)
    assert job["attempts"] == 2 and "the worker process died" in str(job["last_error"]), job
    assert any(m.startswith("Resumed at step") for m in messages(pg_api, job_id))
    assert_same_curve(loss_by_step(pg_api, sessions, job_id), reference)


@pytest.mark.parametrize("workers", [{"ALIGND_MAX_ATTEMPTS": "2"}], indirect=True)
def test_a_job_that_loses_its_worker_too_often_fails_with_worker_lost(
    pg_api: Api, sessions: Any, train_file: str, workers: Workers
) -> None:
    worker = workers.start("unlucky", 0)
    job_id = create_job(pg_api, train_file, workers.queue)
    # The first attempt dies as soon as it has started, before any checkpoint; the second
    # once it has trained a step (so it has said where it started from).
    wait_row(sessions, job_id, lambda job: job.status == "running", "started")
    os.kill(pool_child(worker), signal.SIGKILL)
    wait_row(
        sessions,
        job_id,
        lambda job: job.attempts == 2 and job.status == "running" and (job.step or 0) >= 1,
        "trained a step in attempt 2",
    )
    os.kill(pool_child(worker), signal.SIGKILL)
    job = pg_api.wait_terminal(job_id, timeout_s=60)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "worker_lost"
    assert "lost its worker 2 times" in job["error"]["message"]
    assert "the worker process died" in job["error"]["message"]
    text = messages(pg_api, job_id)
    assert any(m.startswith("Restarted from the beginning after the worker was lost") for m in text)
