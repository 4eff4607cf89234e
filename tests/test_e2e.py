"""End to end through the real parts: HTTP API, Postgres, Redis, a worker process, training.

Upload → job → queue → worker → training → events → checkpoints → adapter download, and the
downloaded adapter reproduces the worker's final model. Cancel of a running job.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api, WorkerProcess, chat_rows

pytestmark = pytest.mark.slow


def job_body(train_id: str, valid_id: str | None = None, **hyperparameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "tiny",
        "training_file": train_id,
        "suffix": "e2e",
        "seed": 3,
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": 2,
                    "batch_size": 4,
                    "learning_rate_multiplier": 10,
                    **hyperparameters,
                }
            },
        },
        "adapter": {"type": "lora", "r": 4, "alpha": 8},
        "max_seq_len": 96,
    }
    if valid_id:
        body["validation_file"] = valid_id
    return body


def all_events(api: Api, job_id: str) -> list[dict[str, Any]]:
    events = api.http.get(f"fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()[
        "data"
    ]
    return list(reversed(events))


def test_supervised_lora_job_end_to_end(
    pg_api: Api, pg_worker: WorkerProcess, models_dir: Path, tmp_path: Path
) -> None:
    train = pg_api.upload(chat_rows(16, seed=1))
    valid = pg_api.upload(chat_rows(6, seed=2))
    created = pg_api.http.post("fine_tuning/jobs", json=job_body(train["id"], valid["id"]))
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]

    job = pg_api.wait_terminal(job_id)
    assert job["status"] == "succeeded", (job, pg_worker.output()[-3000:])
    assert job["fine_tuned_model"] == f"ft:tiny:local:e2e:{job_id}"
    assert job["trained_tokens"] > 0
    assert job["finished_at"] >= job["created_at"]
    assert job["error"] is None
    assert job["progress"] == {"step": 8, "total_steps": 8, "percent": 100.0}  # 16/4 x 2 epochs

    messages = [event["message"] for event in all_events(pg_api, job_id)]
    assert messages[0] == f"Created fine-tuning job: {job_id}"
    assert "Fine-tuning job started" in messages
    assert any(m.startswith("Step 1/8: train_loss=") for m in messages)
    assert any(m.startswith("Checkpoint saved at step 8") for m in messages)
    assert messages[-1] == "The job has successfully completed"
    metrics_events = [e for e in all_events(pg_api, job_id) if e["type"] == "metrics"]
    assert {"step", "train_loss", "train_mean_token_accuracy"} <= set(metrics_events[-1]["data"])

    checkpoints = pg_api.http.get(f"fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [8, 4]  # one per epoch, newest first
    final = checkpoints[0]
    assert final["object"] == "fine_tuning.job.checkpoint"
    assert final["fine_tuned_model_checkpoint"] == f"ft:tiny:local:e2e:{job_id}:ckpt-step-8"
    assert {
        "step",
        "train_loss",
        "train_mean_token_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
    } <= set(final["metrics"])

    models = [m["id"] for m in pg_api.http.get("models").json()["data"]]
    assert job["fine_tuned_model"] in models

    # The downloaded adapter is a PEFT folder that reproduces the worker's final model: its
    # validation loss, computed here, equals the one the worker logged at the final step.
    response = pg_api.http.get(f"fine_tuning/jobs/{job_id}/adapter")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-tar"
    assert int(response.headers["content-length"]) == len(response.content)
    adapter_dir = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(adapter_dir, filter="data")
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4

    from trainer_core.methods.supervised import evaluate

    valid_path = tmp_path / "valid.jsonl"
    valid_path.write_bytes(pg_api.http.get(f"files/{valid['id']}/content").content)
    ours = evaluate(str(models_dir / "tiny"), str(adapter_dir), str(valid_path), 96)
    assert ours["valid_loss"] == pytest.approx(final["metrics"]["valid_loss"], abs=1e-5)
    base = evaluate(str(models_dir / "tiny"), None, str(valid_path), 96)
    assert abs(base["valid_loss"] - ours["valid_loss"]) > 1e-3  # the adapter changed the model

    step4 = checkpoints[1]
    ckpt = pg_api.http.get(f"fine_tuning/jobs/{job_id}/checkpoints/{step4['id']}/adapter")
    assert ckpt.status_code == 200 and ckpt.content != response.content


def test_cancel_running_job_keeps_its_checkpoint(pg_api: Api, pg_worker: WorkerProcess) -> None:
    train = pg_api.upload(chat_rows(32, seed=4))
    # Many steps, one checkpoint each, so that the job is surely running when we cancel.
    body = job_body(train["id"], n_epochs=50, batch_size=1)
    created = pg_api.http.post("fine_tuning/jobs", json=body)
    job_id = created.json()["id"]
    pg_api.wait_for(
        job_id, lambda j: j["status"] == "running" and (j["progress"] or {}).get("step", 0) >= 3
    )

    response = pg_api.http.post(f"fine_tuning/jobs/{job_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] in ("running", "cancelled")

    job = pg_api.wait_terminal(job_id, timeout_s=60)
    assert job["status"] == "cancelled", (job, pg_worker.output()[-3000:])
    assert job["fine_tuned_model"] is None
    assert job["progress"]["step"] < job["progress"]["total_steps"]
    messages = [event["message"] for event in all_events(pg_api, job_id)]
    assert any(m.startswith("Cancellation requested") for m in messages)
    assert messages[-1].startswith("Job cancelled at step")
    checkpoints = pg_api.http.get(f"fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints, "a cancelled job keeps a checkpoint at the step where it stopped"
    assert checkpoints[0]["step_number"] == job["progress"]["step"]
    ckpt = pg_api.http.get(f"fine_tuning/jobs/{job_id}/checkpoints/{checkpoints[0]['id']}/adapter")
    assert ckpt.status_code == 200
    assert pg_api.http.get(f"fine_tuning/jobs/{job_id}/adapter").status_code == 404


def test_training_error_fails_the_job_with_its_message(
    pg_api: Api, pg_worker: WorkerProcess, models_dir: Path
) -> None:
    # A model folder whose weights are garbage: the worker must fail the job, not hang.
    broken = models_dir / "broken"
    if not broken.exists():
        shutil.copytree(models_dir / "tiny", broken)
        (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    train = pg_api.upload(chat_rows(4))
    created = pg_api.http.post(
        "fine_tuning/jobs", json={**job_body(train["id"]), "model": "broken"}
    )
    assert created.status_code == 200, created.text
    job = pg_api.wait_terminal(created.json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "training_error"
    assert job["error"]["message"]
    messages = [event["message"] for event in all_events(pg_api, job["id"])]
    assert messages[-1].startswith("The job failed: ")
