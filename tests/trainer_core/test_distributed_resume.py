"""ZeRO-3 supervised in 2 processes (gloo, CPU) runs, and its checkpoints resume under
DeepSpeed and in one process, continuing the 1-process loss curve; so do ppo's in plain data
parallelism (its value head and the optimizer state of both)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.trainer_core.cli_run import run_cli
from tests.trainer_core.test_distributed_methods import ppo_spec

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow


def rows() -> str:
    lines = []
    for i in range(48):
        a, b = i % 7 + 1, i % 5 + 2
        lines.append(json.dumps({"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}."}))
    return "\n".join(lines) + "\n"


def test_zero3_supervised_runs_and_resumes(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "train.jsonl").write_text(rows())
    spec: dict[str, Any] = {
        "method": "supervised",
        "model": str(tiny_model),
        "train_file": str(tmp_path / "train.jsonl"),
        "seed": 3,
        "max_seq_len": 64,
        "adapter": {"type": "lora", "r": 4, "alpha": 8},
        "num_threads": 1,
        "checkpoint_every": 3,
        "hyperparameters": {
            "n_epochs": 1,
            "batch_size": 4,
            "learning_rate_multiplier": 1.0,
            "learning_rate": 2e-3,
            "gradient_accumulation_steps": 2,
            "warmup_ratio": 0.0,
            "lr_scheduler": "linear",
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "packing": False,
            "completion_only_loss": True,
            "assistant_only_loss": False,
        },
    }
    zero3 = {"gpus": 2, "zero_stage": 3}
    one = {p["step"]: p for p in run_cli(tmp_path, "one", spec, 1)}
    assert len(one) == 6
    sharded = run_cli(tmp_path, "z3", {**spec, "resources": zero3}, 2)
    resumed_here = run_cli(
        tmp_path,
        "z3-resumed-z3",
        {**spec, "resources": zero3, "resume_from": str(tmp_path / "out-z3" / "step-3")},
        2,
    )
    resumed_single = run_cli(
        tmp_path, "z3-resumed-one", {**spec, "resume_from": str(tmp_path / "out-z3" / "step-3")}, 1
    )
    assert [p["step"] for p in sharded] == list(range(1, 7))
    assert [p["step"] for p in resumed_here] == [p["step"] for p in resumed_single] == [4, 5, 6]
    for point in [*sharded, *resumed_here, *resumed_single]:
        expected = one[point["step"]]
        for key in ("train_loss", "grad_norm", "learning_rate"):
            assert point[key] == pytest.approx(expected[key], rel=1e-4), (point["step"], key)
    # The adapter a ZeRO-3 run saved is the plain PEFT folder.
    assert (tmp_path / "out-z3" / "final" / "adapter" / "adapter_config.json").is_file()


def test_ppo_in_two_processes_resumes(tmp_path: Path, tiny_model: Path) -> None:
    spec = {**ppo_spec(tiny_model, tmp_path), "checkpoint_every": 3}
    two = {"gpus": 2, "zero_stage": 0}
    one = {p["step"]: p for p in run_cli(tmp_path, "one", spec, 1)}
    assert len(one) == 6
    run_cli(tmp_path, "dp", {**spec, "resources": two}, 2)
    # A step-3 checkpoint holds the value head beside the optimizer (state/).
    assert (tmp_path / "out-dp" / "step-3" / "state" / "value_head.safetensors").is_file()
    checkpoint = str(tmp_path / "out-dp" / "step-3")
    resumed_here = run_cli(
        tmp_path, "dp-resumed-dp", {**spec, "resources": two, "resume_from": checkpoint}, 2
    )
    resumed_single = run_cli(tmp_path, "dp-resumed-one", {**spec, "resume_from": checkpoint}, 1)
    assert [p["step"] for p in resumed_here] == [p["step"] for p in resumed_single] == [4, 5, 6]
    for point in [*resumed_here, *resumed_single]:
        expected = one[point["step"]]
        # loss/value: the head went on from where the checkpoint left it, not from zero.
        for key in ("train_loss", "grad_norm", "loss/value", "objective/scores"):
            assert point[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), (
                point["step"],
                key,
            )
