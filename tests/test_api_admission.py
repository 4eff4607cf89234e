"""The API under load (issue 13, item 5): a request that cannot get a database connection
quickly is answered 503 with ``Retry-After`` in the error shape, never a 30 s hang and a 500.

A real ``alignd serve`` process with a pool of one connection and a one-second wait, on
Postgres. The test holds an exclusive lock on the jobs table, so one request that lists
models (which reads on a session of the sync pool, in a thread, as work outside /v1 does)
takes the only place and that pool's only connection and waits; everything else is
measured against that.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from alignd.processes import free_port, start_alignd, stop_process_group, wait_healthy
from api.settings import Settings
from tests.conftest import create_api_key, settings_env

WAIT_S = 1.0


class Server:
    def __init__(self, url: str, key: str, pid: int) -> None:
        self.url = url
        self.pid = pid  # of `alignd serve`, the leader of its process group
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )


@contextlib.contextmanager
def serving(settings: Settings, folder: Path, env: dict[str, str]) -> Iterator[Server]:
    """A real ``alignd serve --no-worker`` with ``env`` on top of the test settings."""
    port = free_port()
    env = {**settings_env(settings), "ALIGND_RATE_LIMIT_PER_MINUTE": "0", **env}
    with (folder / "serve.log").open("wb") as log:
        proc = start_alignd(
            ["serve", "--no-worker", "--port", str(port), "--log-level", "warning"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc)
            server = Server(f"http://127.0.0.1:{port}", create_api_key(settings), proc.pid)
            yield server
            server.http.close()
        finally:
            stop_process_group(proc)


@pytest.fixture(scope="module")
def tiny_pool_server(
    pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    env = {
        "ALIGND_DB_POOL_SIZE": "1",
        "ALIGND_DB_MAX_OVERFLOW": "0",
        "ALIGND_DB_POOL_TIMEOUT_S": str(WAIT_S),
        "ALIGND_API_QUEUE_TIMEOUT_S": str(WAIT_S),
    }
    with serving(pg_settings, tmp_path_factory.mktemp("serve"), env) as server:
        yield server


def lock_jobs(pg_settings: Settings) -> psycopg.Connection[tuple[object, ...]]:
    """A connection holding an exclusive lock on ``jobs`` until it commits."""
    url = pg_settings.resolved_database_url.replace("postgresql+psycopg://", "postgresql://")
    conn = psycopg.connect(url)
    conn.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
    return conn


def wait_for_blocked_query(pg_settings: Settings, timeout_s: float = 10) -> None:
    url = pg_settings.resolved_database_url.replace("postgresql+psycopg://", "postgresql://")
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()
            if row and row[0]:
                return
            time.sleep(0.05)
    raise AssertionError("the request never blocked on the lock")


def assert_busy(response: httpx.Response, elapsed_s: float) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert error["code"] == "server_busy"
    # The wait is bounded by the setting, not SQLAlchemy's 30 s.
    assert elapsed_s < WAIT_S + 2, elapsed_s


def timed_get(server: Server, path: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = server.http.get(path)
    return response, time.monotonic() - started


def test_requests_beyond_the_pool_get_503_with_retry_after(
    tiny_pool_server: Server, pg_settings: Settings
) -> None:
    server = tiny_pool_server
    assert server.http.get("/v1/fine_tuning/jobs").status_code == 200
    lock = lock_jobs(pg_settings)
    with ThreadPoolExecutor(max_workers=17) as pool:
        try:
            slow = pool.submit(timed_get, server, "/v1/models")
            wait_for_blocked_query(pg_settings)
            # 16 more /v1 requests at once: no place frees up within the wait.
            others = [pool.submit(timed_get, server, "/v1/files") for _ in range(16)]
            for future in others:
                assert_busy(*future.result(timeout=30))
            # Outside /v1 (no admission limit) the pool's own timeout gives the same answer.
            assert_busy(*timed_get(server, "/metrics"))
            assert not slow.done()
        finally:
            lock.commit()
            lock.close()
        response, _elapsed = slow.result(timeout=30)
    assert response.status_code == 200, response.text
    # The place and the connection are back: the server answers normally at once.
    response, elapsed = timed_get(server, "/v1/files")
    assert response.status_code == 200
    assert elapsed < WAIT_S


def test_streamed_download_does_not_hold_a_place(tiny_pool_server: Server, tmp_path: Path) -> None:
    # A download still being read (its response has started) leaves the only place free.
    body = (
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    )
    created = tiny_pool_server.http.post(
        "/v1/files",
        data={"purpose": "fine-tune"},
        files={"file": ("big.jsonl", body * 40_000)},
    )
    assert created.status_code == 200, created.text
    file_id = created.json()["id"]
    with tiny_pool_server.http.stream("GET", f"/v1/files/{file_id}/content") as download:
        assert download.status_code == 200
        first = next(download.iter_bytes())
        assert first
        response, elapsed = timed_get(tiny_pool_server, "/v1/fine_tuning/jobs")
        assert response.status_code == 200, response.text
        assert elapsed < WAIT_S


@pytest.fixture(scope="module")
def one_place_server(
    pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One place for reads and one for uploads (api/admission.py), a one-second wait."""
    env = {
        "ALIGND_API_CONCURRENCY": "1",
        "ALIGND_API_UPLOAD_CONCURRENCY": "1",
        "ALIGND_API_QUEUE_TIMEOUT_S": str(WAIT_S),
    }
    with serving(pg_settings, tmp_path_factory.mktemp("serve"), env) as server:
        yield server


ROW = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
BOUNDARY = "alignd-test-boundary"


def slow_upload_body(started: threading.Event, parts: int, pause_s: float) -> Iterator[bytes]:
    """A multipart body (purpose, then a JSONL file) sent in pieces ``pause_s`` apart, as a
    client on a slow link sends it."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="slow.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n'
    ).encode()
    started.set()
    for _ in range(parts):
        time.sleep(pause_s)
        yield ROW * 100
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_a_slow_upload_keeps_neither_reads_nor_itself_waiting(one_place_server: Server) -> None:
    server = one_place_server
    started = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(
            server.http.post,
            "/v1/files",
            content=slow_upload_body(started, parts=12, pause_s=0.25),
            headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        assert started.wait(10)
        time.sleep(0.3)  # the upload holds its place, sending
        # Reads have a place of their own: answered at once, however long the upload takes.
        for _ in range(5):
            response, elapsed = timed_get(server, "/v1/files")
            assert response.status_code == 200, response.text
            assert elapsed < WAIT_S / 2, elapsed
        # A second upload waits for the only upload place, and is told so after the wait.
        started_at = time.monotonic()
        second = server.http.post(
            "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("b.jsonl", ROW)}
        )
        assert_busy(second, time.monotonic() - started_at)
        assert not slow.done()
        uploaded = slow.result(timeout=60)
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["status"] == "processed"
    assert uploaded.json()["bytes"] == len(ROW) * 100 * 12


def test_serve_runs_several_api_processes(pg_settings: Settings, tmp_path: Path) -> None:
    # One process's Python runs under one GIL: more API processes on one port is how a
    # machine with more cores serves more requests (docs/operations.md, "Load").
    with serving(pg_settings, tmp_path, {"ALIGND_API_WORKERS": "2"}) as server:
        group = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if entry.name.isdigit() and os.getpgid(int(entry.name)) == server.pid:
                    group.append(entry.name)
        assert len(group) >= 3, group  # the supervisor and two API processes
        took = []
        for _ in range(9):  # on the one keep-alive connection of server.http
            started = time.monotonic()
            response = server.http.get("/v1/files")
            took.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
        # TCP_NODELAY (alignd/serving.py): without it, every answer waited ~40 ms for the
        # client's delayed ACK.
        assert sorted(took)[4] < 0.03, took


def test_places_are_api_concurrency_capped_by_the_pool() -> None:
    # Each admitted request holds at most one connection: never more places than connections.
    assert (Settings().api_places, Settings().api_upload_places) == (4, 2)
    wide = Settings(api_concurrency=50, api_upload_concurrency=30)
    assert (wide.api_places, wide.api_upload_places) == (20, 20)  # 10 + 10 connections
    tiny = Settings(db_pool_size=1, db_max_overflow=0)
    assert (tiny.api_places, tiny.api_upload_places) == (1, 1)
