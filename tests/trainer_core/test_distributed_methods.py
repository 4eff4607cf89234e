"""kto, orpo, simpo (and dpo) in 2 CPU processes under DeepSpeed ZeRO-2 compute the
1-process run.

They share the loop's distributed step (``loop.Run.train_step``): each rank computes its
share of every micro-batch against the whole step's normalisers, and KTO's baseline z is the
whole micro-batch's mean over the ranks (``distributed.mean_over_ranks``). Batches of 3 rows
split 2 + 1 between the ranks, and the data leaves a micro-batch of one row (7 pairs; KTO's
10 rows), so one rank also runs the weight-0 stand-in row. The uneven split is what once
broke ZeRO-2: LoRA layers chose their forward by size, so the ranks built different graphs
and ZeRO-2 paired up the wrong gradients (``lora_matmul``; dpo is here for that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import trainer_core
from tests.trainer_core.cli_run import run_cli
from tests.trainer_core.conftest import LENGTH_REWARD, write_jsonl
from tests.trainer_core.hyperparameters import COMMON
from trainer_core.seams import FolderCheckpointStore, ListSink
from trainer_core.specs import TrainSpec

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

BETA = {
    "kto": {"beta": 0.1},
    "orpo": {"beta": 0.1},
    "simpo": {"beta": 2.0, "gamma": 0.5},
    "dpo": {},
}
EXTRA = {
    "kto": {"desirable_weight": 1.0, "undesirable_weight": 1.0},
    "orpo": {},
    "simpo": {},
    "dpo": {
        "beta": 0.1,
        "loss_type": ["sigmoid"],
        "loss_weights": None,
        "label_smoothing": 0.0,
        "precompute_ref_log_probs": False,
    },
}
PAIRS = {"kto": 5, "orpo": 7, "simpo": 7, "dpo": 7}  # KTO: two rows a pair


def run_here(spec: dict[str, Any], tmp: Path) -> list[tuple[int, dict[str, float]]]:
    """The 1-process run, in this process (the 2-process one needs the launcher)."""
    sink = ListSink()
    trainer_core.run(TrainSpec.model_validate(spec), sink, FolderCheckpointStore(tmp / "one"))
    return sink.points


def pairs(n: int) -> list[dict[str, Any]]:
    names = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus"][:n]
    return [
        {
            "prompt": f"Does {name} like tea?",
            "chosen": f" Yes, {name} likes tea.",
            "rejected": f" No, {name} hates it.",
        }
        for name in names
    ]


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo", "dpo"])
def test_zero2_in_two_processes_matches_one_process(
    method: str, tiny_model: Path, tmp_path: Path
) -> None:
    spec = {
        "method": method,
        "model": str(tiny_model),
        "train_file": str(write_jsonl(tmp_path / "pairs.jsonl", pairs(PAIRS[method]))),
        "seed": 0,
        "max_seq_len": 64,
        "num_threads": 1,
        "adapter": {"type": "lora", "r": 8, "alpha": 16},
        "hyperparameters": {
            **COMMON,
            "n_epochs": 2,
            "batch_size": 3,
            **BETA[method],
            **EXTRA[method],
        },
    }
    one = [values for _, values in run_here(spec, tmp_path)]
    two = run_cli(tmp_path, "two", {**spec, "resources": {"gpus": 2, "zero_stage": 2}}, 2)
    assert len(one) == len(two) >= 4
    # The run learns something, so equal curves are not two flat lines.
    assert one[-1]["train_loss"] != pytest.approx(one[0]["train_loss"], rel=1e-3)
    for step, (a, b) in enumerate(zip(one, two, strict=True), start=1):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4), (method, step)
        assert b["num_tokens"] == a["num_tokens"], (method, step)
        if method == "kto":
            assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-6), step


# The online methods: a rollout's prompts are shared out as whole groups (3 prompts split
# 2 + 1; the 7th prompt's rollout leaves one rank a weight-0 stand-in group), each rank
# samples and scores its own, and the loss normalisers are those of the whole micro-batch.
ONLINE = {
    # bnpo: each micro-batch's tokens over the ranks; μ = 2: old log-probs; β: the reference.
    "grpo-bnpo": (
        "grpo",
        {"loss_type": "bnpo", "beta": 0.04, "num_iterations": 2, "scale_rewards": "group"},
    ),
    # grpo: each micro-batch's rows over the ranks; "batch": the whole rollout's std.
    "grpo-batch": (
        "grpo",
        {"loss_type": "grpo", "beta": 0.0, "num_iterations": 1, "scale_rewards": "batch"},
    ),
    # The KL of every row gathered, advantages normalised over the whole rollout.
    "rloo": ("rloo", {"beta": 0.05, "normalize_advantages": True, "num_iterations": 1}),
    # ZeRO-3: the ranks sample from sharded weights (no merged LoRA weights to swap in).
    "grpo-zero3": (
        "grpo",
        {"loss_type": "dapo", "beta": 0.04, "num_iterations": 1, "scale_rewards": "group"},
    ),
}
GRPO_REST = {"epsilon_high": None, "mask_truncated_completions": False}


@pytest.mark.parametrize("case", list(ONLINE))
def test_online_methods_in_two_processes_match_one_process(
    case: str, tiny_model: Path, tmp_path: Path
) -> None:
    method, extra = ONLINE[case]
    hyperparameters = {
        "num_generations": 2,
        "epsilon": 0.2,
        **(GRPO_REST if method == "grpo" else {}),
        **extra,
    }
    spec = online_spec(
        tiny_model, tmp_path, method, hyperparameters, reward_functions=[LENGTH_REWARD]
    )
    one = [values for _, values in run_here(spec, tmp_path)]
    zero_stage = 3 if case.endswith("zero3") else 2
    two = run_cli(tmp_path, "two", {**spec, "resources": {"gpus": 2, "zero_stage": zero_stage}}, 2)
    assert len(one) == len(two) >= 6
    # Something was learnt, and the rollouts were not all alike.
    assert len({round(values["reward"], 6) for values in one}) > 2
    for step, (a, b) in enumerate(zip(one, two, strict=True), start=1):
        assert b["num_tokens"] == a["num_tokens"], (case, step)
        # abs: rloo's loss with normalised advantages at μ = 1 is −mean(A) = 0 up to rounding.
        keys = ("train_loss", "grad_norm", "reward", "reward_std", "entropy")
        for key in (*keys, "completions/mean_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (case, step, key)
        if "kl" in a:
            assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-6), (case, step)


PPO = {
    "num_ppo_epochs": 2,
    "gamma": 1.0,
    "lam": 0.95,
    "cliprange": 0.2,
    "cliprange_value": 0.2,
    "vf_coef": 0.1,
    "kl_coef": 0.05,
    # Both whitenings: the rewards' scale and the advantages' mean/var span every rank.
    "whiten_rewards": True,
    "missing_eos_penalty": 1.0,
}


def online_spec(
    tiny_model: Path,
    tmp_path: Path,
    method: str,
    hyperparameters: dict[str, Any],
    **fields: Any,
) -> dict[str, Any]:
    """An online ``method`` on 7 prompts, rollouts of 3 over 2 epochs (6 steps), LoRA, full
    sampling; ``hyperparameters`` add to the shared ones, ``fields`` to the spec."""
    prompts = [{"prompt": f"Tell me about number {i}."} for i in range(7)]
    return {
        "method": method,
        "model": str(tiny_model),
        "train_file": str(write_jsonl(tmp_path / "prompts.jsonl", prompts)),
        "seed": 0,
        "max_seq_len": 64,
        "num_threads": 1,
        "adapter": {"type": "lora", "r": 8, "alpha": 16},
        **fields,
        "hyperparameters": {
            **COMMON,
            "n_epochs": 2,
            "batch_size": 3,
            "gradient_accumulation_steps": 2,
            "max_completion_length": 12,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            **hyperparameters,
        },
    }


def ppo_spec(tiny_model: Path, tmp_path: Path) -> dict[str, Any]:
    """PPO scored by the tiny model with an untrained score head as the reward model."""
    return online_spec(
        tiny_model,
        tmp_path,
        "ppo",
        PPO,
        reward_model="rm",
        reward_models={"rm": {"base": str(tiny_model)}},
    )


def test_ppo_in_two_processes_matches_one_process(tiny_model: Path, tmp_path: Path) -> None:
    # ZeRO-0 (plain data parallelism): the value head's gradients are summed over the ranks
    # with the policy's. 3 prompts split 2 + 1, 2 micro-batches of rows [0, 1] and [2] (rank
    # 1 runs a stand-in row in the second), and the 7th prompt's rollout leaves rank 1 no
    # prompt at all.
    spec = ppo_spec(tiny_model, tmp_path)
    one = [values for _, values in run_here(spec, tmp_path)]
    two = run_cli(tmp_path, "two", {**spec, "resources": {"gpus": 2, "zero_stage": 0}}, 2)
    assert len(one) == len(two) >= 6
    # Something was learnt, and the rollouts were not all alike.
    assert len({round(values["objective/scores"], 6) for values in one}) > 2
    assert one[-1]["loss/value"] != pytest.approx(one[0]["loss/value"], rel=1e-3)
    keys = ("train_loss", "grad_norm", "loss/value", "loss/policy", "objective/scores")
    for step, (a, b) in enumerate(zip(one, two, strict=True), start=1):
        assert b["num_tokens"] == a["num_tokens"], step
        for key in (*keys, "objective/kl", "objective/rlhf_reward", "policy/clipfrac"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (step, key)
