"""AdamW and the learning-rate schedule (warmup, then linear, cosine or constant).

The schedule matches transformers' ``get_*_schedule_with_warmup`` step for step (including
its warmup starting at 0), so learning-rate curves compare directly with TRL runs. Gradient
clipping is the method's business, not the optimizer's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# progress through the decay phase, in [0, 1] -> multiplier of the base learning rate
DECAYS: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: max(0.0, 1.0 - progress),
    "cosine": lambda progress: max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress))),
    "constant": lambda progress: 1.0,
}


def build_optimizer(
    model: nn.Module, *, learning_rate: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights.

    Decaying a norm's gain or a bias towards zero regularises nothing useful and hurts; the
    usual rule (GPT-2, HF Trainer) is to decay only matrices, i.e. tensors with ndim >= 2.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [
        {"params": params, "weight_decay": wd}
        for params, wd in ((decay, weight_decay), (no_decay, 0.0))
        if params
    ]
    # fused: one kernel over every tensor per step instead of ~10 per tensor (TRL's default too).
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=True)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: str, total_steps: int, warmup_ratio: float
) -> LambdaLR:
    """Linear warmup over ``ceil(warmup_ratio * total_steps)`` steps, then ``DECAYS[kind]``."""
    decay = DECAYS[kind]
    warmup = warmup_steps(total_steps, warmup_ratio)

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return decay((step - warmup) / max(1, total_steps - warmup))

    return LambdaLR(optimizer, multiplier)


def optimizer_step(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, float]:
    """Clip, step, advance the schedule and clear the gradients: one optimizer step.

    Returns the gradient norm before clipping and the learning rate the step used (the
    schedule's rate before it advances, which is the one to log against this step).

    With fp16's ``scaler`` the gradients are unscaled before clipping (the norm is the true
    one); a step whose gradients overflowed is skipped, and so is its schedule step, as
    accelerate does, so that the schedule counts the steps actually taken.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    learning_rate = float(scheduler.get_last_lr()[0])
    if scaler is None:
        optimizer.step()
        scheduler.step()
    else:
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped when a gradient is inf/nan
        scaler.update()  # halves the scale after an overflow
        if scaler.get_scale() >= scale:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, learning_rate
