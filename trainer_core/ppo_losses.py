"""PPO for RLHF as pure functions on per-token tensors: rewards, GAE, whitening, the losses.

Proximal Policy Optimization (Schulman et al. 2017, https://arxiv.org/abs/1707.06347) as
InstructGPT used it on language models (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155)
and as TRL's PPOTrainer (removed in PR #7020) and "The N Implementation Details of RLHF with
PPO" (Huang et al. 2024, https://arxiv.org/abs/2403.17031) write it down. A completion of C
tokens is an episode: the state before token t is the prompt and tokens < t, the action is
token t, and the reward is a KL penalty at every token plus the reward model's score at the
last one.

Shapes: every per-token tensor is (B, C) over the completion tokens only (column t is
completion token t), right-padded; ``completion_mask`` (B, C) is 1 on real tokens (EOS
included) and 0 on padding, and every row has at least one real token. ``values`` (B, C) are
V(s_t), the value head's estimate at the state *before* token t.

The losses return ``(loss, stats)`` as ``preference_losses`` does: the scalar loss (with grad)
normalised by ``normaliser`` (the real tokens of the whole optimizer step, so accumulating
micro-batches equals one big batch; None means the micro-batch's own count), and detached
*sums* that ``preference_losses.add_stats`` adds up across micro-batches and PPO epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(x − mean) / sqrt(var + 1e-8)`` over the masked entries of ``values`` (B, C).

    TRL's ``masked_whiten``: mean and variance over the positions where ``mask`` is 1 (the
    variance unbiased, with Bessel's n/(n−1)); ``shift_mean=False`` adds the mean back, which
    rescales without centring (what ``whiten_rewards`` uses, so rewards keep their sign).
    Masked positions come back 0. With one real token there is no spread: it comes back 0
    (shift_mean) or unchanged.

    ``total``: when ``values`` are one rank's rows of a rollout shared out between processes,
    the sum of a tensor over every rank (``distributed.all_reduce_tensor``), so the mean and
    variance are the whole rollout's; None sums this process's only.

    Worked example: values = [[2, 4, 6, pad]], mask = [[1, 1, 1, 0]] → mean 4,
    var = ((−2)² + 0² + 2²) / (3 − 1) = 4 → [[−1, 0, 1, 0]]; shift_mean=False → [[3, 4, 5, 0]].
    """
    over = total or (lambda t: t)
    mask = mask.to(values.dtype)
    n = over(mask.sum())
    mean = over((values * mask).sum()) / n.clamp(min=1)
    centred = (values - mean) * mask
    var = over((centred**2).sum()) / (n - 1).clamp(min=1)
    whitened = centred * torch.rsqrt(var + 1e-8) if n > 1 else centred
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


@dataclass(frozen=True)
class RolloutStats:
    """Detached sums over the sequences of one rollout (``objective/*`` of TRL's PPO)."""

    score_sum: torch.Tensor  # () Σ scores (after the missing-EOS penalty)
    kl_sum: torch.Tensor  # () Σ over sequences of Σ_t (log π_θ − log π_ref)
    non_score_reward_sum: torch.Tensor  # () Σ over sequences of Σ_t −kl_coef·kl_t
    num_sequences: torch.Tensor  # ()

    def metrics(self) -> dict[str, float]:
        n = max(1, int(self.num_sequences))
        return {
            "objective/kl": float(self.kl_sum) / n,
            # What PPO maximises: the score minus the KL penalty, per sequence.
            "objective/rlhf_reward": float(self.score_sum + self.non_score_reward_sum) / n,
            "objective/scores": float(self.score_sum) / n,
        }


def kl_penalty_rewards(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    scores: torch.Tensor,
    completion_mask: torch.Tensor,
    is_eos: torch.Tensor,
    *,
    kl_coef: float,
    missing_eos_penalty: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, RolloutStats]:
    """Per-token rewards (B, C): a KL penalty at every token, the score at the last one.

    InstructGPT eq. 2, per token with the k1 estimator (Schulman, "Approximating KL
    divergence", http://joschu.net/blog/kl-approx.html), as TRL's PPOTrainer:

        kl_t = log π_old(y_t|s_t) − log π_ref(y_t|s_t)
        s    = score − missing_eos_penalty · 1[no EOS]
        r_t  = −kl_coef · kl_t + 1[t = last real token] · s

    One difference from TRL: TRL adds the score one position *after* the last real token
    (a padding position, where its values are kept one step longer); here it lands on the
    last real token, where the episode ends (Huang et al. 2024, detail 7).

    Args:
        logps: (B, C) log π_old of the sampled tokens (the policy that sampled them).
        ref_logps: (B, C) log π_ref of the same tokens.
        scores: (B,) the reward model's score of each prompt + completion.
        completion_mask: (B, C) 1 on real completion tokens (EOS included).
        is_eos: (B,) bool, whether the completion ended with EOS (else it was cut at
            ``max_completion_length``).
        kl_coef: β of the per-token penalty (TRL: 0.05).
        missing_eos_penalty: subtracted from the score of a completion without EOS (TRL's
            ``missing_eos_penalty``, e.g. 1.0); None turns it off.

    Returns ``(rewards (B, C), scores (B,) after the penalty, stats)``; rewards are 0 on
    padding.

    Worked example: logps = [[−1, −2]], ref_logps = [[−1.5, −1]], mask = [[1, 1]], score 3,
    no EOS, kl_coef 0.1, penalty 1 → kl = [0.5, −1], s = 3 − 1 = 2,
    rewards = [[−0.05, 0.1 + 2]] = [[−0.05, 2.1]]; objective/kl = −0.5, rlhf_reward = 2.05.
    """
    mask = completion_mask.to(logps.dtype)
    kl = (logps - ref_logps) * mask  # (B, C)
    non_score_rewards = -kl_coef * kl  # (B, C)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~is_eos.bool()).to(scores.dtype)  # (B,)
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    rewards = non_score_rewards.clone()
    rewards[torch.arange(len(rewards)), last] += scores
    rewards = rewards * mask
    stats = RolloutStats(
        score_sum=scores.detach().sum(),
        kl_sum=kl.detach().sum(),
        non_score_reward_sum=non_score_rewards.detach().sum(),
        num_sequences=torch.tensor(len(scores)),
    )
    return rewards.detach(), scores.detach(), stats


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2015, https://arxiv.org/abs/1506.02438).

        δ_t = r_t + γ·V_{t+1} − V_t        (V = 0 after the last real token)
        A_t = δ_t + γλ·A_{t+1}
        R_t = A_t + V_t                    (the value head's regression target)

    Args:
        rewards: (B, C) r_t (``kl_penalty_rewards``).
        values: (B, C) V(s_t) of the policy that sampled the completion.
        completion_mask: (B, C) 1 on real tokens; padding gets A = R = 0.
        gamma: discount (TRL: 1.0).
        lam: GAE's λ, trading bias (0: one-step TD) for variance (1: Monte Carlo; TRL: 0.95).

    Returns ``(advantages (B, C), returns (B, C))``, detached.

    Worked example (3 real tokens and one pad; γ = 1, λ = 0.5): r = [0, 0, 1, 0],
    V = [0.5, 0.4, 0.6, 9] →
        δ_2 = 1 + 0 − 0.6 = 0.4         A_2 = 0.4
        δ_1 = 0 + 0.6 − 0.4 = 0.2       A_1 = 0.2 + 0.5·0.4 = 0.4
        δ_0 = 0 + 0.4 − 0.5 = −0.1      A_0 = −0.1 + 0.5·0.4 = 0.1
    A = [0.1, 0.4, 0.4, 0], R = A + V = [0.6, 0.8, 1.0, 0].
    """
    mask = completion_mask.to(values.dtype)
    rewards, values = rewards.detach() * mask, values.detach() * mask
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        # On padding δ = 0 and A stays 0, so right padding never reaches a real token.
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


@dataclass(frozen=True)
class PpoStats:
    """Detached sums over the real tokens of one micro-batch (see the module docstring)."""

    policy_loss_sum: torch.Tensor  # () Σ_t max(−ρA, −clip(ρ)A)
    value_loss_sum: torch.Tensor  # () Σ_t ½·max((V − R)², (V_clip − R)²), without vf_coef
    loss_sum: torch.Tensor  # () Σ_t of the policy term + vf_coef · the value term
    clipped_sum: torch.Tensor  # () tokens whose policy term was clipped
    value_clipped_sum: torch.Tensor  # () tokens whose value term was clipped
    approxkl_sum: torch.Tensor  # () Σ_t ½·(log π_θ − log π_old)²
    ratio_sum: torch.Tensor  # () Σ_t ρ
    num_tokens: torch.Tensor  # ()

    def metrics(self) -> dict[str, float]:
        n = max(1, int(self.num_tokens))
        return {
            "train_loss": float(self.loss_sum) / n,
            "loss/policy": float(self.policy_loss_sum) / n,
            "loss/value": float(self.value_loss_sum) / n,
            "policy/approxkl": float(self.approxkl_sum) / n,
            "policy/clipfrac": float(self.clipped_sum) / n,
            "val/ratio": float(self.ratio_sum) / n,
            "val/clipfrac": float(self.value_clipped_sum) / n,
        }


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    normaliser: int | None = None,
) -> tuple[torch.Tensor, PpoStats]:
    """PPO's clipped surrogate for the policy plus the clipped value loss (PPO eqs. 7 and 9).

        ρ_t    = exp(log π_θ(y_t|s_t) − log π_old(y_t|s_t))
        ℓ^π_t  = max(−ρ_t·A_t, −clip(ρ_t, 1 − ε, 1 + ε)·A_t)           (= −min(ρA, clip(ρ)A))
        V^c_t  = clip(V_t, V_old,t − ε_v, V_old,t + ε_v)
        ℓ^V_t  = ½·max((V_t − R_t)², (V^c_t − R_t)²)
        L      = (1/N)·Σ_t m_t·(ℓ^π_t + vf_coef·ℓ^V_t)

    The clip engages only outside the band, and only on the side that would let the
    policy (or value) move further than PPO allows: a token is "clipped" (``policy/clipfrac``,
    ``val/clipfrac``) when the clipped term is strictly the larger one; at the band's edge
    both terms are equal and the token still counts as unclipped.

    Args:
        logps: (B, C) log π_θ now (with grad).
        old_logps: (B, C) log π_old, at sampling time.
        advantages: (B, C) A_t (whitened).
        values: (B, C) V_t now (with grad).
        old_values: (B, C) V_old,t, at sampling time.
        returns: (B, C) R_t = A_t + V_old,t before whitening (``gae``).
        completion_mask: (B, C) 1 on real tokens.
        cliprange: ε (TRL: 0.2).
        cliprange_value: ε_v (TRL: 0.2).
        vf_coef: weight of the value loss (TRL: 0.1).
        normaliser: N, the real tokens of the whole optimizer step (default: this batch's).

    Worked example (one token, ε = 0.2): ρ = 1.5, A = 2 → max(−3, −1.2·2) = −2.4 (clipped);
    ρ = 1.5, A = −2 → max(3, 2.4) = 3 (not clipped: the pessimistic term is the unclipped
    one). Value, ε_v = 0.2: V_old = 0, R = 1, V = 0.5 → V^c = 0.2,
    ℓ^V = ½·max(0.25, 0.64) = 0.32 (clipped).
    """
    mask = completion_mask.to(logps.dtype)
    n = normaliser if normaliser is not None else int(mask.sum())
    log_ratio = logps - old_logps  # (B, C)
    ratio = torch.exp(log_ratio)  # (B, C)
    policy_losses = -advantages * ratio  # (B, C)
    policy_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss_max = torch.max(policy_losses, policy_losses_clipped)  # (B, C)

    values_clipped = torch.clamp(
        values, old_values - cliprange_value, old_values + cliprange_value
    )  # (B, C)
    value_losses = (values - returns) ** 2
    value_losses_clipped = (values_clipped - returns) ** 2
    value_loss_max = 0.5 * torch.max(value_losses, value_losses_clipped)  # (B, C)

    per_token = (policy_loss_max + vf_coef * value_loss_max) * mask  # (B, C)
    loss = per_token.sum() / max(1, n)
    with torch.no_grad():
        stats = PpoStats(
            policy_loss_sum=(policy_loss_max * mask).sum(),
            value_loss_sum=(value_loss_max * mask).sum(),
            loss_sum=per_token.sum(),
            clipped_sum=((policy_losses_clipped > policy_losses).to(mask.dtype) * mask).sum(),
            value_clipped_sum=((value_losses_clipped > value_losses).to(mask.dtype) * mask).sum(),
            approxkl_sum=(0.5 * log_ratio**2 * mask).sum(),
            ratio_sum=(ratio * mask).sum(),
            num_tokens=mask.sum(),
        )
    return loss, stats
