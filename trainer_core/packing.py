"""Sequence packing: several short rows in one ``max_seq_len`` row, each seeing only itself.

Rows are put into bins of ``max_seq_len`` tokens by best-fit decreasing (longest row first,
each into the fullest bin it still fits; Johnson 1973), the strategy TRL's SFT packing
defaults to. On mixed lengths it fills bins almost completely, so a batch of packed rows
carries far less padding than a batch of single rows.

A packed row must train exactly as its sequences would alone:

- ``position_ids`` restart at 0 for each sequence (rotary embeddings see the same positions);
- attention is block-diagonal causal: a token sees the earlier tokens of its own sequence
  and nothing else. Position ids alone do not give that on SDPA or eager attention, so the
  batch carries ``sequence_ids`` and ``attention_inputs`` turns them into a 4D mask
  (FlashAttention instead finds the boundaries from the position ids);
- the first token of each sequence is not a target: it would be predicted from the end of
  the sequence before it.

``tests/trainer_core/test_packing.py`` checks the loss of a packed batch against the same
sequences unpadded, one by one.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer_core.batching import Batch
from trainer_core.supervised_data import SupervisedExample


def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of ``capacity`` tokens: lists of indices into ``lengths``.

    Longest first (ties in index order); each goes into the open bin with the least room
    that still fits it (ties: the bin opened first), or opens a new bin. Bins come in the
    order they were opened, their indices in the order they were placed.

    Example: lengths [1, 4, 7, 5], capacity 10 → [[2], [3, 1, 0]]: the 1 goes beside 5 + 4
    (1 token of room), not beside 7 (3 tokens of room), as first-fit would put it.
    """
    if any(n > capacity or n < 1 for n in lengths):
        raise ValueError(f"every length must be between 1 and the capacity {capacity}")
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (tokens of room, bin index) of every bin
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))  # the tightest bin with room for n
        if at == len(room):
            bins.append([i])
            bisect.insort(room, (capacity - n, len(bins) - 1))
            continue
        left, b = room.pop(at)
        bins[b].append(i)
        bisect.insort(room, (left - n, b))
    return bins


@dataclass(frozen=True)
class PackedRow:
    """Several examples that share one row of at most ``max_seq_len`` tokens."""

    examples: tuple[SupervisedExample, ...]

    @property
    def input_ids(self) -> list[int]:
        return [t for e in self.examples for t in e.input_ids]


def pack_examples(examples: Sequence[SupervisedExample], max_seq_len: int) -> list[PackedRow]:
    """The examples in best-fit-decreasing bins of ``max_seq_len`` (they are never longer)."""
    bins = pack_bfd([len(e.input_ids) for e in examples], max_seq_len)
    return [PackedRow(tuple(examples[i] for i in indices)) for indices in bins]


def collate_packed(
    rows: Sequence[PackedRow], pad_token_id: int, *, padding_free: bool = False
) -> Batch:
    """Right-pad packed rows into a batch with ``position_ids`` and ``sequence_ids``.

    ``padding_free``: ``rows`` is one row, for a forward that passes ``use_cache=False``
    (``attention_inputs`` then gives the model the position ids alone)."""
    if padding_free and len(rows) != 1:
        raise ValueError("a padding-free batch is one row")
    longest = max(sum(len(e.input_ids) for e in row.examples) for row in rows)
    shape = (len(rows), longest)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    sequence_ids = torch.zeros(shape, dtype=torch.long)  # 0 = padding, k = k-th sequence
    for r, row in enumerate(rows):
        start = 0
        for k, example in enumerate(row.examples, start=1):
            n = len(example.input_ids)
            end = start + n
            input_ids[r, start:end] = torch.tensor(example.input_ids)
            completion_mask[r, start:end] = torch.tensor(example.completion_mask)
            completion_mask[r, start] = 0  # nothing of this sequence predicts its first token
            position_ids[r, start:end] = torch.arange(n)
            sequence_ids[r, start:end] = k
            start = end
    attention_mask = (sequence_ids > 0).long()
    return Batch(
        input_ids, attention_mask, completion_mask, position_ids, sequence_ids, padding_free
    )


def block_causal_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query t may attend to key s.

    Key s is visible to query t when both are in the same sequence and s <= t. A padding
    query sees itself only, so no softmax row is empty (an empty one gives NaN in SDPA).
    """
    _, length = sequence_ids.shape
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # (T, T)
    real = (sequence_ids != 0)[:, :, None]  # (B, T, 1)
    itself = torch.eye(length, dtype=torch.bool)  # (T, T)
    return ((same & causal & real) | itself)[:, None]  # (B, 1, T, T)


def attention_inputs(batch: Batch, model: nn.Module) -> dict[str, torch.Tensor | None]:
    """The ``attention_mask`` (and ``position_ids``) keyword arguments of the model's forward.

    An unpacked batch passes its 2D padding mask and the model builds the causal mask. A
    padding-free one (one packed row, no padding) passes no mask, only the position ids:
    transformers then finds the sequences from where the positions restart, for every
    attention (``masking_utils.find_packed_sequence_indices``: FlashAttention-2 varlen, a
    document mask for flex_attention, a block-diagonal mask for SDPA and eager), which is
    TRL's padding-free path (``DataCollatorWithFlattening``). transformers looks for the
    sequences only in a forward without a cache: call the model with ``use_cache=False``, as
    every training forward here does. Other packed batches pass a
    4D block-diagonal mask, which transformers uses as is: bool for SDPA, additive float
    for eager attention. FlashAttention takes no 4D mask; it finds the sequences from where
    the position ids restart.
    """
    if batch.sequence_ids is None:
        return {"attention_mask": batch.attention_mask}
    if batch.padding_free or "flash" in attention_implementation(model):
        return {"attention_mask": None, "position_ids": batch.position_ids}
    mask = block_causal_mask(batch.sequence_ids).to(batch.input_ids.device)
    return {"attention_mask": model_mask(mask, model), "position_ids": batch.position_ids}


def attention_implementation(model: nn.Module) -> str:
    """The model's attention: "sdpa", "eager", a FlashAttention name, ..."""
    config: Any = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def model_mask(mask: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A 4D bool mask (True = may attend) as ``model``'s attention takes it: as is for SDPA,
    additive in the model's dtype for eager attention."""
    if attention_implementation(model) != "eager":
        return mask
    dtype = next(model.parameters()).dtype
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill(~mask, torch.finfo(dtype).min)
