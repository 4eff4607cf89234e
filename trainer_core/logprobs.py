"""Per-token log-probabilities of the tokens a sequence actually contains.

Position ``t`` of the logits predicts token ``t + 1``, so everything here is shifted by one:
from ``logits`` (B, T, V) and ``input_ids`` (B, T) come ``per_token_logps`` (B, T-1), where
entry ``t`` is ``log p(input_ids[:, t+1] | input_ids[:, :t+1])``. Masks line up with them as
``completion_mask[:, 1:]``.

Memory: the logits are the largest tensor of a step (V is 32k-256k on real models). A
``log_softmax`` would keep a second (B, T, V) tensor alive for backward; gathering the target
logit and subtracting ``logsumexp`` keeps only (B, T) results (the trick TRL calls
``selective_log_softmax``).
"""

from __future__ import annotations

import torch


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


@torch.no_grad()
def next_token_correct(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: whether the argmax of position t is token t+1 (for token accuracy)."""
    return logits[:, :-1].argmax(dim=-1) == input_ids[:, 1:]
