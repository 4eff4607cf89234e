"""LoRA linear layers computed as one matmul with the merged weight ``W + s·B·A``.

peft computes a LoRA layer as ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ``: besides the base matmul, a rank-r
matmul whose output is as large as the layer's (tokens × out), a pass multiplying it by
``s``, a pass adding it to the base output, and in the backward the same again plus a second
gradient for ``x`` that is added to the first. On a CPU those full-size passes over memory
cost about as much as the rank-r arithmetic is cheap: measured on the 30M tiny model, they
made a LoRA step barely faster than a full fine-tuning step.

Here the forward forms ``W_eff = W + s·B·A`` (out × in, once per call) and computes
``x·W_effᵀ``; the backward gives ``x`` its gradient through ``W_eff`` in one matmul and ``A``
and ``B`` theirs from rank-r products. The result is the same function up to fp32 rounding
(tests/trainer_core/test_lora_matmul.py), and where ``B`` is zero (a fresh adapter) it is
exactly the base layer, so a policy at initialisation equals its reference bit for bit.

Forming ``W_eff`` costs about ``in·out·(r + 1)``; it pays off when the call has more tokens
than ``in·out / (in + out)`` (a training batch: thousands; a generation step: a few), so
smaller calls without grad (a training forward always takes it: every rank must build the
same graph for ZeRO-2), and every case this does not cover, keep peft's own forward: adapters
disabled or merged, several or mixed adapters, DoRA and other variants, active dropout, a
bias on B, a trainable base weight, autocast, ZeRO-3's partitioned weights.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn


class _MergedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return F.linear(x, torch.addmm(weight, lora_b, lora_a, alpha=scaling), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dy = grad.reshape(-1, grad.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        dx = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ torch.addmm(weight, lora_b, lora_a, alpha=s)).view(x.shape)
        if ctx.needs_input_grad[3]:
            grad_a = (dy @ lora_b).t() @ rows * s  # (r × in)
        if ctx.needs_input_grad[4]:
            grad_b = dy.t() @ (rows @ lora_a.t()) * s  # (out × r)
        return dx, None, None, grad_a, grad_b, None


def merged_is_cheaper(tokens: int, in_features: int, out_features: int) -> bool:
    """Whether forming ``W + s·B·A`` costs less than peft's full-size passes for ``tokens``."""
    return tokens * (in_features + out_features) >= in_features * out_features


def _fast_path(
    layer: LoraLinear, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``(weight, bias, A, B, scaling)`` when the merged matmul computes this call, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in layer.lora_variant:
        return None
    name = active[0]
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    dropout = layer.lora_dropout[name]
    if not isinstance(base, nn.Linear) or lora_b.bias is not None:
        return None
    # Dropout that drops nothing: none, p = 0 (DPO's disable_dropout), or eval mode.
    if not (isinstance(dropout, nn.Identity) or dropout.p == 0 or not dropout.training):
        return None
    weight = base.weight
    if weight.requires_grad or hasattr(weight, "ds_id") or weight.dim() != 2:
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    if x.dtype != weight.dtype or lora_a.weight.dtype != weight.dtype:
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    # Size decides only calls without grad (generation, scoring). A training forward always
    # takes the merged path: every rank of a job must build the same graph, since ZeRO-2
    # reduces gradients in the order they become ready, and a rank's share of a micro-batch
    # can fall on either side of the threshold (measured: 2-vs-1-row shares diverged).
    if not torch.is_grad_enabled() and not merged_is_cheaper(
        x.numel() // x.shape[-1], weight.shape[1], weight.shape[0]
    ):
        return None
    return weight, base.bias, lora_a.weight, lora_b.weight, float(layer.scaling[name])


def _forward(layer: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    fast = _fast_path(layer, x, args, kwargs)
    if fast is None:
        return LoraLinear.forward(layer, x, *args, **kwargs)
    weight, bias, lora_a, lora_b, scaling = fast
    out: torch.Tensor = _MergedLoraLinear.apply(x, weight, bias, lora_a, lora_b, scaling)
    return out


def install(model: nn.Module) -> int:
    """Route every peft LoRA linear layer of ``model`` through the merged matmul when it
    applies (see the module docstring); returns how many layers were routed."""
    routed = 0
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]
            routed += 1
    return routed
