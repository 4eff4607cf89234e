"""Prometheus: the API's /metrics and a real worker's metrics port, read with the client
library's own parser (docs/operations.md lists the metrics)."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from alignd.processes import free_port, start_alignd, stop_process_group
from api.db import make_engine, make_sessionmaker
from api.migration import upgrade
from api.settings import Settings
from tests.conftest import PG_ADMIN, Api, WorkerProcess, chat_rows, insert_job
from worker import metrics as worker_metrics
from worker import slots


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample at ``url``, by (name, labels)."""
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def settings(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, models_dir: Path
) -> Iterator[Settings]:
    """A database of this module's own: the job counts below are exact."""
    name = f"alignd_test_metrics_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("metrics-data"),
        database_url=f"{url}/{name}",
        broker_url=redis_url,
        models_dir=models_dir,
    )
    upgrade(settings)
    yield settings
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def api(settings: Settings) -> Iterator[Api]:
    server = Api(settings)
    yield server
    server.stop()


class Worker:
    def __init__(self, settings: Settings, folder: Path) -> None:
        self.queue = f"prom-{secrets.token_hex(3)}"
        self.hostname = f"prom@{self.queue}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.proc = WorkerProcess(
            settings,
            folder / "worker.log",
            {"ALIGND_WORKER_METRICS_PORT": str(self.port), "ALIGND_TORCH_THREADS": "1"},
            args=["--hostname", self.hostname, "--queues", self.queue, "--gpus", "0,1"],
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(self.url, timeout=5)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.proc.proc.poll() is not None:
                    raise AssertionError(self.proc.output()[-3000:]) from None
                time.sleep(0.5)


@pytest.fixture(scope="module")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    running = Worker(settings, tmp_path_factory.mktemp("metrics-worker"))
    yield running
    running.proc.stop()


def test_requests_are_counted_and_timed_per_route_template(api: Api) -> None:
    url = f"{api.url}/metrics"
    route = "/v1/fine_tuning/jobs/{job_id}"
    before = scrape(url)
    for i in range(3):  # three ids, one template
        assert api.http.get(f"fine_tuning/jobs/ftjob-missing{i}").status_code == 404
    for _ in range(2):
        assert api.http.get("files").status_code == 200
    assert httpx.get(f"{api.url}/no/such/path").status_code == 404
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "alignd_http_requests_total"
    assert delta(requests, route=route, method="GET", status="4xx") == 3
    assert delta(requests, route="/v1/files", method="GET", status="2xx") == 2
    assert delta(requests, route="unrouted", method="GET", status="4xx") == 1
    latency = "alignd_http_request_duration_seconds"
    assert delta(f"{latency}_count", route=route, method="GET") == 3
    assert delta(f"{latency}_bucket", route=route, method="GET", le="+Inf") == 3
    assert delta(f"{latency}_sum", route=route, method="GET") > 0
    # No raw id ever becomes a label value.
    assert not any("ftjob-missing" in str(labels) for _name, labels in after)


def test_jobs_queues_and_worker_slots(api: Api, worker: Worker, settings: Settings) -> None:
    train = api.upload(chat_rows(8, seed=3))["id"]
    body: dict[str, Any] = {
        "model": "tiny",
        "training_file": train,
        "seed": 1,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
        "max_seq_len": 64,
        "resources": {"worker_class": worker.queue},
    }
    created = api.http.post("fine_tuning/jobs", json=body)
    assert created.status_code == 200, created.text
    job = api.wait_terminal(created.json()["id"])
    assert job["status"] == "succeeded", job

    # A queued job on a queue no worker serves: it waits, and the queue shows it.
    engine = make_engine(settings)
    try:
        insert_job(
            make_sessionmaker(engine),
            method={"type": "dpo", "dpo": {}},
            extensions={"resources": {"worker_class": "prom-unserved"}},
        )
    finally:
        engine.dispose()

    samples = scrape(f"{api.url}/metrics")
    assert value(samples, "alignd_jobs", status="succeeded", method="supervised") == 1
    assert value(samples, "alignd_jobs", status="queued", method="dpo") == 1
    assert value(samples, "alignd_queue_depth", queue="prom-unserved") == 1
    assert value(samples, "alignd_queue_depth", queue=worker.queue) == 0

    labels = {"worker": worker.hostname, "worker_class": worker.queue}
    samples = scrape(worker.url)
    assert value(samples, "alignd_worker_slots", state="busy", **labels) == 0
    assert value(samples, "alignd_worker_slots", state="free", **labels) == 2
    # Held as a job holds it (worker/slots.py): the worker sees the slot busy.
    held = slots.acquire(slots.lock_dir(settings), ["1"], 1)
    assert held is not None
    try:
        samples = scrape(worker.url)
        assert value(samples, "alignd_worker_slots", state="busy", **labels) == 1
        assert value(samples, "alignd_worker_slots", state="free", **labels) == 1
    finally:
        held.release()
    # The finished job's series is gone from the worker.
    assert not any(name.startswith("alignd_worker_job_") for name, _ in samples)


def test_job_stats_are_reported_while_their_process_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(worker_metrics.STATS_DIR_ENV, str(tmp_path))
    stats = worker_metrics.JobStats("ftjob-x", "dpo")
    stats.started -= 2.0  # two seconds into the attempt
    stats.update(1, {"num_tokens": 1000.0, "train_loss": 0.5})
    # A file of a process that has died is dropped at the next scrape.
    (tmp_path / "job-999999999.json").write_text('{"job_id": "ftjob-dead", "method": "dpo"}')
    collector = worker_metrics.WorkerCollector("w@h", ["gpu"], tmp_path / "locks", ["0"], tmp_path)
    families = {family.name: family for family in collector.collect()}
    (rate,) = families["alignd_worker_job_tokens_per_second"].samples
    assert rate.labels == {"worker": "w@h", "job_id": "ftjob-x", "method": "dpo"}
    assert rate.value == pytest.approx(500.0, rel=0.05)
    assert families["alignd_worker_job_gpu_memory_bytes"].samples == []  # no CUDA here
    assert not (tmp_path / "job-999999999.json").exists()
    worker_metrics.job_ended()
    assert not (tmp_path / f"job-{os.getpid()}.json").exists()
    assert not list(job_samples(collector))


def job_samples(collector: worker_metrics.WorkerCollector) -> Iterator[Any]:
    for family in collector.collect():
        if family.name.startswith("alignd_worker_job_"):
            yield from family.samples


def test_a_running_job_has_its_throughput_series_on_the_worker(api: Api, worker: Worker) -> None:
    train = api.upload(chat_rows(32, seed=4))["id"]
    body: dict[str, Any] = {
        "model": "tiny",
        "training_file": train,
        "seed": 1,
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}},
        },
        "max_seq_len": 64,
        "resources": {"worker_class": worker.queue},
    }
    created = api.http.post("fine_tuning/jobs", json=body)
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    labels = {"worker": worker.hostname, "job_id": job_id, "method": "supervised"}
    try:
        deadline = time.monotonic() + 120
        rate = 0.0
        while rate <= 0 and time.monotonic() < deadline:
            samples = scrape(worker.url)
            rate = value(samples, "alignd_worker_job_tokens_per_second", **labels)
            time.sleep(0.2)
        assert rate > 0, worker.proc.output()[-3000:]
        slots_labels = {"worker": worker.hostname, "worker_class": worker.queue}
        assert value(samples, "alignd_worker_slots", state="busy", **slots_labels) == 1
        # A CPU worker reports no GPU memory.
        assert not any(name == "alignd_worker_job_gpu_memory_bytes" for name, _ in samples)
    finally:
        api.http.post(f"fine_tuning/jobs/{job_id}/cancel")
    assert api.wait_terminal(job_id)["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        samples = scrape(worker.url)
        if not any(name.startswith("alignd_worker_job_") for name, _ in samples):
            break
        time.sleep(0.2)
    assert not any(name.startswith("alignd_worker_job_") for name, _ in samples)


def test_several_api_processes_answer_with_the_sum_of_their_counts(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIGND_", "PROMETHEUS_"))}
    env |= {"ALIGND_DATA_DIR": str(tmp_path), "ALIGND_PORT": str(port)}
    proc = start_alignd(["serve", "--workers", "2", "--no-worker"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
            time.sleep(0.3)
        before = value(
            scrape(f"{base}/metrics"),
            "alignd_http_requests_total",
            route="/healthz",
            method="GET",
            status="2xx",
        )
        for _ in range(20):  # new connections: both processes take some
            assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        # Whichever process answers the scrape, it reports all of them.
        for _ in range(4):
            after = scrape(f"{base}/metrics")
            count = value(
                after, "alignd_http_requests_total", route="/healthz", method="GET", status="2xx"
            )
            assert count - before == 20
    finally:
        stop_process_group(proc)
