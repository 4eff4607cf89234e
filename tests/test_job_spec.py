"""The job spec end to end: the API resolves a body into a TrainSpec once and stores it; the
worker trains from that spec, filling in only what is local (paths, operator settings).

Real HTTP against the app on Postgres, then the worker's own ``build_spec`` on the stored row.
No worker listens on the test queue here; the jobs are cancelled at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.models import Job
from api.services import Services
from api.settings import Settings
from tests.conftest import Api, chat_rows
from trainer_core.hyperparameters import ReinforcementHyperparameters
from trainer_core.specs import WORKER_FIELDS, TrainSpec
from worker.execution import build_spec

LENGTH_REWARD = {"type": "length", "name": "short", "target": 4, "unit": "words"}


@pytest.fixture(scope="module")
def api(pg_settings: Settings) -> Iterator[Api]:
    api = Api(pg_settings.model_copy(update={"default_queue": "job-spec-test-quiet"}))
    yield api
    for job in api.http.get("fine_tuning/jobs", params={"limit": 1000}).json()["data"]:
        if job["status"] == "queued":
            api.http.post(f"fine_tuning/jobs/{job['id']}/cancel")
    api.stop()


def create(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    response = api.http.post("fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def stored_row(settings: Settings, job_id: str) -> Job:
    services = Services.build(settings)
    with services.sessions() as session:
        row = session.get_one(Job, job_id)
        session.expunge(row)
        return row


def test_the_worker_trains_the_stored_spec_with_local_paths_and_settings(
    api: Api, pg_settings: Settings, tmp_path: Path
) -> None:
    train = api.upload(chat_rows(12))["id"]
    valid = api.upload(chat_rows(4, seed=1))["id"]
    job = create(
        api,
        {
            "model": "tiny",
            "training_file": train,
            "validation_file": valid,
            "seed": 7,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
            "adapter": {"type": "lora", "r": 4, "alpha": 8},
            "max_seq_len": 256,
            "resources": {"gradient_checkpointing": True},
        },
    )
    row = stored_row(pg_settings, job["id"])
    # Stored: names and ids, every "auto" resolved, nothing that only a worker knows.
    assert row.spec is not None
    assert WORKER_FIELDS.isdisjoint(row.spec)
    assert (row.spec["model"], row.spec["train_file"], row.spec["validation_file"]) == (
        "tiny",
        train,
        valid,
    )
    assert row.spec["hyperparameters"] == job["method"]["supervised"]["hyperparameters"]

    # The worker: this machine's settings, not the API's, and local paths.
    local = pg_settings.model_copy(
        update={
            "torch_threads": 3,
            "trust_remote_code": True,
            "reward_http_allowed_hosts": ["rewards.internal"],
            "reward_http_timeout_s": 4.5,
        }
    )
    paths = (tmp_path / "train.jsonl", tmp_path / "valid.jsonl", tmp_path / "resume")
    spec = build_spec(Services.build(local), row, *paths)
    assert isinstance(spec, TrainSpec)
    assert spec.model == str(pg_settings.resolved_models_dir / "tiny")
    assert (spec.train_file, spec.validation_file, spec.resume_from) == tuple(map(str, paths))
    assert (spec.num_threads, spec.trust_remote_code, spec.allow_hub) == (3, True, False)
    assert spec.reward_http_allowed_hosts == ["rewards.internal"]
    assert spec.reward_http_timeout_s == 4.5
    # Everything else is the job as it was created and shown.
    assert spec.method == "supervised" and spec.seed == 7 and spec.max_seq_len == 256
    assert spec.hyperparameters.model_dump() == job["method"]["supervised"]["hyperparameters"]
    assert spec.adapter.model_dump() == job["adapter"]
    assert spec.resources.model_dump() == job["resources"]
    assert spec.resources.gradient_checkpointing is True


def test_online_options_are_in_the_spec(api: Api, pg_settings: Settings, tmp_path: Path) -> None:
    rows = "".join(json.dumps({"prompt": f"Say {i}.", "answer": str(i)}) + "\n" for i in range(4))
    prompts = api.upload(rows)["id"]
    grader = {
        "type": "string_check",
        "name": "exact",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "eq",
    }
    grpo = create(
        api,
        {
            "model": "tiny",
            "training_file": prompts,
            "method": {"type": "grpo", "grpo": {"reward_functions": [LENGTH_REWARD]}},
        },
    )
    reinforcement = create(
        api,
        {
            "model": "tiny",
            "training_file": prompts,
            "method": {"type": "reinforcement", "reinforcement": {"grader": grader}},
        },
    )
    paths = (tmp_path / "train.jsonl", None)
    for job in (grpo, reinforcement):
        method = job["method"]["type"]
        spec = build_spec(Services.build(pg_settings), stored_row(pg_settings, job["id"]), *paths)
        assert spec.method == method
        # The normalised reward functions the job shows (reinforcement: its grader, mapped).
        assert spec.reward_functions == job["method"][method]["reward_functions"]
        assert spec.hyperparameters.model_dump() == job["method"][method]["hyperparameters"]
        assert spec.reward_model is None and spec.reward_models == {}
    assert type(spec.hyperparameters).__name__ == "ReinforcementHyperparameters"


def test_reinforcement_echoes_openai_eval_settings_and_warns_of_reasoning_effort(
    api: Api,
) -> None:
    rows = "".join(json.dumps({"prompt": f"Say {i}.", "answer": str(i)}) + "\n" for i in range(4))
    prompts = api.upload(rows)["id"]
    grader = {
        "type": "string_check",
        "name": "exact",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "eq",
    }

    def body(**hyperparameters: Any) -> dict[str, Any]:
        block = {"grader": grader, "hyperparameters": hyperparameters}
        return {
            "model": "tiny",
            "training_file": prompts,
            "method": {"type": "reinforcement", "reinforcement": block},
        }

    def warnings(job_id: str) -> list[dict[str, Any]]:
        events = api.http.get(f"fine_tuning/jobs/{job_id}/events").json()["data"]
        return [e for e in events if e["level"] != "info"]

    # OpenAI's schema: "auto" or an integer >= 1, never 0.
    default = create(api, body())
    shown = default["method"]["reinforcement"]["hyperparameters"]
    assert (shown["eval_interval"], shown["eval_samples"]) == ("auto", "auto")
    assert shown["reasoning_effort"] == "default" and warnings(default["id"]) == []
    # A job stored before "auto" was echoed holds 0 for it: it is shown as "auto".
    old = ReinforcementHyperparameters.model_validate(
        shown | {"eval_interval": 0, "eval_samples": 0}
    )
    assert (old.eval_interval, old.eval_samples) == ("auto", "auto")

    given = create(api, body(eval_interval=3, eval_samples=2, reasoning_effort="high"))
    shown = given["method"]["reinforcement"]["hyperparameters"]
    assert (shown["eval_interval"], shown["eval_samples"]) == (3, 2)
    assert shown["reasoning_effort"] == "high"
    [warning] = warnings(given["id"])
    assert warning["level"] == "warning"
    assert "reasoning_effort 'high' has no effect on this model" in warning["message"]
    assert warning["data"]["param"] == "method.reinforcement.hyperparameters.reasoning_effort"

    for field in ("eval_interval", "eval_samples"):
        response = api.http.post("fine_tuning/jobs", json=body(**{field: 0}))
        assert response.status_code == 400, response.text
        assert field in response.json()["error"]["param"]
