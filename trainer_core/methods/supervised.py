"""Supervised fine-tuning (SFT): maximise the likelihood of the completion tokens.

The method of InstructGPT's first stage (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155)
and of OpenAI's ``supervised`` fine-tuning jobs: next-token cross-entropy on the assistant
turns (chat rows), the completion (prompt/completion rows) or everything (text rows).

One optimizer step, top to bottom: micro-batches → per-token logps → loss normalised by the
tokens of the whole step → backward → clip → AdamW step → schedule → metrics → checkpoint.

Rows are batched by similar length (``batching``), or with ``packing`` several rows share one
``max_seq_len`` row (``packing``); either way the loss is the same token mean.

A run resumes from a checkpoint (``spec.resume_from``) exactly where it left off: weights,
optimizer, scheduler, RNG and position in the epoch (``checkpoint.resume``).

Several processes and DeepSpeed's ZeRO stages: ``distributed`` (each rank takes its share of
every micro-batch; the step's normaliser stays the whole step's). The device, mixed precision
and gradient checkpointing: ``placement`` (the forward and the loss run under its autocast).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from trainer_core import distributed
from trainer_core.adapters import apply_adapter, load_trained
from trainer_core.batching import Batch, collate, epoch_steps, fixed_batches, steps_per_epoch
from trainer_core.checkpoint import (
    TrainerState,
    already_done,
    reload_after_wrap,
    resume,
    save_checkpoint,
)
from trainer_core.data import SupervisedExample, load_supervised
from trainer_core.logprobs import keep_positions, kept_next_token_logps
from trainer_core.losses import SftStats, sft_loss
from trainer_core.models import load_model_and_tokenizer, load_tokenizer
from trainer_core.optim import build_optimizer, build_scheduler
from trainer_core.packing import PackedRow, attention_inputs, collate_packed, pack_examples
from trainer_core.placement import Placement, enable_gradient_checkpointing
from trainer_core.reporting import report_truncation
from trainer_core.seams import CheckpointStore, MetricSink, RunResult, ShouldStop
from trainer_core.specs import SupervisedHyperparameters, TrainSpec


def train(
    spec: TrainSpec, sink: MetricSink, store: CheckpointStore, should_stop: ShouldStop
) -> RunResult:
    hp = spec.hyperparameters
    assert isinstance(hp, SupervisedHyperparameters)
    seed_everything(spec.seed, spec.num_threads)
    # Several processes / DeepSpeed: join the group before the model is built (ZeRO-3).
    d = distributed.setup(spec.resources)
    where = d.placement

    # -- model and data ------------------------------------------------------------------
    base, tokenizer = load_model_and_tokenizer(
        spec.model, allow_hub=spec.allow_hub, trust_remote_code=spec.trust_remote_code
    )
    enable_gradient_checkpointing(base, spec.resources.gradient_checkpointing)
    masks = {
        "completion_only_loss": hp.completion_only_loss,
        "assistant_only_loss": hp.assistant_only_loss,
    }
    train_data = load_supervised(spec.train_file, tokenizer, spec.max_seq_len, **masks)
    report_truncation(sink, train_data, "training", spec.max_seq_len)
    if not train_data.examples:
        raise ValueError(f"no training example has a completion token within {spec.max_seq_len}")
    valid_data = None
    if spec.validation_file is not None:
        valid_data = load_supervised(spec.validation_file, tokenizer, spec.max_seq_len, **masks)
        report_truncation(sink, valid_data, "validation", spec.max_seq_len)
        if not valid_data.examples:
            raise ValueError(
                f"no validation example has a completion token within {spec.max_seq_len}"
            )
    pad_token_id = tokenizer.pad_token_id
    # The rows that batches are made of: examples, or bins of them under packing.
    rows: Sequence[SupervisedExample | PackedRow] = train_data.examples
    if hp.packing:
        rows = pack_examples(train_data.examples, spec.max_seq_len)
        sink.event(
            f"Packed {len(train_data.examples)} training examples into {len(rows)} rows "
            f"of up to {spec.max_seq_len} tokens",
            data={"examples": len(train_data.examples), "rows": len(rows)},
        )
    row_lengths = [len(row.input_ids) for row in rows]

    model = where.model(apply_adapter(base, spec.adapter))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, learning_rate=hp.learning_rate, weight_decay=hp.weight_decay)
    per_epoch = steps_per_epoch(len(rows), hp.batch_size, hp.gradient_accumulation_steps)
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
    num_tokens = start.num_tokens if start else 0  # loss tokens, for the state
    trained_tokens = start.trained_tokens if start else 0
    saved_at = step if start else -1  # step of the latest checkpoint
    since_log: list[SftStats] = []  # stats of the steps since the last metric point
    step_stats = SftStats(torch.tensor(0.0), torch.tensor(0), torch.tensor(0))
    last_metrics: dict[str, float] = {}

    def checkpoint(epoch: int, steps_in_epoch: int, *, final: bool) -> None:
        nonlocal saved_at, last_metrics
        metrics = {
            "step": float(step),
            "train_loss": float(step_stats.nll_sum) / max(1, int(step_stats.num_tokens)),
            "train_mean_token_accuracy": step_stats.mean_token_accuracy,
        }
        if valid_data is not None:
            metrics |= validation_metrics(
                model,
                valid_data.examples,
                batch_size=hp.batch_size,
                pad_token_id=pad_token_id,
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
            dist=d,
        )
        saved_at, last_metrics = step, metrics

    for epoch in range(start.epoch if start else 0, hp.n_epochs):
        plan = epoch_steps(
            len(rows),
            batch_size=hp.batch_size,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            seed=spec.seed,
            epoch=epoch,
            lengths=row_lengths,
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
                make_batch([rows[i] for i in indices], pad_token_id) for indices in micro_batches
            ]
            # Normalise by the counted tokens of the whole step, so accumulating micro-batches
            # gives the same gradient as one big batch (see losses.sft_loss), and the ranks'
            # shares of it add up to the whole (see distributed).
            normaliser = sum(batch.num_loss_tokens for batch in batches)
            micro_stats = []
            for n, (indices, whole) in enumerate(zip(micro_batches, batches, strict=True)):
                mine, weight = distributed.share(d, indices)
                batch = where.to(
                    whole
                    if d.world_size == 1
                    else make_batch([rows[i] for i in mine], pad_token_id)
                )
                with where.autocast():
                    per_token_logps, token_correct = forward(model, batch)  # (B, T-1) each
                    loss, stats = sft_loss(
                        per_token_logps, batch.completion_mask[:, 1:], token_correct, normaliser
                    )
                distributed.backward(d, loss * weight, last=n == len(micro_batches) - 1)
                if weight:
                    micro_stats.append(stats)
                trained_tokens += whole.num_tokens
            grad_norm, learning_rate = distributed.optimizer_step(
                d, params, optimizer, scheduler, hp.max_grad_norm
            )
            step += 1

            # -- metrics -------------------------------------------------------------------
            step_stats = distributed.all_reduce_sum(d, add_stats(micro_stats))
            num_tokens += int(step_stats.num_tokens)
            since_log.append(step_stats)
            if step % spec.log_every == 0 or step == total_steps:
                # Token-weighted over the steps since the last point, so log_every > 1 smooths
                # rather than samples.
                window = add_stats(since_log)
                since_log = []
                sink.metrics(
                    step,
                    {
                        "train_loss": float(window.nll_sum) / max(1, int(window.num_tokens)),
                        "train_mean_token_accuracy": window.mean_token_accuracy,
                        # TRL's num_tokens: every non-padding token trained on so far.
                        "num_tokens": float(trained_tokens),
                        "learning_rate": learning_rate,
                        "grad_norm": float(grad_norm),
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


def seed_everything(seed: int, num_threads: int | None) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    # warn_only: on CUDA some kernels have no deterministic version; better a warning in
    # the log than a failed job. On CPU every op used here is deterministic.
    torch.use_deterministic_algorithms(True, warn_only=True)
    if num_threads is not None:
        torch.set_num_threads(num_threads)


def make_batch(rows: Sequence[SupervisedExample | PackedRow], pad_token_id: int) -> Batch:
    if isinstance(rows[0], PackedRow):
        return collate_packed(rows, pad_token_id)  # type: ignore[arg-type]
    return collate(rows, pad_token_id)  # type: ignore[arg-type]


def forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_token_logps, token_correct)``, both (B, T-1), of the batch's counted tokens.

    Only the positions whose next token counts go through the LM head (``logits_to_keep``);
    elsewhere both are 0 / False, which the completion mask drops.
    """
    keep = keep_positions(batch.completion_mask)  # (B, T) bool
    kept_logits = model(
        input_ids=batch.input_ids,
        **attention_inputs(batch, model),
        logits_to_keep=keep,
        use_cache=False,
    ).logits  # (N, V), N = keep.sum()
    return kept_next_token_logps(kept_logits, batch.input_ids, keep)


def add_stats(stats: Sequence[SftStats]) -> SftStats:
    return SftStats(
        nll_sum=sum((s.nll_sum for s in stats), torch.tensor(0.0)),
        num_correct=sum((s.num_correct for s in stats), torch.tensor(0)),
        num_tokens=sum((s.num_tokens for s in stats), torch.tensor(0)),
    )


@torch.no_grad()
def validation_metrics(
    model: nn.Module,
    examples: Sequence[SupervisedExample],
    *,
    batch_size: int,
    pad_token_id: int,
    where: Placement | None = None,
) -> dict[str, float]:
    """Token-weighted loss and accuracy over all ``examples``, in eval mode (no dropout), on
    ``where``'s device and in its precision (the CPU in fp32 by default)."""
    where = where or Placement()
    was_training = model.training
    model.eval()
    totals = []
    for indices in fixed_batches(len(examples), batch_size):
        batch = where.to(collate([examples[i] for i in indices], pad_token_id))
        with where.autocast():
            per_token_logps, token_correct = forward(model, batch)  # (B, T-1) each
            _, stats = sft_loss(per_token_logps, batch.completion_mask[:, 1:], token_correct, 1)
        totals.append(stats)
    model.train(was_training)
    total = add_stats(totals)
    return {
        "valid_loss": float(total.nll_sum) / max(1, int(total.num_tokens)),
        "valid_mean_token_accuracy": total.mean_token_accuracy,
    }


def evaluate(
    model_path: str,
    adapter_dir: str | None,
    data_file: str,
    max_seq_len: int,
    *,
    batch_size: int = 8,
    allow_hub: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """``{"valid_loss", "valid_mean_token_accuracy"}`` of a saved adapter on ``data_file``.

    The same computation as the validation metrics of a run's checkpoints, so a downloaded
    adapter can be checked against what the job reported. ``adapter_dir`` is a PEFT folder,
    a full model folder, or None for the base model.
    """
    tokenizer = load_tokenizer(model_path, allow_hub=allow_hub, trust_remote_code=trust_remote_code)
    model = load_trained(
        model_path, adapter_dir, allow_hub=allow_hub, trust_remote_code=trust_remote_code
    )
    data = load_supervised(Path(data_file), tokenizer, max_seq_len)
    return validation_metrics(
        model, data.examples, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id
    )
