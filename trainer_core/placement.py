"""Where a rank computes and in what precision: the job's device, mixed precision, and
gradient checkpointing (the ``resources`` fields that shape a forward pass).

- **Device.** ``cuda:<LOCAL_RANK>`` when CUDA is available (the launcher pins the job's GPUs
  with ``CUDA_VISIBLE_DEVICES``, so local rank N is the job's N-th GPU), else the CPU. A
  method moves its models and every batch there (``Placement.to``) and brings back to the CPU
  only what it reports. On the CPU every move is a no-op, so CPU runs compute what they did.
- **Precision.** ``bf16``/``fp16`` are mixed precision as TRL/accelerate run it: the weights
  and AdamW's state stay fp32 (so a saved adapter is fp32), the forward pass and the loss run
  under ``torch.autocast``; the backward follows the forward's dtypes. fp16 also scales the
  loss (``torch.amp.GradScaler``) so that small gradients do not underflow; it needs CUDA
  (CPU autocast is bf16-only in practice, and the workers' registry offers fp16 on GPUs
  only), so it is refused on a CPU. Under DeepSpeed, see ``distributed.deepspeed_config``.
- **Gradient checkpointing.** transformers' own, non-reentrant (``use_reentrant=False``,
  what torch recommends and what works with frozen inputs such as LoRA's base embeddings),
  switched on on the base model before the adapter wraps it. Dropout is off or fixed by the
  RNG state the checkpoint restores, so a recomputed forward equals the first one.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from trainer_core.kernels import check_liger
from trainer_core.specs import ResourcesSpec

T = TypeVar("T")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` (LOCAL_RANK defaults to 0) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """A run's device and precision; one per run (``place``)."""

    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.precision)

    def autocast(self) -> AbstractContextManager[Any]:
        """The context of a forward pass and its loss: autocast under bf16/fp16, else nothing."""
        dtype = self.autocast_dtype
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh loss scaler for fp16 (None otherwise): one per run, it keeps the scale."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def to(self, value: T) -> T:
        """``value`` with its tensors on the device: a tensor, a dataclass (a batch) whose
        tensor (and dataclass) fields move, or a tuple of these; anything else is returned as it is."""
        return to_device(value, self.device)

    def model(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device (in place; returned for chaining)."""
        return model.to(self.device)


def place(resources: ResourcesSpec) -> Placement:
    """The placement of this process's share of a job with these ``resources``."""
    device = local_device()
    if device.type == "cuda":
        # Every CUDA call of this process (nccl's included) goes to its own GPU.
        torch.cuda.set_device(device)
    if resources.precision == "fp16" and device.type != "cuda":
        raise ValueError(
            "precision fp16 needs a CUDA GPU (loss scaling of fp16 autocast); this worker has "
            "none: use bf16 or fp32 on a CPU worker"
        )
    if resources.liger:
        check_liger(device)
    return Placement(device, resources.precision)


def deterministic_algorithms(resources: ResourcesSpec, device: torch.device | None = None) -> bool:
    """Whether the job runs torch's deterministic algorithms on ``device`` (this process's,
    by default): ``resources.deterministic`` when the job says, else on on the CPU (every op
    we use there is deterministic anyway: free) and off on CUDA, where they cost ~17% of a
    step (issue #12: supervised LoRA on an H200, 7.9k vs 12.8k tok/s with them off)."""
    if resources.deterministic is not None:
        return resources.deterministic
    return (device or local_device()).type == "cpu"


def to_device(value: T, device: torch.device) -> T:
    """``value`` with its tensors moved to ``device`` (see ``Placement.to``)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)  # type: ignore[return-value]
    if isinstance(value, tuple):
        return tuple(to_device(item, device) for item in value)  # type: ignore[return-value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {
            f.name: to_device(getattr(value, f.name), device)
            for f in dataclasses.fields(value)
            if isinstance(getattr(value, f.name), torch.Tensor)
            or dataclasses.is_dataclass(getattr(value, f.name))
        }
        if not moved:
            return value
        return dataclasses.replace(value, **moved)  # type: ignore[type-var]
    return value


def enable_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute activations in the backward pass instead of keeping them (``resources.
    gradient_checkpointing``); call on the base model, before the adapter."""
    if not enabled:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    # transformers 5's name for it (``gradient_checkpointing_enable`` is its deprecated alias).
    model.activation_checkpointing_enable(  # type: ignore[operator]
        activation_checkpointing_kwargs={"use_reentrant": False}
    )


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """``loss.backward()``, of the scaled loss under fp16 (``optim.optimizer_step`` unscales)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()
