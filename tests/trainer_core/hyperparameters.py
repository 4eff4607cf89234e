"""The hyperparameters most trainer_core tests start from: one epoch of batch 4 at a constant
1e-2 with no warmup or decay, clipped at 1 (fast to learn on the tiny model)."""

from __future__ import annotations

from typing import Any

COMMON: dict[str, Any] = {
    "n_epochs": 1,
    "batch_size": 4,
    "learning_rate_multiplier": 1.0,
    "learning_rate": 1e-2,
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.0,
    "lr_scheduler": "constant",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
}
