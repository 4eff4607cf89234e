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
positions whose next token counts, giving (N, V) logits whose results
``completion_logps_and_correct`` scatters back into (B, T-1). Prompts, template headers and
padding then cost no LM-head work, which on small models with large vocabularies is a good
part of the step.

Best of all is never to hold the (N, V) logits at all: ``kept_token_logps`` asks the decoder
for the hidden states of the kept positions and runs the head fused with the log-softmax a
chunk of rows at a time (``vocab_chunks.py``), forward and backward. Where that does not
apply (``vocab_chunks.causal_lm_parts`` says when: ZeRO-3, a LoRA'd head, soft-capped
logits) it falls back to ``logits_to_keep`` and the functions on logits below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from trainer_core.vocab_chunks import TokenLogps, causal_lm_parts


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


def logits_token_logps(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> TokenLogps:
    """``head_logps``'s results from materialised logits (N, V): the fallback path, and the
    reference the chunked one is tested against. Statistics in fp32 a chunk of rows at a
    time (one (1024, V) fp32 copy at once under half precision)."""
    logps, correct, entropy = [], [], []
    for chunk, target in zip(logits.split(1024), targets.split(1024), strict=True):
        scaled = chunk.float() / temperature if temperature != 1.0 else chunk.float()
        logp = torch.log_softmax(scaled, dim=-1)  # (rows, V)
        logps.append(logp.gather(-1, target.unsqueeze(-1)).squeeze(-1))
        with torch.no_grad():
            correct.append(chunk.argmax(dim=-1) == target)
            if with_entropy:
                entropy.append(-(logp.exp() * logp).sum(-1))
    return TokenLogps(
        logps=torch.cat(logps),
        correct=torch.cat(correct),
        entropy=torch.cat(entropy) if with_entropy else None,
    )


def kept_token_logps(
    model: nn.Module,
    inputs: Mapping[str, Any],
    keep: torch.Tensor,
    targets: torch.Tensor,
    *,
    pick: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> TokenLogps:
    """Log-probs (N,) of ``targets`` predicted by the True positions of ``keep`` (B, T), in
    row-major order, under ``model`` called with ``inputs`` (``input_ids``, masks, position
    ids as keyword arguments). ``pick`` (N,) maps each target to the kept position
    (row-major rank) that predicts it, where a position predicts several
    (``shared_prompt``); by default the k-th target belongs to the k-th kept position.

    Chunked over the vocabulary when the model allows (``vocab_chunks``), else through
    ``logits_to_keep`` and ``logits_token_logps``: the same numbers either way.
    """
    parts = causal_lm_parts(model)
    if parts is None:
        kept = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (K, V)
        kept = kept if pick is None else kept[pick]  # (N, V)
        return logits_token_logps(kept, targets, temperature=temperature, with_entropy=with_entropy)
    hidden = parts.hidden_states(**inputs, use_cache=False)[keep]  # (K, H)
    hidden = hidden if pick is None else hidden[pick]  # (N, H)
    return parts.token_logps(hidden, targets, temperature=temperature, with_entropy=with_entropy)


def completion_token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """``per_token_logps`` (B, T-1) of the completion tokens of right-padded rows under
    ``model``, 0 elsewhere. Only positions whose next token is a completion token go through
    the LM head: prompts and padding cost no vocabulary projection."""
    per_token_logps, _ = completion_logps_and_correct(
        model, completion_mask, input_ids=input_ids, attention_mask=attention_mask
    )
    return per_token_logps


def completion_logps_and_correct(
    model: nn.Module, completion_mask: torch.Tensor, **inputs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_token_logps, token_correct)``, both (B, T-1), of the tokens ``completion_mask``
    (B, T) counts, under ``model`` called with ``inputs`` (``input_ids`` among them); 0 /
    False elsewhere. ``token_correct``: the argmax prediction is the token (no grad)."""
    input_ids = inputs["input_ids"]
    keep = keep_positions(completion_mask)  # (B, T) bool
    predicts = keep[:, :-1]  # (B, T-1): position t is kept, so token t+1 is scored
    scored = kept_token_logps(model, inputs, keep, input_ids[:, 1:][predicts])  # (N,)
    per_token_logps = scored.logps.new_zeros(predicts.shape).masked_scatter(predicts, scored.logps)
    token_correct = torch.zeros_like(predicts).masked_scatter(predicts, scored.correct)
    return per_token_logps, token_correct


@torch.no_grad()
def next_token_correct(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: whether the argmax of position t is token t+1 (for token accuracy)."""
    return logits[:, :-1].argmax(dim=-1) == input_ids[:, 1:]
