"""REINFORCE Leave-One-Out (RLOO): sampled completions, each judged against its siblings.

Ahmadian et al. 2024, "Back to Basics", https://arxiv.org/abs/2402.14740, as TRL 1.16's
``RLOOTrainer`` runs it. Each prompt is sampled G times; the KL to the reference is folded into
the reward as a sequence-summed k1 estimate, and each completion's baseline is the mean
penalised reward of the other G − 1:

    r'_i = r_i − β · Σ_t (log π_old − log π_ref),    A_i = r'_i − (Σ_j r'_j − r'_i) / (G − 1)

The policy moves through the clipped surrogate on the whole sequence's ratio
ρ_i = π_θ(y_i|x) / π_old(y_i|x), averaged over sequences (``rl_losses.rloo_loss``).

One rollout, top to bottom: batch_size prompts → G completions each and their rewards
(``group_rollouts``: ``generation``, then the reward functions) → old log-probs (the sampling
policy, no grad) and reference log-probs (β > 0) → KL-penalised leave-one-out advantages →
``num_iterations`` optimizer steps on that rollout, each over ``gradient_accumulation_steps``
micro-batches: policy logps → loss → backward → clip → AdamW step → schedule → metrics →
checkpoint.

Everything before the first rollout, and the rollouts themselves, are GRPO's
(``group_rollouts``): the same ``loop`` (one rollout = μ optimizer steps; checkpoints and
stops on rollout boundaries), the same reference (``reference.ReferenceModel``) and rollout
metrics (``rollout_report``). With β = 0 and μ = 1 the old log-probs are π_θ.detach() and
their forward is skipped.

Where it runs, and how several processes share a rollout: as GRPO (``group_rollouts``); the
KL of every row is gathered before the advantages, so normalised advantages are the whole
rollout's.

Deliberately left out: reward clipping (``reward_clip_range``), ε_high ≠ ε, vLLM, tools,
syncing the reference, and a validation pass.
"""

from __future__ import annotations

import torch

from trainer_core import distributed, group_rollouts, loop
from trainer_core.reward_scoring import RewardScorer
from trainer_core.rl_losses import RlStats, add_rl_stats, rloo_advantages, rloo_loss
from trainer_core.seams import RunResult
from trainer_core.specs import RlooHyperparameters


@loop.method(RlooHyperparameters)
def train(job: loop.Job, hp: RlooHyperparameters) -> RunResult:
    # The policy (on the device), its reference (β > 0) and the run: a rollout is μ steps.
    run, data, reference = group_rollouts.start_run(job, hp, "rloo")
    model, mu, d, where = run.model, hp.num_iterations, run.dist, run.where

    # -- each rollout: G completions of each prompt (this rank's share), and their rewards --
    for scored in group_rollouts.scored_rollouts(run, data, hp, RewardScorer(run.spec, run.where)):
        rollout, whole = scored.rollout, scored.whole  # n = b·G rows here, N = B·G in all
        batches = group_rollouts.micro_batches(scored, hp.gradient_accumulation_steps, d)

        # -- old and reference log-probs (sequence sums) and the KL per sequence ----------------
        need_old = hp.beta > 0 or mu > 1
        old_logps: list[torch.Tensor | None] = [None] * len(batches)  # (b,) each
        kl = torch.zeros(rollout.completion_ids.size(0), device=whole.rewards.device)  # (n,)
        kl_token_sum = 0.0
        # With one optimizer step on one micro-batch, the step's own forward (with grad) is
        # the sampling policy's: run it once here and take the old log-probs from it detached,
        # rather than a second, no-grad pass (the same numbers, one fewer forward per rollout).
        training_forward = None
        for k, batch in enumerate(batches):
            if not need_old:
                continue
            part = batch.rollout
            with where.autocast():
                if mu == 1 and len(batches) == 1:
                    training_forward = batch.logps(
                        model, temperature=hp.temperature, with_entropy=True
                    )
                    old_per_token = training_forward[0].detach()
                else:
                    with torch.no_grad():
                        old_per_token, _ = batch.logps(model, temperature=hp.temperature)
                old_logps[k] = (old_per_token * part.completion_mask).sum(-1)
                if reference is not None:
                    with reference.scoring() as ref_model:
                        ref_per_token, _ = batch.logps(ref_model, temperature=hp.temperature)
            if reference is not None and batch.weight:
                per_token_kl = (old_per_token - ref_per_token) * part.completion_mask
                kl[batch.rows] = per_token_kl.sum(-1).float()  # (b,) k1, sequence-summed
                kl_token_sum += float(per_token_kl.sum())

        # -- KL-penalised leave-one-out advantages, over the whole rollout --------------------
        whole_kl = None
        if reference is not None:
            whole_kl = distributed.gather_rows(
                d, kl, scored.rows, whole.rewards.numel(), weight=scored.weight
            )  # (N,)
        whole_advantages = rloo_advantages(
            whole.rewards,
            hp.num_generations,
            kl=whole_kl,
            beta=hp.beta,
            normalize=hp.normalize_advantages,
        )  # (N,)
        advantages = whole_advantages[scored.rows.to(whole_advantages.device)]  # (n,)
        completion_tokens = float(whole.completion_lengths.sum())
        rollout_metrics = whole.metrics()
        if reference is not None:
            kl_mean = distributed.sum_float(d, kl_token_sum) / completion_tokens
            rollout_metrics = {**rollout_metrics, "kl": kl_mean}
        # TRL's num_tokens: prompt and completion tokens sampled (once per rollout); the loss
        # counts the completion tokens.
        run.count(
            trained=int(whole.prompt_lengths.sum() + whole.completion_lengths.sum()),
            loss=int(completion_tokens),
        )

        # -- μ optimizer steps on this rollout -----------------------------------------------
        for _ in range(mu):
            micro_stats: list[RlStats] = []
            entropy_sum = 0.0
            for k, batch in enumerate(batches):
                part = batch.rollout
                with where.autocast():
                    per_token_logps, entropies = training_forward or batch.logps(
                        model, temperature=hp.temperature, with_entropy=True
                    )  # (b, c), (b, c)
                    training_forward = None
                    logps = (per_token_logps * part.completion_mask).sum(-1)  # (b,)
                    old = old_logps[k]
                    loss, stats = rloo_loss(
                        logps,
                        logps.detach() if old is None else old,
                        advantages[batch.rows],
                        epsilon_low=hp.epsilon,
                        epsilon_high=hp.epsilon,
                        num_micro_batches=len(batches),
                        # Split over ranks: the whole micro-batch's rows normalise.
                        micro_batch_rows=batch.whole_rows.numel() if batch.split else None,
                    )
                run.backward(loss * batch.weight, last=k == len(batches) - 1)
                micro_stats.append(stats if batch.weight else distributed.nothing(stats))
                assert entropies is not None
                entropy_sum += batch.weight * float((entropies * part.completion_mask).sum())
            grad_norm, learning_rate = run.optimizer_step()

            # -- metrics (over every rank's rows) --------------------------------------------
            total = distributed.all_reduce_sum(d, add_rl_stats(micro_stats))
            step_metrics = {
                "train_loss": float(total.loss),
                **rollout_metrics,
                "clip_ratio": total.means()["clip_ratio"],
                "entropy": distributed.sum_float(d, entropy_sum) / max(1.0, completion_tokens),
            }
            run.record(step_metrics, grad_norm=grad_norm, learning_rate=learning_rate)
            group_rollouts.report_samples(run, scored)

    return run.result()
