"""Take docs/dashboard.png, the README's picture of the dashboard's job page (`make screenshot`).

Starts the embedded `alignd serve` (SQLite, embedded worker) in a fresh temporary data dir with
the tiny model, trains a small supervised job with a validation file to its end, opens the
job's page in headless Debian Chromium (the one the browser tests use) and saves the picture.
Nothing is downloaded: the model is built locally, the data is the demo's.

    python docs/screenshot.py docs/dashboard.png
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from alignd.demo import make_dataset
from alignd.processes import free_port, start_alignd, stop_process_group, wait_healthy
from trainer_core.tiny_models import create_tiny_model

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def jsonl(rows: int, seed: int) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in make_dataset(rows, seed=seed)).encode()


def train_a_job(http: httpx.Client) -> str:
    def upload(name: str, data: bytes) -> str:
        response = http.post("files", data={"purpose": "fine-tune"}, files={"file": (name, data)})
        response.raise_for_status()
        return str(response.json()["id"])

    train, valid = upload("train.jsonl", jsonl(64, 1)), upload("valid.jsonl", jsonl(16, 2))
    response = http.post(
        "fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": train,
            "validation_file": valid,
            "suffix": "demo",
            "seed": 7,
            "method": {
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {
                        "n_epochs": 3,
                        "batch_size": 4,
                        "learning_rate_multiplier": 50,
                    }
                },
            },
            "adapter": {"type": "lora", "r": 8, "alpha": 16},
            "max_seq_len": 128,
        },
    )
    response.raise_for_status()
    job_id = str(response.json()["id"])
    deadline = time.monotonic() + 600
    while (status := http.get(f"fine_tuning/jobs/{job_id}").json()["status"]) not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{job_id} did not finish")
        time.sleep(1)
    if status != "succeeded":
        raise RuntimeError(f"{job_id} ended {status}")
    return job_id


def main(out: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="alignd-screenshot-") as tmp:
        data_dir, models_dir = Path(tmp) / "data", Path(tmp) / "models"
        create_tiny_model(models_dir / "tiny", size="tiny", seed=0)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "ALIGND_DATA_DIR": str(data_dir),
            "ALIGND_MODELS_DIR": str(models_dir),
            "ALIGND_TORCH_THREADS": "1",
        }
        for name in ("ALIGND_DATABASE_URL", "ALIGND_BROKER_URL"):
            env.pop(name, None)  # the embedded default, whatever this shell has set
        server = start_alignd(
            ["serve", "--port", str(port), "--log-level", "warning"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(base, server)
            key = (data_dir / "api_key").read_text().strip()
            with httpx.Client(
                base_url=f"{base}/v1/", headers={"Authorization": f"Bearer {key}"}, timeout=30
            ) as http:
                job_id = train_a_job(http)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1200, "height": 1000})
                page.goto(f"{base}/#/jobs/{job_id}")
                page.fill("#api-key", key)
                page.click("#sign-in button[type=submit]")
                page.wait_for_selector("#job-status.succeeded")
                page.wait_for_selector('figure.chart[data-metric="loss"]')
                page.wait_for_selector("#checkpoints table")
                page.wait_for_timeout(1000)  # the last frame of the charts
                page.screenshot(path=str(out))
                browser.close()
        finally:
            stop_process_group(server, grace_s=30)
    print(f"{out}: {out.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png")))
