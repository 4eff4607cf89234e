"""Queues per worker class and GPU slots, with real `alignd worker` processes.

Two workers on different queues (classes): a job naming one class runs only on that class's
worker; a job naming a class no worker serves stays queued and says so. A worker with one
slot (``--gpus 0`` on this CUDA-less machine: one CPU slot) and two pool processes runs two
jobs one after the other, never side by side, the second saying what it waits for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from api.db import make_engine, make_sessionmaker
from api.models import Job as JobRow
from api.models import JobLog, Worker
from api.settings import Settings
from tests.conftest import Api, WorkerProcess, chat_rows
from worker.slots import acquire, resolve_devices


class CliWorker(WorkerProcess):
    """``alignd worker --hostname <hostname> <args>``, retrying busy device slots every second."""

    def __init__(self, settings: Settings, log_path: Path, hostname: str, *args: str) -> None:
        self.hostname = hostname
        retry = {"ALIGND_SLOT_RETRY_S": "1"}
        super().__init__(settings, log_path, retry, args=["--hostname", hostname, *args])

    def output(self) -> str:
        return super().output()[-4000:]


@pytest.fixture(scope="module")
def db(pg_settings: Settings) -> Iterator[Any]:
    engine = make_engine(pg_settings)
    yield make_sessionmaker(engine)
    engine.dispose()


def wait_registered(db: Any, worker: CliWorker, since: float, timeout_s: float = 90) -> Worker:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with db() as session:
            row = session.get(Worker, worker.hostname)
            if row is not None and row.started_at >= since:
                session.expunge(row)
                return row
        assert worker.proc.poll() is None, worker.output()
        time.sleep(0.25)
    raise AssertionError(f"{worker.hostname} never registered: {worker.output()}")


def start(
    pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory, hostname: str, *args: str
) -> CliWorker:
    log_path = tmp_path_factory.mktemp("queue-workers") / f"{hostname}.log"
    return CliWorker(pg_settings, log_path, hostname, *args)


@pytest.fixture(scope="module")
def class_workers(
    pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory, db: Any
) -> Iterator[dict[str, CliWorker]]:
    since = time.time()
    workers = {
        name: start(pg_settings, tmp_path_factory, f"{name}@tests", "--queues", name)
        for name in ("cpu-a", "cpu-b")
    }
    try:
        for worker in workers.values():
            wait_registered(db, worker, since)
        yield workers
    finally:
        for worker in workers.values():
            worker.stop()


def tiny_job(train_id: str, **resources: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "training_file": train_id,
        "seed": 1,
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}},
        },
        "adapter": {"type": "lora", "r": 2, "alpha": 4},
        "max_seq_len": 64,
        "resources": resources,
    }


@pytest.mark.slow
def test_workers_register_their_queues_and_slots(
    class_workers: dict[str, CliWorker], db: Any
) -> None:
    # No --gpus: every CUDA device the machine has, or without CUDA one CPU slot per core.
    kind, devices = resolve_devices(None)
    with db() as session:
        row = session.get_one(Worker, "cpu-b@tests")
        assert row.queues == ["cpu-b"]
        assert row.device_kind == kind and row.slots == len(devices)
        if kind == "cpu":
            assert row.slots == (os.cpu_count() or 1)
            assert row.precisions == ["fp32", "bf16"]
        else:
            assert {"fp32", "fp16"} <= set(row.precisions)
        assert row.zero_stages in ([0], [0, 1, 2, 3])
        assert time.time() - row.last_seen < 120


@pytest.mark.slow
def test_job_naming_a_class_runs_on_its_worker(
    pg_api: Api, class_workers: dict[str, CliWorker], db: Any
) -> None:
    train = pg_api.upload(chat_rows(8, seed=5))
    created = pg_api.http.post("fine_tuning/jobs", json=tiny_job(train["id"], worker_class="cpu-b"))
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["resources"]["worker_class"] == "cpu-b" and job["substatus"] is None

    done = pg_api.wait_terminal(job["id"], timeout_s=180)
    assert done["status"] == "succeeded", (done, class_workers["cpu-b"].output())
    with db() as session:
        assert session.get_one(JobRow, job["id"]).worker == "cpu-b@tests"
    events = pg_api.http.get(f"fine_tuning/jobs/{job['id']}/events", params={"limit": 100})
    started = [e for e in events.json()["data"] if e["message"] == "Fine-tuning job started"]
    assert [e["data"]["worker"] for e in started] == ["cpu-b@tests"]
    assert job["id"] not in class_workers["cpu-a"].log_path.read_text(errors="replace")


@pytest.mark.slow
def test_job_naming_an_unserved_class_stays_queued(
    pg_api: Api, class_workers: dict[str, CliWorker]
) -> None:
    train = pg_api.upload(chat_rows(4, seed=6))
    created = pg_api.http.post(
        "fine_tuning/jobs", json=tiny_job(train["id"], worker_class="cpu-nobody")
    )
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    try:
        assert created.json()["substatus"] == "no worker serves queue 'cpu-nobody'"
        time.sleep(3)  # the two workers are idle: neither takes it
        job = pg_api.http.get(f"fine_tuning/jobs/{job_id}").json()
        assert job["status"] == "queued", job
        assert job["substatus"] == "no worker serves queue 'cpu-nobody'"
        assert job["queue_position"] >= 1
        for worker in class_workers.values():
            assert job_id not in worker.log_path.read_text(errors="replace")
    finally:
        pg_api.http.post(f"fine_tuning/jobs/{job_id}/cancel")


@pytest.mark.slow
def test_one_slot_runs_two_jobs_one_after_the_other(
    pg_api: Api,
    pg_settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
    db: Any,
) -> None:
    # Two pool processes but one slot: the slot lock, not the pool size, keeps them apart.
    since = time.time()
    worker = start(
        pg_settings,
        tmp_path_factory,
        "one-slot@tests",
        "--queues",
        "one-slot",
        "--gpus",
        "0",
        "--concurrency",
        "2",
    )
    try:
        row = wait_registered(db, worker, since)
        assert row.slots == 1 and row.queues == ["one-slot"]
        train = pg_api.upload(chat_rows(8, seed=7))
        ids = []
        for _ in range(2):
            created = pg_api.http.post(
                "fine_tuning/jobs", json=tiny_job(train["id"], worker_class="one-slot")
            )
            assert created.status_code == 200, created.text
            ids.append(created.json()["id"])

        seen: set[str] = set()
        deadline = time.monotonic() + 240
        jobs: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            jobs = {i: pg_api.http.get(f"fine_tuning/jobs/{i}").json() for i in ids}
            seen.update(j["substatus"] for j in jobs.values() if j["substatus"])
            if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs.values()):
                break
            time.sleep(0.2)
        assert [j["status"] for j in jobs.values()] == ["succeeded"] * 2, (jobs, worker.output())
        assert "waiting for 1 free GPU on one host" in seen, seen

        with db() as session:
            rows = {i: session.get_one(JobRow, i) for i in ids}
            assert {r.worker for r in rows.values()} == {"one-slot@tests"}
            spans = {
                i: session.execute(
                    select(func.min(JobLog.created_at), func.max(JobLog.created_at)).where(
                        JobLog.job_id == i
                    )
                ).one()
                for i in ids
            }
        # Whichever went first, the other began after it had ended (job log lines carry
        # sub-second times; started_at/finished_at whole seconds).
        assert all(span[0] is not None for span in spans.values()), spans
        a, b = sorted(ids, key=lambda i: spans[i][0])
        assert spans[b][0] >= spans[a][1], spans
        assert (rows[b].started_at or 0) >= (rows[a].finished_at or 0)
    finally:
        worker.stop()


def test_slot_locks_are_all_or_nothing(tmp_path: Path) -> None:
    devices = ["0", "1", "2"]
    first = acquire(tmp_path, devices, 2)
    assert first is not None and first.devices == ["0", "1"]
    # Only one is free: asking for two takes none (the free one is not left held).
    assert acquire(tmp_path, devices, 2) is None
    third = acquire(tmp_path, devices, 1)
    assert third is not None and third.devices == ["2"]
    assert acquire(tmp_path, devices, 1) is None
    assert acquire(tmp_path, devices, 4) is None  # more than the host has
    first.release()
    third.release()
    every = acquire(tmp_path, devices, 3)
    assert every is not None and every.devices == devices
    every.release()


def test_gpus_argument() -> None:
    kind, devices = resolve_devices("0")
    assert devices == ["0"] and kind in ("cpu", "cuda")
    for bad in ("", "0,0", "x" if kind == "cpu" else "99"):
        with pytest.raises(ValueError, match="--gpus"):
            resolve_devices(bad)
