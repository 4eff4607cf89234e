"""Micro-batches cut by a token budget (``resources.max_tokens_per_batch``) train exactly as
micro-batches of ``batch_size`` rows: the optimizer step keeps its rows and normalisers, only
how many rows a forward holds changes (``batching.split_by_tokens``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.trainer_core.cli_run import run_cli
from tests.trainer_core.conftest import method_spec, run, write_jsonl
from tests.trainer_core.hyperparameters import COMMON
from trainer_core.batching import split_by_tokens
from trainer_core.specs import (
    DpoHyperparameters,
    KtoHyperparameters,
    OrpoHyperparameters,
    ResourcesSpec,
    RewardModelHyperparameters,
    SimpoHyperparameters,
    TrainSpec,
)

DPO = {
    "beta": 0.1,
    "loss_type": ["sigmoid"],
    "loss_weights": None,
    "label_smoothing": 0.0,
    "precompute_ref_log_probs": False,
}

# -- the cut, by hand ---------------------------------------------------------------------------


def test_split_by_padded_tokens_by_hand() -> None:
    lengths = [4, 3, 3, 2]
    # [0, 1] pads to 2 × 4 = 8; adding row 2 would pad to 3 × 4 = 12 > 8.
    assert split_by_tokens([[0, 1], [2, 3]], lengths, 8) == [[0, 1], [2, 3]]
    # The step's micro-batches are re-cut, not kept: [0, 1] = 8 ≤ 9, [0, 1, 2] = 12 > 9,
    # and [2, 3] pads to 2 × 3 = 6.
    assert split_by_tokens([[0], [1], [2, 3]], lengths, 9) == [[0, 1], [2, 3]]
    # A row over the budget runs alone; the rows keep their order.
    assert split_by_tokens([[0, 1, 2, 3]], lengths, 3) == [[0], [1], [2], [3]]


def test_split_by_real_tokens_pairs_and_ranks_by_hand() -> None:
    lengths = [4, 3, 3, 2]
    # Padding-free counts real tokens: 4 + 3 = 7 ≤ 8, + 3 = 10 > 8; then 3 + 2 = 5.
    assert split_by_tokens([[0, 1, 2, 3]], lengths, 8, padding_free=True) == [[0, 1], [2, 3]]
    # A pair run as two rows counts twice: 2 × 4 = 8; [1, 2] = 2 × 2 × 3 = 12 > 8.
    assert split_by_tokens([[0, 1, 2, 3]], lengths, 8, rows_per_item=2) == [[0], [1], [2], [3]]
    # Two processes take rows 0::2 and 1::2: [0, 1, 2] gives shares [0, 2] (2 × 4 = 8) and
    # [1] (3), so it fits 8; adding row 3 gives [1, 3] (2 × 3 = 6), still the larger 8.
    assert split_by_tokens([[0, 1, 2, 3]], lengths, 8, ranks=2) == [[0, 1, 2, 3]]
    assert split_by_tokens([[0, 1, 2, 3]], lengths, 7, ranks=2) == [[0, 1], [2, 3]]


def test_the_budget_is_a_resource_and_only_where_it_is_exact(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="greater than or equal to 8"):
        ResourcesSpec(max_tokens_per_batch=4)
    hp = {**COMMON, "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    budget = ResourcesSpec(max_tokens_per_batch=64)
    with pytest.raises(ValueError, match="max_tokens_per_batch applies to supervised"):
        method_spec("kto", tiny_model, tiny_model, KtoHyperparameters, hp, resources=budget)
    dpo = method_spec("dpo", tiny_model, tiny_model, DpoHyperparameters, {**COMMON, **DPO})
    accepted = TrainSpec.model_validate({**dpo.model_dump(), "resources": budget.model_dump()})
    assert accepted.resources.max_tokens_per_batch == 64
    with pytest.raises(ValueError, match="padding_free applies to supervised"):
        TrainSpec.model_validate({**dpo.model_dump(), "resources": {"padding_free": True}})


# -- real runs: with a budget = without -----------------------------------------------------------


@pytest.fixture
def forwards() -> Iterator[list[int]]:
    """The rows of every forward of a model (the policy's micro-batches, and a reference's):
    each goes once through the token embedding, seen by torch's global forward hook."""
    sizes: list[int] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, nn.Embedding):
            sizes.append(int(args[0].shape[0]))

    handle = nn.modules.module.register_module_forward_hook(hook)
    yield sizes
    handle.remove()


# Final weights: AdamW's first steps move each weight by about lr · sign(gradient), so a weight
# whose gradient is near AdamW's eps turns fp32 rounding of the gradient into a visible part of
# lr. The vocabulary-chunked head (trainer_core/vocab_chunks.py) sums the head's gradient a
# chunk at a time: re-cutting the micro-batches, or only the chunks, moves such weights by up to
# ~1e-5 after a few steps at lr = 1e-4 (measured: 1.1e-5 with a budget, 4.9e-6 with smaller
# chunks and no budget). A wrong normaliser or a lost row moves them by ~lr.
WEIGHT_ATOL = 3e-5


def assert_same_run(a: tuple[Any, Any, Any], b: tuple[Any, Any, Any], *, atol: float) -> None:
    """Same per-step losses (within ``atol``), token counts and final weights (``WEIGHT_ATOL``)."""
    (_, sink_a, store_a), (_, sink_b, store_b) = a, b
    assert len(sink_a.points) == len(sink_b.points) >= 2
    for (step, x), (_, y) in zip(sink_a.points, sink_b.points, strict=True):
        assert y["train_loss"] == pytest.approx(x["train_loss"], abs=atol), step
        assert y["num_tokens"] == x["num_tokens"], step
    weights_a = load_file(store_a.saved[-1][1] / "adapter" / "model.safetensors")
    weights_b = load_file(store_b.saved[-1][1] / "adapter" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name, weight in weights_a.items():
        torch.testing.assert_close(weights_b[name], weight, atol=WEIGHT_ATOL, rtol=0, msg=name)


# Full fine-tuning at a small learning rate, clipping off: a wrong normaliser would move the
# weights by ~lr = 1e-4, far above the 1e-6 the runs must agree within (as the 4×1 = 1×4 test).
EXACT = {"adapter": {"type": "full"}, "learning_rate": 1e-4, "max_grad_norm": 1e6}


def test_supervised_with_a_budget_trains_as_without(
    make_spec: Any, tmp_path: Path, forwards: list[int]
) -> None:
    spec = make_spec(batch_size=8, n_epochs=2, **EXACT)
    plain = run(spec, tmp_path / "rows")
    by_rows = list(forwards)
    forwards.clear()
    # The facts rows are 20-30 tokens: 64 padded tokens hold two of them.
    budget = spec.model_copy(update={"resources": ResourcesSpec(max_tokens_per_batch=64)})
    cut = run(budget, tmp_path / "tokens")

    assert by_rows == [8, 8]  # one micro-batch of 8 rows a step
    assert len(forwards) >= 8 and max(forwards) <= 2 and sum(forwards) == 16
    assert_same_run(plain, cut, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "hyperparameters", "extra"),
    [
        ("dpo", DpoHyperparameters, DPO),
        ("reward_model", RewardModelHyperparameters, {"center_rewards_coefficient": 0.0}),
        ("orpo", OrpoHyperparameters, {"beta": 0.1}),
        ("simpo", SimpoHyperparameters, {"beta": 2.0, "gamma": 0.5}),
    ],
)
def test_preference_methods_with_a_budget_train_as_without(
    method: str,
    hyperparameters: Any,
    extra: dict[str, Any],
    tiny_model: Path,
    pair_files: tuple[Path, Path],
    tmp_path: Path,
    forwards: list[int],
) -> None:
    hp = {**COMMON, **extra}
    spec = method_spec(
        method,
        tiny_model,
        pair_files[0],
        hyperparameters,
        hp,
        batch_size=12,
        learning_rate=1e-4,
        max_grad_norm=1e6,
        adapter={"type": "full"},
    )
    plain = run(spec, tmp_path / "rows")
    rows_forwards = len(forwards)
    forwards.clear()
    # A pair is ~12-16 tokens a side: 96 tokens hold a few pairs, not 12.
    budget = spec.model_copy(update={"resources": ResourcesSpec(max_tokens_per_batch=96)})
    cut = run(budget, tmp_path / "tokens")

    assert len(forwards) > rows_forwards  # the budget did cut the steps
    assert_same_run(plain, cut, atol=1e-6)


@pytest.mark.slow
def test_two_processes_with_a_budget_train_as_one_without(tiny_model: Path, tmp_path: Path) -> None:
    pairs = [
        {
            "prompt": f"Does {name} like tea?",
            "chosen": f" Yes, {name} likes tea.",
            "rejected": f" No, {name} hates it.",
        }
        for name in ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus"]
    ]
    spec: dict[str, Any] = {
        "method": "dpo",
        "model": str(tiny_model),
        "train_file": str(write_jsonl(tmp_path / "pairs.jsonl", pairs)),
        "seed": 0,
        "max_seq_len": 64,
        "num_threads": 1,
        "adapter": {"type": "lora", "r": 8, "alpha": 16},
        "hyperparameters": {**COMMON, "n_epochs": 2, "batch_size": 4, **DPO},
    }
    _, one, _ = run(TrainSpec.model_validate(spec), tmp_path / "one")
    # ~16 tokens a side, two rows a pair: 64 tokens hold one pair a process.
    resources = {"gpus": 2, "zero_stage": 2, "max_tokens_per_batch": 64}
    two = run_cli(tmp_path, "two", {**spec, "resources": resources}, 2)
    assert len(one.points) == len(two) >= 4
    for step, ((_, a), b) in enumerate(zip(one.points, two, strict=True), start=1):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4), step
        assert b["num_tokens"] == a["num_tokens"], step
