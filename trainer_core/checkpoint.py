"""Checkpoint folders: what was trained (``adapter/``) and how to go on from here (``state/``).

::

    checkpoint-<step>/
      adapter/   PEFT folder under LoRA, full model folder otherwise (adapters.save_adapter)
      state/     optimizer.pt, scheduler.pt, rng.pt, trainer_state.json

A checkpoint is written into a fresh temporary folder and only then handed to the
``CheckpointStore``, so the store never sees half a checkpoint. ``load_state`` reads
``state/`` back; resuming from it is for a later issue, and everything it needs is here: the
epoch order is a function of (seed, epoch), so ``steps_in_epoch`` says where to pick up.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer_core.adapters import save_adapter
from trainer_core.seams import CheckpointStore


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimizer steps taken
    epoch: int  # the epoch in progress (0-based); n_epochs once training is done
    steps_in_epoch: int  # optimizer steps of ``epoch`` already taken
    seed: int
    total_steps: int
    num_tokens: int  # counted (loss) tokens so far
    trained_tokens: int  # non-padding tokens so far


@dataclass(frozen=True)
class LoadedState:
    trainer: TrainerState
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_state(
    folder: Path,
    *,
    trainer: TrainerState,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save(rng_state(), folder / "rng.pt")
    (folder / "trainer_state.json").write_text(json.dumps(asdict(trainer), indent=2) + "\n")


def load_state(folder: Path) -> LoadedState:
    """Read a checkpoint's ``state/`` folder (pass the folder itself)."""
    trainer = TrainerState(**json.loads((folder / "trainer_state.json").read_text()))
    # Python's RNG state is a tuple of ints, which weights_only loading accepts.
    return LoadedState(
        trainer=trainer,
        optimizer=torch.load(folder / "optimizer.pt", weights_only=True),
        scheduler=torch.load(folder / "scheduler.pt", weights_only=True),
        rng=torch.load(folder / "rng.pt", weights_only=True),
    )


def save_checkpoint(
    store: CheckpointStore,
    *,
    model: nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer: TrainerState,
    metrics: Mapping[str, float],
    final: bool,
) -> None:
    """Write a checkpoint of the current step and hand it to ``store``."""
    tmp = Path(tempfile.mkdtemp(prefix="alignd-checkpoint-"))
    try:
        folder = tmp / f"checkpoint-{trainer.step}"
        save_adapter(model, tokenizer, folder / "adapter")
        write_state(folder / "state", trainer=trainer, optimizer=optimizer, scheduler=scheduler)
        store.save(trainer.step, folder, metrics, final=final)
    finally:
        # The store moved or copied the folder; whatever is left is ours to clean.
        shutil.rmtree(tmp, ignore_errors=True)
