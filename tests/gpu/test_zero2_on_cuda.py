"""One DeepSpeed ZeRO-2 run on one GPU, launched as the worker launches a distributed job
(a fresh process under a rank's environment), in bf16 with LoRA: finite losses, and the
peak GPU memory its rank reports (none on the CPU, so a run that fell back fails)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_core.conftest import fact_rows, write_jsonl
from tests.trainer_core.hyperparameters import COMMON

pytest.importorskip("deepspeed")


def test_zero2_supervised_lora_bf16_on_one_gpu(tiny_model: Path, tmp_path: Path) -> None:
    spec = {
        "method": "supervised",
        "model": str(tiny_model),
        "train_file": str(write_jsonl(tmp_path / "facts.jsonl", fact_rows(repeat=2))),
        "seed": 0,
        "max_seq_len": 96,
        "adapter": {"type": "lora", "r": 8, "alpha": 16},
        "hyperparameters": {**COMMON, "batch_size": 2, "learning_rate": 1e-3},
        "resources": {"gpus": 1, "zero_stage": 2, "precision": "bf16"},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    command = [
        sys.executable,
        *("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"),
        *("-m", "trainer_core", "run", str(tmp_path / "spec.json")),
        *("--output", str(tmp_path / "out"), "--metrics", str(tmp_path / "metrics.json")),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    points = json.loads((tmp_path / "metrics.json").read_text())
    assert len(points) == 4  # 8 rows, batch 2
    for point in points:
        assert math.isfinite(point["train_loss"]), point
        assert point["peak_gpu_memory_gib"] > 0, point
    assert (tmp_path / "out" / "final" / "adapter" / "adapter_model.safetensors").exists()
