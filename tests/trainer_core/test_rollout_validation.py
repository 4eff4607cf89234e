"""The reinforcement eval pass (``rollout_validation``): every ``eval_interval`` steps the
graders' mean over ``eval_samples`` completions of each validation prompt is logged as
``valid_reward``; seeded by step, so a resumed run logs what the uninterrupted one did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.trainer_core.conftest import LENGTH_REWARD, method_spec, write_jsonl
from tests.trainer_core.hyperparameters import COMMON
from trainer_core.methods import grpo, rloo
from trainer_core.seams import FolderCheckpointStore, ListSink
from trainer_core.specs import (
    AdapterSpec,
    GrpoHyperparameters,
    ReinforcementHyperparameters,
    RlooHyperparameters,
    TrainSpec,
)

SAMPLING: dict[str, Any] = {
    **COMMON,
    "max_completion_length": 8,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "num_generations": 2,
    "epsilon": 0.2,
    "epsilon_high": None,
    "beta": 0.0,
    "scale_rewards": "group",
    "loss_type": "dapo",
    "num_iterations": 1,
    "mask_truncated_completions": False,
}
# A grader that reads only the row: 1 for a row labelled "good", 0 for any other, whatever the
# model writes. Its mean over a split is the share of good rows, exactly.
LABEL_CHECK = {
    "type": "string_check",
    "name": "label",
    "input": "{{item.label}}",
    "reference": "good",
    "operation": "eq",
}


def prompts(path: Path, labels: list[str]) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"Tell me about {i}."}], "label": label}
        for i, label in enumerate(labels)
    ]
    return write_jsonl(path, rows)


def train(spec: TrainSpec, root: Path, sink: ListSink | None = None, stop_after: int = 0) -> Any:
    sink = sink or ListSink()
    store = FolderCheckpointStore(root)
    stop = (lambda: len(sink.points) >= stop_after) if stop_after else (lambda: False)
    return grpo.train(spec, sink, store, stop), sink, store


def test_valid_reward_is_the_graders_mean_at_every_interval(
    tiny_model: Path, tmp_path: Path
) -> None:
    """8 training prompts in batches of 4 for 2 epochs: 4 steps. eval_interval 2: the pass runs
    after steps 2 and 4. 1 of the 4 validation rows is good, so each pass's mean over its
    4 × 3 completions is 3 / 12 = 0.25 exactly, at both steps."""
    spec = method_spec(
        "reinforcement",
        tiny_model,
        prompts(tmp_path / "train.jsonl", ["good", "bad"] * 4),
        ReinforcementHyperparameters,
        {
            **SAMPLING,
            "compute_multiplier": 1.0,
            "eval_interval": 2,
            "eval_samples": 3,
            "reasoning_effort": "default",
        },
        n_epochs=2,
        validation_file=str(prompts(tmp_path / "valid.jsonl", ["bad", "good", "bad", "bad"])),
        adapter=AdapterSpec(type="full"),
        reward_functions=[LABEL_CHECK],
    )
    result, sink, _ = train(spec, tmp_path / "ckpt")
    assert result.status == "completed"
    logged = {step: values.get("valid_reward") for step, values in sink.points}
    assert logged == {1: None, 2: 0.25, 3: None, 4: 0.25}
    assert not [m for _, m, _ in sink.events if "validation file" in m]


def test_auto_interval_and_a_resumed_run_logs_the_same_values(
    tiny_model: Path, tmp_path: Path
) -> None:
    """GRPO takes "auto": ⌈4 steps / 10⌉ = every step, one completion per prompt. The length
    reward depends on what is sampled; stopped after step 2 and resumed, steps 3 and 4 log the
    uninterrupted run's values (the pass's sampler is seeded by the step, not the run's RNG)."""
    spec = method_spec(
        "grpo",
        tiny_model,
        prompts(tmp_path / "train.jsonl", ["x"] * 8),
        GrpoHyperparameters,
        SAMPLING,
        n_epochs=2,
        validation_file=str(prompts(tmp_path / "valid.jsonl", ["x"] * 3)),
        adapter=AdapterSpec(type="full"),
        reward_functions=[LENGTH_REWARD],
    )
    _, whole, _ = train(spec, tmp_path / "whole")
    values = [m["valid_reward"] for _, m in whole.points]
    assert len(values) == 4 and all(-1e6 < v <= 1.0 for v in values)
    assert len(set(values)) > 1  # sampled from a policy that changes: not a constant

    result, _, store = train(spec, tmp_path / "first", ListSink(), stop_after=2)
    assert result.status == "stopped" and result.step == 2
    _, rest, _ = train(
        spec.model_copy(update={"resume_from": str(store.saved[-1][1])}), tmp_path / "rest"
    )
    assert [s for s, _ in rest.points] == [3, 4]
    for (_, expected), (_, got) in zip(whole.points[2:], rest.points, strict=True):
        assert got["valid_reward"] == pytest.approx(expected["valid_reward"], rel=1e-6)


def test_rloo_has_no_eval_pass_and_says_its_validation_file_is_unused(
    tiny_model: Path, tmp_path: Path
) -> None:
    hp = {**SAMPLING, "beta": 0.05, "normalize_advantages": False}
    hp = {k: v for k, v in hp.items() if k in RlooHyperparameters.model_fields}
    spec = method_spec(
        "rloo",
        tiny_model,
        prompts(tmp_path / "train.jsonl", ["good", "bad"] * 2),
        RlooHyperparameters,
        hp,
        validation_file=str(prompts(tmp_path / "valid.jsonl", ["good"])),
        reward_functions=[LABEL_CHECK],
    )
    sink = ListSink()
    result = rloo.train(spec, sink, FolderCheckpointStore(tmp_path / "ckpt"), lambda: False)
    assert result.status == "completed"
    assert all("valid_reward" not in values for _, values in sink.points)
    assert [m for _, m, _ in sink.events if "validation file" in m]
