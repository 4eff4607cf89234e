"""``/v1/fine_tuning/alpha/graders/validate`` and ``/run`` through the unmodified openai SDK,
against the API on Postgres, with an operator allowlist for http reward functions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.fine_tuning.alpha import GraderRunResponse, GraderValidateResponse
from openai.types.graders import MultiGrader, StringCheckGrader
from pydantic import ValidationError

from api.migration import upgrade
from api.settings import Settings
from tests.conftest import Api
from tests.test_graders import RewardServer

OUT = "{{sample.output_text}}"
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": OUT,
    "reference": "{{item.answer}}",
    "operation": "eq",
}


@pytest.fixture(scope="module")
def reward_server() -> Iterator[RewardServer]:
    server = RewardServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory,
    pg_url: str,
    redis_url: str,
    reward_server: RewardServer,
) -> Iterator[Api]:
    # No models are needed: graders never load one on the API.
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("graders"),
        database_url=pg_url,
        broker_url=redis_url,
        models_dir=Path(tmp_path_factory.mktemp("no_models")),
        reward_http_allowed_hosts=[reward_server.host],
        reward_http_timeout_s=1.0,
    )
    upgrade(settings)
    server = Api(settings)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api: Api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=api.key, max_retries=0)


def bad_request(call: Any, **kwargs: Any) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call(**kwargs)
    return caught.value


def test_validate_answers_the_sdk_grader_normalised(client: openai.OpenAI) -> None:
    checked = client.fine_tuning.alpha.graders.validate(grader=EXACT)  # type: ignore[arg-type]
    assert isinstance(checked, GraderValidateResponse)
    assert isinstance(checked.grader, StringCheckGrader)
    assert checked.grader.model_dump() == EXACT

    # OpenAI's wire form: an object of named graders (what the docs show and we store).
    grader = {
        "type": "multi",
        "name": "m",
        "graders": {"exact": EXACT},
        "calculate_output": "0.5 * exact",
    }
    multi = client.fine_tuning.alpha.graders.with_raw_response.validate(grader=grader)  # type: ignore[arg-type]
    assert multi.http_response.json() == {"grader": grader}
    # The SDK's MultiGrader type declares one grader there: that form round-trips as typed.
    single = {**grader, "graders": EXACT}
    typed = client.fine_tuning.alpha.graders.validate(grader=single)  # type: ignore[arg-type]
    assert isinstance(typed.grader, MultiGrader)
    assert isinstance(typed.grader.graders, StringCheckGrader)
    assert typed.grader.model_dump() == single


def test_validate_fills_our_types_defaults(api: Api) -> None:
    response = api.http.post(
        "fine_tuning/alpha/graders/validate", json={"grader": {"type": "length", "target": 8}}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "grader": {
            "type": "length",
            "name": "length",
            "target": 8,
            "unit": "chars",
            "tolerance": 0.0,
            "scale": 8.0,
            "input": OUT,
        }
    }


def test_run_answers_the_sdk_run_response(client: openai.OpenAI) -> None:
    run = client.fine_tuning.alpha.graders.run(
        grader=EXACT,  # type: ignore[arg-type]
        model_sample="Paris",
        item={"answer": "Paris"},
    )
    assert isinstance(run, GraderRunResponse)
    assert run.reward == 1.0
    assert run.metadata.name == "exact"
    assert run.metadata.type == "string_check"
    assert run.metadata.errors.sample_parse_error is False
    assert run.metadata.execution_time >= 0

    # kitten vs sitting: 2·LCS/(6+7) = 8/13; the multi halves it: 4/13.
    fuzzy = {
        "type": "text_similarity",
        "name": "sim",
        "input": OUT,
        "reference": "{{item.answer}}",
        "evaluation_metric": "fuzzy_match",
    }
    grader = {
        "type": "multi",
        "name": "m",
        "graders": {"sim": fuzzy, "exact": EXACT},
        "calculate_output": "sim / 2 + exact",
    }
    run = client.fine_tuning.alpha.graders.run(
        grader=grader,  # type: ignore[arg-type]
        model_sample="kitten",
        item={"answer": "sitting"},
    )
    assert run.reward == pytest.approx(4 / 13)
    assert run.sub_rewards == pytest.approx({"sim": 8 / 13, "exact": 0.0})


def test_invalid_graders_are_bad_requests_with_param(client: openai.OpenAI) -> None:
    graders = client.fine_tuning.alpha.graders
    err = bad_request(graders.validate, grader={**EXACT, "operation": "contains"})
    assert err.param == "grader.operation"
    assert err.code == "invalid_grader"

    err = bad_request(graders.validate, grader={"type": "python", "name": "p", "source": "1"})
    assert err.param == "grader.type"
    assert "runs code from the request" in err.message

    err = bad_request(
        graders.run,
        grader={
            "type": "multi",
            "name": "m",
            "graders": {"exact": EXACT},
            "calculate_output": "__import__('os')",
        },
        model_sample="x",
    )
    assert err.param == "grader.calculate_output"

    # A dataset row without the column the template reads.
    err = bad_request(graders.run, grader=EXACT, model_sample="x", item={"other": 1})
    assert err.param == "grader.reference"
    assert err.code == "grader_failed"


def test_request_shape_errors(api: Api) -> None:
    for body, param in (
        ({"grader": EXACT}, "model_sample"),
        ({"grader": EXACT, "model_sample": "x", "item": [1]}, "item"),
        ({"grader": EXACT, "model_sample": "x", "extra": 1}, "extra"),
        ({"model_sample": "x"}, "grader"),
    ):
        response = api.http.post("fine_tuning/alpha/graders/run", json=body)
        assert response.status_code == 400, body
        assert response.json()["error"]["param"] == param
    anonymous = httpx.post(
        f"{api.url}/v1/fine_tuning/alpha/graders/validate", json={"grader": EXACT}
    )
    assert anonymous.status_code == 401


def test_reward_model_graders_validate_but_do_not_run_on_the_api(client: openai.OpenAI) -> None:
    judge = {
        "type": "score_model",
        "name": "judge",
        "model": "ft:tiny:local:rm:ftjob-1",
        "input": [{"role": "user", "content": "{{item.q}}"}],
    }
    checked = client.fine_tuning.alpha.graders.validate(grader=judge)  # type: ignore[arg-type]
    assert checked.grader is not None and checked.grader.model_dump()["range"] == [0.0, 1.0]
    err = bad_request(client.fine_tuning.alpha.graders.run, grader=judge, model_sample="x")
    assert err.param == "grader.type"
    assert err.code == "grader_not_runnable"
    assert "workers" in err.message
    err = bad_request(
        client.fine_tuning.alpha.graders.validate,
        grader={**judge, "model": "gpt-4o-2024-08-06"},
    )
    assert err.param == "grader.model"


def test_http_graders_honour_the_operator_allowlist(api: Api, reward_server: RewardServer) -> None:
    ok = {"type": "http", "name": "remote", "url": reward_server.url("/ok")}
    response = api.http.post(
        "fine_tuning/alpha/graders/run",
        json={"grader": ok, "model_sample": "abcd", "item": {"q": 1}},
    )
    assert response.status_code == 200, response.text
    assert response.json()["reward"] == 4.0  # the endpoint answers len(completion)
    assert reward_server.seen[-1] == {"items": [{"q": 1}], "completions": ["abcd"]}

    elsewhere = {**ok, "url": f"http://127.0.0.1:{reward_server.port + 1}/ok"}
    for route, body in (
        ("validate", {"grader": elsewhere}),
        ("run", {"grader": elsewhere, "model_sample": "x"}),
    ):
        response = api.http.post(f"fine_tuning/alpha/graders/{route}", json=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "grader.url"
        assert "allowlist" in error["message"]

    failing = {**ok, "url": reward_server.url("/500")}
    response = api.http.post(
        "fine_tuning/alpha/graders/run", json={"grader": failing, "model_sample": "x"}
    )
    assert response.status_code == 400
    assert "answered HTTP 500" in response.json()["error"]["message"]


def test_the_allowlist_setting_reads_a_comma_separated_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ALIGND_REWARD_HTTP_ALLOWED_HOSTS", "rewards.internal:8080, 10.0.0.5 ,")
    monkeypatch.setenv("ALIGND_REWARD_HTTP_TIMEOUT_S", "2.5")
    settings = Settings()
    assert settings.reward_http_allowed_hosts == ["rewards.internal:8080", "10.0.0.5"]
    assert settings.reward_http_timeout_s == 2.5
    monkeypatch.setenv("ALIGND_REWARD_HTTP_ALLOWED_HOSTS", "")
    assert Settings().reward_http_allowed_hosts == []


def test_a_malformed_allowlist_entry_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    for entry in ("rewards.internal:http", "10.0.0.0/33", "[::1]8000"):
        monkeypatch.setenv("ALIGND_REWARD_HTTP_ALLOWED_HOSTS", f"rewards.internal, {entry}")
        with pytest.raises(ValidationError):
            Settings()
    # CIDR entries are allowlist entries too (docs/operations.md, "Outbound requests").
    monkeypatch.setenv("ALIGND_REWARD_HTTP_ALLOWED_HOSTS", "10.20.0.0/16,[::1]:8000")
    assert Settings().reward_http_allowed_hosts == ["10.20.0.0/16", "[::1]:8000"]
