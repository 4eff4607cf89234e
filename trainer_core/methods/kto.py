"""Kahneman–Tversky Optimization (KTO): learn from completions labelled good or bad, unpaired.

Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, as TRL 1.16's ``KTOTrainer``
(``loss_type="kto"``). Each row is (prompt, completion, desirable?); preference pairs are
unpaired into one desirable and one undesirable row. Like DPO it moves the policy's log-ratio
Δ = log π_θ(y|x) − log π_ref(y|x) up on desirable and down on undesirable completions, but
against a baseline z, the policy's KL from the reference estimated on mismatched pairs: row
i's prompt with row i−1's completion (TRL's rotation by one within the batch; see
``preference_losses.kto_loss``). So a batch needs two rows or more. One difference from
TRL 1.16: rows are shuffled each epoch, as in every method here, and rotated within the
micro-batch they land in. TRL precomputes the rotation, so it must read KTO data in file
order (``train_sampling_strategy="sequential"``); the rotation within a batch is the same.

One optimizer step, top to bottom: micro-batches of rows → policy logps (with grad) →
mismatched rows' policy logps (no grad, as TRL) → reference logps of both → loss normalised
by the rows of the whole step → backward → clip → AdamW step → schedule → metrics →
checkpoint.

The reference is the base model (the adapter switched off) under LoRA and a frozen copy
under full fine-tuning (``reference.ReferenceModel``). Dropout is switched off, LoRA's included
(TRL's ``disable_dropout=True``), so at the first step the policy is the reference: Δ = z = 0.

Several processes and ZeRO: each rank computes its share of every micro-batch (rows with
their mismatched twins), and z is the whole micro-batch's mean over the ranks, so N
processes compute what one would (``distributed.mean_over_ranks``).

Deliberately left out (for now): TRL's ``apo_zero_unpaired`` loss, precomputed reference
logps, and its warning on unbalanced desirable/undesirable weights. The device, mixed
precision and gradient checkpointing: ``placement``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from trainer_core import distributed, loop
from trainer_core.distributed import Distributed
from trainer_core.logprobs import completion_token_logps
from trainer_core.preference_data import (
    UnpairedBatch,
    UnpairedExample,
    collate_unpaired,
    load_unpaired,
)
from trainer_core.preference_losses import KtoStats, add_stats, completion_logps, kto_loss
from trainer_core.reference import ReferenceModel
from trainer_core.seams import RunResult
from trainer_core.specs import KtoHyperparameters


@loop.method(KtoHyperparameters)
def train(job: loop.Job, hp: KtoHyperparameters) -> RunResult:
    if hp.batch_size < 2:
        raise ValueError(
            "KTO needs batch_size >= 2: its KL baseline pairs each prompt of a batch with "
            "another row's completion"
        )

    # The policy is on the device before the reference is taken: a frozen copy lands there too.
    model, tokenizer, examples, valid_examples = job.load(
        load_unpaired,
        minimum=2,
        too_few="KTO needs 2 or more {split} examples with a completion token within "
        "{max_seq_len}, for its KL baseline",
    )
    pad_token_id, max_seq_len = tokenizer.pad_token_id, job.spec.max_seq_len
    reference = ReferenceModel.of(model, job.spec.adapter.type, dist=job.dist)

    def collate(rows: list[tuple[UnpairedExample, UnpairedExample]]) -> KtoBatch:
        return KtoBatch(
            collate_unpaired([row for row, _ in rows], pad_token_id),
            collate_unpaired([twin for _, twin in rows], pad_token_id),
        )

    def collate_valid(indices: list[int]) -> KtoBatch:
        return KtoBatch(
            *collate_with_mismatched(valid_examples, indices, max_seq_len, pad_token_id)
        )

    run: loop.Run[KtoStats] = job.start(
        model,
        tokenizer,
        rows=len(examples),
        # Row-weighted over a logging window's steps (kl: the micro-batches' mean).
        summarise=lambda window: add_stats(window).metrics(),
        validate=job.validation(
            range(len(valid_examples)),  # indices: a lone last row borrows by its index
            model,
            collate_valid,
            # z of each validation batch alone (one process's: Distributed()); normalisers
            # of 1, the stats being sums.
            partial(step_loss, model, reference, hp, 1, Distributed()),
            valid_metrics,
        ),
    )

    # -- one optimizer step: policy, mismatched and reference logps → the loss of the rows ---
    for micro_batches in run.steps(lengths=[example.padded_length for example in examples]):
        # The loss is a mean over the rows of the whole step, so accumulating micro-batches
        # gives the gradient of one big batch, and the ranks' shares add up to it.
        rows_in_step = sum(len(indices) for indices in micro_batches)
        # Each row with its mismatched twin, paired over the whole micro-batch, so that a
        # rank's share keeps the twins one process would give it.
        with_twins = [
            list(
                zip(
                    [examples[i] for i in indices],
                    mismatched(examples, indices, max_seq_len),
                    strict=True,
                )
            )
            for indices in micro_batches
        ]
        loss = partial(step_loss, model, reference, hp, rows_in_step, job.dist)
        run.train_step(with_twins, collate, loss, add_stats)

    return run.result()


@dataclass(frozen=True)
class KtoBatch:
    """A micro-batch's rows and their mismatched twins (row i's prompt, row i−1's completion)."""

    rows: UnpairedBatch
    twins: UnpairedBatch

    @property
    def num_tokens(self) -> int:
        return self.rows.num_tokens

    @property
    def completion_mask(self) -> torch.Tensor:
        return self.rows.completion_mask


def collate_with_mismatched(
    examples: Sequence[UnpairedExample], indices: Sequence[int], max_seq_len: int, pad: int
) -> tuple[UnpairedBatch, UnpairedBatch]:
    """The batch of the rows ``indices``, and the batch of their ``mismatched`` twins."""
    rows = [examples[i] for i in indices]
    return collate_unpaired(rows, pad), collate_unpaired(
        mismatched(examples, indices, max_seq_len), pad
    )


def mismatched(
    examples: Sequence[UnpairedExample], indices: Sequence[int], max_seq_len: int
) -> list[UnpairedExample]:
    """The mismatched twins of the rows ``indices``: row i's prompt with row i−1's
    completion, the first taking the last's (TRL's rotation), cut to ``max_seq_len``.

    Only the last batch of an epoch or of a validation pass can hold a single row; rotating
    it would give the row itself, so it borrows the completion of the example after it (in
    file order) instead.
    """
    rows = [examples[i] for i in indices]
    if len(rows) > 1:
        donors = [rows[-1], *rows[:-1]]
    else:
        donors = [examples[(indices[0] + 1) % len(examples)]]
    return [
        UnpairedExample(
            row.prompt_ids,
            donor.completion_ids[: max_seq_len - len(row.prompt_ids)],
            row.label,
            row.line,
        )
        for row, donor in zip(rows, donors, strict=True)
    ]


def step_loss(
    model: nn.Module,
    reference: ReferenceModel,
    hp: KtoHyperparameters,
    rows_in_step: int,
    dist: Distributed,
    batch: KtoBatch,
    share: loop.Share,
) -> tuple[torch.Tensor, KtoStats]:
    """A micro-batch's (or a rank's share of it) part of the step's loss: policy, mismatched
    and reference logps.

    z is the mean over the whole micro-batch's mismatched rows, this rank's and the other
    ranks' of ``dist``.
    """
    policy_logps = sequence_logps(model, batch.rows)  # (B,)
    with torch.no_grad():  # z is a detached baseline, so its pass needs no graph
        policy_kl_logps = sequence_logps(model, batch.twins)  # (B,)
    ref_logps = reference_logps(reference, batch.rows)  # (B,)
    ref_kl_logps = reference_logps(reference, batch.twins)  # (B,)
    kl = distributed.mean_over_ranks(
        dist, policy_kl_logps - ref_kl_logps, weight=share.weight
    ).reshape(1)  # (1,): kto_loss takes the mean of (policy − ref) KL logps, here already one
    loss, stats = kto_loss(
        policy_logps,
        ref_logps,
        batch.rows.labels,
        kl,
        torch.zeros_like(kl),
        beta=hp.beta,
        desirable_weight=hp.desirable_weight,
        undesirable_weight=hp.undesirable_weight,
        normaliser=rows_in_step,
    )
    if dist.rank > 0:
        # z is the same on every rank: rank 0 (which always has rows) reports it.
        stats = dataclasses.replace(
            stats, kl_sum=torch.zeros_like(stats.kl_sum), num_batches=torch.tensor(0)
        )
    return loss, stats


def valid_metrics(stats: Sequence[KtoStats]) -> dict[str, float]:
    """The training metrics of all ``stats``, as ``valid_*`` (train_loss as valid_loss)."""
    return {
        "valid_loss" if name == "train_loss" else f"valid_{name}": value
        for name, value in add_stats(stats).metrics().items()
    }


def sequence_logps(model: nn.Module, batch: UnpairedBatch) -> torch.Tensor:
    """(B,) summed log-probs of each row's completion tokens under ``model``."""
    per_token_logps = completion_token_logps(
        model, batch.input_ids, batch.attention_mask, batch.completion_mask
    )  # (B, T-1)
    return completion_logps(per_token_logps, batch.completion_mask[:, 1:])  # (B,)


def reference_logps(reference: ReferenceModel, batch: UnpairedBatch) -> torch.Tensor:
    """(B,) the reference's ``sequence_logps`` (no grad)."""
    with reference.scoring() as ref_model:
        return sequence_logps(ref_model, batch)
