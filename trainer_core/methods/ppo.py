"""Proximal Policy Optimization (PPO) against a trained reward model: RLHF with a value head.

The RL stage of InstructGPT (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155), with
PPO (Schulman et al. 2017, https://arxiv.org/abs/1707.06347) as TRL's PPOTrainer ran it
before TRL removed it (PR #7020) and as "The N Implementation Details of RLHF with PPO"
(Huang et al. 2024, https://arxiv.org/abs/2403.17031) spells it out. The policy samples a
completion of each prompt; the reward model of an earlier ``reward_model`` job scores it; a
KL penalty to the reference at every token keeps the policy near where it started; a value
head (``value_head``) on the policy's backbone is the baseline of GAE advantages; clipped
policy and value losses (``ppo_losses``) update both for several epochs on the same rollout.

One step, top to bottom: batch_size prompts → one completion each (``generation``, logits /
temperature) → scores from the reward model (− missing_eos_penalty without EOS) → old
log-probs and values, reference log-probs (no grad) → per-token rewards −kl_coef·KL with the
score at the last token → GAE advantages and returns → whitened advantages →
``num_ppo_epochs`` optimizer updates, each over ``gradient_accumulation_steps`` micro-batches
of the rollout's rows: log-probs and values → clipped losses → backward → clip → AdamW →
then the schedule → metrics → checkpoint.

A step is one rollout with its ``num_ppo_epochs`` updates, as TRL's PPOTrainer counts them
(one ``global_step`` and one scheduler step per rollout; its ``num_mini_batches`` is 1 here).
The reference is the base model (the adapter switched off) under LoRA and a frozen copy under
full fine-tuning; dropout is off in both. Checkpoints keep the value head in ``state/``
beside the optimizer (``adapter/`` stays an ordinary causal LM), and a resumed run continues
exactly: weights, head, optimizer, scheduler, sampler RNG and position.

Choices that differ from TRL: the score lands on the last real token, not one past it (see
``ppo_losses.kl_penalty_rewards``); the value is a head on the policy's backbone, not a
separate value model; the reward model reads prompt + completion as *text* through its own
tokenizer (as GRPO's reward models do), so it need not share the policy's tokenizer; the
losses are token means over the whole rollout, so accumulation is exact.

Deliberately left out: the k3 KL estimator and an adaptive KL controller, several mini-batches
per PPO epoch (TRL's ``num_mini_batches``), more than one completion per prompt, entropy
metrics, a validation pass, tools, and the device, mixed precision and gradient checkpointing:
it runs on the CPU in fp32 (``placement.cpu_only``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer_core.adapters import apply_adapter
from trainer_core.batching import epoch_steps, steps_per_epoch
from trainer_core.checkpoint import TrainerState, already_done, resume, save_checkpoint
from trainer_core.generation import Rollout, generate
from trainer_core.methods.grpo import (
    PolicyReference,
    micro_batches,
    prompt_budget,
    report_prompts,
    scored_sequence,
    window_metrics,
)
from trainer_core.reward_models import RewardModel
from trainer_core.loop import seed_everything
from trainer_core.models import load_model_and_tokenizer
from trainer_core.optim import build_optimizer, build_scheduler
from trainer_core.placement import cpu_only
from trainer_core.ppo_losses import (
    PpoStats,
    gae,
    kl_penalty_rewards,
    masked_whiten,
    ppo_loss,
)
from trainer_core.preference_losses import add_stats
from trainer_core.prompt_data import PromptExample, load_prompts
from trainer_core.reference import disable_dropout
from trainer_core.seams import CheckpointStore, MetricSink, RunResult, ShouldStop
from trainer_core.specs import PpoHyperparameters, TrainSpec
from trainer_core.value_head import ValueHead, completion_forward

SAMPLES_EVERY = 10  # steps between "Samples at step N" events (and the first step)
SAMPLES_SHOWN = 4
SAMPLE_CHARS = 500


def train(
    spec: TrainSpec, sink: MetricSink, store: CheckpointStore, should_stop: ShouldStop
) -> RunResult:
    hp = spec.hyperparameters
    if not isinstance(hp, PpoHyperparameters):
        raise TypeError("the ppo method needs PpoHyperparameters")
    seed_everything(spec.seed, spec.num_threads)
    cpu_only(spec.resources, "ppo", sink)  # see docs/methods.md

    # -- model, prompts, reference, reward model, value head -------------------------------
    base, tokenizer = load_model_and_tokenizer(
        spec.model, allow_hub=spec.allow_hub, trust_remote_code=spec.trust_remote_code
    )
    max_prompt_length = prompt_budget(spec.max_seq_len, hp.max_completion_length)
    data = load_prompts(spec.train_file, tokenizer, max_prompt_length)
    report_prompts(sink, data, max_prompt_length)
    if spec.validation_file is not None:
        sink.event("The validation file is not used by this method yet", level="warning")
    reward_model = load_reward_model(spec)

    model = apply_adapter(base, spec.adapter)
    disable_dropout(model)
    model.train()
    reference = PolicyReference.of(model, spec.adapter.type)  # before any weight moves
    value_head = ValueHead.for_model(model).to(next(model.parameters()).device)

    # One optimizer over the policy's trainable weights and the head.
    trainable = nn.ModuleList([model, value_head])
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        trainable, learning_rate=hp.learning_rate, weight_decay=hp.weight_decay
    )
    # One step is one rollout of batch_size prompts (accumulation splits its rows instead).
    per_epoch = steps_per_epoch(len(data.examples), hp.batch_size, 1)
    total_steps = per_epoch * hp.n_epochs
    scheduler = build_scheduler(
        optimizer, kind=hp.lr_scheduler, total_steps=total_steps, warmup_ratio=hp.warmup_ratio
    )
    sink.start(total_steps)

    # Pick up where a checkpoint left off (pause/resume, a restarted failed job), or start.
    start = resume(spec.resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
    if spec.resume_from is not None:
        value_head.load(Path(spec.resume_from) / "state")
    step = start.step if start else 0
    num_tokens = start.num_tokens if start else 0
    trained_tokens = start.trained_tokens if start else 0
    saved_at = step if start else -1  # step of the latest checkpoint
    since_log: list[dict[str, float]] = []  # metrics of the steps since the last point
    step_metrics: dict[str, float] = {}
    last_metrics: dict[str, float] = {}

    def checkpoint(epoch: int, steps_in_epoch: int, *, final: bool) -> None:
        nonlocal saved_at, last_metrics
        metrics = {"step": float(step)}
        for key in ("train_loss", "objective/scores"):
            if key in step_metrics:
                metrics[key] = step_metrics[key]
        state = TrainerState(
            step, epoch, steps_in_epoch, spec.seed, total_steps, num_tokens, trained_tokens
        )
        save_checkpoint(
            WithValueHead(store, value_head),
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
            len(data.examples),
            batch_size=hp.batch_size,
            gradient_accumulation_steps=1,
            seed=spec.seed,
            epoch=epoch,
        )
        for steps_in_epoch, (indices,) in enumerate(plan):
            if already_done(start, epoch, steps_in_epoch):
                continue
            if should_stop():
                # Nothing trained yet means nothing worth keeping.
                if step > 0 and saved_at != step:
                    checkpoint(epoch, steps_in_epoch, final=False)
                return RunResult("stopped", step, total_steps, trained_tokens, last_metrics)

            # -- rollout: one completion per prompt, scored by the reward model -----------
            examples = [data.examples[i] for i in indices]
            rollout = generate(
                model,
                tokenizer,
                [e.prompt_ids for e in examples],
                num_generations=1,
                max_completion_length=hp.max_completion_length,
                temperature=hp.temperature,
                top_p=hp.top_p,
                top_k=hp.top_k,
            )  # N = B rows
            sequences = [
                scored_sequence(e.item, text)
                for e, text in zip(examples, rollout.texts, strict=True)
            ]
            mask = rollout.completion_mask  # (N, C)
            raw_scores = reward_model.score(sequences, batch_size=hp.batch_size).to(mask.device)

            # -- old log-probs and values, reference log-probs (no grad) -----------------
            chunks = micro_batches(len(examples), hp.gradient_accumulation_steps)
            parts = [rollout.select(rows) for rows in chunks]
            with torch.no_grad():
                scored = [
                    completion_forward(model, value_head, p, temperature=hp.temperature)
                    for p in parts
                ]
                old_logps = stitch([lp for lp, _ in scored], chunks, mask.shape)  # (N, C)
                values = stitch([v for _, v in scored], chunks, mask.shape)  # (N, C)
                ref_logps = stitch(
                    [reference.logps(p, temperature=hp.temperature) for p in parts],
                    chunks,
                    mask.shape,
                )  # (N, C)

            # -- rewards, GAE advantages and returns, whitening --------------------------
            rewards, scores, rollout_stats = kl_penalty_rewards(
                old_logps,
                ref_logps,
                raw_scores,
                mask,
                rollout.is_eos,
                kl_coef=hp.kl_coef,
                missing_eos_penalty=hp.missing_eos_penalty,
            )  # (N, C), (N,)
            if hp.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, values, mask, gamma=hp.gamma, lam=hp.lam)
            advantages = masked_whiten(advantages, mask)  # (N, C)

            # -- num_ppo_epochs updates on this rollout ------------------------------------
            num_completion_tokens = int(mask.sum())
            micro_stats: list[PpoStats] = []
            grad_norms = []
            for _ in range(hp.num_ppo_epochs):
                for rows, part in zip(chunks, parts, strict=True):
                    c = part.completion_ids.size(1)  # this micro-batch's longest completion
                    new_logps, new_values = completion_forward(
                        model, value_head, part, temperature=hp.temperature
                    )  # (b, c), (b, c)
                    loss, stats = ppo_loss(
                        new_logps,
                        old_logps[rows][:, :c],
                        advantages[rows][:, :c],
                        new_values,
                        values[rows][:, :c],
                        returns[rows][:, :c],
                        part.completion_mask,
                        cliprange=hp.cliprange,
                        cliprange_value=hp.cliprange_value,
                        vf_coef=hp.vf_coef,
                        normaliser=num_completion_tokens,
                    )
                    loss.backward()
                    micro_stats.append(stats)
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            learning_rate = float(scheduler.get_last_lr()[0])  # the rate this step used
            scheduler.step()
            step += 1
            trained_tokens += int(rollout.prompt_mask.sum()) + num_completion_tokens
            num_tokens += num_completion_tokens

            # -- metrics -------------------------------------------------------------------
            step_metrics = {
                **rollout_stats.metrics(),
                # Token means over every micro-batch of every PPO epoch.
                **add_stats(micro_stats).metrics(),
                "learning_rate": learning_rate,
                "grad_norm": sum(grad_norms) / len(grad_norms),
                # TRL's num_tokens: prompt and completion tokens seen so far.
                "num_tokens": float(trained_tokens),
                "epoch": step / per_epoch,
            }
            since_log.append(step_metrics)
            if step % spec.log_every == 0 or step == total_steps:
                sink.metrics(step, window_metrics(since_log))
                since_log = []
            if step == 1 or step % SAMPLES_EVERY == 0 or step == total_steps:
                report_samples(sink, step, tokenizer, examples, rollout, scores)

            # -- checkpoint ----------------------------------------------------------------
            if spec.checkpoint_every is not None and (
                step % spec.checkpoint_every == 0 or step == total_steps
            ):
                checkpoint(epoch, steps_in_epoch + 1, final=step == total_steps)

        if spec.checkpoint_every is None:
            checkpoint(epoch + 1, 0, final=epoch == hp.n_epochs - 1)

    return RunResult("completed", step, total_steps, trained_tokens, last_metrics)


def load_reward_model(spec: TrainSpec) -> RewardModel:
    """The reward model ``spec.reward_model`` names, from the folders the worker fetched."""
    if spec.reward_model is None:
        raise ValueError("ppo needs a reward_model")
    ref = spec.reward_models.get(spec.reward_model)
    if ref is None:
        raise ValueError(f"reward model {spec.reward_model!r} was not provided to this run")
    return RewardModel.load(
        ref.base, ref.adapter, allow_hub=spec.allow_hub, trust_remote_code=spec.trust_remote_code
    )


def stitch(
    pieces: Sequence[torch.Tensor], chunks: Sequence[torch.Tensor], shape: torch.Size
) -> torch.Tensor:
    """(N, C) from per-micro-batch (b, c ≤ C) pieces, rows at ``chunks``, 0 past each c."""
    whole = pieces[0].new_zeros(shape)
    for rows, piece in zip(chunks, pieces, strict=True):
        whole[rows, : piece.size(1)] = piece
    return whole


class WithValueHead:
    """The CheckpointStore a PPO checkpoint goes through: it writes the value head into the
    finished folder's ``state/`` and hands the folder on (``adapter/`` stays a causal LM)."""

    def __init__(self, store: CheckpointStore, value_head: ValueHead) -> None:
        self.store = store
        self.value_head = value_head

    def save(self, step: int, folder: Path, metrics: Mapping[str, float], *, final: bool) -> None:
        self.value_head.save(folder / "state")
        self.store.save(step, folder, metrics, final=final)


def report_samples(
    sink: MetricSink,
    step: int,
    tokenizer: Any,
    examples: Sequence[PromptExample],
    rollout: Rollout,
    scores: torch.Tensor,
) -> None:
    """A few prompt / completion / score rows of the rollout (the score after the penalty)."""
    samples = [
        {
            "prompt": tokenizer.decode(example.prompt_ids, skip_special_tokens=True)[
                -SAMPLE_CHARS:
            ],  # the end is what was asked
            "completion": rollout.texts[row][:SAMPLE_CHARS],
            "score": float(scores[row]),
            "ended_with_eos": bool(rollout.is_eos[row]),
        }
        for row, example in enumerate(examples[:SAMPLES_SHOWN])
    ]
    sink.event(f"Samples at step {step}", data={"samples": samples})
