"""DeepSpeed's side of ``resources`` in 2 CPU processes (gloo): ZeRO-1 and ZeRO-2 with the
optimizer offloaded compute the 1-process steps, and ``precision: bf16`` under ZeRO is
DeepSpeed's own mixed precision that still saves fp32 weights.

bf16 runs cap oneDNN below AMX (see test_precision.py for why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.trainer_core.cli_run import CPU_BF16_ENV, final_adapter, run_cli

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow


@pytest.fixture
def spec(tiny_model: Path, facts_file: Path) -> dict[str, Any]:
    return {
        "method": "supervised",
        "model": str(tiny_model),
        "train_file": str(facts_file),
        "seed": 0,
        "max_seq_len": 128,
        "num_threads": 1,
        "adapter": {"type": "lora", "r": 8, "alpha": 16},
        "hyperparameters": {
            "n_epochs": 3,
            "batch_size": 4,
            "learning_rate_multiplier": 1.0,
            "learning_rate": 1e-2,
            "gradient_accumulation_steps": 1,
            "warmup_ratio": 0.0,
            "lr_scheduler": "linear",
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
        },
    }


def test_zero1_and_zero2_offload_match_one_process(spec: dict[str, Any], tmp_path: Path) -> None:
    one = run_cli(tmp_path, "one", spec, 1, env=CPU_BF16_ENV)
    zero1 = run_cli(
        tmp_path, "zero1", {**spec, "resources": {"gpus": 2, "zero_stage": 1}}, 2, env=CPU_BF16_ENV
    )
    offload = {"gpus": 2, "zero_stage": 2, "offload_optimizer": True}
    zero2_offload = run_cli(
        tmp_path, "zero2-offload", {**spec, "resources": offload}, 2, env=CPU_BF16_ENV
    )
    assert len(one) == len(zero1) == len(zero2_offload) == 6
    assert one[-1]["train_loss"] < one[0]["train_loss"] - 0.1
    for name, curve in (("zero1", zero1), ("zero2-offload", zero2_offload)):
        for step, (a, b) in enumerate(zip(one, curve, strict=True), start=1):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4), (name, step)
        for key, weight in final_adapter(tmp_path, "one").items():
            # Losses match to the 1e-4; weights to 1e-4 absolute, against up to
            # lr * steps = 6e-2 of movement: fused AdamW rounds DeepSpeed's flat partitions
            # differently from per-tensor steps, and Adam's division by each weight's own RMS
            # turns that into up to ~3e-5 on a weight whose gradient is near zero (measured).
            torch.testing.assert_close(
                final_adapter(tmp_path, name)[key], weight, rtol=1e-4, atol=1e-4
            )


def test_zero2_bf16_is_deepspeed_mixed_precision_saving_fp32(
    spec: dict[str, Any], tmp_path: Path
) -> None:
    one = run_cli(tmp_path, "one", spec, 1, env=CPU_BF16_ENV)
    bf16 = run_cli(
        tmp_path,
        "bf16",
        {**spec, "resources": {"gpus": 2, "zero_stage": 2, "precision": "bf16"}},
        2,
        env=CPU_BF16_ENV,
    )
    assert len(bf16) == 6
    assert bf16[0]["train_loss"] == pytest.approx(one[0]["train_loss"], rel=2e-2)
    assert bf16[0]["train_loss"] != one[0]["train_loss"]  # bf16 really computed
    assert bf16[-1]["train_loss"] < bf16[0]["train_loss"] - 0.1
    # The checkpoint holds DeepSpeed's fp32 master weights, not the module's bf16 copies:
    # fp32, and not all of them representable in bf16.
    weights = final_adapter(tmp_path, "bf16")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    trained = torch.cat([w.flatten() for w in weights.values()])
    assert not torch.equal(trained, trained.bfloat16().float())
