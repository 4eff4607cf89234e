"""The merged-weight LoRA matmul computes peft's LoRA layer: same outputs and gradients, the
base layer exactly when the adapter is fresh or disabled, and peft's own path where the merged
weight would cost more (a few tokens) or cannot apply (active dropout)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from trainer_core import lora_matmul


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(torch.relu(self.up(x)))
        return out


def lora_pair(dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    """The same peft model twice: one with peft's forward, one routed through ours; B is
    random so the adapter contributes (a fresh B is zero)."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "down"])
    peft_model = get_peft_model(TwoLayers(), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ours = copy.deepcopy(peft_model)
    assert lora_matmul.install(ours) == 2
    return peft_model, ours


def grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    named = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert x.grad is not None
    return x.grad, named


def test_outputs_and_gradients_match_peft() -> None:
    """Enough tokens (3 × 50 = 150 ≥ 24·40 / 64 = 15) for the merged matmul: every gradient
    (input, A, B of both layers) equals peft's within fp32 rounding; the base gets none."""
    peft_model, ours = lora_pair()
    x = torch.randn(3, 50, 24)
    assert lora_matmul.merged_is_cheaper(150, 24, 40)
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-4, atol=1e-5)
    dx_ref, g_ref = grads(peft_model, x)
    dx, g = grads(ours, x)
    assert set(g) == set(g_ref) and all("lora_" in name for name in g)
    assert len(g) == 4
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-5)


def test_a_fresh_adapter_and_a_disabled_one_are_exactly_the_base() -> None:
    """B = 0 makes W + s·B·A equal W exactly, so a policy at initialisation is its reference
    bit for bit; with the adapter disabled the layer is the base layer even with B ≠ 0."""
    torch.manual_seed(1)
    base = TwoLayers()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"])
    model = get_peft_model(copy.deepcopy(base), config)
    lora_matmul.install(model)
    x = torch.randn(2, 60, 24)
    assert torch.equal(model(x), base(x))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    assert not torch.equal(model(x), base(x))
    with model.disable_adapter():
        assert torch.equal(model(x), base(x))


def test_small_calls_and_active_dropout_keep_peft_forward() -> None:
    """One token without grad (a generation step) is cheaper through peft's rank-r path, and
    dropout acts on the LoRA branch only, which a merged weight cannot express: both give
    peft's result (dropout: the same random mask, so equal outputs under the same seed)."""
    assert not lora_matmul.merged_is_cheaper(1, 24, 40)
    peft_model, ours = lora_pair()
    x = torch.randn(1, 1, 24)
    with torch.no_grad():
        assert torch.equal(ours(x), peft_model(x))

    peft_model, ours = lora_pair(dropout=0.5)
    x = torch.randn(3, 50, 24)
    torch.manual_seed(5)
    expected = peft_model(x)
    torch.manual_seed(5)
    assert torch.equal(ours(x), expected)
    peft_model.eval()
    ours.eval()  # dropout off: the merged matmul applies again
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-4, atol=1e-5)


def test_a_small_training_forward_takes_the_merged_path_too(monkeypatch: Any) -> None:
    """With grad the size does not decide: every rank of a ZeRO-2 job must build the same
    graph, whatever its share of a micro-batch (tests/trainer_core/test_distributed_methods.py
    shows what a 2 + 1-row split did when it did not). Same numbers within fp32 rounding."""
    peft_model, ours = lora_pair()
    x = torch.randn(1, 1, 24)
    calls = []
    real = lora_matmul._MergedLoraLinear.apply

    def counting(*args: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(lora_matmul._MergedLoraLinear, "apply", counting)
    dx, g = grads(ours, x)
    dx_ref, g_ref = grads(peft_model, x)
    assert calls, "a one-token training forward took peft's path"
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    for key in g_ref:
        torch.testing.assert_close(g[key], g_ref[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trainable_base", [False, True])
def test_a_trainable_base_weight_gets_its_gradient(trainable_base: bool) -> None:
    """The merged matmul computes no gradient for W, so a base weight someone unfroze must
    take peft's path and get one."""
    peft_model, ours = lora_pair()
    name = "base_model.model.up.base_layer.weight"
    for model in (peft_model, ours):
        dict(model.named_parameters())[name].requires_grad_(trainable_base)
    x = torch.randn(3, 50, 24)
    _, g_ref = grads(peft_model, x)
    _, g = grads(ours, x)
    assert set(g) == set(g_ref)
    assert (name in g) is trainable_base
    for key in g:
        torch.testing.assert_close(g[key], g_ref[key], rtol=1e-4, atol=1e-5)
