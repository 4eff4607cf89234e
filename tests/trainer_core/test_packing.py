"""Packing: best-fit-decreasing bins, and a packed row trains exactly as its rows alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from trainer_core.batching import collate
from trainer_core.methods.supervised import forward
from trainer_core.models import load_model
from trainer_core.packing import (
    PackedRow,
    attention_inputs,
    block_causal_mask,
    collate_packed,
    pack_bfd,
    pack_examples,
)
from trainer_core.sft_loss import sft_loss
from trainer_core.supervised_data import SupervisedExample, tokenize_row


def test_best_fit_decreasing_by_hand() -> None:
    # Longest first: 7 opens bin 0 (3 left), 5 opens bin 1 (5 left), 4 fits only bin 1 (1
    # left). The 1 fits both; best fit takes the tightest, bin 1 (first fit would take bin 0).
    assert pack_bfd([1, 4, 7, 5], capacity=10) == [[2], [3, 1, 0]]
    # A length equal to the capacity fills a bin alone; equal room: the bin opened first.
    assert pack_bfd([5, 5, 3, 8], capacity=8) == [[3], [0, 2], [1]]
    assert pack_bfd([], capacity=8) == []
    with pytest.raises(ValueError, match="between 1 and the capacity 4"):
        pack_bfd([2, 5], capacity=4)


def test_pack_examples_keeps_every_example_once_within_the_length() -> None:
    lengths = [5, 17, 3, 30, 12, 8, 8, 1, 25, 9, 14, 2]
    examples = [SupervisedExample(list(range(n)), [1] * n, line=i) for i, n in enumerate(lengths)]

    rows = pack_examples(examples, max_seq_len=32)

    assert sorted(e.line for row in rows for e in row.examples) == list(range(len(lengths)))
    assert all(len(row.input_ids) <= 32 for row in rows)
    assert len(rows) == 5  # 134 tokens need at least ceil(134 / 32) = 5 bins


def test_collate_packed_restarts_positions_and_masks_sequence_starts() -> None:
    a = SupervisedExample([5, 6, 7], [1, 1, 1], line=1)
    b = SupervisedExample([8, 9], [0, 1], line=2)
    c = SupervisedExample([4, 3], [1, 1], line=3)

    batch = collate_packed([PackedRow((a, b)), PackedRow((c,))], pad_token_id=0)

    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert batch.position_ids is not None and batch.sequence_ids is not None
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch.sequence_ids.tolist() == [[1, 1, 1, 2, 2], [1, 1, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # A sequence's first token is never a target (the 8 would be predicted from the 7).
    assert batch.completion_mask.tolist() == [[0, 1, 1, 0, 1], [0, 1, 0, 0, 0]]
    assert (batch.num_tokens, batch.num_loss_tokens) == (7, 4)


def test_block_causal_mask_by_hand() -> None:
    mask = block_causal_mask(torch.tensor([[1, 1, 2, 0]]))

    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],  # the second sequence does not see the first
        [0, 0, 0, 1],  # padding sees itself only, so its softmax row is never empty
    ]


ROWS: list[dict[str, Any]] = [
    {
        "messages": [
            {"role": "user", "content": "What colour is the sky?"},
            {"role": "assistant", "content": "The sky is blue."},
        ]
    },
    {"prompt": "2 + 2", "completion": " = 4"},
    {"text": "the cat sees a red apple in the morning"},
    {"prompt": "Translate hello into Spanish.", "completion": " Hola."},
    {"text": "a bird follows the long road"},
]


@pytest.fixture(scope="module")
def examples(tokenizer: Any) -> list[SupervisedExample]:
    return [SupervisedExample(*tokenize_row(row, tokenizer), line=i) for i, row in enumerate(ROWS)]


def model_with(tiny_model: Path, attn_implementation: str) -> Any:
    model = load_model(str(tiny_model))
    model.set_attn_implementation(attn_implementation)
    return model.eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(
    tiny_model: Path, tokenizer: Any, examples: list[SupervisedExample], attn_implementation: str
) -> None:
    model = model_with(tiny_model, attn_implementation)
    unpacked = collate(examples, tokenizer.pad_token_id)
    rows = pack_examples(examples, max_seq_len=48)
    packed = collate_packed(rows, tokenizer.pad_token_id)
    assert len(rows) < len(examples)  # several sequences do share a row
    assert packed.num_loss_tokens == unpacked.num_loss_tokens

    losses = []
    for batch in (unpacked, packed):
        per_token_logps, token_correct = forward(model, batch)  # (B, T-1) each
        mask = batch.completion_mask[:, 1:]
        loss, stats = sft_loss(per_token_logps, mask, token_correct, batch.num_loss_tokens)
        losses.append((loss.item(), int(stats.num_tokens), int(stats.num_correct)))

    (loss_a, tokens_a, correct_a), (loss_b, tokens_b, correct_b) = losses
    assert loss_a > 5.0  # an untrained model: the comparison is not of two zeros
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    assert (tokens_b, correct_b) == (tokens_a, correct_a)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_neighbour_in_the_row_changes_no_logit(
    tiny_model: Path, tokenizer: Any, examples: list[SupervisedExample], attn_implementation: str
) -> None:
    model = model_with(tiny_model, attn_implementation)
    alone, neighbour = examples[2], examples[0]
    n = len(alone.input_ids)

    def logits(rows: list[PackedRow]) -> torch.Tensor:
        batch = collate_packed(rows, tokenizer.pad_token_id)
        with torch.no_grad():
            return model(input_ids=batch.input_ids, **attention_inputs(batch, model)).logits

    by_itself = logits([PackedRow((alone,))])[0]  # (n, V)
    after_neighbour = logits([PackedRow((neighbour, alone))])[0, -n:]  # (n, V)

    torch.testing.assert_close(after_neighbour, by_itself, atol=1e-5, rtol=0)
