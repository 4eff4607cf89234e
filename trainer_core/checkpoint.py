"""Checkpoint folders: what was trained (``adapter/``) and how to go on from here (``state/``).

::

    checkpoint-<step>/
      adapter/   PEFT folder under LoRA, full model folder otherwise (adapters.save_adapter)
      state/     optimizer.pt, scheduler.pt, rng.pt, trainer_state.json

A checkpoint is written into a fresh temporary folder and only then handed to the
``CheckpointStore``, so the store never sees half a checkpoint. ``resume`` puts a
run back where a checkpoint left it: the trained weights, the optimizer and scheduler, the
RNG, and the position (the epoch order is a function of (seed, epoch), so ``epoch`` and
``steps_in_epoch`` say where to pick up). A method calls it once, after building its model,
optimizer and scheduler, and skips the optimizer steps ``already_done`` says were taken.
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

from trainer_core import distributed
from trainer_core.adapters import save_adapter
from trainer_core.distributed import Distributed
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
    optimizer: Mapping[str, Any],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Write ``state/``; ``optimizer`` is a state_dict in torch AdamW's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(dict(optimizer), folder / "optimizer.pt")
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
    dist: Distributed | None = None,
) -> None:
    """Write a checkpoint of the current step and hand it to ``store``.

    Under DeepSpeed every rank calls this (gathering the optimizer's partitions and ZeRO-3's
    parameters are collectives); rank 0 alone writes, in the single-process format.
    """
    d = dist or Distributed()
    optimizer_state = distributed.optimizer_state(
        d, optimizer, trainer.step, float(scheduler.get_last_lr()[0])
    )
    with distributed.gathered(d, model):
        if d.is_main:
            tmp = Path(tempfile.mkdtemp(prefix="alignd-checkpoint-"))
            try:
                folder = tmp / f"checkpoint-{trainer.step}"
                save_adapter(model, tokenizer, folder / "adapter")
                write_state(
                    folder / "state",
                    trainer=trainer,
                    optimizer=optimizer_state,
                    scheduler=scheduler,
                )
                store.save(trainer.step, folder, metrics, final=final)
            finally:
                # The store moved or copied the folder; whatever is left is ours to clean.
                shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier(d)


def load_weights(model: nn.Module, adapter_dir: Path) -> None:
    """Load a checkpoint's ``adapter/`` weights into the model being trained."""
    from safetensors.torch import load_file

    if (adapter_dir / "adapter_config.json").is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(
            model, load_file(adapter_dir / "adapter_model.safetensors")
        )
        unexpected: list[str] = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ValueError(f"checkpoint adapter does not fit the model: {unexpected[:3]}")
        return
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(adapter_dir.glob("*.safetensors")):
        weights.update(load_file(shard))
    if not weights:
        raise ValueError(f"no weights in checkpoint folder {adapter_dir}")
    # Missing keys are allowed: tied weights (an output head that is the embedding) are saved once.
    _missing, extra = model.load_state_dict(weights, strict=False)
    if extra:
        raise ValueError(f"checkpoint weights do not fit the model: {extra[:3]}")


def resume(
    folder: str | Path | None,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainerState | None:
    """Put weights, optimizer, scheduler and RNG back as the checkpoint in ``folder`` left them.

    Returns where the run was (None when there is nothing to resume). Call it last in the
    set-up, so that nothing draws from the restored RNG before the training loop does.
    """
    if folder is None:
        return None
    folder = Path(folder)
    load_weights(model, folder / "adapter")
    state = load_state(folder / "state")
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    restore_rng(state.rng)
    return state.trainer


def reload_after_wrap(d: Distributed, folder: str | Path | None) -> None:
    """Under DeepSpeed, put the optimizer state of the checkpoint that ``resume`` loaded back
    into the engine's partitions (``distributed.wrap`` rebuilt them), and the RNG after it."""
    if folder is None or d.engine is None:
        return
    state = load_state(Path(folder) / "state")
    distributed.load_optimizer_state(d, d.engine.optimizer, state.optimizer)
    restore_rng(state.rng)


def already_done(start: TrainerState | None, epoch: int, steps_in_epoch: int) -> bool:
    """Whether the optimizer step at (epoch, steps_in_epoch) was taken before the resume."""
    return start is not None and (epoch, steps_in_epoch) < (start.epoch, start.steps_in_epoch)
