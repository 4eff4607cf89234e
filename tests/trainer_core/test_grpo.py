"""GRPO on the tiny model: it learns a dense reward, reports TRL's metrics, keeps the base
under LoRA, and a resumed run equals the uninterrupted one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_core.conftest import LENGTH_REWARD, MakeSpec, method_spec
from tests.trainer_core.hyperparameters import COMMON
from trainer_core import loop
from trainer_core.adapters import apply_adapter
from trainer_core.methods import grpo
from trainer_core.seams import FolderCheckpointStore, ListSink, RunResult
from trainer_core.specs import AdapterSpec, GrpoHyperparameters, TrainSpec


@pytest.fixture
def make_spec(tiny_model: Path, prompts_file: Path) -> MakeSpec:
    """A GRPO spec on the tiny model; hyperparameters and spec fields by keyword."""

    def make(**overrides: Any) -> TrainSpec:
        hp = {
            **COMMON,
            "max_completion_length": 16,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "num_generations": 4,
            "epsilon": 0.2,
            "epsilon_high": None,
            "beta": 0.0,
            "scale_rewards": "group",
            "loss_type": "dapo",
            "num_iterations": 1,
            "mask_truncated_completions": False,
        }
        online = {"adapter": AdapterSpec(type="full"), "reward_functions": [LENGTH_REWARD]}
        return method_spec(
            "grpo", tiny_model, prompts_file, GrpoHyperparameters, hp, **(online | overrides)
        )

    return make


def run(
    spec: TrainSpec,
    root: Path,
    should_stop: Callable[[], bool] = lambda: False,
    sink: ListSink | None = None,
) -> tuple[RunResult, ListSink, FolderCheckpointStore]:
    sink, store = sink or ListSink(), FolderCheckpointStore(root)
    return grpo.train(spec, sink, store, should_stop), sink, store


def test_grpo_raises_a_dense_reward(make_spec: MakeSpec, tmp_path: Path) -> None:
    """Bound: within 24 steps (12 epochs of 2 rollouts, full fine-tuning at lr 1e-2) the mean
    reward of the last 4 steps is at least 0.15 above the first step's (seen: 0.22 → ~0.6)."""
    result, sink, _ = run(make_spec(n_epochs=12), tmp_path)
    rewards = [m["reward"] for _, m in sink.points]
    assert result.status == "completed" and len(rewards) == 24
    assert sum(rewards[-4:]) / 4 > rewards[0] + 0.15, rewards


def test_metrics_are_trl_s(make_spec: MakeSpec, tmp_path: Path) -> None:
    spec = make_spec(beta=0.1, num_iterations=2, gradient_accumulation_steps=2, loss_type="grpo")
    result, sink, store = run(spec, tmp_path)
    assert result.total_steps == 4  # 2 rollouts × 2 iterations
    steps = [s for s, _ in sink.points]
    assert steps == [1, 2, 3, 4]
    assert set(sink.points[0][1]) == {
        "train_loss",
        "reward",
        "reward_std",
        "rewards/short/mean",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/max_length",
        "completions/clipped_ratio",
        "kl",
        "clip_ratio",
        "entropy",
        "learning_rate",
        "grad_norm",
        "num_tokens",
        "epoch",
    }
    first, second = sink.points[0][1], sink.points[1][1]
    assert first["kl"] == 0.0  # the policy is the reference until the first step
    assert second["kl"] > 0.0
    assert first["reward"] == second["reward"]  # both iterations use one rollout
    assert second["num_tokens"] == first["num_tokens"]  # counted once per rollout, as TRL
    assert sink.points[2][1]["num_tokens"] > second["num_tokens"]
    assert 0 < first["completions/mean_length"] <= first["completions/max_length"] <= 16
    # One checkpoint at the end of the epoch, final.
    assert [(s, final) for s, _, _, final in store.saved] == [(4, True)]

    (_level, message, data) = sink.events[0]
    assert message == "Samples at step 1" and data is not None
    assert 0 < len(data["samples"]) <= 4
    assert set(data["samples"][0]) == {"prompt", "completion", "reward"}


def test_without_beta_there_is_no_kl_metric(make_spec: MakeSpec, tmp_path: Path) -> None:
    _, sink, _ = run(make_spec(batch_size=8), tmp_path)
    assert "kl" not in sink.points[0][1]


def test_lora_moves_the_adapter_and_keeps_the_base(
    make_spec: MakeSpec, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under LoRA with β > 0 the reference is the policy with its adapter off; after training
    every base weight of the policy is bit-identical to the file and the adapter has moved."""
    policies: list[Any] = []

    def apply_and_keep(*args: Any, **kwargs: Any) -> Any:
        policies.append(apply_adapter(*args, **kwargs))
        return policies[-1]

    monkeypatch.setattr(loop, "apply_adapter", apply_and_keep)
    spec = make_spec(
        adapter=AdapterSpec(type="lora", r=4, alpha=8),
        beta=0.1,
        learning_rate=5e-2,
        batch_size=8,
        n_epochs=2,
    )
    result, sink, store = run(spec, tmp_path)
    assert result.status == "completed"
    assert sink.points[-1][1]["kl"] > 0  # the adapter moved the policy off the base

    # peft keeps a wrapped layer's own weight as "<layer>.base_layer.weight".
    base = {
        name.replace(".base_layer", ""): weight
        for name, weight in policies[0].get_base_model().state_dict().items()
        if "lora_" not in name
    }
    original = load_file(tiny_model / "model.safetensors")
    assert set(base) == set(original)
    for name, weight in original.items():
        assert torch.equal(base[name], weight), name
    adapter = load_file(store.saved[-1][1] / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert any(float(w.abs().sum()) > 0 for name, w in adapter.items() if "lora_B" in name)


def test_stop_then_resume_equals_the_uninterrupted_run(make_spec: MakeSpec, tmp_path: Path) -> None:
    """Stopped before step 3, the run checkpoints step 2; resumed from it, steps 3 and 4
    report exactly what the uninterrupted run reported (weights, optimizer, RNG, position)."""
    spec = make_spec(n_epochs=2, beta=0.1)
    _, whole, _ = run(spec, tmp_path / "whole")

    first = ListSink()
    result, _, store = run(spec, tmp_path / "first", lambda: len(first.points) >= 2, first)
    assert result.status == "stopped" and result.step == 2
    assert [(s, final) for s, _, _, final in store.saved] == [(2, False)]

    resumed, rest, _ = run(
        spec.model_copy(update={"resume_from": str(store.saved[-1][1])}), tmp_path / "rest"
    )
    assert resumed.status == "completed"
    assert [s for s, _ in rest.points] == [3, 4]
    for (step, expected), (_, got) in zip(whole.points[2:], rest.points, strict=True):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), step
