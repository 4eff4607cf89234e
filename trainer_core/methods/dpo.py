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
discopop losses, syncing the reference (TR-DPO), and resuming from ``state/``. The device,
mixed precision and gradient checkpointing: ``placement`` (the policy's and the reference's
forward and the loss run under its autocast).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from trainer_core import distributed, shared_prompt
from trainer_core.adapters import apply_adapter, load_trained
from trainer_core.batching import epoch_steps, fixed_batches, steps_per_epoch
from trainer_core.checkpoint import (
    TrainerState,
    already_done,
    reload_after_wrap,
    resume,
    save_checkpoint,
)
from trainer_core.dpo_losses import DpoStats, add_dpo_stats, combined_dpo_loss
from trainer_core.loop import seed_everything
from trainer_core.models import load_model, load_model_and_tokenizer, load_tokenizer
from trainer_core.optim import build_optimizer, build_scheduler
from trainer_core.placement import Placement, enable_gradient_checkpointing
from trainer_core.preference_data import (
    PairBatch,
    PreferenceExample,
    collate_pairs,
    load_preference,
    pair_lengths,
)
from trainer_core.reference import (
    LiveReference,
    Reference,
    disable_dropout,
    forward_logps,
    live_reference,
    precompute,
)
from trainer_core.reporting import report_truncation
from trainer_core.seams import CheckpointStore, MetricSink, RunResult, ShouldStop
from trainer_core.specs import DpoHyperparameters, TrainSpec


def train(
    spec: TrainSpec, sink: MetricSink, store: CheckpointStore, should_stop: ShouldStop
) -> RunResult:
    hp = spec.hyperparameters
    if not isinstance(hp, DpoHyperparameters):
        raise TypeError("the dpo method needs DpoHyperparameters")
    seed_everything(spec.seed, spec.num_threads)
    # Several processes / DeepSpeed: join the group before the model is built (ZeRO-3).
    d = distributed.setup(spec.resources)
    where = d.placement

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

    # On the device before the reference is taken: a frozen copy lands there too.
    model = where.model(apply_adapter(base, spec.adapter))
    disable_dropout(model)
    model.train()

    # -- the reference: live (adapter off / frozen copy) or precomputed once, now ---------
    train_ref: Reference
    valid_ref: Reference | None
    if hp.precompute_ref_log_probs:
        # Before the first step the policy is the reference: no copy is needed.
        now = live_reference(model, spec.adapter.type, keep=False)
        train_ref = precompute(
            now,
            train_data.examples,
            batch_size=hp.batch_size,
            pad_token_id=pad_token_id,
            where=where,
        )
        valid_ref = None
        if valid_data is not None:
            valid_ref = precompute(
                now,
                valid_data.examples,
                batch_size=hp.batch_size,
                pad_token_id=pad_token_id,
                where=where,
            )
    else:
        train_ref = valid_ref = live_reference(model, spec.adapter.type)
        if isinstance(train_ref, LiveReference) and not train_ref.disable_adapter:
            # Full fine-tuning's frozen copy: sharded like the policy under ZeRO-3.
            train_ref.model = distributed.shard_frozen(d, train_ref.model)

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
    distributed.wrap(
        d, model, optimizer, scheduler, batch_size=hp.batch_size, max_grad_norm=hp.max_grad_norm
    )
    reload_after_wrap(d, spec.resume_from)
    step = start.step if start else 0
    num_tokens = start.num_tokens if start else 0
    trained_tokens = start.trained_tokens if start else 0
    saved_at = step if start else -1  # step of the latest checkpoint
    since_log: list[DpoStats] = []  # stats of the steps since the last metric point
    step_stats: DpoStats | None = None
    last_metrics: dict[str, float] = {}

    def checkpoint(epoch: int, steps_in_epoch: int, *, final: bool) -> None:
        nonlocal saved_at, last_metrics
        metrics = {"step": float(step)}
        if step_stats is not None:
            metrics["train_loss"] = step_stats.loss
        if valid_data is not None and valid_ref is not None:
            metrics |= validation_metrics(
                model, valid_ref, valid_data.examples, hp, pad_token_id=pad_token_id, where=where
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
            dist=d,
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
            if distributed.any_rank(d, should_stop()):
                # Nothing trained yet means nothing worth keeping.
                if step > 0 and saved_at != step:
                    checkpoint(epoch, steps_in_epoch, final=False)
                return RunResult("stopped", step, total_steps, trained_tokens, last_metrics)

            # -- one optimizer step over its micro-batches -----------------------------------
            batches = [
                (indices, collate_pairs([train_data.examples[i] for i in indices], pad_token_id))
                for indices in micro_batches
            ]
            # The loss is a mean over the pairs (and, for "sft", the chosen tokens) of the
            # whole step, so accumulating micro-batches gives the gradient of one big batch,
            # and the ranks' shares of it add up to the whole (see distributed).
            num_pairs = sum(len(indices) for indices in micro_batches)
            num_chosen_tokens = sum(int(chosen_mask(batch).sum()) for _, batch in batches)
            micro_stats = []
            for n, (indices, whole) in enumerate(batches):
                mine, weight = distributed.share(d, indices)
                batch = where.to(
                    whole
                    if d.world_size == 1
                    else collate_pairs([train_data.examples[i] for i in mine], pad_token_id)
                )
                with where.autocast():
                    loss, stats = pair_loss(
                        model, train_ref, batch, mine, hp, num_pairs, num_chosen_tokens
                    )
                distributed.backward(d, loss * weight, last=n == len(micro_batches) - 1)
                micro_stats.append(stats if weight else distributed.nothing(stats))
                trained_tokens += whole.num_tokens
                num_tokens += int(whole.completion_mask[:, 1:].sum())
            grad_norm, learning_rate = distributed.optimizer_step(
                d, params, optimizer, scheduler, hp.max_grad_norm
            )
            step += 1

            # -- metrics -------------------------------------------------------------------
            step_stats = distributed.all_reduce_sum(d, add_dpo_stats(micro_stats))
            since_log.append(step_stats)
            if step % spec.log_every == 0 or step == total_steps:
                # Pair-weighted over the steps since the last point, so log_every > 1 smooths
                # rather than samples.
                window = add_dpo_stats(since_log)
                since_log = []
                sink.metrics(
                    step,
                    {
                        "train_loss": window.loss,
                        **window.means(),
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
    model: nn.Module,
    reference: Reference,
    batch: PairBatch,
    indices: Sequence[int],
    hp: DpoHyperparameters,
    num_pairs: int,
    num_chosen_tokens: int,
) -> tuple[torch.Tensor, DpoStats]:
    """One micro-batch's share of the step's loss: policy logps, reference logps, loss."""
    per_token_logps, logps = forward_logps(model, batch)  # (2B, T-1), (2B,)
    policy_chosen_logps, policy_rejected_logps = logps.chunk(2)  # (B,) each
    ref_chosen_logps, ref_rejected_logps = reference.logps(batch, indices)  # (B,) each
    mask = batch.completion_mask[:, 1:]  # (2B, T-1), aligned with per_token_logps
    return combined_dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        per_token_logps.chunk(2)[0],
        *mask.chunk(2),
        loss_types=hp.loss_type,
        loss_weights=hp.loss_weights,
        beta=hp.beta,
        label_smoothing=hp.label_smoothing,
        num_pairs=num_pairs,
        num_chosen_tokens=num_chosen_tokens,
    )


def chosen_mask(batch: PairBatch) -> torch.Tensor:
    """(B, T-1) 1 where the next token of a chosen row is a completion token."""
    return batch.completion_mask[:, 1:].chunk(2)[0]


@torch.no_grad()
def validation_metrics(
    model: nn.Module,
    reference: Reference,
    examples: Sequence[PreferenceExample],
    hp: DpoHyperparameters,
    *,
    pad_token_id: int,
    where: Placement | None = None,
) -> dict[str, float]:
    """The loss and reward accuracy/margin over all ``examples``, in eval mode (no dropout),
    on ``where``'s device and in its precision (the CPU in fp32 by default)."""
    where = where or Placement()
    was_training = model.training
    model.eval()
    totals = []
    for indices in fixed_batches(len(examples), hp.batch_size):
        batch = where.to(collate_pairs([examples[i] for i in indices], pad_token_id))
        # Normalisers of 1 give sums; DpoStats.loss divides by the totals at the end.
        with where.autocast():
            _, stats = pair_loss(model, reference, batch, indices, hp, 1, 1)
        totals.append(stats)
    model.train(was_training)
    total = add_dpo_stats(totals)
    means = total.means()
    return {
        "valid_loss": total.loss,
        "valid_rewards/accuracies": means["rewards/accuracies"],
        "valid_rewards/margins": means["rewards/margins"],
    }


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
        reference = LiveReference(model, disable_adapter=True)
    else:
        base = load_model(model_path, allow_hub=allow_hub, trust_remote_code=trust_remote_code)
        reference = LiveReference(base.eval(), disable_adapter=False)
    data = load_preference(Path(data_file), tokenizer, max_seq_len)
    return validation_metrics(
        model, reference, data.examples, hyperparameters, pad_token_id=tokenizer.pad_token_id
    )
