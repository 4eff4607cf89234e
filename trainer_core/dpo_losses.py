"""DPO and its variants as pure functions on sequence log-probabilities.

Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) fits
the policy so that the implicit reward r(x, y) = β·log(π_θ(y|x) / π_ref(y|x)) ranks the
chosen completion y_w above the rejected y_l. Every variant here is a function of the two
log-ratios of a pair:

    Δc = log π_θ(y_w|x) − log π_ref(y_w|x)      Δr = log π_θ(y_l|x) − log π_ref(y_l|x)
    h  = Δc − Δr

with log π(y|x) the *sum* of the completion's per-token log-probs. The formulas match TRL
1.16's ``DPOTrainer._compute_loss`` (reverse-KL divergence, no WPO weighting); ``cdpo`` is the
label-smoothed sigmoid that TRL used as "sigmoid" up to 0.28.

Several loss types combine as L = Σ_k w_k · mean_i(ℓ_k,i) (TRL's ``loss_weights``; MPO is
``["sigmoid", "bco_pair", "sft"]`` with ``[0.8, 0.2, 1.0]``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer_core.hyperparameters import DPO_LOSS_TYPES

# Types whose loss is a function of the pair's log-ratios: every DPO loss type but "sft" (the
# one list of them is the hyperparameters' own).
PAIR_LOSS_TYPES = tuple(name for name in DPO_LOSS_TYPES if name != "sft")


def dpo_loss(
    loss_type: str,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss ℓ_i (B,) of one DPO variant (ε = ``label_smoothing``, σ the logistic).

    ===========  ================================================================  ==========
    sigmoid      −logσ(βh)  (DPO; ε is ignored, as in TRL ≥ 0.29)                  2305.18290
    cdpo         −(1−ε)·logσ(βh) − ε·logσ(−βh)  (conservative DPO, TRL ≤ 0.28)     cDPO note
    ipo          ((Δc/|y_w| − Δr/|y_l|) − 1/(2β))²  (length-normalised, as TRL)    2310.12036
    hinge        relu(1 − βh)  (SLiC)                                              2305.10425
    robust       [−(1−ε)·logσ(βh) + ε·logσ(−βh)] / (1−2ε)  (rDPO)                  2403.00409
    bco_pair     −logσ(βΔc) − logσ(−βΔr)  (no running-mean δ, as TRL 1.16)         2404.04656
    sppo_hard    (Δc − 1/(2β))² + (Δr + 1/(2β))²                                   2405.00675
    nca_pair     −logσ(βΔc) − ½·logσ(−βΔc) − ½·logσ(−βΔr)                          2402.05369
    apo_zero     (1 − σ(βΔc)) + σ(βΔr)                                             2408.06266
    apo_down     σ(βΔc) + (1 − σ(β(Δc − Δr)))                                      2408.06266
    exo_pair     KL(q ‖ p) with q = (σ(βh), σ(−βh)) = softmax(β·[Δc, Δr]) and      2402.00856
                 p = (1−ε, ε): q_w·(logσ(βh) − log(1−ε)) + q_l·(logσ(−βh) − log ε)
    ===========  ================================================================  ==========

    TRL 1.16 differs from textbook forms in two places, and we follow TRL: IPO divides each
    log-ratio by its completion length (TRL confirmed this with the IPO authors), and
    ``bco_pair`` has no running reward mean δ.

    Args:
        loss_type: one of ``PAIR_LOSS_TYPES``.
        chosen_logratios: (B,) Δc.
        rejected_logratios: (B,) Δr.
        beta: β > 0, the strength of the pull towards the reference.
        label_smoothing: ε, the assumed probability that a label is flipped (cdpo, robust,
            exo_pair; exo_pair needs ε > 0, robust ε < ½).
        chosen_lengths, rejected_lengths: (B,) completion token counts |y_w|, |y_l| (ipo).

    Returns:
        (B,) per-pair losses, with grad through the log-ratios.
    """
    delta = chosen_logratios - rejected_logratios  # (B,) h
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "cdpo":
        return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type ipo needs the completion lengths")
        chosen_mean = chosen_logratios / chosen_lengths.clamp(min=1)
        rejected_mean = rejected_logratios / rejected_lengths.clamp(min=1)
        return (chosen_mean - rejected_mean - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "robust":
        if not 0 <= eps < 0.5:
            raise ValueError("loss_type robust needs 0 <= label_smoothing < 0.5")
        clean = -(1 - eps) * F.logsigmoid(beta * delta)
        flipped = -eps * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "nca_pair":
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
        return (
            -F.logsigmoid(chosen_rewards)
            - 0.5 * F.logsigmoid(-chosen_rewards)
            - 0.5 * F.logsigmoid(-rejected_rewards)
        )
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(
            beta * rejected_logratios
        )
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + (
            1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
        )
    if loss_type == "exo_pair":
        if eps <= 0:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (1e-3 is usual)")
        q_chosen, log_q_chosen = torch.sigmoid(beta * delta), F.logsigmoid(beta * delta)
        q_rejected, log_q_rejected = torch.sigmoid(-beta * delta), F.logsigmoid(-beta * delta)
        return q_chosen * (log_q_chosen - math.log1p(-eps)) + q_rejected * (
            log_q_rejected - math.log(eps)
        )
    raise ValueError(f"unknown DPO loss type {loss_type!r}; known: {PAIR_LOSS_TYPES} and 'sft'")


@dataclass(frozen=True)
class DpoStats:
    """Detached sums over one micro-batch; add them up over a step (``add_dpo_stats``)."""

    pair_loss_sum: torch.Tensor  # () Σ_i Σ_{k≠sft} w_k·ℓ_k,i
    sft_loss_sum: torch.Tensor  # () w_sft · Σ −log p over chosen completion tokens
    num_pairs: torch.Tensor  # ()
    num_chosen_tokens: torch.Tensor  # () chosen completion tokens (the sft normaliser)
    chosen_rewards_sum: torch.Tensor  # () Σ β·Δc
    rejected_rewards_sum: torch.Tensor  # () Σ β·Δr
    num_correct: torch.Tensor  # () pairs with β·Δc > β·Δr
    chosen_logps_sum: torch.Tensor  # () Σ log π_θ(y_w|x)
    rejected_logps_sum: torch.Tensor  # () Σ log π_θ(y_l|x)

    @property
    def loss(self) -> float:
        """Σ_k w_k · mean(ℓ_k) over the pairs (and tokens, for sft) these stats cover."""
        return float(self.pair_loss_sum) / max(1, int(self.num_pairs)) + float(
            self.sft_loss_sum
        ) / max(1, int(self.num_chosen_tokens))

    def means(self) -> dict[str, float]:
        """The per-pair means TRL logs, under TRL's names."""
        n = max(1, int(self.num_pairs))
        chosen, rejected = float(self.chosen_rewards_sum) / n, float(self.rejected_rewards_sum) / n
        return {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/accuracies": float(self.num_correct) / n,
            "rewards/margins": chosen - rejected,
            "logps/chosen": float(self.chosen_logps_sum) / n,
            "logps/rejected": float(self.rejected_logps_sum) / n,
        }


def add_dpo_stats(stats: Sequence[DpoStats]) -> DpoStats:
    fields = DpoStats.__dataclass_fields__
    return DpoStats(
        **{name: sum((getattr(s, name) for s in stats), torch.tensor(0.0)) for name in fields}
    )


def combined_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_per_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    loss_types: Sequence[str],
    loss_weights: Sequence[float] | None,
    beta: float,
    label_smoothing: float,
    num_pairs: int,
    num_chosen_tokens: int,
) -> tuple[torch.Tensor, DpoStats]:
    """L = Σ_k w_k · mean_i(ℓ_k,i), one micro-batch's share of it, and its stats.

        L_micro = Σ_{k≠sft} w_k · Σ_{i∈micro} ℓ_k,i / N_pairs
                + w_sft · Σ_{i∈micro, t} m_i,t · (−log π_θ(y_w,t)) / N_tokens

    ``sft`` is the NLL of the chosen completion tokens, a token mean (TRL's "sft" type, the
    RPO term of https://arxiv.org/abs/2404.19733).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed completion log-probs, with grad.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference, no grad.
        chosen_per_token_logps: (B, T-1) per-token log-probs of the chosen rows (for sft).
        chosen_mask, rejected_mask: (B, T-1) 1 where the next token is a completion token.
        loss_types, loss_weights: the types and their weights (None: 1.0 each).
        beta, label_smoothing: see ``dpo_loss``.
        num_pairs, num_chosen_tokens: N_pairs and N_tokens of the whole optimizer step, not of
            this micro-batch, so the micro-batch losses of a step add up to the loss of the
            step as one batch (1×4 equals 4×1).

    Returns:
        ``(loss, stats)``: this micro-batch's scalar share of L (with grad) and ``DpoStats``.

    Worked example: one pair, Δc = 0.5, Δr = −0.5, β = 0.1, ["sigmoid"] → h = 1.0,
    L = −logσ(0.1) = 0.644397.
    """
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(loss_types)
    if len(weights) != len(loss_types):
        raise ValueError("loss_weights needs one weight per loss_type")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    chosen_lengths = chosen_mask.sum(dim=1)  # (B,)
    rejected_lengths = rejected_mask.sum(dim=1)  # (B,)

    pair_loss_sum = policy_chosen_logps.new_zeros(())
    sft_loss_sum = policy_chosen_logps.new_zeros(())
    for loss_type, weight in zip(loss_types, weights, strict=True):
        if loss_type == "sft":
            mask = chosen_mask.to(chosen_per_token_logps.dtype)
            sft_loss_sum = sft_loss_sum - weight * (chosen_per_token_logps * mask).sum()
            continue
        per_pair = dpo_loss(
            loss_type,
            chosen_logratios,
            rejected_logratios,
            beta=beta,
            label_smoothing=label_smoothing,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )  # (B,)
        pair_loss_sum = pair_loss_sum + weight * per_pair.sum()
    loss = pair_loss_sum / num_pairs + sft_loss_sum / max(1, num_chosen_tokens)

    chosen_rewards = (beta * chosen_logratios).detach()  # (B,)
    rejected_rewards = (beta * rejected_logratios).detach()  # (B,)
    stats = DpoStats(
        pair_loss_sum=pair_loss_sum.detach(),
        sft_loss_sum=sft_loss_sum.detach(),
        num_pairs=torch.tensor(float(len(chosen_rewards))),
        num_chosen_tokens=chosen_lengths.sum().float(),
        chosen_rewards_sum=chosen_rewards.sum(),
        rejected_rewards_sum=rejected_rewards.sum(),
        num_correct=(chosen_rewards > rejected_rewards).sum().float(),
        chosen_logps_sum=policy_chosen_logps.detach().sum(),
        rejected_logps_sum=policy_rejected_logps.detach().sum(),
    )
    return loss, stats
