"""The embedded default end to end, exactly as `make demo` runs it: SQLite, the filesystem
broker, `alignd serve` with its embedded worker process, a real LoRA job, the adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_a_job_to_success_on_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env.update(
        {
            "ALIGND_DATA_DIR": str(tmp_path / "var"),
            "ALIGND_TORCH_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "alignd", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    lines = {
        line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
        for line in done.stdout.splitlines()
        if ":" in line
    }
    assert lines["status"] == "succeeded", out[-4000:]
    assert float(lines["last train loss"]) > 0
    adapter = Path(lines["adapter folder"])
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    # Everything lived under the data dir: SQLite, the broker folder, artifacts, the model.
    var = tmp_path / "var"
    assert (var / "alignd.db").is_file()
    assert (var / "broker" / "queue").is_dir()
    assert (var / "models" / "tiny-chat" / "config.json").is_file()
    assert any((var / "artifacts" / "jobs").iterdir())
