"""Jobs survive a database outage and a broker restart (issue #13), against a Postgres and a
Redis that each test starts itself (initdb into a temporary folder, ports of their own), so
that stopping them disturbs nothing else:

- Postgres down for 20 s mid-job, shorter than the workers' retry budget: the training
  waits and goes on; the job succeeds in its first attempt with the uninterrupted loss curve.
- Postgres down for 20 s, longer than the budget: the training process stops itself, the
  sweep resumes the job from its last checkpoint once the database is back, and it succeeds
  with the same curve.
- Redis killed with a job queued in it (no persistence: the message is gone) and started
  again: the sweep re-sends the job and it runs.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from alignd.processes import free_port
from api.db import make_engine, make_sessionmaker
from api.migration import upgrade
from api.models import Job
from api.settings import Settings
from tests.conftest import Api, chat_rows
from tests.test_durable_jobs import (
    FAST_RECOVERY,
    Workers,
    assert_same_curve,
    create_job,
    loss_by_step,
)

pytestmark = pytest.mark.slow

OUTAGE_S = 20


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None
    )
    if found is None:
        pytest.skip(f"no {name} on this machine")
    return found


def _as_postgres(command: list[str]) -> list[str]:
    """Postgres refuses to run as root: run its tools as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class OwnPostgres:
    """A Postgres server of the test's own: a fresh cluster in ``folder``, on its own port,
    trust auth, fsync off (its data need not survive the machine)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        subprocess.run(
            _as_postgres(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(self.data),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres(
                [
                    _pg_bin("pg_ctl"),
                    "-D",
                    str(self.data),
                    "-o",
                    options,
                    "-l",
                    str(self.folder / "log"),
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def kill(self) -> None:
        """Stop at once, dropping every connection (as a crash would; recovery on start)."""
        subprocess.run(
            _as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]),
            capture_output=True,
        )


class OwnRedis:
    """A redis-server of the test's own on its own port, without persistence (as the service's
    Redis in the issue's trial: a restart loses every message)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("no redis-server on this machine")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


class Stack:
    def __init__(self, settings: Settings, folder: Path) -> None:
        upgrade(settings)
        self.settings = settings
        self.engine = make_engine(settings)
        self.sessions = make_sessionmaker(self.engine)
        self.api = Api(settings)
        self.folder = folder
        self.train_file = str(self.api.upload(chat_rows(8, seed=11))["id"])

    def workers(self, **env: str) -> Workers:
        return Workers(self.settings, self.folder, {**FAST_RECOVERY, **env})

    def row(self, job_id: str) -> Job | None:
        """The job's row, or None while the database is away."""
        try:
            with self.sessions() as session:
                job = session.get_one(Job, job_id)
                session.expunge(job)
                return job
        except OperationalError:
            return None

    def wait(self, job_id: str, ok: Any, what: str, timeout_s: float = 180) -> Job:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.row(job_id)
            if job is not None and ok(job):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} never {what}: {self.row(job_id)}")

    def close(self) -> None:
        self.api.stop()
        self.engine.dispose()


@pytest.fixture
def postgres() -> Iterator[OwnPostgres]:
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as
    # the postgres user.
    folder = Path(tempfile.mkdtemp(prefix="alignd-test-pg-"))
    server = OwnPostgres(folder)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_stack(
    postgres: OwnPostgres, redis_url: str, models_dir: Path, tmp_path: Path
) -> Iterator[Stack]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=postgres.url,
        broker_url=redis_url,
        models_dir=models_dir,
    )
    stack = Stack(settings, tmp_path)
    yield stack
    stack.close()


def run_through_outage(stack: Stack, postgres: OwnPostgres, workers: Workers) -> tuple[str, int]:
    """A reference run, then the same job with Postgres killed for OUTAGE_S once it is past
    its second checkpoint: (the job's id, its attempts at the end)."""
    workers.start("w", 0)
    reference = create_job(stack.api, stack.train_file, workers.queue)
    done = stack.wait(reference, lambda job: job.status in ("succeeded", "failed"), "ended")
    assert done.status == "succeeded", (done.error, workers.logs())
    job_id = create_job(stack.api, stack.train_file, workers.queue)
    stack.wait(job_id, lambda job: job.status == "running" and (job.step or 0) >= 5, "ran")
    postgres.kill()
    killed_at = time.time()
    time.sleep(OUTAGE_S)
    postgres.start()
    job = stack.wait(job_id, lambda job: job.status in ("succeeded", "failed"), "ended")
    assert job.status == "succeeded", (job.error, workers.logs())
    # It ended after the outage, so the outage was mid-job (nothing is recorded meanwhile).
    assert job.finished_at is not None and job.finished_at >= int(killed_at) + OUTAGE_S - 1
    assert_same_curve(
        loss_by_step(stack.api, stack.sessions, job_id),
        loss_by_step(stack.api, stack.sessions, reference),
    )
    return job_id, job.attempts


def test_a_database_outage_shorter_than_the_retry_budget_is_ridden_through(
    pg_stack: Stack, postgres: OwnPostgres
) -> None:
    workers = pg_stack.workers(ALIGND_DB_RETRY_S=str(OUTAGE_S + 15), ALIGND_STALE_HEARTBEAT_S="60")
    try:
        _job_id, attempts = run_through_outage(pg_stack, postgres, workers)
    finally:
        workers.stop()
    assert attempts == 1, workers.logs()


def test_a_longer_database_outage_stops_the_job_and_the_sweep_resumes_it(
    pg_stack: Stack, postgres: OwnPostgres
) -> None:
    workers = pg_stack.workers()  # retries for 4 s, stale after 8 s
    try:
        job_id, attempts = run_through_outage(pg_stack, postgres, workers)
        logs = "\n".join(worker.output() for worker in workers.started.values())
    finally:
        workers.stop()
    assert attempts == 2, logs[-3000:]
    # The first attempt stopped itself (worker/lease.py), it did not fail the job.
    assert "stopped: the database was unreachable for 4 s" in logs
    job = pg_stack.row(job_id)
    assert job is not None and job.last_error and "no heartbeat" in job.last_error


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    yield server
    server.kill() if server.proc and server.proc.poll() is None else None


def test_a_job_queued_in_a_redis_that_restarts_runs(
    pg_settings: Settings, redis_server: OwnRedis, models_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=pg_settings.database_url,
        broker_url=redis_server.url,
        models_dir=models_dir,
    )
    stack = Stack(settings, tmp_path)
    workers = stack.workers()
    try:
        # No worker yet: the job's message waits in Redis, then dies with it.
        job_id = create_job(stack.api, stack.train_file, workers.queue)
        redis_server.kill()
        redis_server.start()
        workers.start("w", 0)
        started = time.monotonic()
        job = stack.wait(job_id, lambda job: job.status in ("succeeded", "failed"), "ended")
        assert job.status == "succeeded", (job.error, workers.logs())
        # Re-sent once the job had gone unseen for the stale threshold (8 s here).
        assert time.monotonic() - started < 60
        assert "re-sending queued job" in "".join(w.output() for w in workers.started.values())
    finally:
        workers.stop()
        stack.close()
