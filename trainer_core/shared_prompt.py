"""Preference pairs as one row each: the prompt once, then the chosen and the rejected answer.

A pair is two sequences that start with the same prompt. Laid out as two padded rows (TRL's
layout, and ``PairBatch.input_ids``) the prompt is computed twice and the shorter answer is
padded to the longer; here a pair is the row ``prompt + chosen + rejected`` and the
attention mask makes it compute exactly the two sequences:

- chosen tokens see the prompt and the chosen tokens before them (causal);
- rejected tokens see the prompt and the rejected tokens before them, never the chosen ones;
- position ids continue the prompt in both answers (``P..P+C-1`` and ``P..P+R-1``), so
  rotary embeddings see each sequence's own positions.

The first token of each answer is predicted by the prompt's last position, which the two
share. On the benchmark's pairs this computes about a third fewer token positions than two
rows per pair. It needs an attention that takes a 4D mask (SDPA or eager); FlashAttention
does not, and keeps the two-row layout (``reference.forward_logps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from trainer_core.logprobs import kept_token_logps
from trainer_core.packing import attention_implementation, model_mask

PAD, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3


class Pair(Protocol):
    @property
    def prompt_ids(self) -> list[int]: ...
    @property
    def chosen_ids(self) -> list[int]: ...
    @property
    def rejected_ids(self) -> list[int]: ...


@dataclass
class SharedPromptRows:
    input_ids: torch.Tensor  # (B, L) long: prompt + chosen + rejected, right-padded
    position_ids: torch.Tensor  # (B, L) long
    segments: torch.Tensor  # (B, L) long: PAD, PROMPT, CHOSEN or REJECTED
    keep: torch.Tensor  # (B, L) bool: positions that predict a scored token
    # Each scored token, in the row-major order of the two-row layout's completion mask
    # (all chosen rows, then all rejected rows): which kept position predicts it, and it.
    pick: torch.Tensor  # (N,) long, index into the kept positions (row-major)
    targets: torch.Tensor  # (N,) long
    # Each sequence's last non-pad token as a flat index into (B * L), chosen rows then
    # rejected rows: where a sequence classifier reads its score.
    last: torch.Tensor  # (2B,) long


def collate(pairs: Sequence[Pair], pad_token_id: int) -> SharedPromptRows:
    """One row per pair (see the module docstring), right-padded to the longest."""
    width = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    shape = (len(pairs), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segments = torch.zeros(shape, dtype=torch.long)
    keep = torch.zeros(shape, dtype=torch.bool)
    # (row, predicting position, target) of every scored token, chosen then rejected.
    chosen_scored: list[tuple[int, int, int]] = []
    rejected_scored: list[tuple[int, int, int]] = []
    last_chosen: list[int] = []
    last_rejected: list[int] = []
    for row, pair in enumerate(pairs):
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        tokens = pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
        input_ids[row, : p + c + r] = torch.tensor(tokens, dtype=torch.long)
        position_ids[row, : p + c] = torch.arange(p + c)
        position_ids[row, p + c : p + c + r] = torch.arange(p, p + r)
        segments[row, :p] = PROMPT
        segments[row, p : p + c] = CHOSEN
        segments[row, p + c : p + c + r] = REJECTED
        # Answer token k is predicted by the position before it in its own sequence: the
        # prompt's last position for k = 0 (none when the prompt is empty: position 0 of a
        # sequence is never a target), else the answer's token k - 1.
        for k in range(0 if p else 1, c):
            chosen_scored.append((row, p - 1 + k, pair.chosen_ids[k]))
        for k in range(0 if p else 1, r):
            before = p - 1 if k == 0 else p + c + k - 1
            rejected_scored.append((row, before, pair.rejected_ids[k]))
        chosen_at = list(range(p + c))
        rejected_at = list(range(p)) + list(range(p + c, p + c + r))
        last_chosen.append(row * width + _last_real(tokens, chosen_at, pad_token_id))
        last_rejected.append(row * width + _last_real(tokens, rejected_at, pad_token_id))
    scored = chosen_scored + rejected_scored
    for row, position, _ in scored:
        keep[row, position] = True
    # Rank of each kept position in row-major order = its row in the model's kept logits.
    rank = torch.full(shape, -1, dtype=torch.long)
    rank[keep] = torch.arange(int(keep.sum()))
    pick = torch.tensor([int(rank[row, position]) for row, position, _ in scored], dtype=torch.long)
    targets = torch.tensor([target for _, _, target in scored], dtype=torch.long)
    last = torch.tensor(last_chosen + last_rejected, dtype=torch.long)
    return SharedPromptRows(input_ids, position_ids, segments, keep, pick, targets, last)


def _last_real(tokens: list[int], positions: list[int], pad_token_id: int) -> int:
    """The last of ``positions`` whose token is not the pad id, as transformers' sequence
    classifiers pool a padded row (so where EOS pads, a trailing EOS is skipped, as in TRL);
    position 0 when every token is the pad id (their argmax of an all-zero row)."""
    for position in reversed(positions):
        if tokens[position] != pad_token_id:
            return position
    return 0


def attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True where query t may attend to key s: s <= t and key s is in the
    prompt or in t's own answer. A padding query sees itself only (an empty softmax row is
    NaN in SDPA)."""
    _, length = segments.shape
    query, key = segments[:, :, None], segments[:, None, :]  # (B, L, 1), (B, 1, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    visible = (key == PROMPT) | (key == query)
    real = (query != PAD) & (key != PAD)
    itself = torch.eye(length, dtype=torch.bool, device=segments.device)
    return ((visible & real & causal) | itself)[:, None]


def supported(model: nn.Module) -> bool:
    """Whether ``model``'s attention takes a 4D mask (SDPA or eager; not FlashAttention)."""
    return attention_implementation(model) in ("sdpa", "eager")


def model_inputs(rows: SharedPromptRows, model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's ``input_ids``, ``attention_mask`` (bool for SDPA, additive for eager) and
    ``position_ids`` for these rows."""
    mask = model_mask(attention_mask(rows.segments), model)
    return {"input_ids": rows.input_ids, "attention_mask": mask, "position_ids": rows.position_ids}


def scored_logps(model: nn.Module, rows: SharedPromptRows) -> torch.Tensor:
    """(N,) log-probabilities of the scored tokens (order of ``rows.pick``); only the kept
    positions go through the LM head, chunked over the vocabulary (``logprobs``)."""
    scored = kept_token_logps(
        model, model_inputs(rows, model), rows.keep, rows.targets, pick=rows.pick
    )
    return scored.logps


def classifier_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(backbone, score head)`` of a sequence-classification model (under peft too), or
    None where it has no ``score`` head (it then keeps the two-row layout)."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    head = getattr(base, "score", None)
    prefix = str(getattr(base, "base_model_prefix", "") or "")
    backbone = getattr(base, prefix, None) if prefix else None
    if not isinstance(head, nn.Module) or not isinstance(backbone, nn.Module):
        return None
    return backbone, head


def sequence_scores(model: nn.Module, rows: SharedPromptRows) -> torch.Tensor:
    """(2B, num_labels): the score head at each sequence's last token (chosen rows, then
    rejected rows), what a sequence classifier pools from two padded rows."""
    parts = classifier_parts(model)
    if parts is None:
        raise TypeError(f"{type(model).__name__} has no score head")
    backbone, head = parts
    hidden = backbone(**model_inputs(rows, model), use_cache=False).last_hidden_state
    scores: torch.Tensor = head(hidden.reshape(-1, hidden.shape[-1])[rows.last])
    return scores
