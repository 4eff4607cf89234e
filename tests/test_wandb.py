"""The wandb integration (issue #14 item 3): a real job through the service, on a worker whose
operator set ``WANDB_MODE=offline``, writes a W&B run whose history is the job's metric
series; a run wandb refuses is one warning event, and the job succeeds regardless.

wandb 0.31 writes an offline run only as its ``.wandb`` transaction log (no
``wandb-history.jsonl``), and ships no Python reader of it; ``wandb_records`` reads the log's
framing (LevelDB-style 32 KiB blocks of CRC-checked chunks) into the protobuf records.
"""

from __future__ import annotations

import json
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.settings import Settings
from tests.conftest import Api, WorkerProcess, chat_rows

BLOCK = 32 * 1024
HEADER = b":W&B\xe1\xbe\x00"  # magic, 0xBEE1 little-endian, version 0


def wandb_records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[: len(HEADER)] == HEADER, raw[:16]
    pos, pending = len(HEADER), b""
    while pos + 7 <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        # 1 full, 2 first, 3 middle, 4 last
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def offline_run(folder: Path, job_id: str) -> dict[str, Any]:
    """The run's name, project, tags, config and history (step → values) from its log."""
    [log] = list(folder.glob(f"wandb/offline-run-*-{job_id}/run-{job_id}.wandb"))
    found: dict[str, Any] = {"history": {}, "config": {}}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            found |= {"project": run.project, "name": run.display_name, "tags": list(run.tags)}
            found["config"] |= {i.key: json.loads(i.value_json) for i in run.config.update}
        elif kind == "history":
            values = {
                "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                for i in record.history.item
            }
            found["history"][int(values["_step"])] = {
                k: v for k, v in values.items() if not k.startswith("_")
            }
    return found


@pytest.fixture(scope="module")
def wandb_worker(
    pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """A worker on a queue of its own whose operator turned W&B on, offline, into a folder."""
    queue = f"wandb-{secrets.token_hex(3)}"
    folder = tmp_path_factory.mktemp("wandb")
    worker = WorkerProcess(
        pg_settings,
        folder / "worker.log",
        {
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(folder),
            "WANDB_SILENT": "true",
            "WANDB_DISABLE_CODE": "true",
            "WANDB_API_KEY": "",  # never a key from the machine running the tests
        },
        args=["--hostname", f"w@{queue}", "--queues", queue, "--log-level", "info"],
    )
    yield queue, folder
    worker.stop()


def run_job(
    api: Api,
    queue: str,
    integrations: list[dict[str, Any]],
    resources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    train = api.upload(chat_rows(8, seed=5))["id"]
    body = {
        "model": "tiny",
        "training_file": train,
        "seed": 3,
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}},
        },
        "max_seq_len": 64,
        "integrations": integrations,
        "resources": {"worker_class": queue, **(resources or {})},
    }
    created = api.http.post("fine_tuning/jobs", json=body)
    assert created.status_code == 200, created.text
    return api.wait_terminal(created.json()["id"], timeout_s=300)


@pytest.mark.slow
def test_a_job_logs_its_config_and_metrics_to_wandb(
    pg_api: Api, wandb_worker: tuple[str, Path]
) -> None:
    queue, folder = wandb_worker
    wandb = {"project": "alignd-tests", "name": "tiny-sft", "tags": ["ci", "tiny"]}
    job = run_job(pg_api, queue, [{"type": "wandb", "wandb": wandb}])
    assert job["status"] == "succeeded", job

    run = offline_run(folder, job["id"])
    assert (run["project"], run["name"], run["tags"]) == (
        "alignd-tests",
        "tiny-sft",
        ["ci", "tiny"],
    )
    # The config is the job's resolved spec, with the job's id and length.
    assert run["config"]["job_id"] == job["id"]
    assert run["config"]["method"] == "supervised"
    assert run["config"]["hyperparameters"]["batch_size"] == 2
    assert run["config"]["total_steps"] == 4  # 8 rows, batch 2, 1 epoch
    # The history is the job's metric series, step by step, value by value.
    series = pg_api.http.get(f"fine_tuning/jobs/{job['id']}/metrics").json()
    steps = series["step"]
    assert sorted(run["history"]) == steps == [1, 2, 3, 4]
    for i, step in enumerate(steps):
        assert run["history"][step]["train_loss"] == pytest.approx(series["train_loss"][i])
        assert run["history"][step]["learning_rate"] == pytest.approx(series["learning_rate"][i])
    events = pg_api.http.get(f"fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]
    assert not [e for e in events if e["level"] == "warning" or "wandb" in e["message"]]


@pytest.mark.slow
def test_a_job_in_two_processes_logs_from_rank_0_only(
    pg_api: Api, wandb_worker: tuple[str, Path]
) -> None:
    """worker.rank: rank 0 makes the one run, with the whole series; the other rank none."""
    queue, folder = wandb_worker
    wandb = {"project": "alignd-tests", "name": "two-ranks"}
    job = run_job(pg_api, queue, [{"type": "wandb", "wandb": wandb}], {"gpus": 2, "zero_stage": 2})
    assert job["status"] == "succeeded", job
    assert len(list(folder.glob(f"wandb/offline-run-*-{job['id']}"))) == 1
    run = offline_run(folder, job["id"])
    series = pg_api.http.get(f"fine_tuning/jobs/{job['id']}/metrics").json()
    assert run["name"] == "two-ranks" and run["config"]["resources"]["zero_stage"] == 2
    assert sorted(run["history"]) == series["step"]
    assert [run["history"][s]["train_loss"] for s in series["step"]] == pytest.approx(
        series["train_loss"]
    )


@pytest.mark.slow
def test_a_failing_integration_is_a_warning_and_the_job_succeeds(
    pg_api: Api, wandb_worker: tuple[str, Path]
) -> None:
    queue, folder = wandb_worker
    # wandb.init refuses a tag over 64 characters: the run never starts.
    wandb = {"project": "alignd-tests", "tags": ["x" * 100]}
    job = run_job(pg_api, queue, [{"type": "wandb", "wandb": wandb}])
    assert job["status"] == "succeeded", job
    assert job["fine_tuned_model"]
    events = pg_api.http.get(f"fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]
    warnings = [e for e in events if "wandb" in e["message"]]
    assert len(warnings) == 1, [e["message"] for e in events]
    assert warnings[0]["level"] == "warning"
    assert "init" in warnings[0]["message"] and "64 characters" in warnings[0]["message"]
    assert not list(folder.glob(f"wandb/offline-run-*-{job['id']}"))


def test_a_wandb_block_is_checked_when_the_job_is_created(pg_api: Api) -> None:
    train = pg_api.upload(chat_rows(4))["id"]
    for wandb, param in (
        ({"name": "no project"}, "integrations.0.wandb.project"),
        ({"project": "p", "tags": [1]}, "integrations.0.wandb.tags.0"),
        ({"project": "p", "team": "x"}, "integrations.0.wandb.team"),
        ("p", "integrations.0.wandb"),
    ):
        body = {
            "model": "tiny",
            "training_file": train,
            "integrations": [{"type": "wandb", "wandb": wandb}],
        }
        answer = pg_api.http.post("fine_tuning/jobs", json=body)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param
