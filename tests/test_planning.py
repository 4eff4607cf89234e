"""Planning endpoints: job estimates, file validation for a method, queue positions."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest

from api.settings import Settings
from tests.conftest import Api, chat_rows


@pytest.fixture(scope="module")
def quiet_api(pg_settings: Settings) -> Iterator[Api]:
    """The same database, but jobs go to a queue no worker serves: they stay queued."""
    api = Api(pg_settings.model_copy(update={"default_queue": "planning-test-no-worker"}))
    yield api
    for job in api.http.get("fine_tuning/jobs", params={"limit": 1000}).json()["data"]:
        if job["status"] == "queued":
            api.http.post(f"fine_tuning/jobs/{job['id']}/cancel")
    api.stop()


def body(file_id: str, **hp: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "training_file": file_id,
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, **hp}},
        },
    }


def test_estimate_counts_tokens_and_steps_without_queueing(quiet_api: Api) -> None:
    train = quiet_api.upload(chat_rows(10))
    before = len(quiet_api.http.get("fine_tuning/jobs", params={"limit": 1000}).json()["data"])
    response = quiet_api.http.post("fine_tuning/jobs/estimate", json=body(train["id"]))
    assert response.status_code == 200, response.text
    est = response.json()
    assert est["object"] == "fine_tuning.job.estimate"
    assert est["num_examples"] == 10
    assert est["total_steps"] == math.ceil(10 / 4) * 2
    assert est["token_count"] == "tokenizer"
    # Each row is ~20 tokens of text under the tiny tokenizer; bytes/4 would be far more.
    assert 50 < est["tokens_per_epoch"] < 1000
    assert est["train_tokens"] == 2 * est["tokens_per_epoch"]
    assert est["est_duration_s"] >= 1
    after = len(quiet_api.http.get("fine_tuning/jobs", params={"limit": 1000}).json()["data"])
    assert after == before  # nothing was created


def test_estimate_validates_like_create(quiet_api: Api) -> None:
    response = quiet_api.http.post(
        "fine_tuning/jobs/estimate", json={"model": "nope", "training_file": "file-x"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


def test_validate_file_for_a_method(quiet_api: Api) -> None:
    chat = quiet_api.upload(chat_rows(3))
    ok = quiet_api.http.post(
        f"files/{chat['id']}/validate", json={"method": "supervised", "model": "tiny"}
    ).json()
    assert ok["ok"] is True and ok["errors"] == [] and ok["num_examples"] == 3
    assert ok["num_tokens"] > 0 and ok["token_count"] == "tokenizer"
    wrong = quiet_api.http.post(f"files/{chat['id']}/validate", json={"method": "dpo"}).json()
    assert wrong["ok"] is False
    assert wrong["errors"][-1]["code"] == "invalid_file_format"

    bad_lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        ),
        "{oops",
    ]
    bad = quiet_api.upload("\n".join(bad_lines) + "\n")
    report = quiet_api.http.post(
        f"files/{bad['id']}/validate", json={"method": "supervised"}
    ).json()
    assert report["ok"] is False
    assert report["errors"][0]["line"] == 2 and report["errors"][0]["code"] == "invalid_json"

    unknown = quiet_api.http.post(f"files/{chat['id']}/validate", json={"method": "telepathy"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "method"
    # Not a name at all (it once reached a dict lookup and answered 500).
    for method in ({"type": [1]}, [1], 3):
        odd = quiet_api.http.post(f"files/{chat['id']}/validate", json={"method": method})
        assert odd.status_code == 400 and odd.json()["error"]["param"] == "method", odd.text


def test_queued_jobs_show_their_queue_position(quiet_api: Api) -> None:
    train = quiet_api.upload(chat_rows(4))
    first = quiet_api.http.post("fine_tuning/jobs", json=body(train["id"])).json()
    second = quiet_api.http.post("fine_tuning/jobs", json=body(train["id"])).json()
    p1 = quiet_api.http.get(f"fine_tuning/jobs/{first['id']}").json()["queue_position"]
    p2 = quiet_api.http.get(f"fine_tuning/jobs/{second['id']}").json()["queue_position"]
    assert p1 is not None and p2 == p1 + 1
    listed = {
        j["id"]: j["queue_position"] for j in quiet_api.http.get("fine_tuning/jobs").json()["data"]
    }
    assert listed[first["id"]] == p1 and listed[second["id"]] == p2
    quiet_api.http.post(f"fine_tuning/jobs/{first['id']}/cancel")
    assert quiet_api.http.get(f"fine_tuning/jobs/{second['id']}").json()["queue_position"] == p1
    cancelled = quiet_api.http.get(f"fine_tuning/jobs/{first['id']}").json()
    assert cancelled["queue_position"] is None
