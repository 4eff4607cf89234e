"""Jobs over real HTTP against the app on Postgres, with no worker listening: creation,
validation errors with the right ``param``, "auto" resolution, pagination, cancel while queued."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Api, chat_rows


@pytest.fixture(scope="module")
def train_file(pg_api: Api) -> Iterator[str]:
    yield str(pg_api.upload(chat_rows(12))["id"])
    # These jobs are never meant to run: cancel them, so that a worker started later in the
    # session (whose start-up sweep re-sends queued jobs) does not train them.
    for job in pg_api.http.get("fine_tuning/jobs", params={"limit": 1000}).json()["data"]:
        if job["status"] == "queued":
            pg_api.http.post(f"fine_tuning/jobs/{job['id']}/cancel")


def create(api: Api, body: Any) -> Any:
    return api.http.post("fine_tuning/jobs", json=body)


def error_of(response: Any, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_create_resolves_auto_and_stores_everything(pg_api: Api, train_file: str) -> None:
    body = {
        "model": "tiny",
        "training_file": train_file,
        "suffix": "my-model",
        "seed": 11,
        "metadata": {"team": "a"},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        "adapter": {"type": "lora", "r": 4},
        "max_seq_len": 256,
    }
    response = create(pg_api, body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["object"] == "fine_tuning.job"
    assert job["id"].startswith("ftjob-")
    assert job["status"] == "queued"
    assert job["model"] == "tiny"
    assert job["seed"] == 11
    assert job["suffix"] == "my-model"
    assert job["metadata"] == {"team": "a"}
    hp = job["method"]["supervised"]["hyperparameters"]
    # n_epochs as given; "auto" resolved to the documented defaults (docs/methods.md).
    assert hp["n_epochs"] == 2
    assert hp["batch_size"] == 8
    assert hp["learning_rate_multiplier"] == 1.0
    assert hp["learning_rate"] == pytest.approx(2e-4)
    assert job["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 8,
        "learning_rate_multiplier": 1.0,
    }
    assert job["adapter"]["r"] == 4 and job["adapter"]["type"] == "lora"
    assert job["max_seq_len"] == 256
    assert pg_api.http.get(f"fine_tuning/jobs/{job['id']}").json()["method"] == job["method"]

    # The spec as submitted (the body, untouched) beside the spec the worker trains from.
    spec = pg_api.http.get(f"fine_tuning/jobs/{job['id']}/spec")
    assert spec.status_code == 200, spec.text
    assert spec.json()["object"] == "fine_tuning.job.spec"
    assert spec.json()["fine_tuning_job_id"] == job["id"]
    assert spec.json()["submitted"] == body
    resolved = spec.json()["resolved"]
    assert (resolved["method"], resolved["seed"], resolved["max_seq_len"]) == (
        "supervised",
        11,
        256,
    )
    assert resolved["hyperparameters"]["batch_size"] == 8  # "auto" resolved
    assert "spec" not in job and "request" not in job  # not in the job object, nor its lists


def test_legacy_top_level_hyperparameters(pg_api: Api, train_file: str) -> None:
    response = create(
        pg_api,
        {
            "model": "tiny",
            "training_file": train_file,
            "hyperparameters": {"n_epochs": 1, "batch_size": 2},
        },
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["method"]["type"] == "supervised"
    assert job["hyperparameters"]["batch_size"] == 2


@pytest.mark.parametrize(
    ("patch", "param", "code"),
    [
        ({"model": "no-such-model"}, "model", "model_not_found"),
        ({"model": "../etc"}, "model", "model_not_found"),
        ({"training_file": "file-missing"}, "training_file", "file_not_found"),
        ({"validation_file": "file-missing"}, "validation_file", "file_not_found"),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
            "method.supervised.hyperparameters.n_epochs",
            "invalid_value",
        ),
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"learning_rate_multiplier": -1}},
                }
            },
            "method.supervised.hyperparameters.learning_rate_multiplier",
            "invalid_value",
        ),
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"batch_size": "big"}},
                }
            },
            "method.supervised.hyperparameters.batch_size",
            "invalid_value",
        ),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"epochs": 3}}}},
            "method.supervised.hyperparameters.epochs",
            "unknown_parameter",
        ),
        ({"hyperparameters": {"n_epochs": 100}}, "hyperparameters.n_epochs", "invalid_value"),
        ({"method": {"type": "telepathy"}}, "method.type", "unsupported_method"),
        ({"method": {"supervised": {}}}, "method.type", "missing_required_parameter"),
        ({"adapter": {"type": "qlora"}}, "adapter.type", "invalid_value"),
        ({"adapter": {"r": 0}}, "adapter.r", "invalid_value"),
        ({"max_seq_len": 4}, "max_seq_len", "invalid_value"),
        ({"suffix": "has:colon"}, "suffix", "invalid_value"),
        ({"surprise": 1}, "surprise", "unknown_parameter"),
    ],
)
def test_bad_job_bodies_name_their_param(
    pg_api: Api, train_file: str, patch: dict[str, Any], param: str, code: str
) -> None:
    body = {"model": "tiny", "training_file": train_file, **patch}
    error = error_of(create(pg_api, body))
    assert error["param"] == param, error
    assert error["code"] == code, error
    assert error["type"] == "invalid_request_error"


def test_missing_required_fields(pg_api: Api) -> None:
    error = error_of(create(pg_api, {"training_file": "file-x"}))
    assert error["param"] == "model"
    assert error["code"] == "missing_required_parameter"


def test_malformed_json_body(pg_api: Api) -> None:
    response = pg_api.http.post(
        "fine_tuning/jobs", content=b"{bad json", headers={"content-type": "application/json"}
    )
    error = error_of(response)
    assert error["code"] == "invalid_json"


def test_file_in_error_or_wrong_format_is_refused(pg_api: Api) -> None:
    broken = pg_api.upload("{nope\n")
    assert broken["status"] == "error"
    error = error_of(create(pg_api, {"model": "tiny", "training_file": broken["id"]}))
    assert error["param"] == "training_file"
    assert error["code"] == "invalid_file"
    assert "line 1" in error["message"]

    prefs = pg_api.upload(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    assert prefs["status"] == "processed" and prefs["format"] == "preference"
    error = error_of(create(pg_api, {"model": "tiny", "training_file": prefs["id"]}))
    assert error["param"] == "training_file"
    assert error["code"] == "invalid_file_format"


def test_list_paginates_newest_first(pg_api: Api, train_file: str) -> None:
    ids = [
        create(pg_api, {"model": "tiny", "training_file": train_file}).json()["id"]
        for _ in range(3)
    ]
    first = pg_api.http.get("fine_tuning/jobs", params={"limit": 2}).json()
    assert first["object"] == "list"
    assert [job["id"] for job in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    second = pg_api.http.get(
        "fine_tuning/jobs", params={"limit": 2, "after": first["data"][-1]["id"]}
    ).json()
    assert second["data"][0]["id"] == ids[0]
    error = error_of(pg_api.http.get("fine_tuning/jobs", params={"limit": 0}))
    assert error["param"] == "limit"


def test_cancel_queued_job_at_once_then_400(pg_api: Api, train_file: str) -> None:
    job = create(pg_api, {"model": "tiny", "training_file": train_file}).json()
    # The SDK sends an empty body with a JSON content type.
    cancelled = pg_api.http.post(
        f"fine_tuning/jobs/{job['id']}/cancel",
        content=b"",
        headers={"content-type": "application/json"},
    )
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    again = error_of(pg_api.http.post(f"fine_tuning/jobs/{job['id']}/cancel"))
    assert again["code"] == "invalid_state"
    events = pg_api.http.get(f"fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert [event["message"] for event in events] == [
        "Job cancelled",
        f"Created fine-tuning job: {job['id']}",
    ]
    assert all(event["object"] == "fine_tuning.job.event" for event in events)


def test_event_pages_follow_the_cursor_and_refuse_an_unknown_one(
    pg_api: Api, train_file: str
) -> None:
    job = create(pg_api, {"model": "tiny", "training_file": train_file}).json()
    assert pg_api.http.post(f"fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    events = f"fine_tuning/jobs/{job['id']}/events"
    newest = pg_api.http.get(events, params={"limit": 1}).json()
    assert [e["message"] for e in newest["data"]] == ["Job cancelled"] and newest["has_more"]
    older = pg_api.http.get(events, params={"after": newest["last_id"]}).json()
    assert [e["message"] for e in older["data"]] == [f"Created fine-tuning job: {job['id']}"]
    assert older["has_more"] is False
    # Past the last event: an empty page of a job that exists, not a 404.
    assert pg_api.http.get(events, params={"after": older["last_id"]}).json()["data"] == []
    unknown = error_of(pg_api.http.get(events, params={"after": "ftevent-nope"}))
    assert unknown["param"] == "after"
    # Another owner's job is not found, with a cursor or without.
    other = pg_api.as_owner("someone-else")
    for params in ({}, {"after": newest["last_id"]}):
        error = error_of(other.get(events, params=params), status=404)
        assert error["code"] == "not_found"


def test_unknown_job_is_404_everywhere(pg_api: Api) -> None:
    for path in ("", "/events", "/checkpoints", "/adapter", "/spec", "/cancel"):
        method = pg_api.http.post if path == "/cancel" else pg_api.http.get
        error = error_of(method(f"fine_tuning/jobs/ftjob-nope{path}"), status=404)
        assert error["code"] == "not_found"


def test_models_lists_base_models(pg_api: Api) -> None:
    models = pg_api.http.get("models").json()
    assert {"id": "tiny", "object": "model", "owned_by": "system"}.items() <= models["data"][
        0
    ].items()
    assert pg_api.http.get("models/tiny").status_code == 200
    assert error_of(pg_api.http.get("models/nope"), status=404)["param"] == "model"


def test_nul_characters_are_a_400_not_a_500(pg_api: Api) -> None:
    # Postgres cannot store or compare a NUL in text; found by the schemathesis run.
    for response in (
        pg_api.http.get("fine_tuning/jobs", params={"after": "\x00"}),
        pg_api.http.get("files/file-%00"),
    ):
        error = error_of(response)
        assert error["code"] in ("invalid_value", "not_found"), error
