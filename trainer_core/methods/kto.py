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
under full fine-tuning (``reference.frozen_copy``). Dropout is switched off, LoRA's included
(TRL's ``disable_dropout=True``), so at the first step the policy is the reference: Δ = z = 0.

Deliberately left out (for now): TRL's ``apo_zero_unpaired`` loss, precomputed reference
logps, its warning on unbalanced desirable/undesirable weights, and resuming. The device, mixed
precision and gradient checkpointing: ``placement``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from trainer_core.adapters import apply_adapter
from trainer_core.batching import epoch_steps, fixed_batches, steps_per_epoch
from trainer_core.checkpoint import TrainerState, already_done, resume, save_checkpoint
from trainer_core.logprobs import completion_token_logps
from trainer_core.loop import seed_everything
from trainer_core.models import load_model_and_tokenizer
from trainer_core.optim import build_optimizer, build_scheduler, optimizer_step
from trainer_core.placement import Placement, backward, enable_gradient_checkpointing, place
from trainer_core.preference_data import (
    UnpairedBatch,
    UnpairedExample,
    collate_unpaired,
    load_unpaired,
)
from trainer_core.preference_losses import KtoStats, add_stats, completion_logps, kto_loss
from trainer_core.reference import disable_dropout, frozen_copy
from trainer_core.reporting import report_truncation
from trainer_core.seams import CheckpointStore, MetricSink, RunResult, ShouldStop
from trainer_core.specs import KtoHyperparameters, TrainSpec


def train(
    spec: TrainSpec, sink: MetricSink, store: CheckpointStore, should_stop: ShouldStop
) -> RunResult:
    hp = spec.hyperparameters
    assert isinstance(hp, KtoHyperparameters)
    if hp.batch_size < 2:
        raise ValueError(
            "KTO needs batch_size >= 2: its KL baseline pairs each prompt of a batch with "
            "another row's completion"
        )
    seed_everything(spec.seed, spec.num_threads)
    where = place(spec.resources)  # device and precision (see placement)
    scaler = where.grad_scaler()

    # -- model and data ------------------------------------------------------------------
    base, tokenizer = load_model_and_tokenizer(
        spec.model, allow_hub=spec.allow_hub, trust_remote_code=spec.trust_remote_code
    )
    enable_gradient_checkpointing(base, spec.resources.gradient_checkpointing)
    train_data = load_unpaired(spec.train_file, tokenizer, spec.max_seq_len)
    report_truncation(sink, train_data, "training", spec.max_seq_len)
    if len(train_data.examples) < 2:
        raise ValueError(
            f"KTO needs 2 or more training examples with a completion token within "
            f"{spec.max_seq_len}, for its KL baseline"
        )
    valid_data = None
    if spec.validation_file is not None:
        valid_data = load_unpaired(spec.validation_file, tokenizer, spec.max_seq_len)
        report_truncation(sink, valid_data, "validation", spec.max_seq_len)
        if len(valid_data.examples) < 2:
            raise ValueError(
                f"KTO needs 2 or more validation examples with a completion token within "
                f"{spec.max_seq_len}"
            )
    pad_token_id = tokenizer.pad_token_id

    model = where.model(apply_adapter(base, spec.adapter))
    disable_dropout(model)
    model.train()
    # The reference: None means the policy with its adapter switched off (LoRA).
    ref_model = frozen_copy(model) if spec.adapter.type == "full" else None

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, learning_rate=hp.learning_rate, weight_decay=hp.weight_decay)
    per_epoch = steps_per_epoch(
        len(train_data.examples), hp.batch_size, hp.gradient_accumulation_steps
    )
    total_steps = per_epoch * hp.n_epochs
    scheduler = build_scheduler(
        optimizer, kind=hp.lr_scheduler, total_steps=total_steps, warmup_ratio=hp.warmup_ratio
    )
    sink.start(total_steps)

    # Pick up where a checkpoint left off (pause/resume, a restarted failed job), or start.
    start = resume(spec.resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
    step = start.step if start else 0
    num_tokens = start.num_tokens if start else 0
    trained_tokens = start.trained_tokens if start else 0
    saved_at = step if start else -1  # step of the latest checkpoint
    since_log: list[KtoStats] = []  # stats of the steps since the last metric point
    step_stats: KtoStats | None = None
    last_metrics: dict[str, float] = {}

    def checkpoint(epoch: int, steps_in_epoch: int, *, final: bool) -> None:
        nonlocal saved_at, last_metrics
        metrics = {"step": float(step)}
        if step_stats is not None:
            metrics["train_loss"] = step_stats.metrics()["train_loss"]
        if valid_data is not None:
            metrics |= validation_metrics(
                model,
                ref_model,
                valid_data.examples,
                hp,
                spec.max_seq_len,
                pad_token_id,
                where=where,
            )
        state = TrainerState(
            step, epoch, steps_in_epoch, spec.seed, total_steps, num_tokens, trained_tokens
        )
        save_checkpoint(
            store,
            model=model,
            tokenizer=tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
            trainer=state,
            metrics=metrics,
            final=final,
        )
        saved_at, last_metrics = step, metrics

    for epoch in range(start.epoch if start else 0, hp.n_epochs):
        plan = epoch_steps(
            len(train_data.examples),
            batch_size=hp.batch_size,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            seed=spec.seed,
            epoch=epoch,
            # Rows of similar length share a batch: far less padding to run through the model.
            lengths=[example.padded_length for example in train_data.examples],
        )
        for steps_in_epoch, micro_batches in enumerate(plan):
            if already_done(start, epoch, steps_in_epoch):
                continue
            if should_stop():
                # Nothing trained yet means nothing worth keeping.
                if step > 0 and saved_at != step:
                    checkpoint(epoch, steps_in_epoch, final=False)
                return RunResult("stopped", step, total_steps, trained_tokens, last_metrics)

            # -- one optimizer step over its micro-batches -----------------------------------
            # The loss is a mean over the rows of the whole step, so accumulating
            # micro-batches gives the gradient of one big batch (z stays per micro-batch).
            rows_in_step = sum(len(indices) for indices in micro_batches)
            micro_stats = []
            for indices in micro_batches:
                batch, kl_batch = where.to(
                    collate_with_mismatched(
                        train_data.examples, indices, spec.max_seq_len, pad_token_id
                    )
                )
                with where.autocast():
                    loss, stats = kto_step_loss(model, ref_model, batch, kl_batch, hp, rows_in_step)
                backward(loss, scaler)
                micro_stats.append(stats)
                trained_tokens += batch.num_tokens
                num_tokens += int(batch.completion_mask[:, 1:].sum())
            grad_norm, learning_rate = optimizer_step(
                params, optimizer, scheduler, hp.max_grad_norm, scaler
            )
            step += 1

            # -- metrics -------------------------------------------------------------------
            step_stats = add_stats(micro_stats)
            since_log.append(step_stats)
            if step % spec.log_every == 0 or step == total_steps:
                # Row-weighted over the steps since the last point (kl: micro-batch mean).
                window = add_stats(since_log)
                since_log = []
                sink.metrics(
                    step,
                    window.metrics()
                    | {
                        "learning_rate": learning_rate,
                        "grad_norm": float(grad_norm),
                        # TRL's num_tokens: every non-padding token seen so far.
                        "num_tokens": float(trained_tokens),
                        "epoch": step / per_epoch,
                    },
                )

            # -- checkpoint ----------------------------------------------------------------
            if spec.checkpoint_every is not None and (
                step % spec.checkpoint_every == 0 or step == total_steps
            ):
                checkpoint(epoch, steps_in_epoch + 1, final=step == total_steps)

        if spec.checkpoint_every is None:
            checkpoint(epoch + 1, 0, final=epoch == hp.n_epochs - 1)

    return RunResult("completed", step, total_steps, trained_tokens, last_metrics)


def collate_with_mismatched(
    examples: Sequence[UnpairedExample], indices: Sequence[int], max_seq_len: int, pad: int
) -> tuple[UnpairedBatch, UnpairedBatch]:
    """The rows ``indices`` and their mismatched twins: row i's prompt with row i−1's
    completion, the first taking the last's (TRL's rotation), cut to ``max_seq_len``.

    Only an epoch's last micro-batch can hold a single row; rotating it would give the row
    itself, so it borrows the completion of the example after it (in file order) instead.
    """
    rows = [examples[i] for i in indices]
    if len(rows) > 1:
        donors = [rows[-1], *rows[:-1]]
    else:
        donors = [examples[(indices[0] + 1) % len(examples)]]
    mismatched = [
        UnpairedExample(
            row.prompt_ids,
            donor.completion_ids[: max_seq_len - len(row.prompt_ids)],
            row.label,
            row.line,
        )
        for row, donor in zip(rows, donors, strict=True)
    ]
    return collate_unpaired(rows, pad), collate_unpaired(mismatched, pad)


def sequence_logps(model: nn.Module, batch: UnpairedBatch) -> torch.Tensor:
    """(B,) summed log-probs of each row's completion tokens under ``model``."""
    per_token_logps = completion_token_logps(
        model, batch.input_ids, batch.attention_mask, batch.completion_mask
    )  # (B, T-1)
    return completion_logps(per_token_logps, batch.completion_mask[:, 1:])  # (B,)


@torch.no_grad()
def reference_logps(
    model: nn.Module, ref_model: nn.Module | None, batch: UnpairedBatch
) -> torch.Tensor:
    """(B,) the reference's ``sequence_logps``: ``ref_model``, or ``model`` with its adapter
    switched off when there is none (LoRA)."""
    adapter_off = model.disable_adapter() if ref_model is None else nullcontext()  # type: ignore[operator]
    with adapter_off:
        return sequence_logps(ref_model if ref_model is not None else model, batch)


def kto_step_loss(
    model: nn.Module,
    ref_model: nn.Module | None,
    batch: UnpairedBatch,
    kl_batch: UnpairedBatch,
    hp: KtoHyperparameters,
    normaliser: int,
) -> tuple[torch.Tensor, KtoStats]:
    """One micro-batch's share of the step's loss: policy, mismatched and reference logps."""
    policy_logps = sequence_logps(model, batch)  # (B,)
    with torch.no_grad():  # z is a detached baseline, so its pass needs no graph
        policy_kl_logps = sequence_logps(model, kl_batch)  # (B,)
    ref_logps = reference_logps(model, ref_model, batch)  # (B,)
    ref_kl_logps = reference_logps(model, ref_model, kl_batch)  # (B,)
    return kto_loss(
        policy_logps,
        ref_logps,
        batch.labels,
        policy_kl_logps,
        ref_kl_logps,
        beta=hp.beta,
        desirable_weight=hp.desirable_weight,
        undesirable_weight=hp.undesirable_weight,
        normaliser=normaliser,
    )


@torch.no_grad()
def validation_metrics(
    model: nn.Module,
    ref_model: nn.Module | None,
    examples: Sequence[UnpairedExample],
    hp: KtoHyperparameters,
    max_seq_len: int,
    pad_token_id: int,
    *,
    where: Placement | None = None,
) -> dict[str, float]:
    """The loss, z and rewards over all ``examples`` in file order, in eval mode, on
    ``where``'s device and in its precision (the CPU in fp32 by default)."""
    where = where or Placement()
    was_training = model.training
    model.eval()
    totals = []
    for indices in fixed_batches(len(examples), hp.batch_size):
        batch, kl_batch = where.to(
            collate_with_mismatched(examples, indices, max_seq_len, pad_token_id)
        )
        with where.autocast():
            _, stats = kto_step_loss(model, ref_model, batch, kl_batch, hp, len(indices))
        totals.append(stats)
    model.train(was_training)
    metrics = add_stats(totals).metrics()
    return {
        "valid_loss" if name == "train_loss" else f"valid_{name}": value
        for name, value in metrics.items()
    }
