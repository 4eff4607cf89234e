"""The service runs a job on ``cuda:0``: API, Postgres, Redis and a worker process that finds
the GPU itself (``nvidia-smi``), a supervised LoRA job in bf16, its metrics read back over
HTTP. The job's ``peak_gpu_memory_gib`` (reported on CUDA only) shows where it ran."""

from __future__ import annotations

import math

from tests.conftest import Api, WorkerProcess, chat_rows


def test_a_job_runs_on_the_gpu_through_the_service(pg_api: Api, pg_worker: WorkerProcess) -> None:
    train = pg_api.upload(chat_rows(8, seed=1))
    created = pg_api.http.post(
        "fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": train["id"],
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}},
            },
            "adapter": {"type": "lora", "r": 4, "alpha": 8},
            "max_seq_len": 96,
            "resources": {"precision": "bf16"},
        },
    )
    assert created.status_code == 200, created.text
    job = pg_api.wait_terminal(created.json()["id"])
    assert job["status"] == "succeeded", (job["error"], pg_worker.output()[-3000:])

    metrics = pg_api.http.get(f"fine_tuning/jobs/{job['id']}/metrics").json()
    assert metrics["step"] == [1, 2]
    assert all(math.isfinite(v) for v in metrics["train_loss"])
    assert "peak_gpu_memory_gib" in metrics["keys"], metrics["keys"]
    assert all(v > 0 for v in metrics["peak_gpu_memory_gib"])
