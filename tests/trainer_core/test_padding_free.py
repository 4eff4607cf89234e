"""Padding-free micro-batches (``resources.padding_free``): a micro-batch's sequences back to
back in one row, positions restarting per sequence, attention kept within each sequence by
the model's own packed-sequence path (``packing.attention_inputs``), give the loss and the
gradients of the padded batch, on every attention implementation the machine has."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_core.conftest import run
from trainer_core.batching import Batch
from trainer_core.methods.supervised import forward, make_batch
from trainer_core.models import load_model
from trainer_core.packing import PackedRow, attention_inputs, pack_examples
from trainer_core.placement import to_device
from trainer_core.sft_loss import sft_loss
from trainer_core.specs import ResourcesSpec
from trainer_core.supervised_data import SupervisedExample


@pytest.fixture(scope="module")
def examples() -> list[SupervisedExample]:
    """Four rows of 7, 12, 5 and 9 random tokens, the second half of each a completion."""
    generator = torch.Generator().manual_seed(0)
    return [
        SupervisedExample(
            torch.randint(3, 500, (n,), generator=generator).tolist(),
            [0] * (n // 2) + [1] * (n - n // 2),
            line=i,
        )
        for i, n in enumerate([7, 12, 5, 9])
    ]


def loss_of(model: Any, batch: Batch) -> torch.Tensor:
    per_token_logps, token_correct = forward(model, batch)  # (B, T-1) each
    mask = batch.completion_mask[:, 1:]
    loss, _ = sft_loss(per_token_logps, mask, token_correct, batch.num_loss_tokens)
    return loss


def test_a_padding_free_batch_is_one_row_without_padding(
    examples: list[SupervisedExample],
) -> None:
    batch = make_batch(examples, pad_token_id=0, padding_free=True)
    assert batch.padding_free and batch.position_ids is not None
    assert batch.input_ids.shape == (1, 7 + 12 + 5 + 9)
    assert int(batch.attention_mask.sum()) == 33  # no padding at all
    assert batch.position_ids[0, 5:10].tolist() == [5, 6, 0, 1, 2]  # restarts at row 2
    padded = make_batch(examples, pad_token_id=0)
    assert padded.input_ids.shape == (4, 12)
    # The same targets: each sequence's first token is predicted by nothing.
    assert batch.num_loss_tokens == padded.num_loss_tokens == 4 + 6 + 3 + 5
    # Packed rows flatten into the one row too.
    packed = pack_examples(examples, max_seq_len=20)
    assert make_batch(packed, pad_token_id=0, padding_free=True).input_ids.shape == (1, 33)
    # The model gets no mask, only the positions it finds the sequences from.
    inputs = attention_inputs(batch, torch.nn.Linear(1, 1))
    assert inputs["attention_mask"] is None and inputs["position_ids"] is batch.position_ids


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_free_loss_and_gradients_equal_the_padded_batch(
    tiny_model: Path, examples: list[SupervisedExample], attn_implementation: str
) -> None:
    model = load_model(str(tiny_model))
    model.set_attn_implementation(attn_implementation)
    model.eval()  # no dropout: the two forwards must see the same network
    results = []
    for padding_free in (False, True):
        loss = loss_of(model, make_batch(examples, pad_token_id=0, padding_free=padding_free))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        results.append((loss.item(), grads))

    (padded_loss, padded_grads), (free_loss, free_grads) = results
    assert padded_loss > 5.0  # an untrained model: not a comparison of two zeros
    assert free_loss == pytest.approx(padded_loss, abs=1e-5)
    assert free_grads.keys() == padded_grads.keys() and len(free_grads) > 10
    for name, grad in padded_grads.items():
        torch.testing.assert_close(free_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_padding_free_loss_under_flex_attention(
    tiny_model: Path, examples: list[SupervisedExample]
) -> None:
    # flex_attention has no backward on the CPU (torch 2.13): the loss only, under no_grad.
    model = load_model(str(tiny_model))
    model.set_attn_implementation("flex_attention")
    model.eval()
    with torch.no_grad():
        padded = loss_of(model, make_batch(examples, pad_token_id=0))
        free = loss_of(model, make_batch(examples, pad_token_id=0, padding_free=True))
    assert padded.item() > 5.0
    assert free.item() == pytest.approx(padded.item(), abs=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="FlashAttention-2 needs CUDA and the flash_attn package",
)
def test_padding_free_loss_under_flash_attention_2(
    tiny_model: Path, examples: list[SupervisedExample]
) -> None:
    model = load_model(str(tiny_model)).to("cuda", torch.bfloat16)
    model.set_attn_implementation("flash_attention_2")
    model.eval()
    cuda = torch.device("cuda")
    with torch.no_grad():
        padded = loss_of(model, to_device(make_batch(examples, pad_token_id=0), cuda))
        free = loss_of(
            model, to_device(make_batch(examples, pad_token_id=0, padding_free=True), cuda)
        )
    assert free.item() == pytest.approx(padded.item(), rel=2e-2)  # bf16


def test_a_neighbour_changes_no_logit_padding_free(
    tiny_model: Path, examples: list[SupervisedExample]
) -> None:
    model = load_model(str(tiny_model)).eval()
    alone, neighbour = examples[2], examples[0]
    n = len(alone.input_ids)

    def logits(row: PackedRow) -> torch.Tensor:
        batch = make_batch([row], pad_token_id=0, padding_free=True)
        with torch.no_grad():
            # use_cache=False, as every training forward: with a cache transformers does not
            # look for packed sequences in the position ids (the row would attend across).
            inputs = attention_inputs(batch, model)
            return model(input_ids=batch.input_ids, **inputs, use_cache=False).logits

    by_itself = logits(PackedRow((alone,)))[0]  # (n, V)
    after_neighbour = logits(PackedRow((neighbour, alone)))[0, -n:]  # (n, V)
    torch.testing.assert_close(after_neighbour, by_itself, atol=1e-5, rtol=0)


def test_a_padding_free_run_with_a_budget_trains_as_the_padded_run(
    make_spec: Any, tmp_path: Path
) -> None:
    exact = {"adapter": {"type": "full"}, "learning_rate": 1e-4, "max_grad_norm": 1e6}
    spec = make_spec(batch_size=8, n_epochs=2, **exact)
    _, plain_sink, plain_store = run(spec, tmp_path / "padded")
    # The facts rows are 20-30 tokens: 64 real tokens hold two or three of them.
    resources = ResourcesSpec(padding_free=True, max_tokens_per_batch=64)
    _, free_sink, free_store = run(
        spec.model_copy(update={"resources": resources}), tmp_path / "free"
    )

    assert len(plain_sink.points) == len(free_sink.points) == 2
    for (step, a), (_, b) in zip(plain_sink.points, free_sink.points, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-6), step
        assert b["num_tokens"] == a["num_tokens"], step
    plain = load_file(plain_store.saved[-1][1] / "adapter" / "model.safetensors")
    free = load_file(free_store.saved[-1][1] / "adapter" / "model.safetensors")
    for name, weight in plain.items():
        torch.testing.assert_close(free[name], weight, atol=1e-6, rtol=0, msg=name)
