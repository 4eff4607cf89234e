"""REINFORCE Leave-One-Out (RLOO): sampled completions, each judged against its siblings.

Ahmadian et al. 2024, "Back to Basics", https://arxiv.org/abs/2402.14740, as TRL 1.16's
``RLOOTrainer`` runs it. Each prompt is sampled G times; the KL to the reference is folded into
the reward as a sequence-summed k1 estimate, and each completion's baseline is the mean
penalised reward of the other G − 1:

    r'_i = r_i − β · Σ_t (log π_old − log π_ref),    A_i = r'_i − (Σ_j r'_j − r'_i) / (G − 1)

The policy moves through the clipped surrogate on the whole sequence's ratio
ρ_i = π_θ(y_i|x) / π_old(y_i|x), averaged over sequences (``rl_losses.rloo_loss``).

One rollout, top to bottom: batch_size prompts → G completions each (``generation``) → old
log-probs (the sampling policy, no grad) and reference log-probs (β > 0) → rewards
(``graders``) → KL-penalised leave-one-out advantages → ``num_iterations`` optimizer steps on
that rollout, each over ``gradient_accumulation_steps`` micro-batches: policy logps → loss →
backward → clip → AdamW step → schedule → metrics → checkpoint.

Steps, checkpoints and resuming work as in ``grpo`` (one rollout = μ optimizer steps;
checkpoints on rollout boundaries); the rollout helpers are GRPO's. With β = 0 and μ = 1 the
old log-probs are π_θ.detach() and their forward is skipped.

Deliberately left out: reward clipping (``reward_clip_range``), ε_high ≠ ε, vLLM, tools,
syncing the reference, a validation pass, and the device, mixed precision and gradient
checkpointing: it runs on the CPU in fp32 (``placement.cpu_only``).
"""

from __future__ import annotations

import math

import torch

from trainer_core.adapters import apply_adapter
from trainer_core.batching import epoch_steps
from trainer_core.checkpoint import TrainerState, already_done, resume, save_checkpoint
from trainer_core.generation import generate, rollout_logps
from trainer_core.methods.grpo import (
    SAMPLES_EVERY,
    PolicyReference,
    RewardScorer,
    completion_metrics,
    micro_batches,
    prompt_budget,
    report_prompts,
    report_samples,
    reward_metrics,
    window_metrics,
)
from trainer_core.loop import seed_everything
from trainer_core.models import load_model_and_tokenizer
from trainer_core.optim import build_optimizer, build_scheduler
from trainer_core.placement import cpu_only
from trainer_core.prompt_data import load_prompts
from trainer_core.reference import disable_dropout
from trainer_core.rl_losses import RlStats, add_rl_stats, rloo_advantages, rloo_loss
from trainer_core.seams import CheckpointStore, MetricSink, RunResult, ShouldStop
from trainer_core.specs import RlooHyperparameters, TrainSpec


def train(
    spec: TrainSpec, sink: MetricSink, store: CheckpointStore, should_stop: ShouldStop
) -> RunResult:
    hp = spec.hyperparameters
    if not isinstance(hp, RlooHyperparameters):
        raise TypeError("the rloo method needs RlooHyperparameters")
    if not spec.reward_functions:
        raise ValueError("rloo needs at least one reward function")
    seed_everything(spec.seed, spec.num_threads)
    cpu_only(spec.resources, "rloo", sink)  # see docs/methods.md

    # -- model, prompts, reference, rewards ----------------------------------------------
    base, tokenizer = load_model_and_tokenizer(
        spec.model, allow_hub=spec.allow_hub, trust_remote_code=spec.trust_remote_code
    )
    max_prompt_length = prompt_budget(spec.max_seq_len, hp.max_completion_length)
    data = load_prompts(spec.train_file, tokenizer, max_prompt_length)
    report_prompts(sink, data, max_prompt_length)
    if spec.validation_file is not None:
        sink.event("The validation file is not used by this method yet", level="warning")

    model = apply_adapter(base, spec.adapter)
    disable_dropout(model)
    model.train()
    reference = PolicyReference.of(model, spec.adapter.type) if hp.beta > 0 else None
    rewards_of = RewardScorer(spec)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, learning_rate=hp.learning_rate, weight_decay=hp.weight_decay)
    mu = hp.num_iterations
    per_epoch = math.ceil(len(data.examples) / hp.batch_size) * mu
    total_steps = per_epoch * hp.n_epochs
    scheduler = build_scheduler(
        optimizer, kind=hp.lr_scheduler, total_steps=total_steps, warmup_ratio=hp.warmup_ratio
    )
    sink.start(total_steps)

    start = resume(spec.resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
    step = start.step if start else 0
    num_tokens = start.num_tokens if start else 0
    trained_tokens = start.trained_tokens if start else 0
    saved_at = step if start else -1
    since_log: list[dict[str, float]] = []
    last_metrics: dict[str, float] = {}
    step_metrics: dict[str, float] = {}

    def checkpoint(epoch: int, steps_in_epoch: int, *, final: bool) -> None:
        nonlocal saved_at, last_metrics
        metrics = {"step": float(step)}
        for key in ("train_loss", "reward"):
            if key in step_metrics:
                metrics[key] = step_metrics[key]
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
            len(data.examples),
            batch_size=hp.batch_size,
            gradient_accumulation_steps=1,
            seed=spec.seed,
            epoch=epoch,
        )
        for r, (indices,) in enumerate(plan):
            if already_done(start, epoch, r * mu):
                continue
            if should_stop():
                if step > 0 and saved_at != step:
                    checkpoint(epoch, r * mu, final=False)
                return RunResult("stopped", step, total_steps, trained_tokens, last_metrics)

            # -- rollout: G completions of each prompt -----------------------------------------
            examples = [data.examples[i] for i in indices]
            rollout = generate(
                model,
                tokenizer,
                [e.prompt_ids for e in examples],
                num_generations=hp.num_generations,
                max_completion_length=hp.max_completion_length,
                temperature=hp.temperature,
                top_p=hp.top_p,
                top_k=hp.top_k,
            )  # N = B·G rows, prompt-major
            chunks = micro_batches(rollout.completion_ids.size(0), hp.gradient_accumulation_steps)
            parts = [rollout.select(rows) for rows in chunks]

            # -- old and reference log-probs (sequence sums) and the KL per sequence ------------
            need_old = hp.beta > 0 or mu > 1
            old_logps: list[torch.Tensor | None] = [None] * len(parts)  # (b,) each
            kl_parts, kl_token_sum = [], 0.0
            # With one optimizer step on one micro-batch, the step's own forward (with grad)
            # is the sampling policy's: run it once here and take the old log-probs from it
            # detached, rather than a second, no-grad pass (the same numbers, one fewer
            # forward per rollout).
            training_forward = None
            for k, part in enumerate(parts):
                if not need_old:
                    continue
                if mu == 1 and len(parts) == 1:
                    training_forward = rollout_logps(
                        model, part, temperature=hp.temperature, with_entropy=True
                    )
                    old_per_token = training_forward[0].detach()
                else:
                    with torch.no_grad():
                        old_per_token, _ = rollout_logps(model, part, temperature=hp.temperature)
                old_logps[k] = (old_per_token * part.completion_mask).sum(-1)
                if reference is not None:
                    ref_per_token = reference.logps(part, temperature=hp.temperature)
                    per_token_kl = (old_per_token - ref_per_token) * part.completion_mask
                    kl_parts.append(per_token_kl.sum(-1))  # (b,) k1, sequence-summed
                    kl_token_sum += float(per_token_kl.sum())
            kl = torch.cat(kl_parts) if kl_parts else None  # (N,)

            # -- rewards and leave-one-out advantages -----------------------------------------
            items = [e.item for e in examples for _ in range(hp.num_generations)]
            scores = rewards_of(items, rollout.texts)
            rewards = torch.tensor(scores.total, dtype=torch.float32)  # (N,)
            advantages = rloo_advantages(
                rewards,
                hp.num_generations,
                kl=kl,
                beta=hp.beta,
                normalize=hp.normalize_advantages,
            )  # (N,)
            rollout_metrics = {
                **reward_metrics(rewards, scores.per_function),
                **({"kl": kl_token_sum / float(rollout.completion_mask.sum())} if kl_parts else {}),
                **completion_metrics(rollout),
            }
            # TRL's num_tokens: prompt and completion tokens sampled (once per rollout).
            trained_tokens += int(rollout.prompt_mask.sum() + rollout.completion_mask.sum())
            num_tokens += int(rollout.completion_mask.sum())  # the completion tokens trained on

            # -- μ optimizer steps on this rollout -------------------------------------------
            for _ in range(mu):
                micro_stats: list[RlStats] = []
                entropy_sum = 0.0
                for k, (rows, part) in enumerate(zip(chunks, parts, strict=True)):
                    per_token_logps, entropies = training_forward or rollout_logps(
                        model, part, temperature=hp.temperature, with_entropy=True
                    )  # (b, c), (b, c)
                    training_forward = None
                    logps = (per_token_logps * part.completion_mask).sum(-1)  # (b,)
                    old = old_logps[k]
                    loss, stats = rloo_loss(
                        logps,
                        logps.detach() if old is None else old,
                        advantages[rows],
                        epsilon_low=hp.epsilon,
                        epsilon_high=hp.epsilon,
                        num_micro_batches=len(parts),
                    )
                    loss.backward()
                    micro_stats.append(stats)
                    assert entropies is not None
                    entropy_sum += float((entropies * part.completion_mask).sum())
                grad_norm = torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
                learning_rate = float(scheduler.get_last_lr()[0])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                # -- metrics ---------------------------------------------------------------
                total = add_rl_stats(micro_stats)
                step_metrics = {
                    "train_loss": float(total.loss),
                    **rollout_metrics,
                    "clip_ratio": total.means()["clip_ratio"],
                    "entropy": entropy_sum / max(1.0, float(rollout.completion_mask.sum())),
                    "learning_rate": learning_rate,
                    "grad_norm": float(grad_norm),
                    "num_tokens": float(trained_tokens),
                    "epoch": step / per_epoch,
                }
                since_log.append(step_metrics)
                if step % spec.log_every == 0 or step == total_steps:
                    sink.metrics(step, window_metrics(since_log))
                    since_log = []
                if step == 1 or step % SAMPLES_EVERY == 0:
                    report_samples(sink, step, tokenizer, examples, rollout, rewards)

            # -- checkpoint (on rollout boundaries) --------------------------------------------
            if spec.checkpoint_every is not None and (
                step // spec.checkpoint_every > (step - mu) // spec.checkpoint_every
                or step == total_steps
            ):
                checkpoint(epoch, (r + 1) * mu, final=step == total_steps)

        if spec.checkpoint_every is None:
            checkpoint(epoch + 1, 0, final=epoch == hp.n_epochs - 1)

    return RunResult("completed", step, total_steps, trained_tokens, last_metrics)
