"""The reference policy π_ref: a model to score with (every method that has one), and the
log-probs of a pair batch (the DPO family).

Three ways to have one, all scoring in eval mode (no dropout) and without grad:

- Under LoRA the reference is the base model, i.e. the policy with its adapter switched off
  (peft's ``disable_adapter()``), as TRL does: ``ReferenceModel(model, disable_adapter=True)``.
  No second copy in memory.
- Under full fine-tuning, a deep copy of the model taken before training, frozen:
  ``ReferenceModel(frozen_copy(model), ...)``. Costs one more model in memory.
- ``Precomputed``: one pass over the examples before training, keeping two numbers per pair
  (TRL's ``precompute_ref_log_probs``). Before the first step the policy is the reference, so
  under full fine-tuning that pass needs no copy at all, and a step needs no reference
  forward.

The log-probs of a completion are the sum of its per-token log-probs (``preference_losses.completion_logps``),
the same function the method uses for the policy, so policy = reference gives Δ = 0 exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Protocol

import torch
from torch import nn

from trainer_core import distributed, shared_prompt
from trainer_core.batching import fixed_batches
from trainer_core.distributed import Distributed
from trainer_core.logprobs import completion_token_logps
from trainer_core.loop import evaluating
from trainer_core.placement import Placement
from trainer_core.preference_data import PairBatch, PreferenceExample, collate_pairs
from trainer_core.preference_losses import completion_logps


def forward_logps(
    model: nn.Module, batch: PairBatch, *, average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_token_logps (2B, T-1), logps (2B,))``: each row's summed completion log-prob,
    or with ``average`` its mean over the completion tokens (``completion_logps``; per-token
    logps are 0 outside the completions, which the completion mask drops)."""
    if batch.shared is not None and shared_prompt.supported(model):
        # One row per pair, the prompt once; its scored tokens land where the two-row layout
        # has them (chosen rows, then rejected rows, in row-major order).
        scored = batch.completion_mask[:, 1:].bool()  # (2B, T-1)
        logps = shared_prompt.scored_logps(model, batch.shared)  # (N,)
        per_token_logps = logps.new_zeros(scored.shape).masked_scatter(scored, logps)
    else:
        per_token_logps = completion_token_logps(
            model, batch.input_ids, batch.attention_mask, batch.completion_mask
        )  # (2B, T-1)
    mask = batch.completion_mask[:, 1:]  # (2B, T-1)
    return per_token_logps, completion_logps(per_token_logps, mask, average=average)


class Reference(Protocol):
    def logps(self, batch: PairBatch, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ref_chosen_logps, ref_rejected_logps)``, each (B,), of the pairs in ``batch``;
        ``indices`` are their positions in the example list (used by ``Precomputed``)."""
        ...


class ReferenceModel:
    """π_ref as a model to score with: ``model`` itself with its PEFT adapter switched off
    (``disable_adapter``: the base under a LoRA policy, no second copy in memory), or a frozen
    model (a copy taken before training, or a loaded base). Every method with a reference
    scores through ``scoring``: in eval mode and without grad.
    """

    def __init__(self, model: nn.Module, *, disable_adapter: bool) -> None:
        if disable_adapter and not hasattr(model, "disable_adapter"):
            raise TypeError("disable_adapter needs a peft model")
        self.model = model
        self.disable_adapter = disable_adapter

    @classmethod
    def of(
        cls,
        model: nn.Module,
        adapter_type: str,
        *,
        keep: bool = True,
        dist: Distributed | None = None,
    ) -> ReferenceModel:
        """The reference of a policy about to be trained: its base under LoRA, else (full
        fine-tuning) a frozen copy, sharded like the policy under ZeRO-3 when given the
        job's ``dist`` (``distributed.shard_frozen``). Take it once the policy is on its
        device: the copy lands there too.

        ``keep=False`` is for a pass before the first step, when the policy still is the
        reference: the model itself then serves, and nothing is copied."""
        if adapter_type == "lora":
            return cls(model, disable_adapter=True)
        if not keep:
            return cls(model, disable_adapter=False)
        frozen = frozen_copy(model)
        if dist is not None:
            frozen = distributed.shard_frozen(dist, frozen)
        return cls(frozen, disable_adapter=False)

    @contextmanager
    def scoring(self) -> Iterator[nn.Module]:
        """The reference model to call, for the duration: eval mode, no grad, adapter off."""
        adapter_off = (
            self.model.disable_adapter()  # type: ignore[operator]
            if self.disable_adapter
            else nullcontext()
        )
        with evaluating(self.model), adapter_off:
            yield self.model

    def logps(self, batch: PairBatch, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``Reference.logps`` of a pair batch."""
        with self.scoring() as model:
            _, logps = forward_logps(model, batch)  # (2B,)
        chosen, rejected = logps.chunk(2)
        return chosen, rejected


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` as it is now, in eval mode with no grad; take it before the
    first optimizer step."""
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


class Precomputed:
    """Reference log-probs computed once per example; ``logps`` looks them up by index."""

    def __init__(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> None:
        self.chosen_logps = chosen_logps  # (N,)
        self.rejected_logps = rejected_logps  # (N,)

    def logps(self, batch: PairBatch, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(list(indices), dtype=torch.long, device=self.chosen_logps.device)
        return self.chosen_logps[index], self.rejected_logps[index]


def precompute(
    reference: Reference,
    examples: Sequence[PreferenceExample],
    *,
    batch_size: int,
    pad_token_id: int,
    where: Placement | None = None,
) -> Precomputed:
    """One pass of ``reference`` over ``examples``, in file order, on ``where``'s device and in
    its precision (the CPU in fp32 by default): the precision the policy will train in, so
    that policy = reference still gives Δ = 0 at the first step."""
    where = where or Placement()
    chosen, rejected = [], []
    for indices in fixed_batches(len(examples), batch_size):
        batch = where.to(collate_pairs([examples[i] for i in indices], pad_token_id))
        with where.autocast():
            ref_chosen_logps, ref_rejected_logps = reference.logps(batch, indices)  # (B,) each
        chosen.append(ref_chosen_logps)
        rejected.append(ref_rejected_logps)
    return Precomputed(torch.cat(chosen), torch.cat(rejected))
