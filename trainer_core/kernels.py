"""Faster kernels for the same model: regional ``torch.compile`` and Liger's fused kernels.

Both are ``resources`` options (docs/methods.md, "Speed levers"): they change how a step
runs, not what it computes, so both are off by default until a GPU measurement says they
pay (issue #12).

- ``compile_layers``: ``torch.compile`` of each decoder layer, not of the whole model
  (regional compilation, as torchtune's ``compile=True`` and transformers' own
  ``layer.compile()`` advice): the layers are identical, so dynamo compiles one and reuses
  it for the rest, and the parts around them (the masks, the LM head with its
  ``logits_to_keep``, the loss) stay eager, where their shapes change from batch to batch.
  ``dynamic=None`` lets dynamo mark the sequence length dynamic after the first change, so
  length-grouped batches do not recompile at every new length.
- ``apply_liger``: liger-kernel's Triton kernels for RMSNorm, SwiGLU and RoPE. Its fused
  linear cross-entropy is left off: our loss already runs the LM head on the loss
  positions only (``logprobs.keep_positions``), and the fused loss returns no logits,
  which the log-prob methods need. Liger needs a CUDA GPU and the package; asked for
  without either, the job fails at its start with the field named (``check_liger``),
  never silently without it.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

# The test suite compiles with "aot_eager" (dynamo + AOTAutograd, no code generation): the
# same graphs as inductor, without minutes of C++ compilation on a 2-core CI machine.
COMPILE_BACKEND_ENV = "ALIGND_COMPILE_BACKEND"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the modules of the classes transformers never splits
    across devices (``_no_split_modules``: ``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...)."""
    get_base_model = getattr(model, "get_base_model", None)  # a peft model's inner model
    base: nn.Module = get_base_model() if callable(get_base_model) else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [module for module in base.modules() if type(module).__name__ in names]


def compile_layers(model: nn.Module, *, backend: str | None = None) -> int:
    """``torch.compile`` each decoder layer of ``model`` in place: how many were compiled.

    ``backend`` defaults to ``$ALIGND_COMPILE_BACKEND``, else inductor.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"resources.compile: no decoder layer found in {type(model).__name__} "
            "(its _no_split_modules names none)"
        )
    backend = backend or os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def check_liger(device: torch.device) -> None:
    """Refuse ``resources.liger`` where it cannot run: no CUDA device, or no liger-kernel."""
    if device.type != "cuda":
        raise ValueError(
            "resources.liger needs a CUDA GPU (Liger's kernels are Triton kernels); this "
            f"worker runs the job on {device.type}: drop resources.liger"
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(
            "resources.liger needs the liger-kernel package, which this worker does not have "
            "(pip install liger-kernel): drop resources.liger or install it on the worker"
        )


def apply_liger(model: nn.Module) -> None:
    """Swap ``model``'s RMSNorm, SwiGLU MLP and RoPE for Liger's kernels, in place (before the
    adapter is applied: peft then wraps the patched linears)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=model,
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )
