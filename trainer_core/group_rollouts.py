"""The rollouts GRPO and RLOO learn from: G completions of each prompt, scored by the job's
reward functions, each rollout trained on μ (``num_iterations``) times.

The two methods differ in what they make of a rollout (advantages, old and reference
log-probs, the loss); what comes before is the same and is here. ``start_run``: the policy,
its reference (β > 0; taken before a resumed run loads its weights) and the run on ``loop``,
one rollout being μ optimizer steps, so that checkpoints and stops fall between rollouts.
``scored_rollouts``: the rollouts the run has left, each sampled (``generation``) and scored
(``reward_scoring``). ``micro_batches``: a rollout's rows as the step accumulates them.

Placement: the policy, its reference and any reward model are on the job's device
(``job.where``); sampling and scoring run there under its autocast (bf16/fp16), the methods'
training forwards too, and backward goes through the loop's fp16 scaler.

Several processes: the B prompts of a rollout are shared out between the ranks as whole
groups (``distributed.share``: prompts ``rank::world_size``), since a group's advantages need
all G of its rewards. Each rank samples and scores its prompts' rows only; the noise of the
sampler is drawn for the whole rollout on every rank (``generation.RolloutShard``), so a row
samples what it would in one process. The rewards and lengths of every row are then gathered
(``WholeRollout``): advantages with a batch-wide statistic and the metrics are those of the
whole rollout. ``micro_batches`` splits the whole rollout's rows in order, as one process
does, and gives each rank its rows of each micro-batch with the micro-batch's size over all
ranks, so that the loss normalisers stay global and the ranks' losses add up to one
process's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from trainer_core import distributed, loop, rollout_report
from trainer_core.distributed import Distributed
from trainer_core.generation import Rollout, RolloutShard, rollout_logps, sample
from trainer_core.prompt_data import PromptData, PromptExample, training_prompts
from trainer_core.reference import ReferenceModel
from trainer_core.reward_scoring import RewardScorer
from trainer_core.specs import GrpoHyperparameters, RlooHyperparameters

Hyperparameters = GrpoHyperparameters | RlooHyperparameters


@dataclass(frozen=True)
class WholeRollout:
    """Per-row facts of the whole rollout (every rank's rows, prompt-major), on every rank."""

    rewards: torch.Tensor  # (N,) the reward functions' total
    per_function: dict[str, torch.Tensor]  # each function's rewards (N,), by name
    completion_lengths: torch.Tensor  # (N,) completion tokens (EOS included)
    prompt_lengths: torch.Tensor  # (N,) prompt tokens
    is_eos: torch.Tensor  # (N,) bool: ended with EOS

    def metrics(self) -> dict[str, float]:
        """The reward and completion metrics of the rollout (``rollout_report``)."""
        per_function = {name: values.tolist() for name, values in self.per_function.items()}
        return {
            **rollout_report.reward_metrics(self.rewards, per_function),
            **rollout_report.length_metrics(self.completion_lengths, self.is_eos),
        }


@dataclass(frozen=True)
class ScoredRollout:
    """One step's prompts, their sampled completions and the completions' rewards: this
    rank's share (all of it in one process), and the whole rollout's per-row facts."""

    examples: list[PromptExample]  # this rank's prompts of the step
    rollout: Rollout  # this rank's n = b·G rows, prompt-major
    rewards: torch.Tensor  # (n,) the reward functions' total
    per_function: dict[str, list[float]]  # each function's own rewards (n,), by name
    rows: torch.Tensor  # (n,) each row's place among the whole rollout's N = B·G rows
    weight: float  # 0 for a rank with no prompt of its own (a stand-in group)
    whole: WholeRollout


@dataclass(frozen=True)
class MicroBatch:
    """This rank's rows of one micro-batch of a rollout (``micro_batches``)."""

    rows: torch.Tensor  # (b,) indices into this rank's rollout
    rollout: Rollout  # of those rows, padding trimmed
    weight: float  # of its loss: 0 for the stand-in row of a rank with no rows in it
    whole_rows: torch.Tensor  # the micro-batch's rows among the whole rollout's (all ranks)
    split: bool  # split over several ranks: the loss needs the whole micro-batch's size

    def logps(
        self, model: nn.Module, *, temperature: float, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``generation.rollout_logps`` of these rows. Split over ranks, every rank takes the
        shared-prompt path whatever its share holds: under ZeRO the ranks must build the same
        graph (ZeRO-3's forwards and ZeRO-2's gradient reduction are collectives)."""
        return rollout_logps(
            model,
            self.rollout,
            temperature=temperature,
            with_entropy=with_entropy,
            share_prompts=True if self.split else None,
        )


def start_run(
    job: loop.Job, hp: Hyperparameters, method: str, *, validates: bool = False
) -> tuple[loop.Run[dict[str, float]], PromptData, ReferenceModel | None]:
    """The run of a GRPO or RLOO job (``method``, for messages), the prompts it samples, and
    the reference (None when β = 0). A checkpoint keeps the last step's ``train_loss`` and
    ``reward``. ``validates``: the method runs an eval pass on the validation file
    (``rollout_validation``), so it is not warned about as unused."""
    if not job.spec.reward_functions:
        raise ValueError(f"{method} needs at least one reward function")
    base, tokenizer = job.load_base()
    data = training_prompts(job.spec, tokenizer, job.sink, validated=validates)
    model = job.policy(base)  # on the device
    reference = (
        ReferenceModel.of(model, job.spec.adapter.type, dist=job.dist) if hp.beta > 0 else None
    )
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
    run: loop.Run[dict[str, float]], data: PromptData, hp: Hyperparameters, rewards_of: RewardScorer
) -> Iterator[ScoredRollout]:
    """For each rollout the run has left: ``batch_size`` prompts (this rank's share of them),
    G completions of each from the policy as it is now, and their rewards
    (``spec.reward_functions``, by ``rewards_of``: the method's one scorer, whose reward
    models the eval pass shares)."""
    d, where = run.dist, run.where
    g = hp.num_generations
    for (indices,) in run.steps():
        mine, weight = distributed.share(d, indices)
        # Prompt k of the step owns rows k·G .. k·G + G − 1 of the whole rollout.
        positions = range(d.rank, len(indices), d.world_size) if weight else range(1)
        rows = torch.tensor([k * g + j for k in positions for j in range(g)])  # (n,)
        total = len(indices) * g
        shard = None
        if d.world_size > 1:
            shard = RolloutShard(rows, total, partial(distributed.any_rank, d))
        examples = [data.examples[i] for i in mine]
        with where.autocast():
            rollout = sample(
                run.model,
                run.tokenizer,
                [e.prompt_ids for e in examples],
                hp,
                num_generations=g,
                shard=shard,
            )  # n = b·G rows
        scores = rewards_of([e.item for e in examples for _ in range(g)], rollout.texts)
        device = rollout.completion_ids.device
        rewards = torch.tensor(scores.total, dtype=torch.float32, device=device)  # (n,)
        whole = gather(d, rows, total, weight, rewards, scores.per_function, rollout)
        yield ScoredRollout(examples, rollout, rewards, scores.per_function, rows, weight, whole)


def report_samples(run: loop.Run[dict[str, float]], scored: ScoredRollout) -> None:
    """At the first step and every ``SAMPLES_EVERY``: a few of this rank's completions of the
    step with their rewards, as an event (``rollout_report``)."""
    if run.step == 1 or run.step % rollout_report.SAMPLES_EVERY == 0:
        rollout_report.report_samples(
            run.sink,
            run.step,
            run.tokenizer,
            scored.examples,
            scored.rollout,
            reward=scored.rewards,
        )


def gather(
    d: Distributed,
    rows: torch.Tensor,
    total: int,
    weight: float,
    rewards: torch.Tensor,
    per_function: dict[str, list[float]],
    rollout: Rollout,
) -> WholeRollout:
    """The ``WholeRollout`` of every rank's ``rows`` (a collective in several processes)."""
    whole = partial(distributed.gather_rows, d, rows=rows, total=total, weight=weight)
    device = rewards.device
    return WholeRollout(
        rewards=whole(rewards),
        per_function={
            name: whole(torch.tensor(values, dtype=torch.float32, device=device))
            for name, values in per_function.items()
        },
        completion_lengths=whole(rollout.completion_mask.sum(-1).float()),
        prompt_lengths=whole(rollout.prompt_mask.sum(-1).float()),
        is_eos=whole(rollout.is_eos.float()).bool(),
    )


def micro_batches(scored: ScoredRollout, parts: int, d: Distributed) -> list[MicroBatch]:
    """The whole rollout's N rows split in order into at most ``parts`` micro-batches (as
    ``Rollout.micro_batches`` splits them in one process), and this rank's rows of each. A
    rank with no row in a micro-batch runs one of its rows with weight 0 (every rank runs
    every micro-batch's forward and backward: ZeRO's gradient hooks are collectives)."""
    total = scored.whole.rewards.numel()
    split = [rows for rows in torch.arange(total).tensor_split(min(total, parts)) if rows.numel()]
    batches = []
    for whole_rows in split:
        rows = torch.isin(scored.rows, whole_rows).nonzero().squeeze(-1)  # (b,) in order
        weight = scored.weight
        if rows.numel() == 0:
            rows, weight = torch.zeros(1, dtype=torch.long), 0.0
        split_over_ranks = d.world_size > 1
        batches.append(
            MicroBatch(rows, scored.rollout.select(rows), weight, whole_rows, split_over_ranks)
        )
    return batches
