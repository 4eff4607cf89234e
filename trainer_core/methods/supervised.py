"""Supervised fine-tuning (SFT): maximise the likelihood of the completion tokens.

The method of InstructGPT's first stage (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155)
and of OpenAI's ``supervised`` fine-tuning jobs: next-token cross-entropy on the assistant
turns (chat rows), the completion (prompt/completion rows) or everything (text rows).

One optimizer step, top to bottom: micro-batches → per-token logps → loss normalised by the
tokens of the whole step → backward → clip → AdamW step → schedule → metrics → checkpoint.

Rows are batched by similar length (``batching``), or with ``packing`` several rows share one
``max_seq_len`` row (``packing``), or with ``resources.padding_free`` a micro-batch is one row
of its sequences back to back (no padding at all, attention kept within each sequence, cut by
``resources.max_tokens_per_batch``); every way the loss is the same token mean.

A run resumes from a checkpoint (``spec.resume_from``) exactly where it left off: weights,
optimizer, scheduler, RNG and position in the epoch (``checkpoint.resume``).

Several processes and DeepSpeed's ZeRO stages: ``distributed`` (each rank takes its share of
every micro-batch; the step's normaliser stays the whole step's). The device, mixed precision
and gradient checkpointing: ``placement`` (the forward and the loss run under its autocast).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from trainer_core import loop
from trainer_core.adapters import load_trained
from trainer_core.batching import Batch, collate
from trainer_core.logprobs import completion_logps_and_correct
from trainer_core.models import load_tokenizer
from trainer_core.packing import PackedRow, attention_inputs, collate_packed, pack_examples
from trainer_core.seams import RunResult
from trainer_core.sft_loss import SftStats, sft_loss
from trainer_core.specs import SupervisedHyperparameters
from trainer_core.supervised_data import SupervisedExample, load_supervised


@loop.method(SupervisedHyperparameters)
def train(job: loop.Job, hp: SupervisedHyperparameters) -> RunResult:
    model, tokenizer, examples, valid_examples = job.load(
        load_supervised,
        dropout=True,  # SFT keeps LoRA's dropout, as TRL
        completion_only_loss=hp.completion_only_loss,
        assistant_only_loss=hp.assistant_only_loss,
    )
    pad_token_id = tokenizer.pad_token_id
    # The rows that batches are made of: examples, or bins of them under packing.
    rows: Sequence[SupervisedExample | PackedRow] = examples
    if hp.packing:
        rows = pack_examples(examples, job.spec.max_seq_len)
        job.sink.event(
            f"Packed {len(examples)} training examples into {len(rows)} rows "
            f"of up to {job.spec.max_seq_len} tokens",
            data={"examples": len(examples), "rows": len(rows)},
        )

    run: loop.Run[SftStats] = job.start(
        model,
        tokenizer,
        rows=len(rows),
        summarise=partial(sft_metrics, prefix="train_"),  # token-weighted over the window
        checkpoint_metrics=lambda stats: sft_metrics([stats], "train_"),
        validate=job.validation(
            valid_examples,
            model,
            partial(collate, pad_token_id=pad_token_id),
            partial(step_loss, model, 1),  # a normaliser of 1: the stats are sums
            partial(sft_metrics, prefix="valid_"),
        ),
    )

    padding_free = job.spec.resources.padding_free

    def collate_rows(indices: list[int]) -> Batch:
        return make_batch([rows[i] for i in indices], pad_token_id, padding_free=padding_free)

    # -- one optimizer step: per-token logps → the NLL of the whole step's tokens -----------
    lengths = [len(row.input_ids) for row in rows]
    for micro_batches in run.steps(lengths=lengths, padding_free=padding_free):
        batches = [collate_rows(indices) for indices in micro_batches]
        # Normalise by the counted tokens of the whole step, so accumulating micro-batches
        # gives the same gradient as one big batch (see sft_loss.sft_loss), and the ranks'
        # shares of it add up to the whole (see distributed).
        normaliser = sum(batch.num_loss_tokens for batch in batches)
        loss = partial(step_loss, model, normaliser)
        run.train_step(micro_batches, collate_rows, loss, add_stats, wholes=batches)

    return run.result()


def step_loss(
    model: nn.Module, normaliser: int, batch: Batch, share: loop.Share
) -> tuple[torch.Tensor, SftStats]:
    """A micro-batch's (or a rank's share of it) NLL over the step's ``normaliser`` tokens."""
    per_token_logps, token_correct = forward(model, batch)  # (B, T-1) each
    return sft_loss(per_token_logps, batch.completion_mask[:, 1:], token_correct, normaliser)


def sft_metrics(stats: Sequence[SftStats], prefix: str) -> dict[str, float]:
    """``<prefix>loss`` (the token mean of the NLL) and ``<prefix>mean_token_accuracy`` over
    the tokens of all ``stats``."""
    total = add_stats(stats)
    return {
        f"{prefix}loss": float(total.nll_sum) / max(1, int(total.num_tokens)),
        f"{prefix}mean_token_accuracy": total.mean_token_accuracy,
    }


def make_batch(
    rows: Sequence[SupervisedExample | PackedRow], pad_token_id: int, *, padding_free: bool = False
) -> Batch:
    """The rows right-padded into a batch, or (``padding_free``) their sequences back to back
    in one row of no padding: (1, total tokens), positions restarting per sequence."""
    if padding_free:
        sequences = [
            e for row in rows for e in (row.examples if isinstance(row, PackedRow) else [row])
        ]
        return collate_packed([PackedRow(tuple(sequences))], pad_token_id, padding_free=True)
    if isinstance(rows[0], PackedRow):
        return collate_packed(rows, pad_token_id)  # type: ignore[arg-type]
    return collate(rows, pad_token_id)  # type: ignore[arg-type]


def forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_token_logps, token_correct)``, both (B, T-1), of the batch's counted tokens.

    Only the positions whose next token counts go through the LM head, chunked over the
    vocabulary (``logprobs.kept_token_logps``); elsewhere both are 0 / False, which the
    completion mask drops.
    """
    return completion_logps_and_correct(
        model, batch.completion_mask, input_ids=batch.input_ids, **attention_inputs(batch, model)
    )


def add_stats(stats: Sequence[SftStats]) -> SftStats:
    return SftStats(
        nll_sum=sum((s.nll_sum for s in stats), torch.tensor(0.0)),
        num_correct=sum((s.num_correct for s in stats), torch.tensor(0)),
        num_tokens=sum((s.num_tokens for s in stats), torch.tensor(0)),
    )


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
    return loop.evaluate(
        model,
        data.examples,
        batch_size,
        partial(collate, pad_token_id=tokenizer.pad_token_id),
        partial(step_loss, model, 1),
        partial(sft_metrics, prefix="valid_"),
    )
