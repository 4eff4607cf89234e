"""Optimizer parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from trainer_core.optim import build_optimizer, build_scheduler


def test_no_weight_decay_on_biases_and_norms() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)  # frozen parameters are not optimised at all

    optimizer = build_optimizer(model, learning_rate=1e-3, weight_decay=0.1)

    groups = {g["weight_decay"]: g["params"] for g in optimizer.param_groups}
    assert [p.shape for p in groups[0.1]] == [torch.Size([4, 4])]
    assert sorted(p.shape for p in groups[0.0]) == [torch.Size([4]), torch.Size([4])]


REFERENCE: dict[str, Callable[..., Any]] = {
    "linear": get_linear_schedule_with_warmup,
    "cosine": get_cosine_schedule_with_warmup,
    "constant": lambda opt, num_warmup_steps, num_training_steps: get_constant_schedule_with_warmup(
        opt, num_warmup_steps
    ),
}


@pytest.mark.parametrize("kind", sorted(REFERENCE))
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.25])
def test_schedule_matches_transformers(kind: str, warmup_ratio: float) -> None:
    def rates(make: object) -> list[float]:
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make(optimizer)  # type: ignore[operator]
        out = []
        for _ in range(10):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    ours = rates(
        lambda opt: build_scheduler(opt, kind=kind, total_steps=10, warmup_ratio=warmup_ratio)
    )
    # HF Trainer turns warmup_ratio into steps with math.ceil (TrainingArguments.get_warmup_steps).
    warmup = math.ceil(10 * warmup_ratio)
    theirs = rates(lambda opt: REFERENCE[kind](opt, num_warmup_steps=warmup, num_training_steps=10))

    assert ours == pytest.approx(theirs, abs=1e-12)
    if kind == "linear" and warmup_ratio == 0.0:
        # Hand-worked: 1, 0.9, ..., 0.1 over 10 steps.
        assert ours == pytest.approx([1 - i / 10 for i in range(10)])
