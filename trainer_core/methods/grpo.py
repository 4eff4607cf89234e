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
policy logps → loss → backward → clip → AdamW step → schedule → metrics → checkpoint. The
set-up and the scored rollouts are shared with RLOO (``group_rollouts``); the reference is
the policy with its adapter off under LoRA, a frozen copy under full fine-tuning
(``reference.ReferenceModel``); the loop around the rollouts (resume, stops, checkpoints, the
metrics window) is ``loop``'s.

Steps: one rollout is ``num_iterations`` (μ) optimizer steps, as in TRL, so an epoch is
⌈prompts / batch_size⌉ · μ steps. With μ = 1 the sampling policy is the policy being trained,
so π_old = π_θ.detach() and no extra forward is run (TRL's shortcut; the displayed loss is then
−mean(A)-like and near 0 while the gradient is not). Checkpoints and stops fall on rollout
boundaries (``Run.steps`` with ``steps_per_item=μ``): a checkpoint due inside a rollout's μ
steps is taken after its last one.

Choices that differ from TRL: positions follow the attention mask in both sampling and
scoring (TRL's training forward counts left padding as positions), and rows are split into
micro-batches in order rather than shuffled. The sampler is torch's global RNG, seeded with the
run and saved in checkpoints, so a resumed run samples what the uninterrupted one would.

Deliberately left out: vLLM, GSPO's sequence-level ratio, entropy bonuses and masks, the
cispo/sapo/vespo/luspo losses, multi-objective "normalize_then_sum", reward weights, tools and
multi-turn rollouts, and syncing the reference. With a validation file, every
``eval_interval`` steps the graders' mean over sampled validation completions is logged as
``valid_reward`` (``rollout_validation``; OpenAI's eval pass).

Where it runs: the job's device, every forward (sampling, old and reference log-probs, the
training one) and the loss under the run's autocast, backward through the loop's fp16 scaler;
gradient checkpointing is on in the training forwards, off while sampling (eval mode). Under
several processes each rank samples, scores and trains whole prompt groups of each rollout,
with the normalisers of the whole micro-batch, so N ranks compute one process's steps
(``group_rollouts``).
"""

from __future__ import annotations

import torch

from trainer_core import distributed, group_rollouts, loop, rollout_validation
from trainer_core.reward_scoring import RewardScorer
from trainer_core.rl_losses import RlStats, add_rl_stats, group_advantages, grpo_loss
from trainer_core.seams import RunResult
from trainer_core.specs import GrpoHyperparameters


@loop.method(GrpoHyperparameters)  # ReinforcementHyperparameters is one too
def train(job: loop.Job, hp: GrpoHyperparameters) -> RunResult:
    # The policy (on the device), its reference (β > 0) and the run: a rollout is μ steps.
    run, data, reference = group_rollouts.start_run(job, hp, "grpo", validates=True)
    model, mu, d, where = run.model, hp.num_iterations, run.dist, run.where
    # The job's reward functions, their reward models loaded once for training and the eval.
    scorer = RewardScorer(run.spec, run.where)
    valid_reward = rollout_validation.RolloutValidation.of(run, hp, scorer)  # None: no file

    # -- each rollout: G completions of each prompt (this rank's share), and their rewards --
    for scored in group_rollouts.scored_rollouts(run, data, hp, scorer):
        rollout, whole = scored.rollout, scored.whole  # n = b·G rows here, N = B·G in all
        whole_advantages, is_std_zero = group_advantages(
            whole.rewards, hp.num_generations, hp.scale_rewards
        )  # (N,), (N,)
        advantages = whole_advantages[scored.rows.to(whole_advantages.device)]  # (n,)
        loss_mask = rollout.completion_mask  # (n, C)
        loss_lengths = whole.completion_lengths  # (N,)
        if hp.mask_truncated_completions:  # DAPO: no signal from cut-off completions
            loss_mask = loss_mask * rollout.is_eos.unsqueeze(1)
            loss_lengths = loss_lengths * whole.is_eos
        num_items = float(loss_lengths.sum())  # dapo's normaliser: the rollout's tokens

        # -- old (μ > 1) and reference (β > 0) log-probs, once per rollout --------------------
        batches = group_rollouts.micro_batches(scored, hp.gradient_accumulation_steps, d)
        old_logps: list[torch.Tensor | None] = [None] * len(batches)
        ref_logps: list[torch.Tensor | None] = [None] * len(batches)
        for k, batch in enumerate(batches):
            with where.autocast():
                if mu > 1:
                    with torch.no_grad():
                        old_logps[k], _ = batch.logps(model, temperature=hp.temperature)
                if reference is not None:
                    with reference.scoring() as ref_model:
                        ref_logps[k], _ = batch.logps(ref_model, temperature=hp.temperature)
        rollout_metrics = {
            **whole.metrics(),
            "frac_reward_zero_std": float(is_std_zero.float().mean()),
        }
        # TRL's num_tokens: prompt and completion tokens sampled (once per rollout); the loss
        # counts the completion tokens.
        run.count(
            trained=int(whole.prompt_lengths.sum() + whole.completion_lengths.sum()),
            loss=int(num_items),
        )

        # -- μ optimizer steps on this rollout -----------------------------------------------
        for _ in range(mu):
            micro_stats: list[RlStats] = []
            entropy_sum = 0.0
            for k, batch in enumerate(batches):
                part = batch.rollout
                mask = loss_mask[batch.rows][:, : part.completion_ids.size(1)]  # (b, c)
                with where.autocast():
                    per_token_logps, entropies = batch.logps(
                        model, temperature=hp.temperature, with_entropy=True
                    )  # (b, c), (b, c)
                    loss, stats = grpo_loss(
                        per_token_logps,
                        old_logps[k],
                        advantages[batch.rows],
                        mask,
                        epsilon_low=hp.epsilon,
                        epsilon_high=hp.epsilon_high if hp.epsilon_high is not None else hp.epsilon,
                        loss_type=hp.loss_type,
                        max_completion_length=hp.max_completion_length,
                        num_items_in_batch=num_items,
                        num_micro_batches=len(batches),
                        # Split over ranks: the normalisers of the whole micro-batch.
                        micro_batch_rows=batch.whole_rows.numel() if batch.split else None,
                        micro_batch_tokens=float(loss_lengths[batch.whole_rows].sum())
                        if batch.split
                        else None,
                        beta=hp.beta,
                        ref_per_token_logps=ref_logps[k],
                    )
                run.backward(loss * batch.weight, last=k == len(batches) - 1)
                micro_stats.append(stats if batch.weight else distributed.nothing(stats))
                assert entropies is not None
                entropy_sum += batch.weight * float((entropies * mask).sum())
            grad_norm, learning_rate = run.optimizer_step()

            # -- metrics (over every rank's rows) --------------------------------------------
            total = distributed.all_reduce_sum(d, add_rl_stats(micro_stats))
            means = total.means()
            step_metrics = {
                "train_loss": float(total.loss),
                **rollout_metrics,
                **({"kl": means["kl"]} if hp.beta > 0 else {}),
                "clip_ratio": means["clip_ratio"],
                "entropy": distributed.sum_float(d, entropy_sum)
                / max(1.0, float(total.num_tokens)),
                **(valid_reward(run) if valid_reward is not None else {}),
            }
            run.record(step_metrics, grad_norm=grad_norm, learning_rate=learning_rate)
            group_rollouts.report_samples(run, scored)

    return run.result()
