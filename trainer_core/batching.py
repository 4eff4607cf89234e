"""Which examples go into which micro-batch and optimizer step, and padding them into tensors.

An epoch is a seeded permutation of the examples (``torch.Generator`` seeded with
``seed + epoch``, so a run, and a resumed run, sees the same order), cut into micro-batches
of ``batch_size``, grouped ``gradient_accumulation_steps`` at a time into optimizer steps.
The last micro-batch and the last step of an epoch may be short; nothing is dropped.

Given the examples' ``lengths``, the steps are length-grouped: the permutation is cut into
windows of ``GROUP_STEPS`` steps, each window sorted by length and cut into steps, and the
full steps shuffled. A step then holds rows of similar length, so padding them to the
longest wastes little (on mixed lengths random batches pad ~40% of their tokens), while
which rows meet in a step stays random. Grouping works on whole optimizer steps, not
micro-batches, so a step holds the same rows whatever the accumulation split.

Padding is dynamic (to the longest row of the micro-batch) and on the right, so real tokens
keep positions 0..len-1 and causal attention never lets them see padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainer_core.supervised_data import SupervisedExample

Step = list[list[int]]  # the micro-batches (lists of example indices) of one optimizer step


# Steps per length-grouping window: larger groups tighter, smaller keeps the order more random.
GROUP_STEPS = 16


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    completion_mask: torch.Tensor  # (B, T) long, 1 = target of the loss (0 on padding)
    # Packed rows only (packing.collate_packed): positions restart at 0 for each sequence,
    # and sequence_ids number the sequences of a row 1, 2, ... (0 on padding).
    position_ids: torch.Tensor | None = None  # (B, T) long
    sequence_ids: torch.Tensor | None = None  # (B, T) long
    # One packed row and no padding (packing.collate_packed of one row): the model finds the
    # sequences from the position ids alone (packing.attention_inputs).
    padding_free: bool = False

    @property
    def num_loss_tokens(self) -> int:
        """Targets the loss sums over; position 0 is never a target (nothing predicts it)."""
        return int(self.completion_mask[:, 1:].sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: Sequence[SupervisedExample], pad_token_id: int) -> Batch:
    """Right-pad ``examples`` to the longest of them."""
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    completion_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        completion_mask[row, :n] = torch.tensor(example.completion_mask, dtype=torch.long)
    return Batch(input_ids, attention_mask, completion_mask)


def steps_per_epoch(n_examples: int, batch_size: int, gradient_accumulation_steps: int) -> int:
    return math.ceil(math.ceil(n_examples / batch_size) / gradient_accumulation_steps)


def epoch_steps(
    n_examples: int,
    *,
    batch_size: int,
    gradient_accumulation_steps: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    lengths: Sequence[int] | None = None,
) -> list[Step]:
    """The optimizer steps of one epoch, each a list of micro-batches of example indices.

    ``lengths`` (one per example) turns on length grouping (see the module docstring).
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    if shuffle:
        order = torch.randperm(n_examples, generator=generator).tolist()
    else:
        order = list(range(n_examples))
    per_step = batch_size * gradient_accumulation_steps
    if lengths is None:
        steps = [order[i : i + per_step] for i in range(0, n_examples, per_step)]
    else:
        if len(lengths) != n_examples:
            raise ValueError("lengths needs one length per example")
        steps = _length_grouped_steps(order, lengths, per_step, generator if shuffle else None)
    return [[step[i : i + batch_size] for i in range(0, len(step), batch_size)] for step in steps]


def _length_grouped_steps(
    order: list[int], lengths: Sequence[int], per_step: int, generator: torch.Generator | None
) -> list[list[int]]:
    window = per_step * GROUP_STEPS
    grouped: list[int] = []
    for start in range(0, len(order), window):
        # Longest first, so a window's one short step (the epoch's last) has the shortest rows.
        grouped += sorted(order[start : start + window], key=lambda i: -lengths[i])
    steps = [grouped[i : i + per_step] for i in range(0, len(grouped), per_step)]
    full, rest = (steps, []) if len(order) % per_step == 0 else (steps[:-1], steps[-1:])
    if generator is not None:
        full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return full + rest


def fixed_batches(n_examples: int, batch_size: int) -> list[list[int]]:
    """Micro-batches in file order (evaluation)."""
    return [
        list(range(i, min(i + batch_size, n_examples))) for i in range(0, n_examples, batch_size)
    ]


def split_by_tokens(
    step: Step,
    lengths: Sequence[int],
    budget: int,
    *,
    padding_free: bool = False,
    rows_per_item: int = 1,
    ranks: int = 1,
) -> Step:
    """A step's rows, in their order, re-cut into micro-batches of at most ``budget`` tokens.

    The optimizer step keeps its rows and the method its normalisers (of the whole step), so
    the loss and the gradients are those of the step cut by rows; only how many rows a
    forward holds changes (TRL's ``max_tokens``/padding-free batching, with our accumulation).

    A micro-batch's tokens are those of the largest share a process computes (``ranks``
    processes take rows ``rank::ranks``, as ``distributed.share``): its rows times its
    longest row (padded), or the sum of its rows (``padding_free``), times ``rows_per_item``
    (2: a preference pair run as a chosen and a rejected row). A row over the budget alone
    runs alone: a row is never cut.

    Example: lengths [4, 3, 3, 2], budget 8, padded → [[0, 1], [2, 3]] (2 × 4 = 8, then
    2 × 3 = 6; [0, 1, 2] would pad to 3 × 4 = 12).
    """

    def tokens(rows: list[int]) -> int:
        shares = [rows[r::ranks] for r in range(ranks)]
        if padding_free:
            cost = max(sum(lengths[i] for i in share) for share in shares)
        else:
            cost = max(len(share) * max((lengths[i] for i in share), default=0) for share in shares)
        return cost * rows_per_item

    micro_batches: Step = []
    current: list[int] = []
    for i in (i for micro_batch in step for i in micro_batch):
        if current and tokens([*current, i]) > budget:
            micro_batches.append(current)
            current = []
        current.append(i)
    if current:
        micro_batches.append(current)
    return micro_batches
