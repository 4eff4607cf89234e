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
metrics, a validation pass, tools, and several processes (the value head trains beside the
model, which DeepSpeed is not given).

Where it runs: the policy, reference, value head and reward model on the job's device; the
rollout, the reward model's scores, the old/reference forwards and the training forwards under
the run's autocast (the value head itself in fp32), backward through the loop's fp16 scaler;
gradient checkpointing in the training forwards only (sampling is in eval mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from trainer_core import loop
from trainer_core.generation import rollout_logps, sample
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
    where = job.where
    base, tokenizer = job.load_base()
    data = training_prompts(job.spec, tokenizer, job.sink)
    reward_model = load_reward_model(job.spec, where)
    model = job.policy(base)
    reference = ReferenceModel.of(model, job.spec.adapter.type)  # before any weight moves
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
        # -- rollout: one completion per prompt, scored by the reward model -----------------
        examples = [data.examples[i] for i in indices]
        with where.autocast():
            rollout = sample(
                model, tokenizer, [e.prompt_ids for e in examples], hp, num_generations=1
            )  # N = B rows
            sequences = [
                scored_sequence(e.item, text)
                for e, text in zip(examples, rollout.texts, strict=True)
            ]
            raw_scores = reward_model.score(sequences, batch_size=hp.batch_size)  # (N,) fp32
        mask = rollout.completion_mask  # (N, C)
        raw_scores = raw_scores.to(mask.device)

        # -- old log-probs and values, reference log-probs (no grad) -----------------------
        chunks, parts = rollout.micro_batches(hp.gradient_accumulation_steps)
        with torch.no_grad(), where.autocast():
            scored = [
                completion_forward(model, value_head, p, temperature=hp.temperature) for p in parts
            ]
            old_logps = stitch([lp for lp, _ in scored], chunks, mask.shape)  # (N, C)
            values = stitch([v for _, v in scored], chunks, mask.shape)  # (N, C)
        with where.autocast(), reference.scoring() as ref_model:
            ref_logps = stitch(
                [rollout_logps(ref_model, p, temperature=hp.temperature)[0] for p in parts],
                chunks,
                mask.shape,
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
        if hp.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, gamma=hp.gamma, lam=hp.lam)
        advantages = masked_whiten(advantages, mask)  # (N, C)

        # -- num_ppo_epochs updates on this rollout, the schedule stepped after the last ----
        num_completion_tokens = int(mask.sum())
        micro_stats: list[PpoStats] = []
        grad_norms = []
        for ppo_epoch in range(hp.num_ppo_epochs):
            for k, (rows, part) in enumerate(zip(chunks, parts, strict=True)):
                c = part.completion_ids.size(1)  # this micro-batch's longest completion
                with where.autocast():
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
                run.backward(loss, last=k == len(parts) - 1)
                micro_stats.append(stats)
            grad_norm, learning_rate = run.optimizer_step(
                ends_step=ppo_epoch == hp.num_ppo_epochs - 1
            )
            grad_norms.append(float(grad_norm))
        # TRL's num_tokens: prompt and completion tokens seen so far.
        run.count(
            trained=int(rollout.prompt_mask.sum()) + num_completion_tokens,
            loss=num_completion_tokens,
        )

        # -- metrics -----------------------------------------------------------------------
        step_metrics = {
            **rollout_stats.metrics(),
            # Token means over every micro-batch of every PPO epoch.
            **add_stats(micro_stats).metrics(),
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


def stitch(
    pieces: Sequence[torch.Tensor], chunks: Sequence[torch.Tensor], shape: torch.Size
) -> torch.Tensor:
    """(N, C) from per-micro-batch (b, c ≤ C) pieces, rows at ``chunks``, 0 past each c."""
    whole = pieces[0].new_zeros(shape)
    for rows, piece in zip(chunks, pieces, strict=True):
        whole[rows, : piece.size(1)] = piece
    return whole
