"""The unmodified openai SDK over a real job's whole life: metadata filters and paging,
events and checkpoints, pause and resume continuing the loss curve, adapter downloads with
ETag and Range, and deleting the fine-tuned model."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import openai
import pytest

from tests.conftest import Api, WorkerProcess, chat_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(pg_api: Api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pg_api.url}/v1", api_key=pg_api.key, max_retries=0)


def wait(client: openai.OpenAI, job_id: str, ok: Any, timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while not ok(job := client.fine_tuning.jobs.retrieve(job_id)):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def create(client: openai.OpenAI, file_id: str, metadata: dict[str, str], n_epochs: int) -> Any:
    return client.fine_tuning.jobs.create(
        model="tiny",
        training_file=file_id,
        metadata=metadata,
        seed=5,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": n_epochs,
                    "batch_size": 1,
                    "learning_rate_multiplier": 10,
                }
            },
        },
        extra_body={"adapter": {"type": "lora", "r": 4}, "max_seq_len": 64},
    )


def test_pause_resume_download_and_delete(
    client: openai.OpenAI, pg_api: Api, pg_worker: WorkerProcess
) -> None:
    # 240 steps: a pause sent at step 3 must land before a fast worker could finish.
    train = client.files.create(file=("t.jsonl", chat_rows(40).encode()), purpose="fine-tune")
    tag = f"run-{time.monotonic_ns()}"
    job = create(client, train.id, {"suite": tag, "kind": "long"}, n_epochs=6)
    other = create(client, train.id, {"suite": tag, "kind": "other"}, n_epochs=1)

    # metadata filter, and paging across pages (iterating a page fetches the next ones)
    found = client.fine_tuning.jobs.list(metadata={"suite": tag, "kind": "long"})
    assert [j.id for j in found.data] == [job.id]
    paged = [j.id for j in client.fine_tuning.jobs.list(limit=1, metadata={"suite": tag})]
    assert paged == [other.id, job.id]

    # pause mid-run: a checkpoint at the step where it stopped, and the worker is free
    wait(client, job.id, lambda j: (j.model_extra.get("progress") or {}).get("step", 0) >= 3)
    assert client.fine_tuning.jobs.pause(job.id).status in ("running", "paused")
    paused = wait(client, job.id, lambda j: j.status == "paused", 60)
    paused_step = paused.model_extra["progress"]["step"]
    assert 3 <= paused_step < 240
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints[0].step_number == paused_step
    wait(
        client, other.id, lambda j: j.status == "succeeded", 120
    )  # ran while the long one was paused

    # resume: the curve continues from the paused step, it does not restart
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait(client, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", pg_worker.output()[-3000:]
    steps = pg_api.http.get(f"fine_tuning/jobs/{job.id}/metrics").json()["step"]
    assert steps == list(range(1, 241)), (
        steps
    )  # every step once: the resumed run began at paused_step + 1
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data]
    assert any(m.startswith(f"Job paused at step {paused_step}") for m in messages)
    assert any(
        m.startswith(f"Job resumed from its checkpoint at step {paused_step}") for m in messages
    )
    # list_events pages with `after`, newest first, no repeats
    paged_events = [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=3)]
    assert len(paged_events) == len(set(paged_events)) == len(messages)

    # the adapter: sha256 ETag, ranges, 304
    whole = pg_api.http.get(f"fine_tuning/jobs/{job.id}/adapter")
    assert whole.status_code == 200
    etag = whole.headers["etag"]
    assert etag == f'"{hashlib.sha256(whole.content).hexdigest()}"'
    assert whole.headers["accept-ranges"] == "bytes"
    part = pg_api.http.get(f"fine_tuning/jobs/{job.id}/adapter", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(whole.content)}"
    tail = pg_api.http.get(f"fine_tuning/jobs/{job.id}/adapter", headers={"Range": "bytes=-10"})
    assert tail.content == whole.content[-10:]
    assert (
        pg_api.http.get(
            f"fine_tuning/jobs/{job.id}/adapter", headers={"If-None-Match": etag}
        ).status_code
        == 304
    )
    bad = pg_api.http.get(
        f"fine_tuning/jobs/{job.id}/adapter", headers={"Range": f"bytes={len(whole.content)}-"}
    )
    assert bad.status_code == 416 and bad.json()["error"]["code"] == "range_not_satisfiable"

    # models: retrieve, delete, gone
    model = client.models.retrieve(done.fine_tuned_model)
    assert model.owned_by == "local"
    deleted = client.models.delete(done.fine_tuned_model)
    assert deleted.deleted is True
    assert done.fine_tuned_model not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(done.fine_tuned_model)
    assert pg_api.http.get(f"fine_tuning/jobs/{job.id}/adapter").status_code == 404
    with pytest.raises(openai.BadRequestError) as base:
        client.models.delete("tiny")
    assert base.value.code == "model_not_deletable"


def test_resume_refuses_jobs_that_are_not_paused_or_failed(client: openai.OpenAI) -> None:
    train = client.files.create(file=("t.jsonl", chat_rows(2).encode()), purpose="fine-tune")
    job = create(client, train.id, {"suite": "refuse"}, n_epochs=1)
    client.fine_tuning.jobs.cancel(job.id)
    wait(client, job.id, lambda j: j.status == "cancelled", 60)
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.resume(job.id)
    assert err.value.code == "invalid_state"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.pause(job.id)


def test_dpo_through_the_sdk(client: openai.OpenAI) -> None:
    from tests.test_e2e_methods import preference_rows

    train = client.files.create(
        file=("p.jsonl", preference_rows(4, seed=1, openai_format=True).encode()),
        purpose="fine-tune",
    )
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train.id,
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"beta": 0.3, "n_epochs": 1, "batch_size": "auto"}},
        },
        extra_body={"max_seq_len": 64},
    )
    assert job.method.type == "dpo"
    assert job.method.dpo.hyperparameters.beta == 0.3
    assert job.method.dpo.hyperparameters.batch_size == 4  # "auto", resolved and stored
    done = wait(client, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error


def test_resume_restarts_a_failed_job_from_its_last_checkpoint(
    client: openai.OpenAI, pg_api: Api, pg_worker: WorkerProcess, pg_settings: Any
) -> None:
    from sqlalchemy import update

    from api.models import Job
    from api.services import Services

    # 384 steps, a checkpoint every 48: long enough that the pause, sent after the first
    # checkpoint, lands before the job could finish on a fast worker (32 steps did not).
    train = client.files.create(file=("t.jsonl", chat_rows(48).encode()), purpose="fine-tune")
    job = create(client, train.id, {"suite": "failed-resume"}, n_epochs=8)
    wait(client, job.id, lambda j: len(client.fine_tuning.jobs.checkpoints.list(j.id).data) >= 1)
    client.fine_tuning.jobs.pause(job.id)
    wait(client, job.id, lambda j: j.status == "paused", 60)
    stopped_at = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number
    # What a worker that died after a checkpoint leaves behind (the parent marks it failed).
    services = Services.build(pg_settings)
    with services.sessions() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(
                status="failed",
                error={"code": "worker_lost", "message": "simulated", "param": None},
            )
        )
    assert client.fine_tuning.jobs.retrieve(job.id).status == "failed"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait(client, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded" and done.error is None
    steps = pg_api.http.get(f"fine_tuning/jobs/{job.id}/metrics").json()["step"]
    assert steps == list(range(1, 385))
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data]
    assert any(
        m.startswith(f"Job resumed from its checkpoint at step {stopped_at}") for m in messages
    )
