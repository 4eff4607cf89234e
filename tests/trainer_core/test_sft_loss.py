"""The SFT loss and per-token logprobs against hand-worked numbers and the naive computation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer_core.batching import collate
from trainer_core.logprobs import (
    completion_logps_and_correct,
    keep_positions,
    logits_token_logps,
    next_token_correct,
    next_token_logps,
)
from trainer_core.models import load_model
from trainer_core.sft_loss import sft_loss
from trainer_core.supervised_data import SupervisedExample, tokenize_row


def test_sft_loss_hand_worked() -> None:
    # logps [[log ½, log ¼, −9]], mask [[1, 1, 0]], N = 2:
    # L = (log 2 + log 4) / 2 = 1.5 · log 2 = 1.0397208; the masked −9 plays no part.
    per_token_logps = torch.tensor([[math.log(0.5), math.log(0.25), -9.0]])
    completion_mask = torch.tensor([[1, 1, 0]])
    token_correct = torch.tensor([[True, False, True]])

    loss, stats = sft_loss(per_token_logps, completion_mask, token_correct, normaliser=2)

    assert loss.item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert loss.item() == pytest.approx(1.0397208, abs=1e-6)
    assert int(stats.num_tokens) == 2
    assert stats.mean_token_accuracy == 0.5  # the correct masked position does not count


def test_sft_loss_normaliser_is_the_step_not_the_micro_batch() -> None:
    # Two micro-batches with 1 and 3 counted tokens, N = 4: their losses sum to the mean of
    # all 4 tokens, not to the mean of the two micro-batch means.
    a = torch.tensor([[-1.0, 0.0]]), torch.tensor([[1, 0]])
    b = torch.tensor([[-2.0, -3.0, -4.0]]), torch.tensor([[1, 1, 1]])
    total = sum(sft_loss(logps, mask, mask.bool(), normaliser=4)[0] for logps, mask in (a, b))
    assert float(total) == pytest.approx((1 + 2 + 3 + 4) / 4)


def test_token_correct_is_argmax_of_previous_position() -> None:
    logits = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [9.0, 0.0, 0.0]]])  # (1, 3, 3)
    input_ids = torch.tensor([[0, 1, 0]])
    # position 0 predicts 1 (right), position 1 predicts 2 but the token is 0 (wrong)
    assert next_token_correct(logits, input_ids).tolist() == [[True, False]]


@pytest.fixture(scope="module")
def real_batch(tokenizer: Any) -> Any:
    rows = [
        {
            "messages": [
                {"role": "user", "content": "What colour is the sky?"},
                {"role": "assistant", "content": "The sky is blue."},
            ]
        },
        {"prompt": "2 + 2", "completion": " = 4"},
        {"text": "the cat sees a red apple in the morning"},
    ]
    examples = [SupervisedExample(*tokenize_row(row, tokenizer), line=1) for row in rows]
    return collate(examples, tokenizer.pad_token_id)


def test_loss_matches_naive_float64_log_softmax(tiny_model: Path, real_batch: Any) -> None:
    model = load_model(str(tiny_model))
    with torch.no_grad():
        logits = model(
            input_ids=real_batch.input_ids, attention_mask=real_batch.attention_mask
        ).logits  # (B, T, V)
    logits.requires_grad_(True)
    completion_mask = real_batch.completion_mask[:, 1:]

    per_token_logps = next_token_logps(logits, real_batch.input_ids)
    loss, stats = sft_loss(
        per_token_logps,
        completion_mask,
        next_token_correct(logits, real_batch.input_ids),
        normaliser=real_batch.num_loss_tokens,
    )

    # Naive: the whole (B, T-1, V) log_softmax in float64, gathered.
    full = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    naive_logps = full.gather(-1, real_batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    naive_loss = -(naive_logps * completion_mask).sum() / completion_mask.sum()
    assert per_token_logps.shape == completion_mask.shape
    torch.testing.assert_close(per_token_logps.double(), naive_logps, atol=1e-5, rtol=0)
    assert abs(loss.item() - naive_loss.item()) < 1e-6
    assert loss.item() > 5.0  # an untrained model over ~512 tokens: near log 512 ≈ 6.2
    assert int(stats.num_tokens) == real_batch.num_loss_tokens
    # And the gradient with respect to the logits, which is what training uses.
    (grad,) = torch.autograd.grad(loss, logits)
    (naive_grad,) = torch.autograd.grad(naive_loss, logits)
    torch.testing.assert_close(grad, naive_grad.float(), atol=1e-7, rtol=1e-5)


def test_low_precision_logits_take_the_row_path(real_batch: Any) -> None:
    torch.manual_seed(0)
    logits = torch.randn(*real_batch.input_ids.shape, 512).to(torch.bfloat16)

    per_token_logps = next_token_logps(logits, real_batch.input_ids)

    full = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    naive = full.gather(-1, real_batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    assert per_token_logps.dtype == torch.float32
    torch.testing.assert_close(per_token_logps.double(), naive, atol=1e-5, rtol=0)


def test_kept_positions_give_the_same_logps_as_full_logits(
    tiny_model: Path, real_batch: Any
) -> None:
    model = load_model(str(tiny_model))
    keep = keep_positions(real_batch.completion_mask)  # (B, T)
    mask = real_batch.completion_mask[:, 1:].bool()  # (B, T-1)
    assert keep[:, :-1].equal(mask) and not keep[:, -1].any()
    inputs = {"input_ids": real_batch.input_ids, "attention_mask": real_batch.attention_mask}
    with torch.no_grad():
        full = model(**inputs).logits  # (B, T, V)
        per_token_logps, token_correct = completion_logps_and_correct(
            model, real_batch.completion_mask, **inputs
        )

    expected = next_token_logps(full, real_batch.input_ids)
    torch.testing.assert_close(per_token_logps[mask], expected[mask], atol=1e-5, rtol=0)
    assert (per_token_logps[~mask] == 0).all()
    assert token_correct.equal(next_token_correct(full, real_batch.input_ids) & mask)


def test_logits_token_logps_by_hand_and_in_low_precision() -> None:
    # N = 3 logit rows over V = 2, targets 1, 0, 1:
    # log p = log ½, log ¾, log ¾; argmax 0, 0, 1 against 1, 0, 1.
    # Entropies: −(½ log ½ · 2) = log 2, and −(¾ log ¾ + ¼ log ¼) for the other two.
    kept = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    targets = torch.tensor([1, 0, 1])
    got = logits_token_logps(kept, targets, with_entropy=True)

    expected = torch.tensor([math.log(0.5), math.log(0.75), math.log(0.75)])
    torch.testing.assert_close(got.logps, expected)
    assert got.correct.tolist() == [False, True, True]
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert got.entropy is not None
    torch.testing.assert_close(got.entropy, torch.tensor([math.log(2.0), h, h]))
    low = logits_token_logps(kept.to(torch.bfloat16), targets).logps
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, expected, atol=1e-2, rtol=0)
    # Temperature 2 halves the logits: row 1 becomes softmax(½ log 3, 0), p(0) = √3/(√3+1).
    hot = logits_token_logps(kept, targets, temperature=2.0).logps
    assert hot[1].item() == pytest.approx(math.log(math.sqrt(3) / (math.sqrt(3) + 1)), abs=1e-6)
