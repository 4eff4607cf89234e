"""Group Relative Policy Optimization (GRPO): learn from sampled completions and their rewards.

Shao et al. 2024 (DeepSeekMath), https://arxiv.org/abs/2402.03300, as TRL 1.16's
``GRPOTrainer`` runs it, and OpenAI's ``reinforcement`` jobs (the same module; their grader
becomes reward functions when the job is created). There is no value model: each prompt is
sampled G times, and a completion's advantage is its reward relative to its group's,

    A_i = (r_i − mean_group r) / (std_group r + 1e-4),

pushed into the policy through PPO's clipped surrogate per token, with an optional k3 KL term
to the reference (β > 0) and one of four loss aggregations (``rl_losses``).

One rollout, top to bottom: batch_size prompts → G completions each (``generation``, logits /
temperature, no grad, eval mode) → rewards (``graders.score`` over ``spec.reward_functions``)
→ advantages → old and reference log-probs (only when needed) → ``num_iterations`` optimizer
steps on that rollout, each over ``gradient_accumulation_steps`` micro-batches of its rows:
policy logps → loss → backward → clip → AdamW step → schedule → metrics → checkpoint.

Steps: one rollout is ``num_iterations`` (μ) optimizer steps, as in TRL, so an epoch is
⌈prompts / batch_size⌉ · μ steps. With μ = 1 the sampling policy is the policy being trained,
so π_old = π_θ.detach() and no extra forward is run (TRL's shortcut; the displayed loss is then
−mean(A)-like and near 0 while the gradient is not). Checkpoints and stops fall on rollout
boundaries: a checkpoint due inside a rollout's μ steps is taken after its last one.

Choices that differ from TRL: positions follow the attention mask in both sampling and
scoring (TRL's training forward counts left padding as positions), and rows are split into
micro-batches in order rather than shuffled. The sampler is torch's global RNG, seeded with the
run and saved in checkpoints, so a resumed run samples what the uninterrupted one would.

Deliberately left out: vLLM, GSPO's sequence-level ratio, entropy bonuses and masks, the
cispo/sapo/vespo/luspo losses, multi-objective "normalize_then_sum", reward weights, tools and
multi-turn rollouts, syncing the reference, a validation pass (reinforcement's eval_interval /
eval_samples are accepted and not used yet), and the device, mixed precision and gradient
checkpointing: it runs on the CPU in fp32 (``placement.cpu_only``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from trainer_core import graders
from trainer_core.adapters import apply_adapter
from trainer_core.batching import epoch_steps
from trainer_core.checkpoint import TrainerState, already_done, resume, save_checkpoint
from trainer_core.generation import Rollout, generate, rollout_logps
from trainer_core.reward_models import RewardModel, Scorable
from trainer_core.loop import seed_everything
from trainer_core.models import load_model_and_tokenizer
from trainer_core.optim import build_optimizer, build_scheduler
from trainer_core.placement import cpu_only
from trainer_core.prompt_data import PromptData, PromptExample, load_prompts
from trainer_core.reference import disable_dropout, frozen_copy
from trainer_core.rl_losses import RlStats, add_rl_stats, group_advantages, grpo_loss, nanstd
from trainer_core.seams import CheckpointStore, MetricSink, RunResult, ShouldStop
from trainer_core.specs import GrpoHyperparameters, TrainSpec

SAMPLES_EVERY = 10  # steps between "Samples at step N" events (and the first step)
SAMPLES_SHOWN = 4
SAMPLE_CHARS = 500
# Metrics that are a state at the step, not a quantity to average over a logging window.
LAST_VALUE_METRICS = ("learning_rate", "grad_norm", "num_tokens", "epoch")


def train(
    spec: TrainSpec, sink: MetricSink, store: CheckpointStore, should_stop: ShouldStop
) -> RunResult:
    hp = spec.hyperparameters
    if not isinstance(hp, GrpoHyperparameters):  # ReinforcementHyperparameters is one too
        raise TypeError("the grpo method needs GrpoHyperparameters")
    if not spec.reward_functions:
        raise ValueError("grpo needs at least one reward function")
    seed_everything(spec.seed, spec.num_threads)
    cpu_only(spec.resources, "grpo", sink)  # see docs/methods.md

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
    rollouts_per_epoch = math.ceil(len(data.examples) / hp.batch_size)
    per_epoch = rollouts_per_epoch * mu
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

            # -- rollout: G completions of each prompt, then their rewards --------------------
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
            items = [e.item for e in examples for _ in range(hp.num_generations)]
            scores = rewards_of(items, rollout.texts)
            rewards = torch.tensor(scores.total, dtype=torch.float32)  # (N,)
            advantages, is_std_zero = group_advantages(
                rewards, hp.num_generations, hp.scale_rewards
            )  # (N,), (N,)
            loss_mask = rollout.completion_mask  # (N, C)
            if hp.mask_truncated_completions:  # DAPO: no signal from cut-off completions
                loss_mask = loss_mask * rollout.is_eos.unsqueeze(1)
            num_items = float(loss_mask.sum())  # dapo's normaliser: the rollout's tokens

            # -- old (μ > 1) and reference (β > 0) log-probs, once per rollout -----------------
            chunks = micro_batches(rollout.completion_ids.size(0), hp.gradient_accumulation_steps)
            parts = [rollout.select(rows) for rows in chunks]
            old_logps: list[torch.Tensor | None] = [None] * len(parts)
            ref_logps: list[torch.Tensor | None] = [None] * len(parts)
            with torch.no_grad():
                for k, part in enumerate(parts):
                    if mu > 1:
                        old_logps[k], _ = rollout_logps(model, part, temperature=hp.temperature)
                    if reference is not None:
                        ref_logps[k] = reference.logps(part, temperature=hp.temperature)
            rollout_metrics = {
                **reward_metrics(rewards, scores.per_function),
                "frac_reward_zero_std": float(is_std_zero.float().mean()),
                **completion_metrics(rollout),
            }
            # TRL's num_tokens: prompt and completion tokens sampled (once per rollout).
            trained_tokens += int(rollout.prompt_mask.sum() + rollout.completion_mask.sum())
            num_tokens += int(num_items)  # the completion tokens the loss counts

            # -- μ optimizer steps on this rollout -------------------------------------------
            for _ in range(mu):
                micro_stats: list[RlStats] = []
                entropy_sum = 0.0
                for k, (rows, part) in enumerate(zip(chunks, parts, strict=True)):
                    per_token_logps, entropies = rollout_logps(
                        model, part, temperature=hp.temperature, with_entropy=True
                    )  # (b, c), (b, c)
                    mask = loss_mask[rows][:, : part.completion_ids.size(1)]  # (b, c)
                    loss, stats = grpo_loss(
                        per_token_logps,
                        old_logps[k],
                        advantages[rows],
                        mask,
                        epsilon_low=hp.epsilon,
                        epsilon_high=hp.epsilon_high if hp.epsilon_high is not None else hp.epsilon,
                        loss_type=hp.loss_type,
                        max_completion_length=hp.max_completion_length,
                        num_items_in_batch=num_items,
                        num_micro_batches=len(parts),
                        beta=hp.beta,
                        ref_per_token_logps=ref_logps[k],
                    )
                    loss.backward()
                    micro_stats.append(stats)
                    assert entropies is not None
                    entropy_sum += float((entropies * mask).sum())
                grad_norm = torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
                learning_rate = float(scheduler.get_last_lr()[0])  # the rate this step uses
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                # -- metrics ---------------------------------------------------------------
                total = add_rl_stats(micro_stats)
                means = total.means()
                step_metrics = {
                    "train_loss": float(total.loss),
                    **rollout_metrics,
                    **({"kl": means["kl"]} if hp.beta > 0 else {}),
                    "clip_ratio": means["clip_ratio"],
                    "entropy": entropy_sum / max(1.0, float(total.num_tokens)),
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


# -- parts the online methods share (rloo imports them) ----------------------------------------


def prompt_budget(max_seq_len: int, max_completion_length: int) -> int:
    """Tokens a prompt may keep: ``max_seq_len`` bounds what the file holds, the prompt, and
    the completion adds up to ``max_completion_length`` on top. (OpenAI's reinforcement jobs
    have no sequence limit; their default 64-token completions must run beside any
    max_seq_len, so the two limits are not taken from one budget.)"""
    del max_completion_length  # not taken from the prompt's budget, see above
    return max_seq_len


def report_prompts(sink: MetricSink, data: PromptData, max_prompt_length: int) -> None:
    if data.n_truncated:
        sink.event(
            f"Truncated {data.n_truncated} prompts to their last {max_prompt_length} tokens",
            level="warning",
            data={"truncated": data.n_truncated, "max_prompt_length": max_prompt_length},
        )


def micro_batches(n_rows: int, gradient_accumulation_steps: int) -> list[torch.Tensor]:
    """The rollout's rows split, in order, into at most ``gradient_accumulation_steps`` parts."""
    parts = torch.arange(n_rows).tensor_split(min(n_rows, gradient_accumulation_steps))
    return [rows for rows in parts if rows.numel()]


class PolicyReference:
    """π_ref's log-probs of a rollout: the policy with its adapter off under LoRA (no copy,
    as TRL), a frozen copy taken before training under full fine-tuning."""

    def __init__(self, model: nn.Module, *, disable_adapter: bool) -> None:
        self.model = model
        self.disable_adapter = disable_adapter

    @classmethod
    def of(cls, model: nn.Module, adapter_type: str) -> PolicyReference:
        if adapter_type == "lora":
            return cls(model, disable_adapter=True)
        return cls(frozen_copy(model), disable_adapter=False)

    @torch.no_grad()
    def logps(self, rollout: Rollout, *, temperature: float) -> torch.Tensor:
        """(N, C) per-token log-probs of the completions, on logits / temperature."""
        adapter_off = (
            self.model.disable_adapter()  # type: ignore[operator]
            if self.disable_adapter
            else nullcontext()
        )
        with adapter_off:
            per_token_logps, _ = rollout_logps(self.model, rollout, temperature=temperature)
        return per_token_logps


class RewardScorer:
    """``spec.reward_functions`` through ``graders.score``; a reward model a function names is
    loaded on first use (``spec.reward_models[name]``) and kept for the run."""

    def __init__(self, spec: TrainSpec) -> None:
        self.spec = spec
        self.models: dict[str, RewardModel] = {}

    def __call__(self, items: Sequence[Mapping[str, Any]], completions: Sequence[str]) -> Any:
        return graders.score(
            self.spec.reward_functions,
            list(items),
            list(completions),
            reward_model=self.reward_model,
            http_allowed_hosts=self.spec.reward_http_allowed_hosts,
            http_timeout_s=self.spec.reward_http_timeout_s,
        )

    def reward_model(
        self, name: str, items: Sequence[Mapping[str, Any]], completions: Sequence[str]
    ) -> list[float]:
        if name not in self.models:
            ref = self.spec.reward_models.get(name)
            if ref is None:
                raise ValueError(f"reward model {name!r} was not provided to this run")
            self.models[name] = RewardModel.load(
                ref.base,
                ref.adapter,
                allow_hub=self.spec.allow_hub,
                trust_remote_code=self.spec.trust_remote_code,
            )
        sequences = [scored_sequence(i, c) for i, c in zip(items, completions, strict=True)]
        scores: list[float] = self.models[name].score(sequences).tolist()
        return scores


def scored_sequence(item: Mapping[str, Any], completion: str) -> Scorable:
    """What a reward model reads: the conversation with the completion as the assistant's
    turn, or the text prompt followed by the completion (TRL's rule)."""
    prompt = item.get("messages", item.get("prompt"))
    if isinstance(prompt, str):
        return prompt + completion
    return [*prompt, {"role": "assistant", "content": completion}]


def reward_metrics(
    rewards: torch.Tensor, per_function: Mapping[str, Sequence[float]]
) -> dict[str, float]:
    """``reward``, ``reward_std`` (unbiased) and ``rewards/<name>/mean`` of one rollout."""
    metrics = {
        "reward": float(torch.nanmean(rewards)),
        "reward_std": float(nanstd(rewards)) if rewards.numel() > 1 else 0.0,
    }
    for name, values in per_function.items():
        metrics[f"rewards/{name}/mean"] = float(
            torch.nanmean(torch.tensor(list(values), dtype=torch.float32))
        )
    return metrics


def completion_metrics(rollout: Rollout) -> dict[str, float]:
    """Lengths in tokens (EOS included) and the share of completions cut at the limit."""
    lengths = rollout.completion_mask.sum(-1).float()  # (N,)
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": 1.0 - float(rollout.is_eos.float().mean()),
    }


def window_metrics(points: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One metric point for the steps since the last: means, but the last value of states."""
    keys = list(points[-1])
    return {
        key: points[-1][key]
        if key in LAST_VALUE_METRICS
        else sum(p[key] for p in points if key in p) / sum(1 for p in points if key in p)
        for key in keys
    }


def report_samples(
    sink: MetricSink,
    step: int,
    tokenizer: Any,
    examples: Sequence[PromptExample],
    rollout: Rollout,
    rewards: torch.Tensor,
) -> None:
    """A few prompt / completion / reward rows of the rollout, cut to ``SAMPLE_CHARS``."""
    g = len(rollout.texts) // len(examples)
    samples = []
    # One completion of each prompt first, then the second ones, ...
    rows = sorted(range(len(rollout.texts)), key=lambda r: (r % g, r // g))[:SAMPLES_SHOWN]
    for row in rows:
        prompt = tokenizer.decode(examples[row // g].prompt_ids, skip_special_tokens=True)
        samples.append(
            {
                "prompt": prompt[-SAMPLE_CHARS:],  # the end is what was asked
                "completion": rollout.texts[row][:SAMPLE_CHARS],
                "reward": float(rewards[row]),
            }
        )
    sink.event(f"Samples at step {step}", data={"samples": samples})
