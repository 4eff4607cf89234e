"""Training through ``python -m trainer_core run`` in fresh processes, as a worker launches it:
one process, or ``ranks`` under ``torch.distributed.run`` (gloo on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

# bf16 matmuls SIGILL on this VM unless oneDNN stays below AMX (see test_precision.py).
CPU_BF16_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}


def run_cli(
    tmp: Path, name: str, spec: dict[str, Any], ranks: int = 1, env: dict[str, str] | None = None
) -> list[dict[str, float]]:
    """Run ``spec`` in ``ranks`` fresh processes (``env`` added to theirs); the metric points,
    and ``tmp/out-<name>`` holds the checkpoints."""
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    entry = ["-m", "trainer_core", "run", str(path), "--output", str(tmp / f"out-{name}")]
    entry += ["--metrics", str(tmp / f"m-{name}.json")]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command = [sys.executable, *(launcher if ranks > 1 else []), *entry]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    points: list[dict[str, float]] = json.loads((tmp / f"m-{name}.json").read_text())
    return points


def final_adapter(tmp: Path, name: str) -> dict[str, torch.Tensor]:
    """The LoRA weights of run ``name``'s final checkpoint."""
    return load_file(tmp / f"out-{name}" / "final" / "adapter" / "adapter_model.safetensors")
