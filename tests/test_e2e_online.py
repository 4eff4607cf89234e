"""The online methods as real jobs through the service, and their options validated at create.

GRPO with a dense length reward, OpenAI's reinforcement through the unmodified SDK with a
string_check grader, RLOO, and PPO scored by the reward model an earlier reward_model job
trained: each is validated, resolved, run by the worker and ends with its metrics.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.conftest import Api, WorkerProcess
from tests.test_e2e_methods import metrics_events, preference_rows, run_job

pytestmark = pytest.mark.slow

LENGTH_REWARD = {
    "type": "length",
    "name": "short",
    "target": 4,
    "unit": "words",
    "input": "{{sample.output_text}}",
}
# PPO samples one completion per prompt: it has no num_generations.
PPO_SAMPLING = {
    "n_epochs": 1,
    "batch_size": 2,
    "max_completion_length": 8,
    "learning_rate_multiplier": 10,
}
SAMPLING = {
    "n_epochs": 1,
    "batch_size": 2,
    "num_generations": 2,
    "max_completion_length": 8,
    "learning_rate_multiplier": 10,
}


def prompt_rows(n: int) -> str:
    rows = [
        {
            "messages": [{"role": "user", "content": f"Say something about number {i}."}],
            "answer": str(i),
        }
        for i in range(n)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def prompts(pg_api: Api) -> str:
    uploaded = pg_api.upload(prompt_rows(4))
    assert uploaded["format"] == "prompt_only", uploaded
    return str(uploaded["id"])


def create(api: Api, body: dict[str, Any]) -> Any:
    return api.http.post("fine_tuning/jobs", json={"model": "tiny", "max_seq_len": 64, **body})


@pytest.mark.parametrize(
    ("method", "param", "code"),
    [
        ({"type": "grpo"}, "method.grpo.reward_functions", "missing_required_parameter"),
        (
            {
                "type": "grpo",
                "grpo": {"reward_functions": [{"type": "python", "source": "print(1)"}]},
            },
            "method.grpo.reward_functions[0]",
            "invalid_grader",
        ),
        (
            {
                "type": "grpo",
                "grpo": {
                    "reward_functions": [
                        {
                            "type": "string_check",
                            "input": "{{sample.output_text}}",
                            "reference": "x",
                            "operation": "nope",
                        }
                    ]
                },
            },
            "method.grpo.reward_functions[0].operation",
            "invalid_grader",
        ),
        (
            {"type": "ppo", "ppo": {"reward_model": "ft:tiny:local::ftjob-nope"}},
            "method.ppo.reward_model",
            "reward_model_not_found",
        ),
        ({"type": "reinforcement"}, "method.reinforcement.grader", "missing_required_parameter"),
        (
            {
                "type": "grpo",
                "grpo": {
                    "reward_functions": [LENGTH_REWARD],
                    "hyperparameters": {"max_completion_length": 64},
                },
            },
            "method.grpo.hyperparameters.max_completion_length",
            "invalid_value",
        ),
        (
            {
                "type": "grpo",
                "grpo": {
                    "reward_functions": [LENGTH_REWARD],
                    "hyperparameters": {"num_generations": 1},
                },
            },
            "method.grpo.hyperparameters.num_generations",
            "invalid_value",
        ),
    ],
)
def test_online_options_are_validated(
    pg_api: Api, prompts: str, method: dict[str, Any], param: str, code: str
) -> None:
    response = create(pg_api, {"training_file": prompts, "method": method})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["param"] == param or error["param"].startswith(param), error


def test_grpo_job(pg_api: Api, pg_worker: WorkerProcess, prompts: str) -> None:
    job = run_job(
        pg_api,
        pg_worker,
        {
            "model": "tiny",
            "training_file": prompts,
            "method": {
                "type": "grpo",
                "grpo": {"reward_functions": [LENGTH_REWARD], "hyperparameters": SAMPLING},
            },
            "max_seq_len": 64,
        },
    )
    block = job["method"]["grpo"]
    assert block["reward_functions"][0]["name"] == "short"
    assert block["hyperparameters"]["loss_type"] == "dapo"
    last = metrics_events(pg_api, job["id"])[-1]
    assert {
        "reward",
        "reward_std",
        "rewards/short/mean",
        "frac_reward_zero_std",
        "completions/mean_length",
    } <= set(last)


def test_rloo_job(pg_api: Api, pg_worker: WorkerProcess, prompts: str) -> None:
    job = run_job(
        pg_api,
        pg_worker,
        {
            "model": "tiny",
            "training_file": prompts,
            "method": {
                "type": "rloo",
                "rloo": {"reward_functions": [LENGTH_REWARD], "hyperparameters": SAMPLING},
            },
            "max_seq_len": 64,
        },
    )
    assert {"reward", "kl"} <= set(metrics_events(pg_api, job["id"])[-1])


def test_reinforcement_job_through_the_sdk(
    pg_api: Api, pg_worker: WorkerProcess, prompts: str
) -> None:
    client = openai.OpenAI(base_url=f"{pg_api.url}/v1", api_key=pg_api.key, max_retries=0)
    grader = {
        "type": "string_check",
        "name": "mentions",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "like",
    }
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=prompts,
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": grader,
                "hyperparameters": {"n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.25},
            },
        },
        extra_body={"max_seq_len": 96},  # above reinforcement's default max_completion_length (64)
    )
    assert job.method.type == "reinforcement"
    done = pg_api.wait_terminal(job.id)
    assert done["status"] == "succeeded", (done["error"], pg_worker.output()[-2000:])
    assert done["method"]["reinforcement"]["hyperparameters"]["num_generations"] == 2  # 8 x 0.25
    assert "rewards/mentions/mean" in metrics_events(pg_api, job.id)[-1]


def test_ppo_job_scored_by_an_earlier_reward_model_job(
    pg_api: Api, pg_worker: WorkerProcess, prompts: str
) -> None:
    pairs = pg_api.upload(preference_rows(8, seed=9, openai_format=False))
    rm = run_job(
        pg_api,
        pg_worker,
        {
            "model": "tiny",
            "training_file": pairs["id"],
            "method": {
                "type": "reward_model",
                "reward_model": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}},
            },
            "max_seq_len": 64,
        },
    )
    job = run_job(
        pg_api,
        pg_worker,
        {
            "model": "tiny",
            "training_file": prompts,
            "method": {
                "type": "ppo",
                "ppo": {
                    "reward_model": rm["fine_tuned_model"],
                    "hyperparameters": {**PPO_SAMPLING, "num_ppo_epochs": 2},
                },
            },
            "max_seq_len": 64,
        },
    )
    assert job["method"]["ppo"]["reward_model"] == rm["fine_tuned_model"]
    assert {
        "objective/kl",
        "objective/rlhf_reward",
        "policy/approxkl",
        "policy/clipfrac",
        "loss/value",
        "val/ratio",
    } <= set(metrics_events(pg_api, job["id"])[-1])
