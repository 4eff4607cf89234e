"""A succeeded job's results file (OpenAI's ``result_files``): a CSV of its metrics per step,
owned by the job's owner, read with the unmodified SDK's ``files.content``."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import openai
import pytest

from api.artifacts import ArtifactStoreError, LocalArtifactStore
from api.files import chunk_count, content, delete_file
from api.models import Checkpoint, File, Job, JobMetric, new_id, now
from api.results import results_csv, upload_results
from api.services import Services
from api.settings import Settings
from tests.conftest import Api, WorkerProcess, chat_rows, insert_job
from worker.execution import finish

OPENAI_HEADER = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]


def rows_of(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode())))


def test_results_csv_columns_cells_and_relogged_steps(pg_settings: Settings) -> None:
    services = Services.build(pg_settings)
    job_id = insert_job(services.sessions, status="running", attempts=1)
    points = [
        (1, {"train_loss": 2.5, "train_mean_token_accuracy": 0.25, "lr": 1e-4}),
        (2, {"train_loss": 2.0, "lr": 2e-4}),
        (3, {"lr": 3e-4}),
        # step 2 logged again (a resumed job): its latest point wins, as GET .../metrics says
        (2, {"train_loss": 1.75, "lr": 2e-4, "kl": 0.125}),
    ]
    with services.sessions() as session, session.begin():
        for step, values in points:
            session.add(
                JobMetric(job_id=job_id, owner="local", created_at=now(), step=step, values=values)
            )
        # The validation pass's metrics come with the checkpoint of step 2, not its point.
        session.add(
            Checkpoint(
                id=new_id("ftckpt"),
                job_id=job_id,
                owner="local",
                created_at=now(),
                step=2,
                metrics={"step": 2.0, "train_loss": 9.0, "valid_loss": 2.25, "valid_x": 0.5},
                artifact_key="none",
            )
        )
    with services.sessions() as session:
        data = results_csv(session, job_id)
    assert rows_of(data) == [
        [*OPENAI_HEADER, "kl", "lr", "valid_x"],  # then the others, sorted by name
        ["1", "2.5", "0.25", "", "", "", "0.0001", ""],
        ["2", "1.75", "", "2.25", "", "0.125", "0.0002", "0.5"],
        ["3", "", "", "", "", "", "0.0003", ""],
    ]

    # The file goes to the artifact store (the local folder under the data dir) first, and
    # finish() records it with the job's success, in the same transaction, owned by the owner.
    stored = upload_results(services.sessions, services.artifacts, job_id)
    finish(services, job_id, "succeeded", attempt=1, results=stored)
    with services.sessions() as session:
        job = session.get_one(Job, job_id)
        [file_id] = job.result_files
        row = session.get_one(File, file_id)
        assert (row.owner, row.purpose, row.status) == (job.owner, "fine-tune-results", "processed")
        assert row.bytes == len(data)
        assert row.artifact_key == f"files/{file_id}/{job_id}_results.csv"
    in_store = pg_settings.data_dir / "artifacts" / "files" / file_id / f"{job_id}_results.csv"
    assert in_store.read_bytes() == data
    assert chunk_count_of(services, file_id) == 0  # not in file_chunks
    with services.sessions() as session:
        streamed = content(session, services.sessions, services.artifacts, row)
        assert b"".join(streamed) == data

    # Deleting the file deletes its object.
    with services.sessions() as session, session.begin():
        delete_file(session, job.owner, file_id, services.artifacts)
    assert not in_store.parent.exists()


def test_a_results_file_that_cannot_be_stored_or_recorded_leaves_no_row_and_no_object(
    pg_settings: Settings, tmp_path: Path
) -> None:
    services = Services.build(pg_settings)
    job_id = insert_job(services.sessions, status="running", attempts=1)
    with services.sessions() as session, session.begin():
        session.add(
            JobMetric(job_id=job_id, owner="local", created_at=now(), step=1, values={"x": 1.0})
        )
    # A store whose root is a file: the put fails, as a full disk or a lost bucket does; the
    # worker turns this error into the job's failure (code artifact_store_error).
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    with pytest.raises(ArtifactStoreError):
        upload_results(services.sessions, LocalArtifactStore(blocked), job_id)

    # Uploaded, but the attempt no longer holds the job: nothing is recorded and the object,
    # which no row would name, is deleted.
    stored = upload_results(services.sessions, services.artifacts, job_id)
    in_store = pg_settings.data_dir / "artifacts" / stored.key
    assert (
        in_store.read_bytes() == b"step,train_loss,train_accuracy,valid_loss,"
        b"valid_mean_token_accuracy,x\n1,,,,,1.0\n"
    )
    finish(services, job_id, "succeeded", attempt=2, results=stored)
    assert not in_store.exists()
    with services.sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.status, job.result_files) == ("running", [])
        assert session.get(File, stored.file_id) is None


def chunk_count_of(services: Services, file_id: str) -> int:
    with services.sessions() as session:
        return chunk_count(session, file_id)


@pytest.mark.slow
def test_a_succeeded_job_lists_its_results_file_for_its_owner_only(
    pg_api: Api, pg_worker: WorkerProcess
) -> None:
    client = openai.OpenAI(base_url=f"{pg_api.url}/v1", api_key=pg_api.key, max_retries=0)
    train = client.files.create(file=("t.jsonl", chat_rows(16).encode()), purpose="fine-tune")
    valid = client.files.create(
        file=("v.jsonl", chat_rows(4, seed=1).encode()), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train.id,
        validation_file=valid.id,
        seed=3,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}},
        },
        extra_body={"adapter": {"type": "lora", "r": 4}, "max_seq_len": 64},
    )
    assert job.result_files == []
    deadline = time.monotonic() + 240
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.25)
    assert job.status == "succeeded", job.error
    assert len(job.result_files) == 1
    file_id = job.result_files[0]

    meta = client.files.retrieve(file_id)
    assert meta.purpose == "fine-tune-results" and meta.status == "processed"
    assert meta.filename == f"{job.id}_results.csv"
    assert file_id in [f.id for f in client.files.list(purpose="fine-tune-results")]
    content = client.files.content(file_id).read()
    assert meta.bytes == len(content)

    # The CSV says what GET .../metrics says, one row per step, OpenAI's columns first; the
    # validation columns say what the checkpoints say, at their steps.
    metrics = pg_api.http.get(f"fine_tuning/jobs/{job.id}/metrics").json()
    checkpoints = {
        c.step_number: c.metrics for c in client.fine_tuning.jobs.checkpoints.list(job.id)
    }
    header, *rows = rows_of(content)
    assert header[:5] == OPENAI_HEADER
    extra = sorted(set(metrics["keys"]) - {*OPENAI_HEADER, "train_mean_token_accuracy"})
    assert header[5:] == extra and "learning_rate" in extra
    assert [int(r[0]) for r in rows] == metrics["step"] == list(range(1, 9))
    source = {"train_accuracy": "train_mean_token_accuracy"}
    for column, name in enumerate(header[1:], start=1):
        cells = [float(r[column]) if r[column] else None for r in rows]
        if name.startswith("valid_"):
            at = {s: getattr(checkpoints[s], name) for s in checkpoints}
            assert cells == [at.get(s) for s in metrics["step"]], name
        else:
            assert cells == metrics[source.get(name, name)], name
    # hand-checked: step 1's loss is the first train_loss, as Python writes that float
    assert rows[0][1] == repr(metrics["train_loss"][0])
    # the final checkpoint (step 8) ran the validation pass: the last row has its valid_loss
    assert 8 in checkpoints and rows[-1][3] == repr(checkpoints[8].valid_loss)

    # Another owner sees neither the file nor its content (404, never 403).
    other = pg_api.as_owner(f"other-{time.monotonic_ns()}")
    assert other.get(f"files/{file_id}").status_code == 404
    assert other.get(f"files/{file_id}/content").status_code == 404
    assert file_id not in json.dumps(other.get("files").json())


@pytest.mark.slow
def test_a_reinforcement_job_logs_valid_reward_into_its_metrics_and_results_file(
    pg_api: Api, pg_worker: WorkerProcess
) -> None:
    """The eval pass through the service: a grader that reads only the row's label (1 for
    "good") gives each pass over 2 good rows of 4 the mean 0.5, at every step (interval 1)."""
    client = openai.OpenAI(base_url=f"{pg_api.url}/v1", api_key=pg_api.key, max_retries=0)

    def prompts(labels: list[str]) -> bytes:
        return "".join(
            json.dumps({"messages": [{"role": "user", "content": f"Say {i}."}], "label": label})
            + "\n"
            for i, label in enumerate(labels)
        ).encode()

    train = client.files.create(file=("t.jsonl", prompts(["good"] * 8)), purpose="fine-tune")
    valid = client.files.create(
        file=("v.jsonl", prompts(["good", "bad", "bad", "good"])), purpose="fine-tune"
    )
    grader = {
        "type": "string_check",
        "name": "label",
        "input": "{{item.label}}",
        "reference": "good",
        "operation": "eq",
    }
    hyperparameters = {
        "n_epochs": 1,
        "batch_size": 4,
        "compute_multiplier": 0.25,  # 2 completions a prompt
        "eval_interval": 1,
        "eval_samples": 2,
    }
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train.id,
        validation_file=valid.id,
        seed=3,
        method={
            "type": "reinforcement",
            "reinforcement": {"grader": grader, "hyperparameters": hyperparameters},
        },
        extra_body={"max_seq_len": 128},
    )
    deadline = time.monotonic() + 300
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.25)
    assert job.status == "succeeded", job.error
    assert job.method.reinforcement.hyperparameters.eval_interval == 1

    metrics = pg_api.http.get(f"fine_tuning/jobs/{job.id}/metrics").json()
    assert metrics["step"] == [1, 2]
    assert metrics["valid_reward"] == [0.5, 0.5]
    header, *rows = rows_of(client.files.content(job.result_files[0]).read())
    column = header.index("valid_reward")
    assert [r[column] for r in rows] == ["0.5", "0.5"]
