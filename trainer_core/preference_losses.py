"""Preference losses as pure functions on tensors: reward modelling, KTO, ORPO and SimPO.

Each returns ``(loss, stats)``: the scalar loss (with grad) and detached *sums* over the
micro-batch (never means), so the stats of a step's micro-batches add up with ``add_stats``
and are divided once when a metric is reported, as ``sft_loss.SftStats`` are.

Every loss takes a ``normaliser``: the number of examples (or tokens) of the whole optimizer
step, not of the micro-batch. Summing the micro-batch losses of a step then gives the mean
over the step, so 4 micro-batches of 1 equal 1 micro-batch of 4. Left as None it is the
micro-batch's own count, which is TRL's per-batch mean.

Vocabulary: ``*_logps`` (B,) are sequence log-probs of the completion tokens (summed, or
length-averaged where the method says so; ``completion_logps`` computes both), ``rewards``
(B,) are scalar scores, row ``i`` of the chosen tensors pairs with row ``i`` of the rejected.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F


def completion_logps(
    per_token_logps: torch.Tensor, completion_mask: torch.Tensor, *, average: bool = False
) -> torch.Tensor:
    """Sequence log-probs (B,) from ``per_token_logps`` (B, T-1) and its mask (B, T-1).

    ``average=False`` is the sum over completion tokens (DPO, KTO); ``average=True`` divides
    by their number (ORPO, SimPO: the length-normalised log-prob of the papers).
    """
    mask = completion_mask.to(per_token_logps.dtype)
    summed = (per_token_logps * mask).sum(-1)  # (B,)
    return summed / mask.sum(-1).clamp(min=1) if average else summed


S = TypeVar("S")


def add_stats(stats: Sequence[S]) -> S:
    """Field-wise total of stats dataclasses: sums, but min of ``*_min`` and max of ``*_max``."""
    first = stats[0]
    totals = {}
    for field in dataclasses.fields(first):  # type: ignore[arg-type]
        values = [getattr(s, field.name) for s in stats]
        if field.name.endswith("_min"):
            totals[field.name] = torch.stack(values).min()
        elif field.name.endswith("_max"):
            totals[field.name] = torch.stack(values).max()
        else:
            totals[field.name] = torch.stack(values).sum()
    return type(first)(**totals)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    return float(numerator) / max(1, int(denominator))


# -- reward modelling -----------------------------------------------------------------------


@dataclass(frozen=True)
class RewardStats:
    """Detached sums over one micro-batch of pairs (see the module docstring)."""

    loss_sum: torch.Tensor  # () Σ per-pair loss, centring term included
    num_correct: torch.Tensor  # () pairs with r_c > r_r
    margin_sum: torch.Tensor  # () Σ (r_c − r_r)
    reward_sum: torch.Tensor  # () Σ of all 2B rewards
    reward_min: torch.Tensor  # ()
    reward_max: torch.Tensor  # ()
    num_pairs: torch.Tensor  # ()

    def metrics(self) -> dict[str, float]:
        return {
            "train_loss": _ratio(self.loss_sum, self.num_pairs),
            "accuracy": _ratio(self.num_correct, self.num_pairs),
            "margin": _ratio(self.margin_sum, self.num_pairs),
            "mean_reward": _ratio(self.reward_sum, 2 * self.num_pairs),
            "min_reward": float(self.reward_min),
            "max_reward": float(self.reward_max),
        }


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    *,
    center_rewards_coefficient: float = 0.0,
    normaliser: int | None = None,
) -> tuple[torch.Tensor, RewardStats]:
    """Bradley–Terry pairwise loss of a reward model, as TRL 1.16's ``RewardTrainer``.

    InstructGPT (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, eq. 1); the per-pair
    margin is Llama 2's (Touvron et al. 2023, https://arxiv.org/abs/2307.09288, eq. 2); the
    centring term is Eisenstein et al. 2023 (https://arxiv.org/abs/2312.09244):

        ℓ_i = −log σ(r_c,i − r_r,i − m_i) + c · (r_c,i + r_r,i)²
        L   = (1 / N) · Σ_i ℓ_i

    TRL writes ``mean(−log σ(…)) + c · mean((r_c + r_r)²)``, the same number for N = B.

    Args:
        chosen_rewards: (B,) r_c, the scalar score of each chosen sequence.
        rejected_rewards: (B,) r_r.
        margin: (B,) m, how much better chosen is than rejected (the data's optional
            ``margin`` column); None means 0.
        center_rewards_coefficient: c (0.01 is usual; 0 turns the term off).
        normaliser: N, the pairs of the whole optimizer step (default: B).

    Worked example: r_c = [2, 0], r_r = [0, 1], m = [1, 0], c = 0.1, N = 2 →
    ℓ = [−log σ(1) + 0.1·4, −log σ(−1) + 0.1·1] = [0.713262, 1.413262], L = 1.063262.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    logits = diff if margin is None else diff - margin
    losses = -F.logsigmoid(logits)  # (B,)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    loss = losses.sum() / (normaliser or len(losses))
    rewards = torch.cat([chosen_rewards, rejected_rewards]).detach()  # (2B,)
    stats = RewardStats(
        loss_sum=losses.detach().sum(),
        num_correct=(diff > 0).sum(),
        margin_sum=diff.detach().sum(),
        reward_sum=rewards.sum(),
        reward_min=rewards.min(),
        reward_max=rewards.max(),
        num_pairs=torch.tensor(len(losses)),
    )
    return loss, stats


# -- KTO ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KtoStats:
    """Detached sums over one micro-batch of unpaired examples."""

    loss_sum: torch.Tensor  # () Σ weighted per-example loss
    kl_sum: torch.Tensor  # () Σ over micro-batches of the (clamped) KL estimate z
    num_batches: torch.Tensor  # () micro-batches (z is one number per micro-batch)
    chosen_rewards_sum: torch.Tensor  # () Σ β·Δ over desirable examples
    rejected_rewards_sum: torch.Tensor  # () Σ β·Δ over undesirable examples
    chosen_logps_sum: torch.Tensor  # () Σ policy logps over desirable examples
    rejected_logps_sum: torch.Tensor  # ()
    num_chosen: torch.Tensor  # () desirable examples
    num_rejected: torch.Tensor  # () undesirable examples

    def metrics(self) -> dict[str, float]:
        """The step's metrics. As in TRL, the chosen (rejected) ones are left out when no
        desirable (undesirable) example was seen: a mean over nothing is not a number."""
        values = {
            "train_loss": _ratio(self.loss_sum, self.num_chosen + self.num_rejected),
            "kl": _ratio(self.kl_sum, self.num_batches),
        }
        if self.num_chosen > 0:
            values["rewards/chosen"] = _ratio(self.chosen_rewards_sum, self.num_chosen)
            values["logps/chosen"] = _ratio(self.chosen_logps_sum, self.num_chosen)
        if self.num_rejected > 0:
            values["rewards/rejected"] = _ratio(self.rejected_rewards_sum, self.num_rejected)
            values["logps/rejected"] = _ratio(self.rejected_logps_sum, self.num_rejected)
        return values


def validation_pair_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A pair method's validation metrics (loss, reward accuracy and margin) from the
    training-style metrics of its validation pass."""
    return {
        "valid_loss": metrics["train_loss"],
        "valid_rewards/accuracies": metrics["rewards/accuracies"],
        "valid_rewards/margins": metrics["rewards/margins"],
    }


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    normaliser: int | None = None,
) -> tuple[torch.Tensor, KtoStats]:
    """Kahneman–Tversky Optimization, as TRL 1.16's ``KTOTrainer`` (``loss_type="kto"``).

    Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, eq. 7. With Δ = logπ_θ(y|x) −
    logπ_ref(y|x) and z the batch's KL estimate from mismatched pairs (x_i, y_{i−1}):

        z   = max(0, mean_i(logπ_θ(y_{i−1}|x_i) − logπ_ref(y_{i−1}|x_i)))   (no gradient)
        ℓ_i = λ_D · (1 − σ(β(Δ_i − z)))   if y_i is desirable
        ℓ_i = λ_U · (1 − σ(β(z − Δ_i)))   if y_i is undesirable
        L   = (1 / N) · Σ_i ℓ_i

    TRL concatenates the weighted desirable and undesirable losses and takes their nanmean,
    so the weights scale each example's term and are not renormalised; N = B is that mean.
    The paper's value term is λ_y − v, which differs from ℓ by a constant only.

    Args:
        policy_logps: (B,) summed completion logps of the policy.
        ref_logps: (B,) the same under the reference.
        labels: (B,) bool, True = desirable.
        policy_kl_logps: (B,) policy logps of the mismatched completions (computed without
            grad, as TRL does; they only enter z, which is detached anyway).
        ref_kl_logps: (B,) the same under the reference.
        beta: β. desirable_weight, undesirable_weight: λ_D, λ_U.
        normaliser: N, the examples of the whole optimizer step (default: B).

    Worked example: Δ = [1, −1, 0] (policy [−1, −3, −2], ref [−2, −2, −2]), labels
    [T, F, T], KL logps policy [−4, −4] vs ref [−5, −4] → z = max(0, 0.5) = 0.5; β = 1,
    λ_D = 2, λ_U = 1: ℓ = [2(1 − σ(0.5)), 1 − σ(1.5), 2(1 − σ(−0.5))]
    = [0.755081, 0.182426, 1.244919], L = 2.182426 / 3 = 0.727475.
    """
    kl = (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()  # ()
    logratios = policy_logps - ref_logps  # (B,)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(labels, desirable, undesirable)  # (B,)
    loss = losses.sum() / (normaliser or len(losses))
    rewards = beta * logratios.detach()  # (B,)
    logps = policy_logps.detach()
    stats = KtoStats(
        loss_sum=losses.detach().sum(),
        kl_sum=kl,
        num_batches=torch.tensor(1),
        chosen_rewards_sum=rewards[labels].sum(),
        rejected_rewards_sum=rewards[~labels].sum(),
        chosen_logps_sum=logps[labels].sum(),
        rejected_logps_sum=logps[~labels].sum(),
        num_chosen=labels.sum(),
        num_rejected=(~labels).sum(),
    )
    return loss, stats


# -- reference-free pair losses: ORPO and SimPO ---------------------------------------------


@dataclass(frozen=True)
class PairStats:
    """Detached sums over one micro-batch of pairs, for the reference-free methods.

    ``rewards`` are β · the length-averaged logps, as TRL logs them for ORPO and SimPO.
    """

    loss_sum: torch.Tensor  # () Σ per-pair preference loss (ORPO: without the NLL term)
    chosen_rewards_sum: torch.Tensor  # ()
    rejected_rewards_sum: torch.Tensor  # ()
    num_correct: torch.Tensor  # () pairs with reward_c > reward_r
    chosen_logps_sum: torch.Tensor  # () Σ length-averaged logps of chosen
    rejected_logps_sum: torch.Tensor  # ()
    num_pairs: torch.Tensor  # ()

    def metrics(self) -> dict[str, float]:
        chosen = _ratio(self.chosen_rewards_sum, self.num_pairs)
        rejected = _ratio(self.rejected_rewards_sum, self.num_pairs)
        return {
            "train_loss": _ratio(self.loss_sum, self.num_pairs),
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/accuracies": _ratio(self.num_correct, self.num_pairs),
            "rewards/margins": chosen - rejected,
            "logps/chosen": _ratio(self.chosen_logps_sum, self.num_pairs),
            "logps/rejected": _ratio(self.rejected_logps_sum, self.num_pairs),
        }


def _pair_stats(
    losses: torch.Tensor, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float
) -> PairStats:
    chosen, rejected = chosen_logps.detach(), rejected_logps.detach()
    return PairStats(
        loss_sum=losses.detach().sum(),
        chosen_rewards_sum=beta * chosen.sum(),
        rejected_rewards_sum=beta * rejected.sum(),
        num_correct=(beta * chosen > beta * rejected).sum(),
        chosen_logps_sum=chosen.sum(),
        rejected_logps_sum=rejected.sum(),
        num_pairs=torch.tensor(len(losses)),
    )


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    normaliser: int | None = None,
) -> tuple[torch.Tensor, PairStats]:
    """Simple Preference Optimization: a reference-free margin on length-averaged logps.

    Meng et al. 2024, https://arxiv.org/abs/2405.14734, eq. 6. With π̄(y|x) = logπ_θ(y|x)/|y|:

        ℓ_i = −log σ(β · (π̄(y_c|x) − π̄(y_r|x)) − γ)
        L   = (1 / N) · Σ_i ℓ_i

    TRL 1.16 has no SimPO trainer; this is its ``CPOTrainer`` with ``loss_type="simpo"``,
    ``cpo_alpha=0`` and no label smoothing, which computes −log σ(β · (Δ − γ/β)): the same.

    Args:
        policy_chosen_logps: (B,) length-averaged logps of the chosen completions.
        policy_rejected_logps: (B,) the same for rejected.
        beta: β (the paper uses 2.0–2.5). gamma: γ, the target margin (0.5–1.5).
        normaliser: N, the pairs of the whole optimizer step (default: B).

    Worked example: π̄_c = [−1, −2], π̄_r = [−2, −1], β = 2, γ = 0.5 → β·Δ − γ = [1.5, −2.5],
    ℓ = [−log σ(1.5), −log σ(−2.5)] = [0.201413, 2.578889], L = 1.390151.
    """
    logits = beta * (policy_chosen_logps - policy_rejected_logps) - gamma  # (B,)
    losses = -F.logsigmoid(logits)  # (B,)
    loss = losses.sum() / (normaliser or len(losses))
    return loss, _pair_stats(losses, policy_chosen_logps, policy_rejected_logps, beta)


@dataclass(frozen=True)
class OrpoStats:
    """ORPO's extra sums: the NLL term and the odds ratio (beside ``PairStats``)."""

    nll_sum: torch.Tensor  # () Σ −log p over the NLL tokens
    nll_tokens: torch.Tensor  # () the NLL tokens
    log_odds_ratio_sum: torch.Tensor  # () Σ log σ(log-odds_c − log-odds_r)
    log_odds_chosen_sum: torch.Tensor  # () Σ (log-odds_c − log-odds_r)

    def metrics(self, pairs: PairStats, beta: float) -> dict[str, float]:
        """``pairs.metrics()`` with ORPO's train_loss (NLL included), nll_loss and
        log_odds_ratio (TRL's names: log_odds_ratio is the mean log σ, not the mean log-odds)."""
        nll = _ratio(self.nll_sum, self.nll_tokens)
        log_odds_ratio = _ratio(self.log_odds_ratio_sum, pairs.num_pairs)
        return pairs.metrics() | {
            "train_loss": nll - beta * log_odds_ratio,
            "nll_loss": nll,
            "log_odds_ratio": log_odds_ratio,
        }


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012, "Accurately Computing
    log(1 − exp(−|a|))": expm1 near 0, log1p below −log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_per_token_logps: torch.Tensor,
    chosen_nll_mask: torch.Tensor,
    *,
    beta: float,
    nll_normaliser: int | None = None,
    normaliser: int | None = None,
) -> tuple[torch.Tensor, PairStats, OrpoStats]:
    """Odds Ratio Preference Optimization: SFT plus a log odds-ratio penalty, no reference.

    Hong et al. 2024, https://arxiv.org/abs/2403.07691, eqs. 4–7, as TRL 1.16's
    ``experimental.orpo.ORPOTrainer``. With π̄(y|x) = logπ_θ(y|x)/|y| (length-averaged) and
    log-odds(y) = π̄ − log(1 − exp π̄):

        L = (1 / M) · Σ_{b,t} m[b,t] · (−log p_θ(x[b,t+1] | x[b,≤t]))
            − (β / N) · Σ_i log σ(log-odds(y_c,i) − log-odds(y_r,i))

    The first term is the NLL of the chosen rows over the tokens of ``chosen_nll_mask``. TRL
    (and so this trainer) counts the *whole* chosen sequence there, prompt tokens included
    (its labels are ``input_ids`` wherever attention is 1), not the completion alone as the
    paper's eq. 5 reads; pass ``attention_mask[:B, 1:]`` to match it. β is the paper's λ.

    Args:
        policy_chosen_logps: (B,) length-averaged completion logps of chosen (all < 0).
        policy_rejected_logps: (B,) the same for rejected.
        chosen_per_token_logps: (B, T-1) per-token logps of the chosen rows.
        chosen_nll_mask: (B, T-1) m, 1 where the next token counts in the NLL.
        beta: β (λ in the paper; 0.1 is TRL's default).
        nll_normaliser: M, the NLL tokens of the whole optimizer step (default: Σ m).
        normaliser: N, the pairs of the whole optimizer step (default: B).

    Returns:
        ``(loss, pair_stats, orpo_stats)``; ``pair_stats.loss_sum`` is Σ −β log σ(·), the
        odds-ratio part only (``OrpoStats.metrics`` adds the NLL back for train_loss).

    Worked example: π̄_c = [log ½], π̄_r = [log ¼]: log-odds_c = log(½/½) = 0, log-odds_r =
    log(¼/¾) = −log 3, so log σ(log 3) = log ¾ = −0.287682; per-token logps [[−1, −2, −9]]
    with m = [[1, 1, 0]] give NLL 3 over M = 2 tokens; β = 0.1 →
    L = 1.5 + 0.1 · 0.287682 = 1.528768.
    """
    chosen, rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))  # (B,)
    ratio = F.logsigmoid(log_odds)  # (B,)
    or_losses = -beta * ratio  # (B,)
    mask = chosen_nll_mask.to(chosen_per_token_logps.dtype)  # (B, T-1)
    nll_sum = -(chosen_per_token_logps * mask).sum()  # ()
    nll_tokens = chosen_nll_mask.sum()
    loss = nll_sum / (nll_normaliser or max(1, int(nll_tokens))) + or_losses.sum() / (
        normaliser or len(or_losses)
    )
    orpo = OrpoStats(
        nll_sum=nll_sum.detach(),
        nll_tokens=nll_tokens,
        log_odds_ratio_sum=ratio.detach().sum(),
        log_odds_chosen_sum=log_odds.detach().sum(),
    )
    return loss, _pair_stats(or_losses, chosen, rejected, beta), orpo
