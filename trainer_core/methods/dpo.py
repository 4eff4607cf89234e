"""Direct Preference Optimization (DPO): learn from pairs of a preferred and a rejected answer.

Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, and OpenAI's ``dpo`` fine-tuning
jobs. DPO needs no reward model and no sampling: it raises the policy's log-probability ratio
to a frozen reference on the chosen answer relative to the rejected one,

    L = −log σ(β · [(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))]),

or one of the variants in ``dpo_losses`` (IPO, hinge, robust, ..., weighted sums of several).
The reference is the base model (the adapter switched off) under LoRA, a frozen copy under
full fine-tuning, or log-probs computed once before training (see ``reference.py``).

One optimizer step, top to bottom: micro-batches of pairs (chosen and rejected in one
forward: one row per pair with the prompt computed once, ``shared_prompt.py``, or under
FlashAttention chosen and rejected rows in one 2B batch) → policy logps → reference logps →
loss normalised by the pairs of the whole step → backward → clip → AdamW step → schedule →
metrics → checkpoint.

Dropout is switched off in the policy and the reference, LoRA's included (TRL's
``disable_dropout=True``), so at the first step the policy is the reference and L = log 2.

Deliberately left out (for now): TRL's f-divergences, WPO weighting, LD-DPO, the aot and
discopop losses, and syncing the reference (TR-DPO). The device,
mixed precision and gradient checkpointing: ``placement`` (the policy's and the reference's
forward and the loss run under its autocast).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from trainer_core import loop, shared_prompt
from trainer_core.adapters import load_trained
from trainer_core.dpo_losses import DpoStats, add_dpo_stats, combined_dpo_loss
from trainer_core.models import load_model, load_tokenizer
from trainer_core.preference_data import PairBatch, collate_pairs, load_preference, pair_lengths
from trainer_core.preference_losses import validation_pair_metrics
from trainer_core.reference import Reference, ReferenceModel, forward_logps, precompute
from trainer_core.seams import RunResult
from trainer_core.specs import DpoHyperparameters


@loop.method(DpoHyperparameters)
def train(job: loop.Job, hp: DpoHyperparameters) -> RunResult:
    # The policy is on the device before the reference is taken: a frozen copy lands there too.
    model, tokenizer, examples, valid_examples = job.load(load_preference, unit="pairs")
    pad_token_id = tokenizer.pad_token_id

    # -- the reference: live (adapter off / frozen copy) or precomputed once, now ---------
    train_ref: Reference
    valid_ref: Reference
    if hp.precompute_ref_log_probs:
        # Before the first step the policy is the reference: no copy is needed.
        now = ReferenceModel.of(model, job.spec.adapter.type, keep=False)
        precomputed = partial(
            precompute, now, batch_size=hp.batch_size, pad_token_id=pad_token_id, where=job.where
        )
        train_ref = valid_ref = precomputed(examples)
        if valid_examples:
            valid_ref = precomputed(valid_examples)
    else:
        train_ref = valid_ref = ReferenceModel.of(model, job.spec.adapter.type, dist=job.dist)

    run: loop.Run[DpoStats] = job.start(
        model,
        tokenizer,
        rows=len(examples),
        summarise=dpo_metrics,  # pair-weighted over a logging window's steps
        checkpoint_metrics=lambda stats: {"train_loss": stats.loss},
        validate=job.validation(
            valid_examples,
            model,
            partial(collate_pairs, pad_token_id=pad_token_id),
            partial(step_loss, model, valid_ref, hp, 1, 1),  # normalisers of 1: stats are sums
            valid_metrics,
        ),
    )

    def collate(indices: list[int]) -> PairBatch:
        return collate_pairs([examples[i] for i in indices], pad_token_id)

    # -- one optimizer step: policy logps → reference logps → the loss of the step's pairs --
    shared = shared_prompt.supported(model)  # pairs run as one row each (shared_prompt.py)
    for micro_batches in run.steps(
        # A token budget counts both rows of a pair unless it runs as one row.
        lengths=pair_lengths(examples, one_row=shared),
        rows_per_item=1 if shared else 2,
    ):
        batches = [collate(indices) for indices in micro_batches]
        # The loss is a mean over the pairs (and, for "sft", the chosen tokens) of the
        # whole step, so accumulating micro-batches gives the gradient of one big batch,
        # and the ranks' shares of it add up to the whole (see distributed).
        num_pairs = sum(len(indices) for indices in micro_batches)
        num_chosen_tokens = sum(int(chosen_mask(batch).sum()) for batch in batches)
        loss = partial(step_loss, model, train_ref, hp, num_pairs, num_chosen_tokens)
        run.train_step(micro_batches, collate, loss, add_dpo_stats, wholes=batches)

    return run.result()


def step_loss(
    model: nn.Module,
    reference: Reference,
    hp: DpoHyperparameters,
    num_pairs: int,
    num_chosen_tokens: int,
    batch: PairBatch,
    share: loop.Share,
) -> tuple[torch.Tensor, DpoStats]:
    """A micro-batch's (or a rank's share of it) part of the step's loss: policy logps,
    reference logps (a precomputed reference looks them up by ``share.rows``, the pairs'
    indices), loss."""
    per_token_logps, logps = forward_logps(model, batch)  # (2B, T-1), (2B,)
    policy_chosen_logps, policy_rejected_logps = logps.chunk(2)  # (B,) each
    ref_chosen_logps, ref_rejected_logps = reference.logps(batch, share.rows)  # (B,) each
    mask = batch.completion_mask[:, 1:]  # (2B, T-1), aligned with per_token_logps
    return combined_dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        per_token_logps.chunk(2)[0],
        *mask.chunk(2),
        num_pairs=num_pairs,
        num_chosen_tokens=num_chosen_tokens,
        loss_types=hp.loss_type,
        loss_weights=hp.loss_weights,
        beta=hp.beta,
        label_smoothing=hp.label_smoothing,
    )


def dpo_metrics(stats: Sequence[DpoStats]) -> dict[str, float]:
    """The loss and the means (rewards, log-probs) over the pairs of all ``stats``."""
    total = add_dpo_stats(stats)
    return {"train_loss": total.loss, **total.means()}


def valid_metrics(stats: Sequence[DpoStats]) -> dict[str, float]:
    """A validation pass's loss, reward accuracy and margin (``valid_*``)."""
    return validation_pair_metrics(dpo_metrics(stats))


def chosen_mask(batch: PairBatch) -> torch.Tensor:
    """(B, T-1) 1 where the next token of a chosen row is a completion token."""
    return batch.completion_mask[:, 1:].chunk(2)[0]


def evaluate(
    model_path: str,
    adapter_dir: str | None,
    data_file: str,
    max_seq_len: int,
    hyperparameters: DpoHyperparameters,
    *,
    allow_hub: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """``{"valid_loss", "valid_rewards/accuracies", "valid_rewards/margins"}`` of a saved
    adapter on ``data_file``, against the base model as the reference.

    The same computation as the validation metrics of a run's checkpoints (with the run's
    ``hyperparameters``: beta, loss types, batch size), so a downloaded adapter can be checked
    against what the job reported. ``adapter_dir`` is a PEFT folder, a full model folder, or
    None for the base model (whose loss is then log 2 under "sigmoid").
    """
    tokenizer = load_tokenizer(model_path, allow_hub=allow_hub, trust_remote_code=trust_remote_code)
    model = load_trained(
        model_path, adapter_dir, allow_hub=allow_hub, trust_remote_code=trust_remote_code
    )
    reference: Reference
    if isinstance(model, PeftModel):
        reference = ReferenceModel(model, disable_adapter=True)
    else:
        base = load_model(model_path, allow_hub=allow_hub, trust_remote_code=trust_remote_code)
        reference = ReferenceModel(base.eval(), disable_adapter=False)
    data = load_preference(Path(data_file), tokenizer, max_seq_len)
    return loop.evaluate(
        model,
        data.examples,
        hyperparameters.batch_size,
        partial(collate_pairs, pad_token_id=tokenizer.pad_token_id),
        partial(step_loss, model, reference, hyperparameters, 1, 1),
        valid_metrics,
    )
