"""Losses as pure functions on tensors, each returning the loss and detached statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SftStats:
    """Detached sums over one micro-batch; add them up over a step, then divide."""

    nll_sum: torch.Tensor  # () sum of -log p over counted tokens
    num_correct: torch.Tensor  # () counted tokens whose argmax prediction was right
    num_tokens: torch.Tensor  # () counted tokens

    @property
    def mean_token_accuracy(self) -> float:
        return float(self.num_correct) / max(1, int(self.num_tokens))


def sft_loss(
    per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    token_correct: torch.Tensor,
    normaliser: int | float,
) -> tuple[torch.Tensor, SftStats]:
    """Supervised fine-tuning loss: the negative log-likelihood of the completion tokens.

        L = (1 / N) · Σ_{b,t} m[b,t] · (−log p_θ(x[b,t+1] | x[b,≤t]))

    Args:
        per_token_logps: (B, T-1) log p of each next token (``logprobs.next_token_logps``).
        completion_mask: (B, T-1) 1 where the next token counts (``batch.completion_mask[:, 1:]``).
        token_correct: (B, T-1) bool, argmax prediction == next token (for the accuracy stat).
        normaliser: N, the number of counted tokens in the whole optimizer step, not in this
            micro-batch. Summing the micro-batch losses of a step then gives the token mean
            over the step, so 4 micro-batches of 1 equal 1 micro-batch of 4 exactly (a
            per-micro-batch mean would weight short examples up).

    Returns:
        ``(loss, stats)``: the scalar loss (with grad) and detached ``SftStats``.

    Worked example: logps [[log ½, log ¼, −9]], mask [[1, 1, 0]], N = 2 →
    L = (log 2 + log 4) / 2 = 1.5 · log 2 ≈ 1.039721.
    """
    mask = completion_mask.to(per_token_logps.dtype)  # (B, T-1)
    nll_sum = -(per_token_logps * mask).sum()  # ()
    loss = nll_sum / normaliser
    counted = completion_mask.bool()
    stats = SftStats(
        nll_sum=nll_sum.detach(),
        num_correct=(token_correct & counted).sum(),
        num_tokens=counted.sum(),
    )
    return loss, stats
