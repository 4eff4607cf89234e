"""Every offline method as a real job through the service: API, Postgres, Redis, worker.

The trainer tests check each method's arithmetic; these check that a job body of each type
is validated, resolved, run by the worker, and ends with its metrics, checkpoints and a
downloadable adapter.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from typing import Any

import pytest

from tests.conftest import Api, WorkerProcess

pytestmark = pytest.mark.slow

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow"]


def preference_rows(n: int, seed: int, openai_format: bool) -> str:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        animal, wrong = rng.sample(ANIMALS, 2)
        prompt = f"Which animal did I name? I named a {animal}."
        good, bad = f"You named a {animal}.", f"You named a {wrong}."
        if openai_format:
            rows.append(
                {
                    "input": {"messages": [{"role": "user", "content": prompt}]},
                    "preferred_output": [{"role": "assistant", "content": good}],
                    "non_preferred_output": [{"role": "assistant", "content": bad}],
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return "".join(json.dumps(row) + "\n" for row in rows)


def kto_rows(n: int, seed: int) -> str:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        animal, wrong = rng.sample(ANIMALS, 2)
        label = i % 2 == 0
        rows.append(
            {
                "prompt": f"I named a {animal}.",
                "completion": f"You named a {animal if label else wrong}.",
                "label": label,
            }
        )
    return "".join(json.dumps(row) + "\n" for row in rows)


def run_job(api: Api, worker: WorkerProcess, body: dict[str, Any]) -> dict[str, Any]:
    created = api.http.post("fine_tuning/jobs", json=body)
    assert created.status_code == 200, created.text
    job = api.wait_terminal(created.json()["id"])
    assert job["status"] == "succeeded", (job, worker.output()[-3000:])
    return job


def metrics_events(api: Api, job_id: str) -> list[dict[str, Any]]:
    events = api.http.get(f"fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()[
        "data"
    ]
    return [e["data"] for e in reversed(events) if e["type"] == "metrics"]


def adapter_files(api: Api, job_id: str) -> set[str]:
    response = api.http.get(f"fine_tuning/jobs/{job_id}/adapter")
    assert response.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        return set(tar.getnames())


@pytest.mark.parametrize("openai_format", [True, False])
def test_dpo_job(pg_api: Api, pg_worker: WorkerProcess, openai_format: bool) -> None:
    train = pg_api.upload(preference_rows(8, seed=1, openai_format=openai_format))
    valid = pg_api.upload(preference_rows(4, seed=2, openai_format=openai_format))
    assert train["format"] == "preference"
    job = run_job(
        pg_api,
        pg_worker,
        {
            "model": "tiny",
            "training_file": train["id"],
            "validation_file": valid["id"],
            "method": {
                "type": "dpo",
                "dpo": {
                    "hyperparameters": {
                        "n_epochs": 1,
                        "batch_size": 4,
                        "beta": 0.2,
                        "learning_rate_multiplier": 20,
                    }
                },
            },
            "adapter": {"type": "lora", "r": 4},
            "max_seq_len": 64,
        },
    )
    hp = job["method"]["dpo"]["hyperparameters"]
    assert (
        hp["beta"] == 0.2
        and hp["loss_type"] == ["sigmoid"]
        and hp["precompute_ref_log_probs"] is False
    )
    first = metrics_events(pg_api, job["id"])[0]
    assert first["train_loss"] == pytest.approx(0.693147, abs=1e-5)  # policy = reference at step 1
    assert {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    } <= set(first)
    final = pg_api.http.get(f"fine_tuning/jobs/{job['id']}/checkpoints").json()["data"][0]
    assert "valid_loss" in final["metrics"]
    assert "adapter_config.json" in adapter_files(pg_api, job["id"])


def test_preference_file_refused_for_supervised_and_chat_file_for_dpo(pg_api: Api) -> None:
    prefs = pg_api.upload(preference_rows(2, seed=3, openai_format=True))
    bad = pg_api.http.post(
        "fine_tuning/jobs",
        json={"model": "tiny", "training_file": prefs["id"], "method": {"type": "supervised"}},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "training_file"
    kto = pg_api.upload(kto_rows(2, seed=3))
    bad = pg_api.http.post(
        "fine_tuning/jobs",
        json={"model": "tiny", "training_file": kto["id"], "method": {"type": "dpo"}},
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_file_format"
    bad = pg_api.http.post(
        "fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": prefs["id"],
            "method": {
                "type": "dpo",
                "dpo": {
                    "hyperparameters": {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}
                },
            },
        },
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "method.dpo.hyperparameters"


@pytest.mark.parametrize(
    ("method", "hyperparameters", "metric_keys"),
    [
        (
            "reward_model",
            {"center_rewards_coefficient": 0.01},
            {"accuracy", "margin", "mean_reward", "min_reward", "max_reward"},
        ),
        ("orpo", {"beta": 0.1}, {"rewards/accuracies", "nll_loss", "log_odds_ratio"}),
        ("simpo", {"beta": 2.0, "gamma": 0.5}, {"rewards/accuracies", "rewards/margins"}),
        ("kto", {"beta": 0.1}, {"kl"}),
    ],
)
def test_preference_method_jobs(
    pg_api: Api,
    pg_worker: WorkerProcess,
    method: str,
    hyperparameters: dict[str, Any],
    metric_keys: set[str],
) -> None:
    # KTO takes the paired file too: each pair becomes one desirable and one undesirable row.
    train = pg_api.upload(preference_rows(8, seed=5, openai_format=False))
    job = run_job(
        pg_api,
        pg_worker,
        {
            "model": "tiny",
            "training_file": train["id"],
            "method": {
                "type": method,
                method: {"hyperparameters": {"n_epochs": 1, "batch_size": 4, **hyperparameters}},
            },
            "adapter": {"type": "lora", "r": 4},
            "max_seq_len": 64,
        },
    )
    resolved = job["method"][method]["hyperparameters"]
    assert all(resolved[k] == v for k, v in hyperparameters.items())
    points = metrics_events(pg_api, job["id"])
    assert metric_keys <= set(points[-1]), points[-1]
    assert "adapter_config.json" in adapter_files(pg_api, job["id"])
    if method == "reward_model":
        model = next(
            m
            for m in pg_api.http.get("models").json()["data"]
            if m["id"] == job["fine_tuned_model"]
        )
        assert model["method"] == "reward_model"


def test_kto_job_on_unpaired_rows(pg_api: Api, pg_worker: WorkerProcess) -> None:
    train = pg_api.upload(kto_rows(8, seed=6))
    assert train["format"] == "kto"
    job = run_job(
        pg_api,
        pg_worker,
        {
            "model": "tiny",
            "training_file": train["id"],
            "method": {"type": "kto", "kto": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
            "max_seq_len": 64,
        },
    )
    assert metrics_events(pg_api, job["id"])[0]["train_loss"] == pytest.approx(
        0.5, abs=1e-5
    )  # policy = reference, KL 0
