"""Log-probs over the vocabulary a chunk of rows at a time: the LM head fused with the
log-softmax, so that neither the forward nor the backward ever holds the ``[tokens × vocab]``
logits at once (issue #12, item 2).

A causal LM's head turns hidden states (N, H) into logits (N, V); V is 32k-256k on real
models, so for a step of a few thousand tokens the fp32 logits, their softmax and their
gradient are the largest tensors of the step (Qwen2.5-0.5B: 151,936 × 3,840 × 4 bytes =
2.3 GB each). Here ``head_logps`` takes the hidden states and the head's weight instead,
and per chunk of rows (``CHUNK_BYTES`` of fp32 logits) computes the logits, reduces them to
what the loss reads (the log-prob of the target, its argmax-correctness, optionally the
entropy) and drops them. It saves only the hidden states, the weight (a reference to the
parameter), the targets and one logsumexp per row; the backward recomputes each chunk's logits (one more head matmul, the price of the
memory) and accumulates the gradients of the hidden states and, when the head is trainable
(full fine-tuning; a LoRA head is frozen), of the weight and bias. When all rows fit in one
chunk (small vocabularies, short batches: the CPU benchmarks) the forward keeps that chunk's
softmax for the backward instead, which is within the budget anyway and saves the recompute.

Numbers: in fp32 the same as ``log_softmax`` + ``gather`` up to rounding (the CPU tests hold
them to 1e-5 relative, values and gradients). Under autocast the head matmul runs in the
autocast dtype, exactly as the model's own ``lm_head`` would, and the softmax statistics in
fp32 (what the ``logits_to_keep`` path did chunk-wise, in the forward only).

Learnt from TRL's ``trl/kernels/chunked_logprob.py`` and liger-kernel's fused linear
cross-entropy; unlike Liger's we keep no gradient buffer from the forward (it would be an
(N, H) tensor and a (V, H) one kept alive until the backward) and recompute instead.
``causal_lm_parts`` finds the decoder and the head of a model (under peft too) and says when
this path does not apply (``head_logps`` callers then keep the ``logits_to_keep`` path).

Entropy is returned without grad: the online methods report it, none trains on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Rows per chunk are chosen so that one (rows, V) fp32 tensor takes about this much memory;
# the backward holds three or four such tensors at once. 256 MiB is ~440 rows at Qwen's
# 151,936 vocabulary (a head matmul of ~60 GFLOP per chunk at hidden 896: big enough to keep
# a GPU busy) and the whole batch at once on the tiny test models.
CHUNK_BYTES = 256 * 2**20


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab_size`` (see ``CHUNK_BYTES``)."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


@dataclass(frozen=True)
class TokenLogps:
    """Per-row results of ``head_logps``, all (N,)."""

    logps: torch.Tensor  # fp32 log p(target), with grad
    correct: torch.Tensor  # bool, argmax == target
    entropy: torch.Tensor | None  # fp32, no grad; None unless asked for


def head_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    rows: int | None = None,
) -> TokenLogps:
    """``log_softmax(linear(hidden, weight, bias) / temperature)[target]`` per row.

    Args:
        hidden: (N, H) final hidden states of the positions that predict a token.
        weight: (V, H) the LM head's weight (the embedding matrix when they are tied).
        bias: (V,) or None.
        targets: (N,) long, the token each row predicts.
        temperature: the logits are divided by it (the sampling distribution of a rollout).
        with_entropy: also return each row's entropy (no grad).
        rows: rows per chunk; default ``chunk_rows(V)``.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    rows = rows or chunk_rows(weight.size(0))
    logps, correct, entropy = _HeadLogps.apply(
        hidden, weight, bias, targets, float(temperature), with_entropy, rows, dtype
    )
    return TokenLogps(logps=logps, correct=correct, entropy=entropy if with_entropy else None)


def _chunk_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """(rows, V) logits / temperature of one chunk, in fp32 (fp64 for fp64 inputs); the
    matmul in its inputs' dtype."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (rows, V)
    return logits / temperature if temperature != 1.0 else logits


class _HeadLogps(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        with_entropy: bool,
        rows: int,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = hidden.size(0)
        stats = torch.promote_types(dtype, torch.float32)
        logps = hidden.new_empty(n, dtype=stats)
        lse = hidden.new_empty(n, dtype=stats)
        correct = torch.empty(n, dtype=torch.bool, device=hidden.device)
        entropy = hidden.new_zeros(n if with_entropy else 0, dtype=stats)
        # When every row fits in one chunk, keep its probabilities for the backward instead
        # of recomputing them: they are within the chunk budget by construction, and the
        # recompute (one more head matmul) would buy no memory.
        single = n <= rows
        saved_probs: torch.Tensor | None = None
        # Casts are explicit (autocast off inside): the weight is cast once per call, not per
        # chunk, as autocast's own cast cache would.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            for start in range(0, n, rows):
                end = min(n, start + rows)
                logits = _chunk_logits(hidden[start:end].to(dtype), w, b, temperature)
                target = targets[start:end]
                chunk_lse = torch.logsumexp(logits, dim=-1)  # (rows,)
                lse[start:end] = chunk_lse
                logps[start:end] = logits.gather(-1, target[:, None]).squeeze(-1) - chunk_lse
                correct[start:end] = logits.argmax(dim=-1) == target
                if with_entropy or single:
                    probs = torch.exp(logits - chunk_lse[:, None])  # (rows, V) softmax
                    if with_entropy:  # H = lse - Σ p·s
                        entropy[start:end] = chunk_lse - (probs * logits).sum(-1)
                    if single:
                        saved_probs = probs
        ctx.save_for_backward(hidden, weight, bias, targets, lse, saved_probs)
        ctx.temperature, ctx.rows, ctx.dtype = temperature, rows, dtype
        ctx.mark_non_differentiable(correct, entropy)
        return logps, correct, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logps: torch.Tensor, *_: Any
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse, saved_probs = ctx.saved_tensors
        temperature, rows, dtype = ctx.temperature, ctx.rows, ctx.dtype
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # fp32 accumulators across chunks; cast to the parameters' dtype at the end.
        stats = lse.dtype
        grad_weight = torch.zeros_like(weight, dtype=stats) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=stats) if want_bias and bias is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            for start in range(0, hidden.size(0), rows):
                end = min(hidden.size(0), start + rows)
                h = hidden[start:end].to(dtype)
                g = grad_logps[start:end].to(stats)  # (rows,)
                # d logp_t / d s = onehot(t) - softmax(s); chain through s = z / temperature.
                if saved_probs is not None:  # the one chunk, kept by the forward
                    grad_logits = saved_probs * -g[:, None]  # (rows, V), a new tensor
                else:
                    logits = _chunk_logits(h, w, b, temperature)  # (rows, V)
                    grad_logits = torch.exp(logits - lse[start:end, None]).mul_(-g[:, None])
                grad_logits.scatter_add_(-1, targets[start:end, None], g[:, None])
                if temperature != 1.0:
                    grad_logits.div_(temperature)
                grad_z = grad_logits.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start:end] = (grad_z @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (grad_z.T @ h).to(stats)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


@dataclass(frozen=True)
class CausalLmParts:
    """A causal LM split where ``head_logps`` takes over: the decoder (input ids to final
    hidden states) and the output projection."""

    decoder: nn.Module
    head: nn.Linear

    def hidden_states(self, **inputs: Any) -> torch.Tensor:
        """(B, T, H) final hidden states (after the last norm) of the decoder."""
        hidden: torch.Tensor = self.decoder(**inputs).last_hidden_state
        return hidden

    def token_logps(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> TokenLogps:
        """``head_logps`` of ``hidden`` (N, H) through this model's head."""
        return head_logps(
            hidden,
            self.head.weight,
            self.head.bias,
            targets,
            temperature=temperature,
            with_entropy=with_entropy,
        )


def causal_lm_parts(model: nn.Module) -> CausalLmParts | None:
    """The decoder and head of a causal LM (a peft model too), or None where the chunked
    path would not compute what ``model(...).logits`` does:

    - the model has no ``get_decoder``/``get_output_embeddings`` (not a transformers LM);
    - the head is not a plain ``nn.Linear`` (a LoRA or ``modules_to_save`` wrapper on the
      head: its output is not ``linear(hidden, weight)``);
    - the config post-processes logits (Gemma's ``final_logit_softcapping``, Cohere's
      ``logit_scale``);
    - the head is partitioned by DeepSpeed ZeRO-3 (its weight is an empty shard outside the
      module's own forward hooks): the ``logits_to_keep`` path runs there.
    """
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    head = get_head()
    if type(head) is not nn.Linear:
        return None
    config = getattr(base, "config", None)
    for scaling in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, scaling, None) not in (None, 1, 1.0):
            return None
    if hasattr(head.weight, "ds_id"):  # a ZeRO-3 partitioned parameter
        return None
    decoder = get_decoder()
    if not isinstance(decoder, nn.Module) or decoder is base:
        return None
    return CausalLmParts(decoder=decoder, head=head)
