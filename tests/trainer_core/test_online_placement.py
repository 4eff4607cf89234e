"""The online methods (grpo, rloo, ppo) honour the ``resources`` that shape a forward pass:
bf16 runs train under autocast (their training forwards give bf16 logits) with finite losses,
LoRA and full fine-tuning alike, and gradient checkpointing changes no loss.

bf16 runs go through ``autocast_probe`` in a fresh process (``CPU_BF16_ENV``: oneDNN's AMX
kernels die of SIGILL on this VM; see test_precision.py). On the CPU the device is the CPU,
so these check the one code path a GPU worker runs, less the moves.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import trainer_core
from tests.trainer_core.cli_run import CPU_BF16_ENV
from tests.trainer_core.conftest import LENGTH_REWARD, method_spec
from tests.trainer_core.hyperparameters import COMMON
from trainer_core.seams import FolderCheckpointStore, ListSink
from trainer_core.specs import (
    GrpoHyperparameters,
    PpoHyperparameters,
    ResourcesSpec,
    RlooHyperparameters,
    TrainSpec,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning"),
]

SAMPLING = {"max_completion_length": 8, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
HYPERPARAMETERS: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "grpo": (
        GrpoHyperparameters,
        {
            **SAMPLING,
            "num_generations": 2,
            "epsilon": 0.2,
            "epsilon_high": None,
            "beta": 0.04,
            "scale_rewards": "group",
            "loss_type": "bnpo",
            "num_iterations": 2,
            "mask_truncated_completions": False,
        },
    ),
    "rloo": (
        RlooHyperparameters,
        {
            **SAMPLING,
            "num_generations": 2,
            "epsilon": 0.2,
            "beta": 0.05,
            "normalize_advantages": False,
            "num_iterations": 1,
        },
    ),
    "ppo": (
        PpoHyperparameters,
        {
            **SAMPLING,
            "num_ppo_epochs": 2,
            "gamma": 1.0,
            "lam": 0.95,
            "cliprange": 0.2,
            "cliprange_value": 0.2,
            "vf_coef": 0.1,
            "kl_coef": 0.05,
            "whiten_rewards": False,
            "missing_eos_penalty": None,
        },
    ),
}


def online_spec(
    method: str, tiny_model: Path, prompts_file: Path, adapter: str, **resources: Any
) -> TrainSpec:
    """Two rollouts of 4 prompts, accumulated over 2 micro-batches; ppo scores with the tiny
    model as an (untrained) reward model, grpo and rloo with a length reward."""
    kind, hp = HYPERPARAMETERS[method]
    scoring: dict[str, Any] = (
        {"reward_model": "rm", "reward_models": {"rm": {"base": str(tiny_model)}}}
        if method == "ppo"
        else {"reward_functions": [LENGTH_REWARD]}
    )
    return method_spec(
        method,
        tiny_model,
        prompts_file,
        kind,
        {**COMMON, "gradient_accumulation_steps": 2, **hp},
        adapter={"type": adapter, "r": 8, "alpha": 16} if adapter == "lora" else {"type": "full"},
        resources=ResourcesSpec(**resources),
        **scoring,
    )


@pytest.mark.parametrize("adapter", ["lora", "full"])
@pytest.mark.parametrize("method", ["grpo", "rloo", "ppo"])
def test_bf16_trains_under_autocast_with_finite_losses(
    method: str, adapter: str, tiny_model: Path, prompts_file: Path, tmp_path: Path
) -> None:
    spec = online_spec(method, tiny_model, prompts_file, adapter, precision="bf16")
    spec_path, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(spec.model_dump_json())
    done = subprocess.run(
        [sys.executable, "-m", "tests.trainer_core.autocast_probe", str(spec_path), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **CPU_BF16_ENV},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    # Every forward with grad (the training ones) and without (sampling, old and reference
    # log-probs, the reward model) ran under bf16 autocast.
    assert result["linear"] == {"grad": ["torch.bfloat16"], "no_grad": ["torch.bfloat16"]}
    points = result["points"]
    assert len(points) >= 2
    for point in points:
        assert math.isfinite(point["train_loss"]), point
        assert math.isfinite(point["grad_norm"]), point


@pytest.mark.parametrize(("method", "adapter"), [("grpo", "lora"), ("ppo", "full")])
def test_gradient_checkpointing_changes_no_loss(
    method: str, adapter: str, tiny_model: Path, prompts_file: Path, tmp_path: Path
) -> None:
    losses = {}
    for checkpointing in (False, True):
        spec = online_spec(
            method, tiny_model, prompts_file, adapter, gradient_checkpointing=checkpointing
        )
        sink = ListSink()
        trainer_core.run(spec, sink, FolderCheckpointStore(tmp_path / str(checkpointing)))
        losses[checkpointing] = [values["train_loss"] for _, values in sink.points]
    assert len(losses[False]) >= 2
    assert any(abs(loss) > 1e-4 for loss in losses[False])  # not a run of zeros
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-7)
