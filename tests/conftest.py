"""Shared fixtures: real Postgres and Redis, the API over real HTTP, a real worker process.

Each test run creates its own Postgres database (a fresh name) and drops it after, and uses
a Redis database index of its own, so runs never see each other's rows or messages.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import uvicorn

from alignd.processes import free_port, start_alignd, stop_process_group
from api.app import create_app
from api.migration import upgrade
from api.models import Job, new_id, now
from api.settings import LOCAL_OWNER, Settings

PG_ADMIN = os.environ.get("ALIGND_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST = os.environ.get("ALIGND_TEST_REDIS", "redis://127.0.0.1:6379")
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer_core.tiny_models import create_tiny_model

    root = tmp_path_factory.mktemp("models")
    create_tiny_model(root / "tiny", size="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"alignd_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    # A database index of our own (1-15); flushed before and after.
    index = 1 + secrets.randbelow(15)
    url = f"{REDIS_HOST}/{index}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture(scope="session")
def pg_settings(
    tmp_path_factory: pytest.TempPathFactory, pg_url: str, redis_url: str, models_dir: Path
) -> Settings:
    """The distributed configuration: Postgres, Redis, a worker in its own process."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data"),
        database_url=pg_url,
        broker_url=redis_url,
        models_dir=models_dir,
    )
    upgrade(settings)
    return settings


def settings_env(settings: Settings) -> dict[str, str]:
    env = {
        **os.environ,
        "ALIGND_DATA_DIR": str(settings.data_dir),
        "ALIGND_MODELS_DIR": str(settings.resolved_models_dir),
        "ALIGND_TORCH_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("database_url", "broker_url"):
        value = getattr(settings, key)
        if value:
            env[f"ALIGND_{key.upper()}"] = value
    return env


def create_api_key(settings: Settings, owner: str = LOCAL_OWNER, name: str = "tests") -> str:
    """A new API key for ``owner``, made in the database as `alignd keys create` makes it."""
    from api.db import make_engine, make_sessionmaker
    from api.keys import create_key

    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as session, session.begin():
            return create_key(session, owner, name)[1]
    finally:
        engine.dispose()


def job_row(**columns: Any) -> Job:
    """A supervised job on the tiny model as the API stores one, ``columns`` replacing any of
    its values: for tests that put a job in place without the API or a broker."""
    defaults: dict[str, Any] = {
        "id": new_id("ftjob"),
        "owner": LOCAL_OWNER,
        "created_at": now(),
        "model": "tiny",
        "status": "queued",
        "training_file": "file-none",
        "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
        "extensions": {},
        "seed": 1,
        "result_files": [],
        "cancel_requested": False,
    }
    return Job(**(defaults | columns))


def insert_job(sessions: Callable[[], Any], **columns: Any) -> str:
    """Insert ``job_row(**columns)`` and return its id. Nothing enqueues it: only a sweep
    (queued, or running with a stale heartbeat) would hand it to a worker."""
    job = job_row(**columns)
    job_id = job.id  # read before the commit expires the row's attributes
    with sessions() as session, session.begin():
        session.add(job)
    return job_id


class Api:
    """The app served by uvicorn on a real port, in a thread of the test process.

    ``http`` sends a key of owner ``local`` (``key``); ``as_owner`` gives clients of others.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.key = create_api_key(settings, LOCAL_OWNER)
        self._clients: list[httpx.Client] = []
        self.http = self.client(self.key)

    def client(self, key: str | None) -> httpx.Client:
        """An httpx client on ``/v1/`` that sends ``key`` (none when None); closed by stop()."""
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        client = httpx.Client(base_url=f"{self.url}/v1/", headers=headers, timeout=30)
        self._clients.append(client)
        return client

    def as_owner(self, owner: str) -> httpx.Client:
        """A client with a new key of ``owner`` (another tenant)."""
        return self.client(create_api_key(self.settings, owner))

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def upload(
        self, content: str | bytes, filename: str = "data.jsonl", purpose: str = "fine-tune"
    ) -> dict[str, Any]:
        data = content.encode() if isinstance(content, str) else content
        response = self.http.post(
            "files", data={"purpose": purpose}, files={"file": (filename, data)}
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_for(
        self, job_id: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 240
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.http.get(f"fine_tuning/jobs/{job_id}").json()
            if predicate(job):
                return dict(job)
            time.sleep(0.25)
        raise AssertionError(
            f"job {job_id} never reached the state; last: {json.dumps(job)[:2000]}"
        )

    def wait_terminal(self, job_id: str, timeout_s: float = 240) -> dict[str, Any]:
        return self.wait_for(job_id, lambda job: job["status"] in TERMINAL, timeout_s)


@pytest.fixture(scope="session")
def pg_api(pg_settings: Settings) -> Iterator[Api]:
    api = Api(pg_settings)
    yield api
    api.stop()


class WorkerProcess:
    """``alignd worker`` with ``args``, in its own process group, logging to ``log_path``."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        extra_env: dict[str, str] | None = None,
        args: Sequence[str] = ("--log-level", "info"),
    ) -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 -- open as long as the worker runs
        self.proc = start_alignd(
            ["worker", *args],
            env={**settings_env(settings), **(extra_env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        stop_process_group(self.proc, grace_s=20)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def pg_worker(
    pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(pg_settings, tmp_path_factory.mktemp("logs") / "worker.log")
    yield worker
    worker.stop()


def chat_rows(n: int, seed: int = 0) -> str:
    from alignd.demo import make_dataset

    return "".join(json.dumps(row) + "\n" for row in make_dataset(n, seed=seed))
