"""The unmodified openai SDK against the running API: files and jobs round-trip, errors arrive
as the SDK's typed exceptions with code and param. (The full SDK surface is its own issue.)"""

from __future__ import annotations

import io
import time

import openai
import pytest

from tests.conftest import Api, chat_rows


@pytest.fixture(scope="module")
def client(pg_api: Api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pg_api.url}/v1", api_key=pg_api.key, max_retries=0)


def test_files_and_jobs_through_the_sdk(client: openai.OpenAI) -> None:
    created = client.files.create(
        file=("train.jsonl", io.BytesIO(chat_rows(6).encode())), purpose="fine-tune"
    )
    assert created.status == "processed"
    assert client.files.wait_for_processing(created.id).status == "processed"
    assert client.files.content(created.id).read() == chat_rows(6).encode()

    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=created.id,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": "auto"}},
        },
        extra_body={"adapter": {"type": "lora", "r": 2}, "max_seq_len": 64},
    )
    assert job.status == "queued"
    assert job.method.supervised.hyperparameters.batch_size == 6
    assert job.model_extra["adapter"]["r"] == 2
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=50)]
    # A worker may already have claimed it (the e2e worker runs in the same session): then
    # cancel stops it at its next step. Either way it ends cancelled.
    assert client.fine_tuning.jobs.cancel(job.id).status in ("cancelled", "running")
    deadline = time.monotonic() + 60
    while (current := client.fine_tuning.jobs.retrieve(job.id)).status != "cancelled":
        assert time.monotonic() < deadline, current
        time.sleep(0.2)
    events = client.fine_tuning.jobs.list_events(job.id, limit=100)
    assert [e.message for e in events.data][-1] == f"Created fine-tuning job: {job.id}"
    messages = [e.message for e in events.data]
    assert messages[0].startswith("Job cancelled")
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert all(c.fine_tuning_job_id == job.id for c in checkpoints.data)


def test_errors_are_typed_with_code_and_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.jobs.create(model="nope", training_file="file-x")
    assert bad.value.code == "model_not_found"
    assert bad.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-missing")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-missing")
