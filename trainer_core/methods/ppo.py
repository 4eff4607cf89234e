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
(one ``global_step`` and one scheduler step per rollout; its ``num_mini_batches`` is 1 here):
``loop``'s step path with ``ends_step`` on the last update only. The reference is the base
model (the adapter switched off) under LoRA and a frozen copy under full fine-tuning
(``reference.ReferenceModel``); dropout is off in both. Checkpoints keep the value head in
``state/`` beside the optimizer (``value_head.WithValueHead``; ``adapter/`` stays an ordinary
causal LM), and a resumed run continues exactly: weights, head, optimizer, scheduler, sampler
RNG and position.

Choices that differ from TRL: the score lands on the last real token, not one past it (see
``ppo_losses.kl_penalty_rewards``); the value is a head on the policy's backbone, not a
separate value model; the reward model reads prompt + completion as *text* through its own
tokenizer (as GRPO's reward models do), so it need not share the policy's tokenizer; the
losses are token means over the whole rollout, so accumulation is exact.

Deliberately left out: the k3 KL estimator and an adaptive KL controller, several mini-batches
per PPO epoch (TRL's ``num_mini_batches``), more than one completion per prompt, entropy
metrics, a validation pass, tools, and DeepSpeed's ZeRO stages 1-3 (the value head trains
beside the model, which DeepSpeed is not given).

Several processes (``resources.gpus`` > 1, ZeRO stage 0: plain data parallelism): the B
prompts of a rollout are shared out between the ranks (``distributed.share``), and each rank
samples (``generation.RolloutShard``: the noise one process draws), scores and trains its
own. What spans the rollout is computed over every rank: the whitening's mean and variance
(``masked_whiten``'s ``total``), the loss normaliser (the rollout's completion tokens), the
metrics and the token counts. The micro-batches are the whole rollout's rows split in order,
as in one process, each rank running its rows of each (a rank with none runs a stand-in row
weighted 0, so that every rank has gradients to reduce). ``distributed.optimizer_step`` sums
the gradients of everything the optimizer trains over the ranks, the value head's too, so
every rank takes the same AdamW step and keeps the same head and optimizer state. GAE runs
per row and needs no other rank.

Where it runs: the policy, reference, value head and reward model on the job's device; the
rollout, the reward model's scores, the old/reference forwards and the training forwards under
the run's autocast (the value head itself in fp32), backward through the loop's fp16 scaler;
gradient checkpointing in the training forwards only (sampling is in eval mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from trainer_core import distributed, loop
from trainer_core.generation import RolloutShard, rollout_logps, sample
from trainer_core.placement import Placement
from trainer_core.ppo_losses import PpoStats, gae, kl_penalty_rewards, masked_whiten, ppo_loss
from trainer_core.preference_losses import add_stats
from trainer_core.prompt_data import training_prompts
from trainer_core.reference import ReferenceModel
from trainer_core.reward_models import RewardModel
from trainer_core.reward_scoring import named_reward_model, scored_sequence
from trainer_core.rollout_report import SAMPLES_EVERY, report_samples
from trainer_core.seams import RunResult
from trainer_core.specs import PpoHyperparameters, TrainSpec
from trainer_core.value_head import ValueHead, WithValueHead, completion_forward


@loop.method(PpoHyperparameters)
def train(job: loop.Job, hp: PpoHyperparameters) -> RunResult:
    # -- model, prompts, reward model, reference, value head: all on the job's device -------
    where, d = job.where, job.dist
    if d.zero_stage != 0:
        # The value head trains beside the model; DeepSpeed is given the model alone.
        raise ValueError(
            "ppo runs with resources.zero_stage 0 only (plain data parallelism over "
            f"resources.gpus), not {d.zero_stage}"
        )
    base, tokenizer = job.load_base()
    data = training_prompts(job.spec, tokenizer, job.sink)
    reward_model = load_reward_model(job.spec, where)
    model = job.policy(base)
    reference = ReferenceModel.of(model, job.spec.adapter.type, dist=d)  # before weights move
    value_head = ValueHead.for_model(model).to(next(model.parameters()).device)

    # Checkpoints keep the head in state/; one optimizer trains the policy and the head.
    job = replace(job, store=WithValueHead(job.store, value_head))
    run: loop.Run[dict[str, float]] = job.start(
        model,
        tokenizer,
        rows=len(data.examples),
        gradient_accumulation_steps=1,  # one step is one rollout of batch_size prompts
        summarise=loop.mean_of_points,
        checkpoint_metrics=lambda last: {k: last[k] for k in ("train_loss", "objective/scores")},
        trainable=nn.ModuleList([model, value_head]),
    )
    if job.spec.resume_from is not None:
        value_head.load(Path(job.spec.resume_from) / "state")

    # -- one rollout and its num_ppo_epochs updates a step ---------------------------------
    for (indices,) in run.steps():
        # -- rollout: one completion per prompt (this rank's), scored by the reward model ----
        mine, weight = distributed.share(d, indices)
        # Prompt k of the step is row k of the whole rollout; a stand-in is row 0's prompt.
        rows = torch.tensor(list(range(d.rank, len(indices), d.world_size)) if weight else [0])
        shard = None
        if d.world_size > 1:
            shard = RolloutShard(rows, len(indices), partial(distributed.any_rank, d))
        examples = [data.examples[i] for i in mine]
        with where.autocast():
            rollout = sample(
                model,
                tokenizer,
                [e.prompt_ids for e in examples],
                hp,
                num_generations=1,
                shard=shard,
            )  # n rows here, N = B in all
            sequences = [
                scored_sequence(e.item, text)
                for e, text in zip(examples, rollout.texts, strict=True)
            ]
            raw_scores = reward_model.score(sequences, batch_size=hp.batch_size)  # (N,) fp32
        mask = rollout.completion_mask  # (n, C)
        raw_scores = raw_scores.to(mask.device)
        # What this rank adds to the rollout's statistics: nothing from a stand-in row.
        live = mask * weight  # (n, C)

        # -- old log-probs and values, reference log-probs (no grad) -----------------------
        chunks, weights = micro_batch_rows(rows, len(indices), weight, hp)
        parts = [rollout.select(chunk) for chunk in chunks]
        with torch.no_grad(), where.autocast():
            scored = [
                completion_forward(model, value_head, p, temperature=hp.temperature) for p in parts
            ]
            old_logps = stitch([lp for lp, _ in scored], chunks, mask.shape, weights)  # (N, C)
            values = stitch([v for _, v in scored], chunks, mask.shape, weights)  # (N, C)
        with where.autocast(), reference.scoring() as ref_model:
            ref_logps = stitch(
                [rollout_logps(ref_model, p, temperature=hp.temperature)[0] for p in parts],
                chunks,
                mask.shape,
                weights,
            )  # (N, C)

        # -- rewards, GAE advantages and returns, whitening --------------------------------
        rewards, scores, rollout_stats = kl_penalty_rewards(
            old_logps,
            ref_logps,
            raw_scores,
            mask,
            rollout.is_eos,
            kl_coef=hp.kl_coef,
            missing_eos_penalty=hp.missing_eos_penalty,
        )  # (N, C), (N,)
        rollout_stats = distributed.all_reduce_sum(
            d, rollout_stats if weight else distributed.nothing(rollout_stats)
        )
        over_ranks = partial(distributed.all_reduce_tensor, d)
        if hp.whiten_rewards:
            rewards = masked_whiten(rewards, live, shift_mean=False, total=over_ranks)
        advantages, returns = gae(rewards, values, mask, gamma=hp.gamma, lam=hp.lam)
        advantages = masked_whiten(advantages, live, total=over_ranks)  # (n, C)

        # -- num_ppo_epochs updates on this rollout, the schedule stepped after the last ----
        num_completion_tokens = distributed.sum_int(d, int(live.sum()))
        micro_stats: list[PpoStats] = []
        grad_norms = []
        for ppo_epoch in range(hp.num_ppo_epochs):
            for k, (chunk, part, w) in enumerate(zip(chunks, parts, weights, strict=True)):
                c = part.completion_ids.size(1)  # this micro-batch's longest completion
                with where.autocast():
                    new_logps, new_values = completion_forward(
                        model, value_head, part, temperature=hp.temperature
                    )  # (b, c), (b, c)
                loss, stats = ppo_loss(
                    new_logps,
                    old_logps[chunk][:, :c],
                    advantages[chunk][:, :c],
                    new_values,
                    values[chunk][:, :c],
                    returns[chunk][:, :c],
                    part.completion_mask,
                    cliprange=hp.cliprange,
                    cliprange_value=hp.cliprange_value,
                    vf_coef=hp.vf_coef,
                    normaliser=num_completion_tokens,
                )
                run.backward(loss * w, last=k == len(parts) - 1)
                micro_stats.append(stats if w else distributed.nothing(stats))
            grad_norm, learning_rate = run.optimizer_step(
                ends_step=ppo_epoch == hp.num_ppo_epochs - 1
            )
            grad_norms.append(float(grad_norm))
        # TRL's num_tokens: prompt and completion tokens seen so far.
        prompt_tokens = distributed.sum_int(d, int(rollout.prompt_mask.sum()) if weight else 0)
        run.count(trained=prompt_tokens + num_completion_tokens, loss=num_completion_tokens)

        # -- metrics -----------------------------------------------------------------------
        step_metrics = {
            **rollout_stats.metrics(),
            # Token means over every micro-batch of every PPO epoch.
            **distributed.all_reduce_sum(d, add_stats(micro_stats)).metrics(),
        }
        run.record(
            step_metrics, grad_norm=sum(grad_norms) / len(grad_norms), learning_rate=learning_rate
        )
        if run.step == 1 or run.step % SAMPLES_EVERY == 0 or run.step == run.total_steps:
            report_samples(
                run.sink,
                run.step,
                tokenizer,
                examples,
                rollout,
                score=scores,  # after the missing-EOS penalty
                ended_with_eos=rollout.is_eos,
            )

    return run.result()


def load_reward_model(spec: TrainSpec, where: Placement | None = None) -> RewardModel:
    """The reward model ``spec.reward_model`` names, from the folders the worker fetched, on
    ``where``'s device."""
    if spec.reward_model is None:
        raise ValueError("ppo needs a reward_model")
    return named_reward_model(spec, spec.reward_model, where)


def micro_batch_rows(
    rows: torch.Tensor, total: int, weight: float, hp: PpoHyperparameters
) -> tuple[list[torch.Tensor], list[float]]:
    """The whole rollout's ``total`` rows split in order into at most
    ``gradient_accumulation_steps`` micro-batches (as ``Rollout.micro_batches`` splits them in
    one process), and this rank's rows of each (indices into its rollout, whose rows are
    ``rows`` of the whole) with the weight of their loss: a micro-batch without a row of
    this rank runs its row 0 weighted 0 (every rank backs something up, so every rank has
    the gradients that ``distributed.optimizer_step`` sums)."""
    parts = min(total, hp.gradient_accumulation_steps)
    chunks, weights = [], []
    for whole_rows in torch.arange(total).tensor_split(parts):
        if not whole_rows.numel():
            continue
        chunk = torch.isin(rows, whole_rows).nonzero().squeeze(-1)  # (b,) in order
        if chunk.numel() == 0 or not weight:
            chunk, w = torch.zeros(1, dtype=torch.long), 0.0
        else:
            w = 1.0
        chunks.append(chunk)
        weights.append(w)
    return chunks, weights


def stitch(
    pieces: Sequence[torch.Tensor],
    chunks: Sequence[torch.Tensor],
    shape: torch.Size,
    weights: Sequence[float],
) -> torch.Tensor:
    """(n, C) from per-micro-batch (b, c ≤ C) pieces, rows at ``chunks``, 0 past each c. A
    stand-in piece (weight 0) is left out: its row is another micro-batch's, whose own
    forward (batched as in one process) is the one that counts."""
    whole = pieces[0].new_zeros(shape)
    for rows, piece, weight in zip(chunks, pieces, weights, strict=True):
        if weight:
            whole[rows, : piece.size(1)] = piece
    return whole
