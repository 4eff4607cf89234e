"""Simple Preference Optimization (SimPO): a reference-free margin on length-averaged logps.

Meng et al. 2024, https://arxiv.org/abs/2405.14734. The implicit reward of a completion is
its length-averaged log-probability scaled by β, and the chosen one must beat the rejected one
by a target margin γ:

    L = −log σ(β · (π̄(y_c|x) − π̄(y_r|x)) − γ),   π̄ = log π_θ(y|x) / |y|.

TRL 1.16 has no SimPO trainer; this is its ``experimental.cpo.CPOTrainer`` with
``loss_type="simpo"`` and ``cpo_alpha=0`` (no NLL term), the setting TRL documents for
SimPO (see ``preference_losses.simpo_loss``). The rewards it reports are β · π̄, as TRL's.

One optimizer step, top to bottom: micro-batches of pairs (chosen and rejected in one
forward: one row per pair with the prompt once, ``shared_prompt.py``) → per-token logps →
length-averaged logps → loss normalised by the pairs of the whole step → backward → clip →
AdamW step → schedule → metrics → checkpoint.

Dropout is switched off, LoRA's included (TRL's ``disable_dropout=True``). Deliberately left
out (for now): CPO's NLL term and its other losses, AlphaPO's reward shaping and label
smoothing. The device, mixed precision and gradient checkpointing: ``placement``; several
processes and ZeRO: ``distributed`` (each rank computes its share of every micro-batch
against the whole step's pair count).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from trainer_core import loop, shared_prompt
from trainer_core.preference_data import PairBatch, collate_pairs, load_preference, pair_lengths
from trainer_core.preference_losses import PairStats, add_stats, simpo_loss, validation_pair_metrics
from trainer_core.reference import forward_logps
from trainer_core.seams import RunResult
from trainer_core.specs import SimpoHyperparameters


@loop.method(SimpoHyperparameters)
def train(job: loop.Job, hp: SimpoHyperparameters) -> RunResult:
    model, tokenizer, examples, valid_examples = job.load(load_preference, unit="pairs")
    pad_token_id = tokenizer.pad_token_id
    run: loop.Run[PairStats] = job.start(
        model,
        tokenizer,
        rows=len(examples),
        summarise=pair_metrics,  # pair-weighted over the window
        validate=job.validation(
            valid_examples,
            model,
            partial(collate_pairs, pad_token_id=pad_token_id),
            partial(step_loss, model, hp, 1),  # a normaliser of 1: the stats are sums
            lambda stats: validation_pair_metrics(pair_metrics(stats)),
        ),
    )

    def collate(indices: list[int]) -> PairBatch:
        return collate_pairs([examples[i] for i in indices], pad_token_id)

    # -- one optimizer step: length-averaged logps of both answers → the margin loss --------
    shared = shared_prompt.supported(model)  # pairs run as one row each (shared_prompt.py)
    for micro_batches in run.steps(
        # A token budget counts both rows of a pair unless it runs as one row.
        lengths=pair_lengths(examples, one_row=shared),
        rows_per_item=1 if shared else 2,
    ):
        # The loss is a mean over the pairs of the whole step, so accumulating micro-batches
        # gives the gradient of one big batch, and the ranks' shares add up to it.
        num_pairs = sum(len(indices) for indices in micro_batches)
        run.train_step(micro_batches, collate, partial(step_loss, model, hp, num_pairs), add_stats)

    return run.result()


def step_loss(
    model: nn.Module, hp: SimpoHyperparameters, num_pairs: int, batch: PairBatch, share: loop.Share
) -> tuple[torch.Tensor, PairStats]:
    """A micro-batch's (or a rank's share of it) part of the step's loss, against the whole
    step's pair count, from one forward pass over its pairs (one row per pair where the
    attention takes a 4D mask: ``shared_prompt``)."""
    _, logps = forward_logps(model, batch, average=True)  # (2B,) length-averaged
    policy_chosen_logps, policy_rejected_logps = logps.chunk(2)  # (B,) each
    return simpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        beta=hp.beta,
        gamma=hp.gamma,
        normaliser=num_pairs,
    )


def pair_metrics(stats: Sequence[PairStats]) -> dict[str, float]:
    """``PairStats.metrics`` over the pairs of all ``stats``."""
    return add_stats(stats).metrics()
