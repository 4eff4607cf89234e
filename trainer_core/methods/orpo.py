"""Odds Ratio Preference Optimization (ORPO): SFT and preference alignment in one loss.

Hong et al. 2024, https://arxiv.org/abs/2403.07691, as TRL 1.16's
``experimental.orpo.ORPOTrainer``. No reference model: next to the NLL of the chosen rows it
penalises the log odds ratio of the length-averaged likelihoods,

    L = NLL(chosen) − β · log σ(log-odds(y_c) − log-odds(y_r)),
    log-odds(y) = π̄(y|x) − log(1 − exp π̄(y|x)),   π̄ = log π_θ(y|x) / |y|,

where, as in TRL, the NLL covers the whole chosen sequence, prompt tokens included (see
``preference_losses.orpo_loss``). The rewards it reports are β · π̄, as TRL's.

One optimizer step, top to bottom: micro-batches of pairs (chosen and rejected rows in one
2B batch) → per-token logps → length-averaged logps and the chosen NLL → loss normalised by
the pairs and NLL tokens of the whole step → backward → clip → AdamW step → schedule →
metrics → checkpoint.

Dropout is switched off, LoRA's included (TRL's ``disable_dropout=True``). Deliberately left
out (for now): encoder-decoder models. The device, mixed precision and gradient checkpointing:
``placement``; several processes and ZeRO: ``distributed`` (each rank computes its share of
every micro-batch against the whole step's normalisers).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from trainer_core import loop
from trainer_core.logprobs import completion_logps_and_correct
from trainer_core.preference_data import PairBatch, collate_pairs, load_preference
from trainer_core.preference_losses import (
    OrpoStats,
    PairStats,
    add_stats,
    completion_logps,
    orpo_loss,
    validation_pair_metrics,
)
from trainer_core.seams import RunResult
from trainer_core.specs import OrpoHyperparameters

OrpoStep = tuple[PairStats, OrpoStats]


@loop.method(OrpoHyperparameters)
def train(job: loop.Job, hp: OrpoHyperparameters) -> RunResult:
    model, tokenizer, examples, valid_examples = job.load(load_preference, unit="pairs")
    pad_token_id = tokenizer.pad_token_id

    def collate(indices: list[int]) -> PairBatch:
        return collate_pairs([examples[i] for i in indices], pad_token_id)

    run: loop.Run[OrpoStep] = job.start(
        model,
        tokenizer,
        rows=len(examples),
        # Pair- (and NLL token-) weighted over a logging window's steps.
        summarise=partial(orpo_metrics, beta=hp.beta),
        validate=job.validation(
            valid_examples,
            model,
            partial(collate_pairs, pad_token_id=pad_token_id),
            partial(step_loss, model, hp, 1, 1),  # normalisers of 1: the stats are sums
            lambda stats: validation_pair_metrics(orpo_metrics(stats, hp.beta)),
        ),
    )

    # -- one optimizer step: one forward of both answers → NLL + odds-ratio term ------------
    for micro_batches in run.steps(
        # Chosen and rejected run as two rows: a token budget counts both.
        lengths=[example.padded_length for example in examples],
        rows_per_item=2,
    ):
        batches = [collate(indices) for indices in micro_batches]
        # The odds-ratio term is a mean over the pairs of the whole step and the NLL a
        # mean over its chosen tokens, so accumulating micro-batches gives the gradient
        # of one big batch, and the ranks' shares add up to it.
        num_pairs = sum(len(indices) for indices in micro_batches)
        num_nll_tokens = sum(int(nll_mask(batch).sum()) for batch in batches)
        loss = partial(step_loss, model, hp, num_pairs, num_nll_tokens)
        run.train_step(micro_batches, collate, loss, add_orpo_stats, wholes=batches)

    return run.result()


def nll_mask(batch: PairBatch) -> torch.Tensor:
    """(B, T-1) the chosen rows' NLL targets: every real token after the first, prompt
    included (TRL's ORPO labels are the input ids wherever attention is 1)."""
    return batch.attention_mask[:, 1:].chunk(2)[0]


def step_loss(
    model: nn.Module,
    hp: OrpoHyperparameters,
    num_pairs: int,
    num_nll_tokens: int,
    batch: PairBatch,
    share: loop.Share,
) -> tuple[torch.Tensor, OrpoStep]:
    """A micro-batch's (or a rank's share of it) part of the step's loss, against the whole
    step's normalisers, from one forward pass over its 2B rows."""
    # Score the tokens either term reads: every completion token, and the chosen rows' NLL
    # targets; only their positions go through the (vocabulary-chunked) head.
    scored = batch.completion_mask.clone()  # (2B, T)
    scored[: len(scored) // 2, 1:] |= nll_mask(batch).to(scored.dtype)
    per_token_logps, _ = completion_logps_and_correct(
        model, scored, input_ids=batch.input_ids, attention_mask=batch.attention_mask
    )  # (2B, T-1), 0 where neither term reads
    logps = completion_logps(per_token_logps, batch.completion_mask[:, 1:], average=True)
    policy_chosen_logps, policy_rejected_logps = logps.chunk(2)  # (B,) each
    loss, pairs, orpo = orpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        per_token_logps.chunk(2)[0],  # (B, T-1) the chosen rows
        nll_mask(batch),
        beta=hp.beta,
        nll_normaliser=num_nll_tokens,
        normaliser=num_pairs,
    )
    return loss, (pairs, orpo)


def add_orpo_stats(stats: Sequence[OrpoStep]) -> OrpoStep:
    return add_stats([pairs for pairs, _ in stats]), add_stats([orpo for _, orpo in stats])


def orpo_metrics(stats: Sequence[OrpoStep], beta: float) -> dict[str, float]:
    """``OrpoStats.metrics`` over the pairs and NLL tokens of all ``stats``."""
    pairs, orpo = add_orpo_stats(stats)
    return orpo.metrics(pairs, beta)
