"""Reward modelling: learn a scalar score r(x, y) that ranks the chosen completion higher.

The reward model of InstructGPT (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155), as
TRL 1.16's ``RewardTrainer`` trains it: the base model with a fresh one-output linear head
(``AutoModelForSequenceClassification``, ``num_labels=1``) read at the last real token, and
the Bradley–Terry loss −log σ(r_c − r_r − margin) (+ optional centring; see
``preference_losses.bradley_terry_loss``). The saved model scores completions for the online
methods: ``RewardModel.load(...).score(...)``, or ``score(...)`` for a one-off.

One optimizer step, top to bottom: micro-batches of pairs → chosen and rejected rows through
the model in one forward pass → rewards (2B,) → loss normalised by the pairs of the whole
step → backward → clip → AdamW step → schedule → metrics → checkpoint.

Two things TRL learnt the hard way (issues #2758, #937): the model finds "the last real
token" as the rightmost token that is not ``config.pad_token_id``, so that id is set on the
config from the tokenizer before anything runs (Llama configs have none, and pooling then
reads a padding position); and under LoRA the new head is trained and saved whole (peft's
``modules_to_save``), since a low-rank update would leave a random head mostly random.
When the tokenizer pads with EOS (it has no pad token), a row's trailing EOS counts as
padding and the reward is read one token earlier, exactly as in TRL.

Dropout is switched off, LoRA's included (TRL's ``disable_dropout=True``). One difference
from TRL 1.16: pairs longer than ``max_seq_len`` keep their start (TRL drops them; see
``preference_data``). The device, mixed precision and gradient checkpointing: ``placement``
(the forward and the loss run under its autocast); several processes: ``distributed``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, TaskType
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import logging as hf_logging

from trainer_core import distributed, shared_prompt
from trainer_core.adapters import _without_peft_deprecation_warning, apply_adapter
from trainer_core.batching import epoch_steps, fixed_batches, steps_per_epoch
from trainer_core.checkpoint import (
    TrainerState,
    already_done,
    reload_after_wrap,
    resume,
    save_checkpoint,
)
from trainer_core.data import Message, _encode, _messages, _render, _with_eos
from trainer_core.loop import seed_everything
from trainer_core.models import check_model_source, load_tokenizer
from trainer_core.optim import build_optimizer, build_scheduler
from trainer_core.placement import Placement, enable_gradient_checkpointing
from trainer_core.preference_data import (
    PairBatch,
    PreferenceExample,
    collate_pairs,
    load_preference,
    pair_lengths,
)
from trainer_core.preference_losses import RewardStats, add_stats, bradley_terry_loss
from trainer_core.reference import disable_dropout
from trainer_core.reporting import report_truncation
from trainer_core.seams import CheckpointStore, MetricSink, RunResult, ShouldStop
from trainer_core.specs import RewardModelHyperparameters, TrainSpec


def train(
    spec: TrainSpec, sink: MetricSink, store: CheckpointStore, should_stop: ShouldStop
) -> RunResult:
    hp = spec.hyperparameters
    assert isinstance(hp, RewardModelHyperparameters)
    seed_everything(spec.seed, spec.num_threads)  # before loading: the new head is random
    # Several processes / DeepSpeed: join the group before the model is built (ZeRO-3).
    d = distributed.setup(spec.resources)
    where = d.placement

    # -- model and data ------------------------------------------------------------------
    tokenizer = load_tokenizer(
        spec.model, allow_hub=spec.allow_hub, trust_remote_code=spec.trust_remote_code
    )
    base = load_reward_base(
        spec.model,
        pad_token_id=tokenizer.pad_token_id,
        allow_hub=spec.allow_hub,
        trust_remote_code=spec.trust_remote_code,
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

    model = where.model(apply_adapter(base, spec.adapter, task_type=TaskType.SEQ_CLS))
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
    distributed.wrap(
        d, model, optimizer, scheduler, batch_size=hp.batch_size, max_grad_norm=hp.max_grad_norm
    )
    reload_after_wrap(d, spec.resume_from)
    step = start.step if start else 0
    num_tokens = start.num_tokens if start else 0
    saved_at = step if start else -1  # step of the latest checkpoint
    since_log: list[RewardStats] = []  # stats of the steps since the last metric point
    step_stats: RewardStats | None = None
    last_metrics: dict[str, float] = {}

    def checkpoint(epoch: int, steps_in_epoch: int, *, final: bool) -> None:
        nonlocal saved_at, last_metrics
        metrics = {"step": float(step)}
        if step_stats is not None:
            trained = step_stats.metrics()
            metrics |= {"train_loss": trained["train_loss"], "train_accuracy": trained["accuracy"]}
        if valid_data is not None:
            metrics |= validation_metrics(
                model,
                valid_data.examples,
                batch_size=hp.batch_size,
                pad_token_id=pad_token_id,
                center_rewards_coefficient=hp.center_rewards_coefficient,
                where=where,
            )
        # Every token is read (there is no loss mask), so both counts are the same.
        state = TrainerState(
            step, epoch, steps_in_epoch, spec.seed, total_steps, num_tokens, num_tokens
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

    shared = uses_shared_prompt(model)
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
                return RunResult("stopped", step, total_steps, num_tokens, last_metrics)

            # -- one optimizer step over its micro-batches -----------------------------------
            # Normalise by the pairs of the whole step, so accumulating micro-batches gives
            # the same gradient as one big batch, and the ranks' shares add up to it.
            pairs_in_step = sum(len(indices) for indices in micro_batches)
            micro_stats = []
            step_tokens = 0  # this rank's
            for n, indices in enumerate(micro_batches):
                mine, weight = distributed.share(d, indices)
                batch = where.to(
                    collate_pairs([train_data.examples[i] for i in mine], pad_token_id)
                )
                with where.autocast():
                    chosen_rewards, rejected_rewards = forward(model, batch)  # (B,) each
                    loss, stats = bradley_terry_loss(
                        chosen_rewards,
                        rejected_rewards,
                        batch.margin,
                        center_rewards_coefficient=hp.center_rewards_coefficient,
                        normaliser=pairs_in_step,
                    )
                distributed.backward(d, loss * weight, last=n == len(micro_batches) - 1)
                micro_stats.append(stats if weight else distributed.nothing(stats))
                step_tokens += batch.num_tokens if weight else 0
            grad_norm, learning_rate = distributed.optimizer_step(
                d, params, optimizer, scheduler, hp.max_grad_norm
            )
            step += 1
            num_tokens += distributed.sum_int(d, step_tokens)

            # -- metrics -------------------------------------------------------------------
            step_stats = distributed.all_reduce_sum(d, add_stats(micro_stats))
            since_log.append(step_stats)
            if step % spec.log_every == 0 or step == total_steps:
                # Pair-weighted over the steps since the last point (min/max over all of them).
                window = add_stats(since_log)
                since_log = []
                sink.metrics(
                    step,
                    window.metrics()
                    | {
                        "learning_rate": learning_rate,
                        "grad_norm": float(grad_norm),
                        "num_tokens": float(num_tokens),
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

    return RunResult("completed", step, total_steps, num_tokens, last_metrics)


def load_reward_base(
    model: str, *, pad_token_id: int, allow_hub: bool = False, trust_remote_code: bool = False
) -> PreTrainedModel:
    """``model`` as a one-output sequence classifier in fp32, in training mode.

    From a causal LM the ``score`` head is new (drawn from torch's RNG: seed first) and the LM
    head is unused; from a saved reward model (full fine-tuning) it is the trained one.
    ``pad_token_id`` goes on the config, as pooling reads the last token that is not it.
    """
    check_model_source(model, allow_hub=allow_hub)
    # transformers reports the head it made and the LM head it skipped; both are expected.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        loaded = AutoModelForSequenceClassification.from_pretrained(
            model,
            num_labels=1,
            dtype=torch.float32,
            local_files_only=not allow_hub,
            trust_remote_code=trust_remote_code,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    loaded.config.get_text_config().pad_token_id = pad_token_id
    loaded.train()
    return loaded


def uses_shared_prompt(model: nn.Module) -> bool:
    """Whether pairs run as one row each: the attention takes a 4D mask and the head is
    ``score`` (transformers' sequence classifiers)."""
    return shared_prompt.supported(model) and shared_prompt.classifier_parts(model) is not None


def forward(model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen_rewards, rejected_rewards)``, (B,) each, from one pass over the 2B rows
    (fp32 whatever the autocast: rewards are compared and reported)."""
    if batch.shared is not None and uses_shared_prompt(model):
        # One row per pair, the prompt once (shared_prompt.py).
        rewards = shared_prompt.sequence_scores(model, batch.shared).squeeze(-1).float()
    else:
        rewards = (
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            .logits.squeeze(-1)  # (2B, 1) -> (2B,)
            .float()
        )
    chosen_rewards, rejected_rewards = rewards.chunk(2)
    return chosen_rewards, rejected_rewards


@torch.no_grad()
def validation_metrics(
    model: nn.Module,
    examples: Sequence[PreferenceExample],
    *,
    batch_size: int,
    pad_token_id: int,
    center_rewards_coefficient: float = 0.0,
    where: Placement | None = None,
) -> dict[str, float]:
    """Pair-mean loss and accuracy over all ``examples``, in eval mode (no dropout), on
    ``where``'s device and in its precision (the CPU in fp32 by default)."""
    where = where or Placement()
    was_training = model.training
    model.eval()
    totals = []
    for indices in fixed_batches(len(examples), batch_size):
        batch = where.to(collate_pairs([examples[i] for i in indices], pad_token_id))
        with where.autocast():
            chosen_rewards, rejected_rewards = forward(model, batch)
            _, stats = bradley_terry_loss(
                chosen_rewards,
                rejected_rewards,
                batch.margin,
                center_rewards_coefficient=center_rewards_coefficient,
            )
        totals.append(stats)
    model.train(was_training)
    metrics = add_stats(totals).metrics()
    return {"valid_loss": metrics["train_loss"], "valid_accuracy": metrics["accuracy"]}


def evaluate(
    model_path: str,
    adapter_dir: str | Path | None,
    data_file: str,
    max_seq_len: int,
    *,
    batch_size: int = 8,
    center_rewards_coefficient: float = 0.0,
    allow_hub: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """``{"valid_loss", "valid_accuracy"}`` of a saved reward model on the pairs of
    ``data_file``: the computation of a run's checkpoint metrics, so a downloaded adapter can
    be checked against what the job reported."""
    reward_model = RewardModel.load(
        model_path, adapter_dir, allow_hub=allow_hub, trust_remote_code=trust_remote_code
    )
    tokenizer = reward_model.tokenizer
    data = load_preference(Path(data_file), tokenizer, max_seq_len)
    return validation_metrics(
        reward_model.model,
        data.examples,
        batch_size=batch_size,
        pad_token_id=tokenizer.pad_token_id,
        center_rewards_coefficient=center_rewards_coefficient,
    )


# -- using a trained reward model -------------------------------------------------------------

# What ``RewardModel.score`` takes: a plain string (tokenized as a training string is, EOS
# appended), a conversation (rendered with the chat template), or token ids as they are.
Scorable = str | Sequence[Message] | Sequence[int]


class RewardModel:
    """A trained reward model and its tokenizer, ready to score sequences (eval mode).

    Load once, score many batches (the online methods' reward function)::

        rm = RewardModel.load(base_model, "out/final/adapter")
        rewards = rm.score(["Q: 2+2? A: 4", "Q: 2+2? A: 5"])  # (2,) tensor
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer

    @classmethod
    def load(
        cls,
        model_path: str,
        adapter_dir: str | Path | None,
        *,
        allow_hub: bool = False,
        trust_remote_code: bool = False,
        device: torch.device | None = None,
    ) -> RewardModel:
        """The reward model a run saved: ``adapter_dir`` is a checkpoint's ``adapter/`` folder
        (a PEFT folder on ``model_path``, or a full model folder), None for the untrained base.
        It scores on ``device`` (the CPU by default; an online method passes its own).

        A PEFT folder loads as ``PeftModel.from_pretrained`` on
        ``AutoModelForSequenceClassification(model_path, num_labels=1)``; its saved head
        replaces the random one.
        """
        if adapter_dir is not None and not Path(adapter_dir).is_dir():
            raise ValueError(f"adapter folder {str(adapter_dir)!r} does not exist")
        tokenizer = load_tokenizer(
            model_path, allow_hub=allow_hub, trust_remote_code=trust_remote_code
        )
        options = {"allow_hub": allow_hub, "trust_remote_code": trust_remote_code}
        model: nn.Module
        if adapter_dir is not None and (Path(adapter_dir) / "adapter_config.json").is_file():
            model = load_reward_base(model_path, pad_token_id=tokenizer.pad_token_id, **options)
            with _without_peft_deprecation_warning():
                model = PeftModel.from_pretrained(model, str(adapter_dir))
        elif adapter_dir is not None:
            # A full folder must carry its trained head; a causal LM would get a random one.
            config = json.loads((Path(adapter_dir) / "config.json").read_text())
            architectures = config.get("architectures") or []
            if not any(a.endswith("ForSequenceClassification") for a in architectures):
                raise ValueError(f"{str(adapter_dir)!r} does not hold a reward model")
            model = load_reward_base(
                str(adapter_dir), pad_token_id=tokenizer.pad_token_id, **options
            )
        else:
            model = load_reward_base(model_path, pad_token_id=tokenizer.pad_token_id, **options)
        if device is not None:
            model.to(device)  # type: ignore[arg-type]  # transformers types .to oddly
        return cls(model, tokenizer)

    def token_ids(self, sequence: Scorable) -> list[int]:
        """The tokens ``score`` reads for one sequence."""
        if isinstance(sequence, str):
            return _with_eos(_encode(self.tokenizer, sequence), self.tokenizer)
        items = list(sequence)
        if items and isinstance(items[0], dict):
            return _render(self.tokenizer, _messages(items))
        return [int(token) for token in items]  # type: ignore[call-overload]

    @torch.no_grad()
    def score(self, sequences: Sequence[Scorable], *, batch_size: int = 8) -> torch.Tensor:
        """Rewards (N,), fp32 on the CPU, one per sequence (prompt and completion together)."""
        ids = [self.token_ids(sequence) for sequence in sequences]
        device = next(self.model.parameters()).device
        rewards = []
        for start in range(0, len(ids), batch_size):
            rows = ids[start : start + batch_size]
            longest = max(len(row) for row in rows)
            input_ids = torch.full((len(rows), longest), self.tokenizer.pad_token_id)
            attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, : len(row)] = torch.tensor(row)
                attention_mask[i, : len(row)] = 1
            logits = self.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                use_cache=False,
            ).logits  # (b, 1)
            rewards.append(logits.squeeze(-1).float().cpu())
        return torch.cat(rewards) if rewards else torch.zeros(0)


def score(
    model_path: str,
    adapter_dir: str | Path | None,
    sequences: Sequence[Scorable],
    *,
    batch_size: int = 8,
    allow_hub: bool = False,
    trust_remote_code: bool = False,
) -> list[float]:
    """One-off scoring: load the reward model ``adapter_dir`` holds and score ``sequences``."""
    reward_model = RewardModel.load(
        model_path, adapter_dir, allow_hub=allow_hub, trust_remote_code=trust_remote_code
    )
    return reward_model.score(sequences, batch_size=batch_size).tolist()
