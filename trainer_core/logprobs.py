"""Per-token log-probabilities of the tokens a sequence actually contains.

Position ``t`` of the logits predicts token ``t + 1``, so everything here is shifted by one:
from ``logits`` (B, T, V) and ``input_ids`` (B, T) come ``per_token_logps`` (B, T-1), where
entry ``t`` is ``log p(input_ids[:, t+1] | input_ids[:, :t+1])``. Masks line up with them as
``completion_mask[:, 1:]``.

Memory: the logits are the largest tensor of a step (V is 32k-256k on real models). A
``log_softmax`` would keep a second (B, T, V) tensor alive for backward; gathering the target
logit and subtracting ``logsumexp`` keeps only (B, T) results (the trick TRL calls
``selective_log_softmax``). Better still is not to compute the logits nobody reads: a model
asked with ``logits_to_keep=keep_positions(mask)`` (transformers 5) projects only the
positions whose next token counts, giving (N, V) logits that ``kept_next_token_logps``
scatters back into (B, T-1). Prompts, template headers and padding then cost no LM-head
work, which on small models with large vocabularies is a good part of the step.
"""

from __future__ import annotations

import torch
from torch import nn


def next_token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``per_token_logps`` (B, T-1) of ``input_ids[:, 1:]`` under ``logits`` (B, T, V)."""
    logits = logits[:, :-1]  # (B, T-1, V), a view: position t predicts token t+1
    targets = input_ids[:, 1:].unsqueeze(-1)  # (B, T-1, 1)
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, targets).squeeze(-1)  # (B, T-1)
        return picked - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    # logsumexp in bf16/fp16 loses too much precision; go one row at a time in fp32 so only
    # one (T-1, V) fp32 copy exists at once.
    rows = [
        torch.log_softmax(row.float(), dim=-1).gather(-1, target).squeeze(-1)  # (T-1,)
        for row, target in zip(logits, targets, strict=True)
    ]
    return torch.stack(rows)  # (B, T-1)


def keep_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions whose logits are needed, i.e. whose next token counts.

    Pass it as the model's ``logits_to_keep``; position T-1 predicts nothing in the row.
    """
    keep = torch.zeros_like(completion_mask, dtype=torch.bool)  # (B, T)
    keep[:, :-1] = completion_mask[:, 1:].bool()
    return keep


def kept_logps(
    kept_logits: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """``per_token_logps`` (B, T-1) from the logits of kept positions.

    ``kept_logits`` (N, V) are the logits at the N True positions of ``keep`` (B, T), in
    row-major order (what ``logits_to_keep=keep`` returns). Positions not kept get logp 0;
    masks must exclude them anyway.
    """
    predicts = keep[:, :-1]  # (B, T-1): position t is kept, so token t+1 is scored
    targets = input_ids[:, 1:][predicts]  # (N,)
    if kept_logits.dtype in (torch.float32, torch.float64):
        picked = kept_logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
        logps = picked - torch.logsumexp(kept_logits, dim=-1)  # (N,)
    else:
        # As in next_token_logps: fp32 one chunk of rows at a time.
        logps = torch.cat(
            [
                torch.log_softmax(chunk.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
                for chunk, t in zip(kept_logits.split(1024), targets.split(1024), strict=True)
            ]
        )
    return logps.new_zeros(predicts.shape).masked_scatter(predicts, logps)


def completion_token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """``per_token_logps`` (B, T-1) of the completion tokens of right-padded rows under
    ``model``, 0 elsewhere. Only positions whose next token is a completion token go through
    the LM head (``logits_to_keep``): prompts and padding cost no vocabulary projection."""
    keep = keep_positions(completion_mask)  # (B, T) bool
    kept_logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        logits_to_keep=keep,
        use_cache=False,
    ).logits  # (N, V), N = keep.sum()
    return kept_logps(kept_logits, input_ids, keep)


def kept_next_token_logps(
    kept_logits: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_token_logps, token_correct)``, both (B, T-1), from the logits of kept positions
    (see ``kept_logps``); ``token_correct`` is False where a position was not kept."""
    predicts = keep[:, :-1]
    per_token_logps = kept_logps(kept_logits, input_ids, keep)
    with torch.no_grad():
        correct = kept_logits.argmax(dim=-1) == input_ids[:, 1:][predicts]  # (N,)
        token_correct = torch.zeros_like(predicts).masked_scatter(predicts, correct)
    return per_token_logps, token_correct


@torch.no_grad()
def next_token_correct(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: whether the argmax of position t is token t+1 (for token accuracy)."""
    return logits[:, :-1].argmax(dim=-1) == input_ids[:, 1:]
