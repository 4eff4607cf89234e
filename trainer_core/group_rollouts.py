"""The rollouts GRPO and RLOO learn from: G completions of each prompt, scored by the job's
reward functions, each rollout trained on μ (``num_iterations``) times.

The two methods differ in what they make of a rollout (advantages, old and reference
log-probs, the loss); what comes before is the same and is here. ``start_run``: the policy,
its reference (β > 0; taken before a resumed run loads its weights) and the run on ``loop``,
one rollout being μ optimizer steps, so that checkpoints and stops fall between rollouts.
``scored_rollouts``: the rollouts the run has left, each sampled (``generation``) and scored
(``reward_scoring``).

Rollouts are not placed on a device yet: the CPU in fp32, whatever the job's resources
(``placement.cpu_only``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from trainer_core import loop
from trainer_core.generation import Rollout, sample
from trainer_core.placement import Placement, cpu_only
from trainer_core.prompt_data import PromptData, PromptExample, training_prompts
from trainer_core.reference import ReferenceModel
from trainer_core.reward_scoring import RewardScorer
from trainer_core.specs import GrpoHyperparameters, RlooHyperparameters

Hyperparameters = GrpoHyperparameters | RlooHyperparameters


@dataclass(frozen=True)
class ScoredRollout:
    """One step's prompts, their sampled completions and the completions' rewards."""

    examples: list[PromptExample]  # the B prompts of the step
    rollout: Rollout  # N = B·G rows, prompt-major
    rewards: torch.Tensor  # (N,) the reward functions' total
    per_function: dict[str, list[float]]  # each function's own rewards (N,), by name


def start_run(
    job: loop.Job, hp: Hyperparameters, method: str
) -> tuple[loop.Run[dict[str, float]], PromptData, ReferenceModel | None]:
    """The run of a GRPO or RLOO job (``method``, for messages), the prompts it samples, and
    the reference (None when β = 0). A checkpoint keeps the last step's ``train_loss`` and
    ``reward``."""
    if not job.spec.reward_functions:
        raise ValueError(f"{method} needs at least one reward function")
    cpu_only(job.spec.resources, method, job.sink)  # see docs/methods.md
    job = replace(job, dist=replace(job.dist, placement=Placement()))  # the CPU, in fp32
    base, tokenizer = job.load_base()
    data = training_prompts(job.spec, tokenizer, job.sink, validated=method == "grpo")
    model = job.policy(base)
    reference = ReferenceModel.of(model, job.spec.adapter.type) if hp.beta > 0 else None
    run: loop.Run[dict[str, float]] = job.start(
        model,
        tokenizer,
        rows=len(data.examples),
        # A rollout of batch_size prompts is one item (accumulation splits its rows instead).
        gradient_accumulation_steps=1,
        steps_per_item=hp.num_iterations,
        summarise=loop.mean_of_points,
        checkpoint_metrics=lambda last: {key: last[key] for key in ("train_loss", "reward")},
    )
    return run, data, reference


def scored_rollouts(
    run: loop.Run[dict[str, float]], data: PromptData, hp: Hyperparameters
) -> Iterator[ScoredRollout]:
    """For each rollout the run has left: ``batch_size`` prompts, G completions of each from
    the policy as it is now, and their rewards (``spec.reward_functions``)."""
    rewards_of = RewardScorer(run.spec)
    g = hp.num_generations
    for (indices,) in run.steps():
        examples = [data.examples[i] for i in indices]
        prompts = [e.prompt_ids for e in examples]
        rollout = sample(run.model, run.tokenizer, prompts, hp, num_generations=g)  # N = B·G
        scores = rewards_of([e.item for e in examples for _ in range(g)], rollout.texts)
        rewards = torch.tensor(scores.total, dtype=torch.float32)  # (N,)
        yield ScoredRollout(examples, rollout, rewards, scores.per_function)
