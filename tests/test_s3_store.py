"""The S3 artifact store against a real S3-compatible server: moto's standalone server, a
process started here on a free port.

- The store itself: multipart uploads of large files, the sha256 kept with the object,
  ranged reads, missing keys, deleting a job's prefix, creating the bucket at start, and
  failures (a bucket that does not exist fails at once; a server killed for real is retried
  for ``s3_retry_s``, then fails) that end as ``ArtifactStoreError``.
- The whole job path (slow): the API and a worker process configured with
  ``ALIGND_ARTIFACTS_URL=s3://...`` → checkpoints and the adapter land in the bucket and
  nowhere on disk, the adapter downloads through the API with Range and an ETag that is the
  sha256 of the bytes in S3; a paused job, and a job whose training process was killed,
  resume from the checkpoint the worker fetches from S3;
  a worker whose bucket does not exist fails its job with ``artifact_store_error`` and
  records no checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import psycopg
import pytest
import redis

from alignd.processes import free_port, stop_process_group
from api.artifacts import ArtifactStoreError, artifact_store
from api.migration import upgrade
from api.s3 import S3ArtifactStore
from api.settings import Settings
from tests.conftest import PG_ADMIN, REDIS_HOST, Api, WorkerProcess, chat_rows
from tests.test_durable_jobs import FAST_RECOVERY, pool_child
from tests.test_e2e import all_events, job_body

MiB = 1024 * 1024
KEYS = {"aws_access_key_id": "alignd-test", "aws_secret_access_key": "alignd-test-secret"}


@dataclass
class S3Server:
    proc: subprocess.Popen[bytes]
    endpoint: str

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **KEYS)

    def stop(self) -> None:
        stop_process_group(self.proc, grace_s=5)


def start_s3_server(log_path: Path) -> S3Server:
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited: {log_path.read_text()[-2000:]}")
        try:
            httpx.get(endpoint, timeout=1)
            return S3Server(proc, endpoint)
        except httpx.HTTPError:
            time.sleep(0.2)
    stop_process_group(proc)
    raise RuntimeError("moto_server did not answer within 60 s")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


def store_settings(data_dir: Path, endpoint: str, url: str, **overrides: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        artifacts_url=url,
        s3_endpoint_url=endpoint,
        s3_region="us-east-1",
        s3_access_key_id=KEYS["aws_access_key_id"],
        s3_secret_access_key=KEYS["aws_secret_access_key"],
        **overrides,
    )


def keys_under(client: Any, bucket: str, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def test_settings_read_the_s3_url() -> None:
    settings = Settings(artifacts_url="s3://bucket/some/prefix/")
    assert settings.artifacts_s3 == ("bucket", "some/prefix")
    assert Settings(artifacts_url="s3://bucket").artifacts_s3 == ("bucket", "")
    assert Settings(artifacts_url="/srv/artifacts").artifacts_s3 is None
    with pytest.raises(ValueError, match="needs a bucket"):
        Settings(artifacts_url="s3:///prefix")


def test_store_round_trip_multipart_range_and_delete(s3: S3Server, tmp_path: Path) -> None:
    settings = store_settings(
        tmp_path,
        s3.endpoint,
        "s3://round-trip/alignd/",
        s3_create_bucket=True,  # the bucket does not exist yet: the store makes it
        s3_multipart_bytes=5 * MiB,
    )
    store = artifact_store(settings)
    assert isinstance(store, S3ArtifactStore)
    artifact_store(settings)  # a second start finds the bucket there: no error

    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(11 * MiB + 17))
    data = big.read_bytes()
    store.put_file("jobs/j1/checkpoints/step-2/adapter.tar", big)
    small = tmp_path / "small.tar"
    small.write_bytes(b"state")
    store.put_file("jobs/j1/checkpoints/step-2/state.tar", small)
    store.put_file("jobs/j10/checkpoints/step-1/adapter.tar", small)

    client = s3.client()
    head = client.head_object(
        Bucket="round-trip", Key="alignd/jobs/j1/checkpoints/step-2/adapter.tar"
    )
    # 11 MiB in 5 MiB parts: S3's ETag of a multipart object ends with its part count.
    assert head["ETag"].strip('"').endswith("-3")
    assert head["ContentLength"] == len(data)

    info = store.stat("jobs/j1/checkpoints/step-2/adapter.tar")
    assert info is not None
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert store.stat("jobs/j1/checkpoints/step-2/missing.tar") is None

    chunks = list(store.read("jobs/j1/checkpoints/step-2/adapter.tar", 5, 2 * MiB + 9))
    assert b"".join(chunks) == data[5 : 2 * MiB + 10]
    assert max(len(chunk) for chunk in chunks) <= MiB  # streamed, never the span at once

    fetched = tmp_path / "fetched.tar"
    store.get_file("jobs/j1/checkpoints/step-2/adapter.tar", fetched)
    assert fetched.read_bytes() == data
    with pytest.raises(FileNotFoundError):
        store.get_file("jobs/j1/checkpoints/step-9/adapter.tar", tmp_path / "none.tar")

    # A job's prefix goes whole, and only it: jobs/j10 shares the characters, not the folder.
    store.delete_prefix("jobs/j1")
    assert keys_under(client, "round-trip", "alignd/") == {
        "alignd/jobs/j10/checkpoints/step-1/adapter.tar"
    }
    with pytest.raises(ValueError, match="escapes"):
        store.put_file("../outside", small)


def test_missing_bucket_fails_at_once(s3: S3Server, tmp_path: Path) -> None:
    store = artifact_store(store_settings(tmp_path, s3.endpoint, "s3://no-such-bucket/x"))
    source = tmp_path / "a.tar"
    source.write_bytes(b"adapter")
    started = time.monotonic()
    with pytest.raises(ArtifactStoreError, match="NoSuchBucket") as caught:
        store.put_file("jobs/j/checkpoints/step-1/adapter.tar", source)
    assert "s3://no-such-bucket/x" in str(caught.value)
    assert time.monotonic() - started < 10  # not retried for s3_retry_s (60 s)


def test_server_killed_is_retried_then_fails(tmp_path: Path) -> None:
    server = start_s3_server(tmp_path / "moto.log")
    try:
        settings = store_settings(
            tmp_path, server.endpoint, "s3://doomed/p", s3_create_bucket=True, s3_retry_s=2
        )
        store = artifact_store(settings)
        source = tmp_path / "a.tar"
        source.write_bytes(b"adapter")
        store.put_file("before.tar", source)
    finally:
        server.proc.kill()  # for real, with no goodbye
        server.proc.wait()
    started = time.monotonic()
    with pytest.raises(ArtifactStoreError, match="Could not connect") as caught:
        store.put_file("after.tar", source)
    elapsed = time.monotonic() - started
    assert 2 <= elapsed < 20, elapsed  # tried again for s3_retry_s, then gave up
    assert "storing after.tar in s3://doomed/p" in str(caught.value)


# -- the whole job path -------------------------------------------------------------------


@dataclass
class Stack:
    api: Api
    worker: WorkerProcess
    s3: S3Server
    settings: Settings
    bucket: str
    prefix: str


def worker_env(settings: Settings, endpoint: str, url: str) -> dict[str, str]:
    # The worker takes its keys the standard AWS way (the API above takes them as settings).
    return {
        "ALIGND_ARTIFACTS_URL": url,
        "ALIGND_S3_ENDPOINT_URL": endpoint,
        "ALIGND_S3_REGION": "us-east-1",
        "ALIGND_S3_RETRY_S": "2",
        "AWS_ACCESS_KEY_ID": KEYS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": KEYS["aws_secret_access_key"],
    }


@pytest.fixture(scope="module")
def stack(
    s3: S3Server, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[Stack]:
    """A database and a Redis index of this module's own, the API and one worker on S3."""
    name = f"alignd_s3_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    pg_url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    redis_url = f"{REDIS_HOST}/{1 + secrets.randbelow(15)}"
    redis.Redis.from_url(redis_url).flushdb()
    bucket, prefix = "alignd-jobs", "deploy-a"
    url = f"s3://{bucket}/{prefix}"
    settings = store_settings(
        tmp_path_factory.mktemp("s3-data"),
        s3.endpoint,
        url,
        s3_create_bucket=True,
        database_url=f"{pg_url}/{name}",
        broker_url=redis_url,
        models_dir=models_dir,
        default_queue=f"s3-{secrets.token_hex(3)}",
    )
    upgrade(settings)
    api = Api(settings)
    env = {**worker_env(settings, s3.endpoint, url), "ALIGND_DEFAULT_QUEUE": settings.default_queue}
    worker = WorkerProcess(settings, tmp_path_factory.mktemp("s3-logs") / "worker.log", env)
    try:
        yield Stack(api, worker, s3, settings, bucket, prefix)
    finally:
        worker.stop()
        api.stop()
        redis.Redis.from_url(redis_url).flushdb()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.slow
def test_job_artifacts_land_in_s3_and_download_through_the_api(stack: Stack) -> None:
    api, client = stack.api, stack.s3.client()
    train = api.upload(chat_rows(16, seed=1))
    created = api.http.post("fine_tuning/jobs", json=job_body(train["id"]))
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    job = api.wait_terminal(job_id)
    assert job["status"] == "succeeded", (job, stack.worker.output()[-3000:])

    base = f"{stack.prefix}/jobs/{job_id}/checkpoints"
    assert keys_under(client, stack.bucket, f"{stack.prefix}/jobs/{job_id}/") == {
        f"{base}/step-{step}/{part}.tar" for step in (4, 8) for part in ("adapter", "state")
    }
    # Nothing went to the local default folder.
    assert not (stack.settings.data_dir / "artifacts").exists()

    in_s3 = client.get_object(Bucket=stack.bucket, Key=f"{base}/step-8/adapter.tar")["Body"].read()
    whole = api.http.get(f"fine_tuning/jobs/{job_id}/adapter")
    assert whole.status_code == 200
    assert whole.content == in_s3
    etag = whole.headers["etag"]
    assert etag == f'"{hashlib.sha256(in_s3).hexdigest()}"'
    assert int(whole.headers["content-length"]) == len(in_s3)

    part = api.http.get(f"fine_tuning/jobs/{job_id}/adapter", headers={"Range": "bytes=100-611"})
    assert part.status_code == 206
    assert part.content == in_s3[100:612]
    assert part.headers["content-range"] == f"bytes 100-611/{len(in_s3)}"
    tail = api.http.get(f"fine_tuning/jobs/{job_id}/adapter", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == in_s3[-10:]
    beyond = api.http.get(
        f"fine_tuning/jobs/{job_id}/adapter", headers={"Range": f"bytes={len(in_s3)}-"}
    )
    assert beyond.status_code == 416
    assert beyond.json()["error"]["code"] == "range_not_satisfiable"
    cached = api.http.get(f"fine_tuning/jobs/{job_id}/adapter", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""

    checkpoints = api.http.get(f"fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    step4 = next(c for c in checkpoints if c["step_number"] == 4)
    ckpt = api.http.get(f"fine_tuning/jobs/{job_id}/checkpoints/{step4['id']}/adapter")
    assert ckpt.status_code == 200
    assert (
        ckpt.content
        == client.get_object(Bucket=stack.bucket, Key=f"{base}/step-4/adapter.tar")["Body"].read()
    )

    # The results file is an object in the bucket too, and the API serves exactly its bytes.
    (results_id,) = job["result_files"]
    results_key = f"{stack.prefix}/files/{results_id}/{job_id}_results.csv"
    assert keys_under(client, stack.bucket, f"{stack.prefix}/files/{results_id}/") == {results_key}
    csv_object = client.get_object(Bucket=stack.bucket, Key=results_key)["Body"].read()
    csv = api.http.get(f"files/{results_id}/content")
    assert csv.status_code == 200
    assert csv.content == csv_object
    assert int(csv.headers["content-length"]) == len(csv_object)
    rows = csv.text.splitlines()
    assert rows[0].startswith("step,train_loss,train_accuracy,valid_loss")
    assert [row.split(",")[0] for row in rows[1:]] == [str(step) for step in range(1, 9)]

    # Deleting the fine-tuned model deletes its objects from the bucket.
    deleted = api.http.delete(f"models/{job['fine_tuned_model']}")
    assert deleted.status_code == 200, deleted.text
    assert keys_under(client, stack.bucket, f"{stack.prefix}/jobs/{job_id}/") == set()
    assert api.http.get(f"fine_tuning/jobs/{job_id}/adapter").status_code == 404
    # Deleting the results file deletes its object.
    assert api.http.delete(f"files/{results_id}").status_code == 200
    assert keys_under(client, stack.bucket, f"{stack.prefix}/files/{results_id}/") == set()


@pytest.mark.slow
def test_paused_job_resumes_from_its_checkpoint_in_s3(stack: Stack) -> None:
    api = stack.api
    # 240 steps: a pause sent at step 3 must land before a fast worker could finish (CI's
    # machine ran 48 steps before the pause arrived).
    train = api.upload(chat_rows(40, seed=5))
    body = job_body(train["id"], n_epochs=6, batch_size=1)
    job_id = api.http.post("fine_tuning/jobs", json=body).json()["id"]
    api.wait_for(
        job_id, lambda j: j["status"] == "running" and (j["progress"] or {}).get("step", 0) >= 3
    )
    assert api.http.post(f"fine_tuning/jobs/{job_id}/pause").status_code == 200
    paused = api.wait_for(job_id, lambda j: j["status"] == "paused", timeout_s=120)
    step = paused["progress"]["step"]
    assert 3 <= step < 240
    checkpoints = api.http.get(f"fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints[0]["step_number"] == step
    key = f"{stack.prefix}/jobs/{job_id}/checkpoints/step-{step}/state.tar"
    assert key in keys_under(stack.s3.client(), stack.bucket, key)

    assert api.http.post(f"fine_tuning/jobs/{job_id}/resume").status_code == 200
    job = api.wait_terminal(job_id)
    assert job["status"] == "succeeded", (job, stack.worker.output()[-3000:])
    # The worker fetched the paused step's checkpoint from the bucket (its local work folder
    # was removed when the job paused) ...
    log = stack.worker.output()
    assert f"fetched jobs/{job_id}/checkpoints/step-{step}/state.tar" in log, log[-3000:]
    # ... and continued from it: every step once, the ones after the pause logged after it.
    metrics = api.http.get(f"fine_tuning/jobs/{job_id}/metrics").json()
    assert metrics["step"] == list(range(1, 241)), metrics["step"]
    messages = [event["message"] for event in all_events(api, job_id)]
    paused_at = messages.index(f"Job paused at step {step}; resume it to continue")
    later_steps = [
        int(m.split()[1].split("/")[0]) for m in messages[paused_at:] if m.startswith("Step ")
    ]
    assert later_steps and min(later_steps) > step


@pytest.mark.slow
def test_worker_whose_bucket_is_missing_fails_the_job_and_records_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    queue = f"s3-broken-{secrets.token_hex(3)}"
    env = {
        **worker_env(stack.settings, stack.s3.endpoint, "s3://no-such-bucket/x"),
        "ALIGND_DEFAULT_QUEUE": queue,
    }
    broken = WorkerProcess(stack.settings, tmp_path / "worker.log", env)
    try:
        api = stack.api
        train = api.upload(chat_rows(8, seed=2))
        body = {**job_body(train["id"]), "resources": {"worker_class": queue}}
        created = api.http.post("fine_tuning/jobs", json=body)
        assert created.status_code == 200, created.text
        job = api.wait_terminal(created.json()["id"])
    finally:
        broken.stop()
    assert job["status"] == "failed", (job, broken.output()[-3000:])
    assert job["error"]["code"] == "artifact_store_error"
    assert "NoSuchBucket" in job["error"]["message"]
    assert "s3://no-such-bucket/x" in job["error"]["message"]
    assert job["fine_tuned_model"] is None
    assert api.http.get(f"fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []
    assert api.http.get(f"fine_tuning/jobs/{job['id']}/adapter").status_code == 404
    messages = [event["message"] for event in all_events(api, job["id"])]
    assert not any(m.startswith("Checkpoint saved") for m in messages)
    assert messages[-1].startswith("The job failed: storing jobs/")


@pytest.mark.slow
def test_job_that_lost_its_worker_resumes_from_s3(stack: Stack, tmp_path: Path) -> None:
    queue = f"s3-lost-{secrets.token_hex(3)}"
    env = {
        **worker_env(stack.settings, stack.s3.endpoint, f"s3://{stack.bucket}/{stack.prefix}"),
        **FAST_RECOVERY,
    }
    # One pool process on a slot of its own (test_durable_jobs.py's workers do the same).
    worker = WorkerProcess(
        stack.settings, tmp_path / "worker.log", env, args=["--queues", queue, "--gpus", "7"]
    )
    try:
        api = stack.api
        train = api.upload(chat_rows(8, seed=11))
        # 8 rows in batches of 4, 8 epochs: 16 steps, a checkpoint every 2.
        body = {**job_body(train["id"], n_epochs=8), "resources": {"worker_class": queue}}
        job_id = api.http.post("fine_tuning/jobs", json=body).json()["id"]
        api.wait_for(
            job_id,
            lambda j: j["status"] == "running" and (j["progress"] or {}).get("step", 0) >= 5,
        )
        os.kill(pool_child(worker), signal.SIGKILL)  # the training process, for real
        job = api.wait_terminal(job_id)
        assert job["status"] == "succeeded", (job, worker.output()[-3000:])
        resumed = [m for m in (e["message"] for e in all_events(api, job_id)) if "Resumed" in m]
        assert len(resumed) == 1, resumed
        step = int(resumed[0].split()[3])
        assert step >= 4 and step % 2 == 0
        # The new attempt fetched that checkpoint from the bucket, and went on from it.
        log = worker.output()
        assert f"fetched jobs/{job_id}/checkpoints/step-{step}/state.tar" in log, log[-3000:]
        metrics = api.http.get(f"fine_tuning/jobs/{job_id}/metrics").json()
        assert metrics["step"] == list(range(1, 17))
    finally:
        worker.stop()
