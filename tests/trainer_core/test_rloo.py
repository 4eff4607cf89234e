"""RLOO on the tiny model: it learns a dense reward and reports TRL's metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.trainer_core.conftest import LENGTH_REWARD, MakeSpec, method_spec
from tests.trainer_core.hyperparameters import COMMON
from trainer_core.methods import rloo
from trainer_core.seams import FolderCheckpointStore, ListSink, RunResult
from trainer_core.specs import AdapterSpec, RlooHyperparameters, TrainSpec


@pytest.fixture
def make_spec(tiny_model: Path, prompts_file: Path) -> MakeSpec:
    def make(**overrides: Any) -> TrainSpec:
        hp = {
            **COMMON,
            "max_completion_length": 16,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "num_generations": 4,
            "epsilon": 0.2,
            "beta": 0.05,
            "normalize_advantages": False,
            "num_iterations": 1,
        }
        online = {"adapter": AdapterSpec(type="full"), "reward_functions": [LENGTH_REWARD]}
        return method_spec(
            "rloo", tiny_model, prompts_file, RlooHyperparameters, hp, **(online | overrides)
        )

    return make


def run(spec: TrainSpec, root: Path) -> tuple[RunResult, ListSink, FolderCheckpointStore]:
    sink, store = ListSink(), FolderCheckpointStore(root)
    return rloo.train(spec, sink, store, lambda: False), sink, store


def test_rloo_raises_a_dense_reward(make_spec: MakeSpec, tmp_path: Path) -> None:
    """Bound: within 24 steps (full fine-tuning, lr 1e-2, β = 0.05) the mean reward of the
    last 4 steps is at least 0.15 above the first step's (seen: 0.22 → ~0.6)."""
    result, sink, _ = run(make_spec(n_epochs=12), tmp_path)
    rewards = [m["reward"] for _, m in sink.points]
    assert result.status == "completed" and len(rewards) == 24
    assert sum(rewards[-4:]) / 4 > rewards[0] + 0.15, rewards


def test_metrics_are_trl_s(make_spec: MakeSpec, tmp_path: Path) -> None:
    spec = make_spec(
        adapter=AdapterSpec(type="lora", r=4, alpha=8),
        learning_rate=5e-2,
        num_iterations=2,
        gradient_accumulation_steps=2,
        normalize_advantages=True,
    )
    result, sink, store = run(spec, tmp_path)
    assert result.total_steps == 4 and [s for s, _ in sink.points] == [1, 2, 3, 4]
    assert set(sink.points[0][1]) == {
        "train_loss",
        "reward",
        "reward_std",
        "rewards/short/mean",
        "kl",
        "clip_ratio",
        "entropy",
        "completions/mean_length",
        "completions/max_length",
        "completions/clipped_ratio",
        "learning_rate",
        "grad_norm",
        "num_tokens",
        "epoch",
    }
    first, third = sink.points[0][1], sink.points[2][1]
    assert first["kl"] == 0.0  # old = ref (adapter off, B = 0) before the first step
    assert third["kl"] != 0.0  # the second rollout comes from a moved policy
    assert [(s, final) for s, _, _, final in store.saved] == [(4, True)]


def test_without_beta_the_kl_is_not_computed(make_spec: MakeSpec, tmp_path: Path) -> None:
    _, sink, _ = run(make_spec(beta=0.0, batch_size=8), tmp_path)
    assert "kl" not in sink.points[0][1]
    assert sink.points[0][1]["train_loss"] == pytest.approx(0.0, abs=1e-6)  # Σ LOO A = 0


def test_one_micro_batch_reuses_the_training_forward_for_the_old_logps(
    make_spec: MakeSpec, tmp_path: Path
) -> None:
    """With μ = 1 and one micro-batch the old log-probs come from the step's own forward
    (detached) instead of a second no-grad pass; with two micro-batches they come from that
    pass. Same rollouts, same arithmetic: the curves agree (float summation order aside)."""
    _, fused, _ = run(make_spec(n_epochs=2), tmp_path / "one")
    _, two_pass, _ = run(make_spec(n_epochs=2, gradient_accumulation_steps=2), tmp_path / "two")
    assert len(fused.points) == len(two_pass.points) == 4
    for (step, a), (_, b) in zip(fused.points, two_pass.points, strict=True):
        for key in ("train_loss", "reward", "kl", "clip_ratio"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (step, key)
    assert fused.points[-1][1]["kl"] != 0.0  # the policy moved, so the KL is not trivially 0
