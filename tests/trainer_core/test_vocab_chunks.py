"""The LM head fused with the log-softmax, a chunk of rows at a time (``vocab_chunks``),
against the materialised logits: the same values and the same gradients (fp32: 1e-5
relative), never an (N, V) tensor kept for the backward, and the same loss and gradients on a
real training step of a tiny model, full fine-tuning, LoRA and tied embeddings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tests.trainer_core.conftest import fact_rows
from trainer_core.adapters import apply_adapter
from trainer_core.batching import collate
from trainer_core.logprobs import (
    completion_logps_and_correct,
    keep_positions,
    logits_token_logps,
)
from trainer_core.models import load_model
from trainer_core.sft_loss import sft_loss
from trainer_core.specs import AdapterSpec
from trainer_core.supervised_data import SupervisedExample, tokenize_row
from trainer_core.vocab_chunks import causal_lm_parts, chunk_rows, head_logps

N, H, V = 23, 8, 40


def tensors(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=generator, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H, generator=generator, dtype=dtype).requires_grad_()
    bias = torch.randn(V, generator=generator, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=generator)
    return hidden, weight, bias, targets


def test_hand_worked_two_tokens() -> None:
    # One row, H = 1, V = 2: logits = [1·0, 1·log 3] → p = (¼, ¾). Target 0: log ¼, not the
    # argmax; entropy −(¼ log ¼ + ¾ log ¾). d log p_0 / d z = onehot − p = (¾, −¾), so
    # d/d hidden = ¾·0 − ¾·log 3 and d/d weight = (¾, −¾)·hidden = (¾, −¾).
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [math.log(3.0)]], requires_grad=True)
    got = head_logps(hidden, weight, None, torch.tensor([0]), with_entropy=True)
    got.logps.sum().backward()

    assert got.logps.item() == pytest.approx(math.log(0.25), abs=1e-6)
    assert got.correct.tolist() == [False]
    assert got.entropy is not None
    assert got.entropy.item() == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6
    )
    assert hidden.grad is not None and weight.grad is not None
    assert hidden.grad.item() == pytest.approx(-0.75 * math.log(3.0), abs=1e-6)
    torch.testing.assert_close(weight.grad, torch.tensor([[0.75], [-0.75]]))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("rows", [1, 5, 1000])  # one row a chunk, a ragged last chunk, one chunk
def test_same_values_and_gradients_as_the_full_logits(temperature: float, rows: int) -> None:
    hidden, weight, bias, targets = tensors()
    # Different weights per row, so a mix-up of rows across chunks would show.
    weights = torch.linspace(0.5, 2.0, N)

    got = head_logps(
        hidden, weight, bias, targets, temperature=temperature, with_entropy=True, rows=rows
    )
    (got.logps * weights).sum().backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias)]  # type: ignore[union-attr]
    for t in (hidden, weight, bias):
        t.grad = None

    logits = F.linear(hidden, weight, bias) / temperature  # (N, V)
    expected = logits_token_logps(logits, targets, with_entropy=True)
    (expected.logps * weights).sum().backward()

    torch.testing.assert_close(got.logps, expected.logps, rtol=1e-5, atol=1e-6)
    assert got.entropy is not None and expected.entropy is not None
    torch.testing.assert_close(got.entropy, expected.entropy, rtol=1e-5, atol=1e-6)
    assert got.correct.equal(expected.correct)
    for grad, tensor in zip(grads, (hidden, weight, bias), strict=True):
        torch.testing.assert_close(grad, tensor.grad, rtol=1e-5, atol=1e-6)


def test_gradcheck_in_float64() -> None:
    hidden, weight, bias, targets = (t.detach() for t in tensors(torch.float64))
    hidden, targets = hidden[:6].requires_grad_(), targets[:6]
    weight.requires_grad_()
    bias.requires_grad_()

    for rows in (4, 6):  # recomputed chunks; one chunk whose softmax the forward keeps

        def logps(
            h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, rows: int = rows
        ) -> torch.Tensor:
            return head_logps(h, w, b, targets, temperature=0.8, rows=rows).logps

        assert torch.autograd.gradcheck(logps, (hidden, weight, bias))


def test_no_vocabulary_sized_tensor_is_kept_for_the_backward() -> None:
    hidden, weight, bias, targets = tensors()
    saved: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head_logps(hidden, weight, bias, targets, rows=4).logps.sum().backward()
        materialised = len(saved)
        logits_token_logps(F.linear(hidden, weight, bias), targets).logps.sum()

    assert (N, V) not in saved[:materialised]
    assert (4, V) not in saved[:materialised]  # no chunk's either: they are recomputed
    assert (N, V) in saved[materialised:]  # the check can fail: the naive path keeps one


def test_a_frozen_head_gets_no_gradient() -> None:
    hidden, weight, bias, targets = tensors()
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    head_logps(hidden, weight, bias, targets, rows=7).logps.sum().backward()
    assert weight.grad is None and bias.grad is None
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_bf16_autocast_matmul_in_bf16_statistics_in_fp32() -> None:
    hidden, weight, _, targets = tensors()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head_logps(hidden, weight, None, targets, rows=4)
        logits = F.linear(hidden, weight)  # (N, V) bf16: what the model's lm_head gives
        expected = logits_token_logps(logits, targets)
    assert logits.dtype == torch.bfloat16
    assert got.logps.dtype == torch.float32
    torch.testing.assert_close(got.logps, expected.logps, rtol=1e-5, atol=1e-5)
    got.logps.sum().backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.float32
    assert weight.grad is not None and weight.grad.dtype == torch.float32


def test_chunk_rows_follow_the_memory_budget() -> None:
    assert chunk_rows(151_936) == 441  # 256 MiB of fp32 logits at Qwen2.5's vocabulary
    assert chunk_rows(512) == 131_072
    assert chunk_rows(10**12) == 1


@pytest.fixture(scope="module")
def batch(tokenizer: Any) -> Any:
    examples = [SupervisedExample(*tokenize_row(row, tokenizer), line=1) for row in fact_rows(1)]
    return collate(examples, tokenizer.pad_token_id)


def sft_step_grads(
    model: torch.nn.Module, batch: Any, *, chunked: bool
) -> tuple[float, dict[str, torch.Tensor]]:
    """The SFT loss of ``batch`` and the gradients it gives, through the chunked head or
    through ``logits_to_keep`` and the materialised logits."""
    model.zero_grad()
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if chunked:
        assert causal_lm_parts(model) is not None
        per_token_logps, correct = completion_logps_and_correct(
            model, batch.completion_mask, **inputs
        )
    else:
        keep = keep_positions(batch.completion_mask)
        predicts = keep[:, :-1]
        kept = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (N, V)
        scored = logits_token_logps(kept, batch.input_ids[:, 1:][predicts])
        per_token_logps = scored.logps.new_zeros(predicts.shape).masked_scatter(
            predicts, scored.logps
        )
        correct = torch.zeros_like(predicts).masked_scatter(predicts, scored.correct)
    loss, _ = sft_loss(per_token_logps, batch.completion_mask[:, 1:], correct, 17)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def assert_same_step(model: torch.nn.Module, batch: Any) -> None:
    loss, grads = sft_step_grads(model, batch, chunked=True)
    old_loss, old_grads = sft_step_grads(model, batch, chunked=False)
    assert loss == pytest.approx(old_loss, rel=1e-5)
    assert grads.keys() == old_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, old_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_full_fine_tuning_step_equals_the_logits_path(tiny_model: Path, batch: Any) -> None:
    model = load_model(str(tiny_model))
    assert_same_step(model, batch)
    parts = causal_lm_parts(model)
    assert parts is not None and parts.head is model.lm_head


def test_lora_step_equals_the_logits_path(tiny_model: Path, batch: Any) -> None:
    torch.manual_seed(0)
    model = apply_adapter(load_model(str(tiny_model)), AdapterSpec(type="lora", r=4))
    # B starts at zero; move it so the adapter changes the logits.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert_same_step(model, batch)


def test_tied_embeddings_step_equals_the_logits_path(batch: Any) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=int(batch.input_ids.max()) + 1,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_step(model, batch)


def test_a_lora_on_the_head_keeps_the_logits_path(tiny_model: Path, batch: Any) -> None:
    torch.manual_seed(0)
    spec = AdapterSpec(type="lora", r=4, target_modules=["q_proj", "lm_head"])
    model = apply_adapter(load_model(str(tiny_model)), spec)
    assert causal_lm_parts(model) is None  # the head is a LoRA layer: not linear(h, W)
    per_token_logps, _ = completion_logps_and_correct(
        model,
        batch.completion_mask,
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
    )
    loss, _ = sft_step_grads(model, batch, chunked=False)
    mask = batch.completion_mask[:, 1:]
    assert -(per_token_logps * mask).sum().item() / 17 == pytest.approx(loss, rel=1e-6)
