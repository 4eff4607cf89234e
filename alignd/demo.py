"""``alignd demo``: a real supervised LoRA fine-tune through the whole embedded service.

Creates the tiny model if it is missing, starts ``alignd serve`` (API + embedded worker) on a
free port, uploads a generated chat dataset, creates the job over HTTP, follows its events
with a progress bar, downloads and unpacks the adapter, and stops the server. Exits 0 only
if the job succeeded.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alignd.client import Client
from alignd.processes import free_port, start_alignd, stop_process_group, wait_healthy

TERMINAL = ("succeeded", "failed", "cancelled")
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "hen", "ant"]


def make_dataset(n: int, seed: int) -> list[dict[str, Any]]:
    """Small chat rows with a learnable rule: the answer restates the question's parts."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        color, animal = rng.choice(COLORS), rng.choice(ANIMALS)
        count = rng.randint(2, 9)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You answer in one short sentence."},
                    {
                        "role": "user",
                        "content": f"How many {color} {animal}s are there? I see {count}.",
                    },
                    {"role": "assistant", "content": f"There are {count} {color} {animal}s."},
                ]
            }
        )
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def follow(client: Client, job_id: str, timeout_s: float = 1800) -> dict[str, Any]:
    """Print a job's events as they come, with a progress bar; return the terminal job."""
    seen: set[str] = set()
    bar: tqdm[Any] | None = None
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = client.get(f"fine_tuning/jobs/{job_id}")
    while time.monotonic() < deadline:
        job = client.get(f"fine_tuning/jobs/{job_id}")
        events = client.get(f"fine_tuning/jobs/{job_id}/events", limit=100)["data"]
        for event in reversed(events):  # the API lists newest first
            if event["id"] in seen:
                continue
            seen.add(event["id"])
            if event["type"] != "metrics":
                (bar.write if bar else print)(f"  [{event['level']}] {event['message']}")
        progress = job.get("progress")
        if progress and bar is None:
            bar = tqdm(total=progress["total_steps"], desc="training", unit="step", file=sys.stdout)
        if progress and bar is not None:
            bar.update(progress["step"] - bar.n)
        if job["status"] in TERMINAL:
            break
        time.sleep(0.5)
    if bar is not None:
        bar.close()
    return job


def metric_trail(client: Client, job_id: str) -> list[dict[str, Any]]:
    """The job's metrics events, oldest first."""
    events = client.get(f"fine_tuning/jobs/{job_id}/events", limit=1000)["data"]
    return [
        e["data"] for e in reversed(events) if e["type"] == "metrics" and "train_loss" in e["data"]
    ]


def run_demo(*, port: int = 0, model: str = "tiny-chat") -> int:
    from api.keys import read_key_file
    from api.settings import load_settings

    settings = load_settings()
    model_dir = settings.resolved_models_dir / model
    if not (model_dir / "config.json").is_file():
        from trainer_core.tiny_models import create_tiny_model

        print(f"creating the tiny model {model_dir} ...")
        create_tiny_model(model_dir, size="tiny", seed=0)

    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ALIGND_DATA_DIR": str(settings.data_dir)}
    log_path = settings.data_dir / "demo" / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting alignd serve on {base} (data in {settings.data_dir}, log in {log_path}) ...")
    with open(log_path, "ab") as log:
        server = start_alignd(
            ["serve", "--port", str(port), "--log-level", "warning"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(base, server)
        # The embedded `serve` wrote its key for owner "local" before it started listening.
        api_key = read_key_file(settings.api_key_file) if settings.embedded_database else None
        client = Client(f"{base}/v1", api_key=api_key)
        data_dir = settings.data_dir / "demo"
        train = client.upload(write_jsonl(make_dataset(96, seed=1), data_dir / "train.jsonl"))
        valid = client.upload(write_jsonl(make_dataset(16, seed=2), data_dir / "valid.jsonl"))
        print(
            f"uploaded {train['id']} ({train['num_examples']} examples, {train['status']}) and {valid['id']}"
        )
        job = client.post(
            "fine_tuning/jobs",
            {
                "model": model,
                "training_file": train["id"],
                "validation_file": valid["id"],
                "suffix": "demo",
                "seed": 7,
                "method": {
                    "type": "supervised",
                    # A tiny random model needs a far larger step than a pretrained
                    # one: 50 x the LoRA base rate of 2e-4.
                    "supervised": {
                        "hyperparameters": {
                            "n_epochs": 3,
                            "batch_size": 8,
                            "learning_rate_multiplier": 50,
                        }
                    },
                },
                "adapter": {"type": "lora", "r": 8, "alpha": 16},
                "max_seq_len": 128,
            },
        )
        print(f"created {job['id']} ({job['status']})")
        job = follow(client, job["id"])
        trail = metric_trail(client, job["id"])
        adapter_dir = None
        if job["status"] == "succeeded":
            adapter_dir = client.download_adapter(job["id"], data_dir / "adapters" / job["id"])
        print()
        print(f"job:            {job['id']}")
        print(f"status:         {job['status']}")
        if trail:
            first, last = trail[0], trail[-1]
            print(f"last train loss: {last['train_loss']:.4f}")
            print(
                f"learning:       train loss {first['train_loss']:.3f} -> {last['train_loss']:.3f}, "
                f"token accuracy {first['train_mean_token_accuracy']:.2f} -> "
                f"{last['train_mean_token_accuracy']:.2f}"
            )
        print(f"fine-tuned:     {job['fine_tuned_model']}")
        print(f"adapter folder: {adapter_dir}")
        if job.get("error"):
            print(f"error:          {job['error']}")
        return 0 if job["status"] == "succeeded" else 1
    finally:
        stop_process_group(server, grace_s=30)
