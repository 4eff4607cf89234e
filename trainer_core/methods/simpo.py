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
out (for now): CPO's NLL term and its other losses, AlphaPO's reward shaping, label
smoothing and resuming from ``state/``. The device, mixed precision and gradient
checkpointing: ``placement``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trainer_core import shared_prompt
from trainer_core.adapters import apply_adapter
from trainer_core.batching import epoch_steps, fixed_batches, steps_per_epoch
from trainer_core.checkpoint import TrainerState, already_done, resume, save_checkpoint
from trainer_core.loop import seed_everything
from trainer_core.models import load_model_and_tokenizer
from trainer_core.optim import build_optimizer, build_scheduler, optimizer_step
from trainer_core.placement import Placement, backward, enable_gradient_checkpointing, place
from trainer_core.preference_data import (
    PairBatch,
    PreferenceExample,
    collate_pairs,
    load_preference,
    pair_lengths,
)
from trainer_core.preference_losses import PairStats, add_stats, completion_logps, simpo_loss
from trainer_core.reference import disable_dropout, forward_logps
from trainer_core.reporting import report_truncation
from trainer_core.seams import CheckpointStore, MetricSink, RunResult, ShouldStop
from trainer_core.specs import SimpoHyperparameters, TrainSpec


def train(
    spec: TrainSpec, sink: MetricSink, store: CheckpointStore, should_stop: ShouldStop
) -> RunResult:
    hp = spec.hyperparameters
    assert isinstance(hp, SimpoHyperparameters)
    seed_everything(spec.seed, spec.num_threads)
    where = place(spec.resources)  # device and precision (see placement)
    scaler = where.grad_scaler()

    # -- model and data ------------------------------------------------------------------
    base, tokenizer = load_model_and_tokenizer(
        spec.model, allow_hub=spec.allow_hub, trust_remote_code=spec.trust_remote_code
    )
    enable_gradient_checkpointing(base, spec.resources.gradient_checkpointing)
    train_data = load_preference(spec.train_file, tokenizer, spec.max_seq_len)
    report_truncation(sink, train_data, "training", spec.max_seq_len, unit="pairs")
    if not train_data.examples:
        raise ValueError(f"no training pair has a completion token within {spec.max_seq_len}")
    valid_data = None
    if spec.validation_file is not None:
        valid_data = load_preference(spec.validation_file, tokenizer, spec.max_seq_len)
        report_truncation(sink, valid_data, "validation", spec.max_seq_len, unit="pairs")
        if not valid_data.examples:
            raise ValueError(f"no validation pair has a completion token within {spec.max_seq_len}")
    pad_token_id = tokenizer.pad_token_id

    model = where.model(apply_adapter(base, spec.adapter))
    disable_dropout(model)
    model.train()
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
    since_log: list[PairStats] = []  # stats of the steps since the last metric point
    step_stats: PairStats | None = None
    last_metrics: dict[str, float] = {}

    def checkpoint(epoch: int, steps_in_epoch: int, *, final: bool) -> None:
        nonlocal saved_at, last_metrics
        metrics = {"step": float(step)}
        if step_stats is not None:
            metrics["train_loss"] = step_stats.metrics()["train_loss"]
        if valid_data is not None:
            metrics |= validation_metrics(
                model, valid_data.examples, hp, pad_token_id=pad_token_id, where=where
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

    shared = shared_prompt.supported(model)  # pairs run as one row each (shared_prompt.py)
    for epoch in range(start.epoch if start else 0, hp.n_epochs):
        plan = epoch_steps(
            len(train_data.examples),
            batch_size=hp.batch_size,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            seed=spec.seed,
            epoch=epoch,
            # Rows of similar length share a batch: far less padding to run through the model.
            lengths=pair_lengths(train_data.examples, one_row=shared),
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
            batches = [
                where.to(collate_pairs([train_data.examples[i] for i in indices], pad_token_id))
                for indices in micro_batches
            ]
            # The loss is a mean over the pairs of the whole step, so accumulating
            # micro-batches gives the gradient of one big batch.
            num_pairs = sum(len(indices) for indices in micro_batches)
            micro_stats = []
            for batch in batches:
                with where.autocast():
                    loss, stats = pair_loss(model, batch, hp, num_pairs)
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
                # Pair-weighted over the steps since the last point.
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


def pair_loss(
    model: nn.Module, batch: PairBatch, hp: SimpoHyperparameters, num_pairs: int
) -> tuple[torch.Tensor, PairStats]:
    """One micro-batch's share of the step's loss, from one forward pass over its pairs (one
    row per pair where the attention takes a 4D mask: ``shared_prompt``)."""
    per_token_logps, _ = forward_logps(model, batch)  # (2B, T-1)
    logps = completion_logps(per_token_logps, batch.completion_mask[:, 1:], average=True)
    policy_chosen_logps, policy_rejected_logps = logps.chunk(2)  # (B,) each
    return simpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        beta=hp.beta,
        gamma=hp.gamma,
        normaliser=num_pairs,
    )


@torch.no_grad()
def validation_metrics(
    model: nn.Module,
    examples: Sequence[PreferenceExample],
    hp: SimpoHyperparameters,
    *,
    pad_token_id: int,
    where: Placement | None = None,
) -> dict[str, float]:
    """The loss and reward accuracy/margin over all ``examples``, in eval mode."""
    where = where or Placement()
    was_training = model.training
    model.eval()
    totals = []
    for indices in fixed_batches(len(examples), hp.batch_size):
        batch = where.to(collate_pairs([examples[i] for i in indices], pad_token_id))
        with where.autocast():
            _, stats = pair_loss(model, batch, hp, len(indices))
        totals.append(stats)
    model.train(was_training)
    metrics = add_stats(totals).metrics()
    return {
        "valid_loss": metrics["train_loss"],
        "valid_rewards/accuracies": metrics["rewards/accuracies"],
        "valid_rewards/margins": metrics["rewards/margins"],
    }
