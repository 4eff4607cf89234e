"""The losses and advantages of the sampling-based RL methods (GRPO, RLOO) as pure functions.

Every formula matches TRL 1.16 (``GRPOTrainer._generate_and_score_completions`` /
``_compute_loss``, ``RLOOTrainer`` likewise) to the digit; ``bench/online_parity.py`` checks
it. Shapes: N rollout rows (prompt-major, G per prompt), C completion positions.

GRPO (Shao et al. 2024, https://arxiv.org/abs/2402.03300). Per token t of completion i,

    ρ_i,t = exp(log π_θ(y_t) − log π_old(y_t))
    ℓ_i,t = −min(ρ_i,t · A_i, clip(ρ_i,t, 1 − ε_low, 1 + ε_high) · A_i) + β · KL_i,t

with A_i the group advantage (``group_advantages``), KL the k3 estimator (``k3_kl``), and the
per-token losses aggregated by ``aggregate_loss`` (grpo, bnpo, dr_grpo, dapo).

RLOO (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740): the KL is folded into the
reward as β·Σ_t (log π_old − log π_ref) (k1, sequence-summed), the baseline is the mean reward
of the other G−1 samples of the prompt, and the ratio is taken on whole sequences.

NaN rewards (an unscorable completion) are left out of the group statistics and get
advantage 0, as in TRL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]

# TRL adds this to the std before dividing (not an ε inside a sqrt).
STD_EPS = 1e-4


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased (Bessel-corrected) std ignoring NaNs, as TRL's ``nanstd``."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim)
    return torch.sqrt(variance * count / (count - 1))


# -- advantages ------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: ScaleRewards = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages (N,), is_std_zero (N,) bool)``: GRPO's group-relative advantage.

        A_i = r_i − mean_group(r)                        scale_rewards="none" (Dr. GRPO)
        A_i = (r_i − mean_group(r)) / (std_group(r) + 1e-4)       "group" (GRPO)
        A_i = (r_i − mean_group(r)) / (std_batch(r) + 1e-4)       "batch"

    std is unbiased. ``is_std_zero`` marks rows whose scaling std is 0 (under "none", the
    group std); its mean is TRL's ``frac_reward_zero_std``.

    Example (G = 2): r = [1, 3, 2, 2] → group means [2, 2], group stds [√2, 0],
    "none": A = [−1, 1, 0, 0]; "group": A = [−1/(√2+1e-4), 1/(√2+1e-4), 0, 0].
    """
    grouped = rewards.view(-1, num_generations)  # (N/G, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)  # (N,)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)  # (N,)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)  # (N,)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


def rloo_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    normalize: bool = False,
) -> torch.Tensor:
    """(N,) RLOO advantages: the leave-one-out baseline of the KL-penalised reward.

        r'_i = r_i − β · kl_i            kl_i = Σ_t (log π_old − log π_ref)  (``sequence_k1``)
        b_i  = (Σ_{j in group} r'_j − r'_i) / (G − 1)
        A_i  = r'_i − b_i                and, with ``normalize``, (A − mean A) / (std A + 1e-4)

    Example (G = 3, β = 0): r = [1, 2, 6] → b = [4, 3.5, 1.5], A = [−3, −1.5, 4.5].
    """
    if kl is not None and beta != 0.0:
        rewards = rewards - beta * kl
    grouped = rewards.view(-1, num_generations)  # (N/G, G)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)  # (N/G, 1)
    baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)
    advantages = rewards - baselines.view(-1)  # (N,)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


# -- KL estimators ---------------------------------------------------------------------------


def k3_kl(per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor) -> torch.Tensor:
    """(N, C) Schulman's k3 estimator of KL(π_θ ‖ π_ref), ≥ 0 and unbiased under π_θ:

        KL_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1

    http://joschu.net/blog/kl-approx.html. Example: logp = −1, ref = −2 → e⁻¹ + 1 − 1 = 0.3679.
    """
    delta = ref_per_token_logps - per_token_logps
    return torch.exp(delta) - delta - 1


def sequence_k1(
    old_per_token_logps: torch.Tensor,
    ref_per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """(N,) RLOO's KL per sequence: Σ_t (old_t − ref_t) over the completion (k1; may be < 0)."""
    return ((old_per_token_logps - ref_per_token_logps) * completion_mask).sum(-1)


# -- the clipped surrogate -------------------------------------------------------------------


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, *, epsilon_low: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ratio, is_low_clipped, is_high_clipped)``: PPO's clipped objective, negated.

        ρ = exp(log_ratio),   loss = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)

    (Schulman et al. 2017, https://arxiv.org/abs/1707.06347.) ``log_ratio`` is (N, C) per token
    or (N,) per sequence; ``advantages`` broadcasts against it ((N, 1) or (N,)). The clip only
    bites where it lowers the objective: ρ < 1 − ε_low with A < 0 ("low") and ρ > 1 + ε_high
    with A > 0 ("high"); there the gradient is 0. The masks are detached.
    """
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    with torch.no_grad():
        is_low = (ratio < 1 - epsilon_low) & (advantages < 0)
        is_high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return loss, ratio, is_low, is_high


def aggregate_loss(
    per_token_loss: torch.Tensor,
    completion_mask: torch.Tensor,
    loss_type: LossType,
    *,
    max_completion_length: int,
    num_items_in_batch: float,
    num_micro_batches: int = 1,
    micro_batch_rows: int | None = None,
    micro_batch_tokens: float | None = None,
) -> torch.Tensor:
    """() One micro-batch's share of the step's loss from ``per_token_loss`` (B, C).

    =======  =====================================================  ==========================
    grpo     mean_i(Σ_t ℓ_i,t·m_i,t / Σ_t m_i,t) / M                 GRPO paper
    bnpo     Σ ℓ·m / Σ m  (active tokens of this micro-batch) / M    TRL
    dr_grpo  Σ ℓ·m / (B · max_completion_length) / M                 2503.20783 (Dr. GRPO)
    dapo     Σ ℓ·m / num_items_in_batch                              2503.14476 (DAPO)
    =======  =====================================================  ==========================

    M = ``num_micro_batches``, the micro-batches one optimizer step accumulates; B this
    micro-batch's rows; ``num_items_in_batch`` the active completion tokens of the step's
    whole rollout, so dapo's micro-batch losses add up to one token-level mean over the step
    however it is split.

    Example: ℓ = [[1, 2, 3], [4, 0, 0]], m = [[1, 1, 1], [1, 0, 0]], max length 4, M = 1,
    num_items 4: grpo (2 + 4)/2 = 3; bnpo 10/4 = 2.5; dr_grpo 10/8 = 1.25; dapo 10/4 = 2.5.

    A rank's share of a micro-batch split over several ranks passes the whole micro-batch's
    ``micro_batch_rows`` (B) and ``micro_batch_tokens`` (Σ m): the ranks' losses then add up
    to the micro-batch's. With the first example's rows on two ranks (2 rows, 4 tokens), grpo
    gives 2/2 + 4/2 = 3 and bnpo 6/4 + 4/4 = 2.5, as above.
    """
    mask = completion_mask.to(per_token_loss.dtype)
    total = (per_token_loss * mask).sum()
    if loss_type == "grpo":
        per_sequence = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        if micro_batch_rows is not None:
            return per_sequence.sum() / micro_batch_rows / num_micro_batches
        return per_sequence.mean() / num_micro_batches
    if loss_type == "bnpo":
        if micro_batch_tokens is not None:
            return total / max(1.0, micro_batch_tokens) / num_micro_batches
        return total / mask.sum().clamp(min=1.0) / num_micro_batches
    if loss_type == "dr_grpo":
        rows = per_token_loss.size(0) if micro_batch_rows is None else micro_batch_rows
        return total / (rows * max_completion_length) / num_micro_batches
    if loss_type == "dapo":
        return total / max(1.0, float(num_items_in_batch))
    raise ValueError(f"unknown loss_type {loss_type!r}")


# -- whole losses ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RlStats:
    """Detached sums over one micro-batch; ``add_rl_stats`` adds a step's up."""

    loss: torch.Tensor  # () the micro-batch's loss (its share of the step's)
    num_tokens: torch.Tensor  # () active completion tokens (or sequences, at sequence level)
    kl_sum: torch.Tensor  # () Σ KL over the active tokens (0 when β = 0)
    clip_low_sum: torch.Tensor  # () active tokens clipped below
    clip_high_sum: torch.Tensor  # () active tokens clipped above

    def means(self) -> dict[str, float]:
        """Token-weighted means over the tokens these stats cover."""
        n = max(1.0, float(self.num_tokens))
        low, high = float(self.clip_low_sum) / n, float(self.clip_high_sum) / n
        return {
            "kl": float(self.kl_sum) / n,
            "clip_ratio": low + high,  # TRL's clip_ratio/region_mean (low and high are disjoint)
            "clip_ratio/low_mean": low,
            "clip_ratio/high_mean": high,
        }


def add_rl_stats(stats: list[RlStats]) -> RlStats:
    fields = RlStats.__dataclass_fields__
    return RlStats(
        **{name: sum((getattr(s, name) for s in stats), torch.tensor(0.0)) for name in fields}
    )


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: LossType,
    max_completion_length: int,
    num_items_in_batch: float,
    num_micro_batches: int = 1,
    micro_batch_rows: int | None = None,
    micro_batch_tokens: float | None = None,
    beta: float = 0.0,
    ref_per_token_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, RlStats]:
    """``(loss (), stats)`` of GRPO on one micro-batch (see the module docstring).

    Args:
        per_token_logps: (B, C) log π_θ of the completion tokens, with grad, computed on
            logits / temperature.
        old_per_token_logps: (B, C) log π_old, the policy that sampled the rollout; None means
            "this is the sampling policy" (one iteration per rollout): π_θ.detach(), ρ = 1.
        advantages: (B,) from ``group_advantages``.
        completion_mask: (B, C) 1 on tokens that count.
        beta, ref_per_token_logps: the KL term; its k3 value is multiplied by ρ (TRL 1.16's
            ``use_bias_correction_kl=True`` default, DeepSeek-V3.2), which leaves the value
            unchanged on-policy and makes the gradient that of the reverse KL.
        The rest as in ``aggregate_loss`` and ``clipped_surrogate``.
    """
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    per_token_loss, ratio, is_low, is_high = clipped_surrogate(
        per_token_logps - old,
        advantages.unsqueeze(-1),  # (B, 1)
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
    )
    mask = completion_mask.to(per_token_logps.dtype)
    kl_sum = torch.tensor(0.0)
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta > 0 needs ref_per_token_logps")
        per_token_kl = k3_kl(per_token_logps, ref_per_token_logps) * ratio  # (B, C)
        per_token_loss = per_token_loss + beta * per_token_kl
        kl_sum = (per_token_kl.detach() * mask).sum()
    loss = aggregate_loss(
        per_token_loss,
        completion_mask,
        loss_type,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
        num_micro_batches=num_micro_batches,
        micro_batch_rows=micro_batch_rows,
        micro_batch_tokens=micro_batch_tokens,
    )
    stats = RlStats(
        loss=loss.detach(),
        num_tokens=mask.sum(),
        kl_sum=kl_sum,
        clip_low_sum=(is_low * mask).sum(),
        clip_high_sum=(is_high * mask).sum(),
    )
    return loss, stats


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    num_micro_batches: int = 1,
    micro_batch_rows: int | None = None,
) -> tuple[torch.Tensor, RlStats]:
    """``(loss (), stats)`` of RLOO on one micro-batch: the clipped surrogate on whole
    sequences, averaged over them (TRL 1.16's ``RLOOTrainer._compute_loss``).

        ρ_i = exp(Σ_t log π_θ − Σ_t log π_old),  loss = mean_i −min(ρ_i·A_i, clip(ρ_i)·A_i) / M

    ``logps`` / ``old_logps`` (B,) are completion sums (masked); ``advantages`` (B,) from
    ``rloo_advantages``. Stats count sequences, not tokens (``kl`` is reported separately,
    from the rollout). ``micro_batch_rows``: the whole micro-batch's rows when these are one
    rank's share of it (``aggregate_loss``).
    """
    per_sequence_loss, _, is_low, is_high = clipped_surrogate(
        logps - old_logps, advantages, epsilon_low=epsilon_low, epsilon_high=epsilon_high
    )
    if micro_batch_rows is None:
        loss = per_sequence_loss.mean() / num_micro_batches
    else:
        loss = per_sequence_loss.sum() / micro_batch_rows / num_micro_batches
    stats = RlStats(
        loss=loss.detach(),
        num_tokens=torch.tensor(float(logps.size(0))),
        kl_sum=torch.tensor(0.0),
        clip_low_sum=is_low.float().sum(),
        clip_high_sum=is_high.float().sum(),
    )
    return loss, stats
