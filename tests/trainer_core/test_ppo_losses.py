"""PPO's pieces against hand-computed numbers: rewards, GAE, whitening, the clipped losses."""

from __future__ import annotations

import math

import pytest
import torch

from trainer_core.ppo_losses import gae, kl_penalty_rewards, masked_whiten, ppo_loss
from trainer_core.preference_losses import add_stats


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# -- rewards --------------------------------------------------------------------------------


def test_kl_penalty_rewards_worked_example() -> None:
    # logps − ref = [0.5, −1], kl_coef 0.1 → −0.1·kl = [−0.05, 0.1]; the score 3 lands on the
    # last real token, less the missing-EOS penalty 1 → [−0.05, 0.1 + 2].
    rewards, scores, stats = kl_penalty_rewards(
        t([-1.0, -2.0]),
        t([-1.5, -1.0]),
        torch.tensor([3.0], dtype=torch.float64),
        t([1, 1]),
        torch.tensor([False]),
        kl_coef=0.1,
        missing_eos_penalty=1.0,
    )
    torch.testing.assert_close(rewards, t([-0.05, 2.1]))
    assert scores.tolist() == [2.0]
    assert stats.metrics() == pytest.approx(
        {"objective/kl": -0.5, "objective/scores": 2.0, "objective/rlhf_reward": 2.05}
    )


def test_score_lands_on_the_last_real_token_and_padding_gets_nothing() -> None:
    # Row 0 ends at t = 1 (EOS there), row 1 fills all three columns. Equal logps: no KL.
    logps = t([-1.0, -1.0, 7.0], [-1.0, -1.0, -1.0])
    rewards, _, stats = kl_penalty_rewards(
        logps,
        logps.clone(),
        torch.tensor([5.0, -2.0], dtype=torch.float64),
        t([1, 1, 0], [1, 1, 1]),
        torch.tensor([True, False]),
        kl_coef=0.05,
    )
    torch.testing.assert_close(rewards, t([0.0, 5.0, 0.0], [0.0, 0.0, -2.0]))
    assert stats.metrics()["objective/kl"] == 0.0


def test_missing_eos_penalty_lowers_exactly_the_scores_without_eos() -> None:
    scores = torch.tensor([1.0, 1.0, -0.5], dtype=torch.float64)
    is_eos = torch.tensor([True, False, False])
    mask = t([1, 1], [1, 1], [1, 0])
    logps = t([-1.0, -2.0], [-1.0, -2.0], [-3.0, 0.0])
    plain_rewards, plain, _ = kl_penalty_rewards(
        logps, logps - 0.25, scores, mask, is_eos, kl_coef=0.1
    )
    rewards, penalised, _ = kl_penalty_rewards(
        logps, logps - 0.25, scores, mask, is_eos, kl_coef=0.1, missing_eos_penalty=0.75
    )
    assert (plain - penalised).tolist() == [0.0, 0.75, 0.75]
    # The penalty reaches the reward of the last real token and nothing else.
    torch.testing.assert_close(plain_rewards - rewards, t([0, 0], [0, 0.75], [0.75, 0]))


# -- GAE ------------------------------------------------------------------------------------


def test_gae_worked_example() -> None:
    # The docstring's example: γ = 1, λ = 0.5, three real tokens and one padding column whose
    # value (9) must not leak into the real ones.
    advantages, returns = gae(
        t([0, 0, 1, 0]), t([0.5, 0.4, 0.6, 9.0]), t([1, 1, 1, 0]), gamma=1.0, lam=0.5
    )
    torch.testing.assert_close(advantages, t([0.1, 0.4, 0.4, 0.0]))
    torch.testing.assert_close(returns, t([0.6, 0.8, 1.0, 0.0]))


def test_gae_with_lambda_1_is_the_discounted_return_minus_the_value() -> None:
    # λ = 1: A_t = Σ_k γ^k r_{t+k} − V_t. r = [0.5, 0, 1], γ = 0.9:
    # R_2 = 1, R_1 = 0.9·1 = 0.9, R_0 = 0.5 + 0.9·0.9 = 1.31.
    values = t([0.3, -0.2, 0.7])
    advantages, returns = gae(t([0.5, 0, 1]), values, t([1, 1, 1]), gamma=0.9, lam=1.0)
    torch.testing.assert_close(returns, t([1.31, 0.9, 1.0]))
    torch.testing.assert_close(advantages, t([1.31, 0.9, 1.0]) - values)


def test_gae_with_lambda_0_is_one_step_td() -> None:
    # λ = 0: A_t = r_t + γ·V_{t+1} − V_t, and V after the end is 0.
    advantages, _ = gae(t([1, 2, 3]), t([0.5, 0.25, 2.0]), t([1, 1, 1]), gamma=0.5, lam=0.0)
    torch.testing.assert_close(advantages, t([1 + 0.125 - 0.5, 2 + 1.0 - 0.25, 3 - 2.0]))


# -- whitening ------------------------------------------------------------------------------


def test_masked_whiten_worked_example() -> None:
    values, mask = t([2, 4, 6, 100]), t([1, 1, 1, 0])
    # mean 4, unbiased var ((−2)² + 0 + 2²)/2 = 4, std 2 (+1e-8 under the root).
    scale = 2 / math.sqrt(4 + 1e-8)
    torch.testing.assert_close(masked_whiten(values, mask), t([-scale, 0, scale, 0]))
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False), t([4 - scale, 4, 4 + scale, 0])
    )


def test_masked_whiten_pools_every_row_of_the_batch() -> None:
    values, mask = t([1, 3, 0], [5, 0, 0]), t([1, 1, 0], [1, 0, 0])
    whitened = masked_whiten(values, mask)
    real = whitened[mask.bool()]
    assert real.mean().item() == pytest.approx(0, abs=1e-12)
    assert real.var().item() == pytest.approx(1, abs=1e-6)  # unbiased, as TRL
    assert whitened[~mask.bool()].tolist() == [0, 0, 0]


# -- the clipped losses ---------------------------------------------------------------------


def one_token_loss(
    ratio: float, advantage: float, *, value: float = 0.0, old_value: float = 0.0, ret: float = 0.0
) -> tuple[float, float, float, float]:
    """(loss, d loss / d logp, d loss / d value, policy clipfrac) for one token, ε = ε_v = 0.2."""
    logps = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    values = torch.tensor([[value]], dtype=torch.float64, requires_grad=True)
    loss, stats = ppo_loss(
        logps,
        torch.zeros(1, 1, dtype=torch.float64),
        torch.tensor([[advantage]], dtype=torch.float64),
        values,
        torch.tensor([[old_value]], dtype=torch.float64),
        torch.tensor([[ret]], dtype=torch.float64),
        torch.ones(1, 1),
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=1.0,
    )
    loss.backward()
    assert logps.grad is not None and values.grad is not None
    return loss.item(), logps.grad.item(), values.grad.item(), stats.metrics()["policy/clipfrac"]


def test_policy_loss_worked_examples() -> None:
    # ρ = 1.5, A = 2: max(−3, −2.4) = −2.4, clipped. ρ = 1.5, A = −2: max(3, 2.4) = 3.
    assert one_token_loss(1.5, 2.0)[0] == pytest.approx(-2.4)
    assert one_token_loss(1.5, 2.0)[3] == 1.0
    assert one_token_loss(1.5, -2.0)[0] == pytest.approx(3.0)
    assert one_token_loss(1.5, -2.0)[3] == 0.0
    # ρ = 0.5, A = −2: max(1, 1.6) = 1.6, clipped. ρ = 0.5, A = 2: max(−1, −1.6) = −1.
    assert one_token_loss(0.5, -2.0)[0] == pytest.approx(1.6)
    assert one_token_loss(0.5, 2.0)[0] == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("edge", "advantage"),
    [(1.2, 1.0), (0.8, -1.0)],  # the side where the objective would gain by moving further
)
def test_policy_clip_engages_exactly_at_the_band_edges(edge: float, advantage: float) -> None:
    # Just inside the band: the gradient is ρ·(−A) and nothing is clipped. Just outside: no
    # gradient and the token counts as clipped. On the edge itself both terms are equal.
    outward = 1 if edge > 1 else -1
    inside = edge * math.exp(-outward * 1e-6)
    outside = edge * math.exp(outward * 1e-6)
    loss, grad, _, clipfrac = one_token_loss(inside, advantage)
    assert grad == pytest.approx(-advantage * inside)
    assert clipfrac == 0.0
    loss, grad, _, clipfrac = one_token_loss(outside, advantage)
    assert (grad, clipfrac) == (0.0, 1.0)
    assert loss == pytest.approx(-advantage * edge)
    assert one_token_loss(edge, advantage)[3] == 0.0


@pytest.mark.parametrize(("edge", "advantage"), [(1.2, -1.0), (0.8, 1.0)])
def test_policy_clip_never_engages_on_the_pessimistic_side(edge: float, advantage: float) -> None:
    # Past the edge, but moving further would *lower* the objective: the unclipped term is
    # the larger loss, so the gradient keeps pulling the ratio back.
    far = edge * (1.5 if edge > 1 else 0.5)
    _, grad, _, clipfrac = one_token_loss(far, advantage)
    assert grad == pytest.approx(-advantage * far)
    assert clipfrac == 0.0


def test_value_loss_worked_examples_and_clip_edges() -> None:
    # V_old = 0, R = 1, ε_v = 0.2 (A = 0 and ρ = 1, so only the value term counts).
    # V = 0.5 → V_clip = 0.2: ½·max(0.25, 0.64) = 0.32, no gradient (the clip is flat there).
    loss, _, grad, _ = one_token_loss(1.0, 0.0, value=0.5, ret=1.0)
    assert loss == pytest.approx(0.32)
    assert grad == 0.0
    # V = −0.5 → V_clip = −0.2: ½·max(2.25, 1.44) = 1.125, unclipped, gradient V − R = −1.5.
    loss, _, grad, _ = one_token_loss(1.0, 0.0, value=-0.5, ret=1.0)
    assert loss == pytest.approx(1.125)
    assert grad == pytest.approx(-1.5)
    # Just inside the band (V = 0.2 − 1e-6): unclipped; just outside: clipped, no gradient.
    _, _, grad, _ = one_token_loss(1.0, 0.0, value=0.2 - 1e-6, ret=1.0)
    assert grad == pytest.approx(0.2 - 1e-6 - 1.0)
    _, _, grad, _ = one_token_loss(1.0, 0.0, value=0.2 + 1e-6, ret=1.0)
    assert grad == 0.0


def test_ppo_loss_stats_and_masking() -> None:
    # Two rows, the second with one padding token holding wild numbers that must not count.
    logps = t([math.log(1.5), 0.0], [math.log(0.5), 50.0])
    old = torch.zeros(2, 2, dtype=torch.float64)
    advantages = t([2.0, 1.0], [-2.0, 1e6])
    values = t([0.5, 0.0], [-0.5, 1e6])
    returns = t([1.0, 0.0], [1.0, -1e6])
    mask = t([1, 1], [1, 0])
    loss, stats = ppo_loss(
        logps,
        old,
        advantages,
        values,
        torch.zeros(2, 2, dtype=torch.float64),
        returns,
        mask,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
    )
    # policy: [−2.4, −1, 1.6] (the first and third clipped); value: [0.32, 0, 1.125] (the
    # first clipped); per token: policy + 0.1·value.
    policy, value = [-2.4, -1.0, 1.6], [0.32, 0.0, 1.125]
    expected_loss = (sum(policy) + 0.1 * sum(value)) / 3
    assert loss.item() == pytest.approx(expected_loss)
    approxkl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3
    assert stats.metrics() == pytest.approx(
        {
            "train_loss": expected_loss,
            "loss/policy": sum(policy) / 3,
            "loss/value": sum(value) / 3,
            "policy/approxkl": approxkl,
            "policy/clipfrac": 2 / 3,
            "val/ratio": (1.5 + 1 + 0.5) / 3,
            "val/clipfrac": 1 / 3,
        }
    )


def test_split_micro_batches_with_a_step_normaliser_equal_the_whole_batch() -> None:
    # Normalising each micro-batch by the tokens of the whole step makes the summed losses
    # (and the summed stats) those of one big batch.
    torch.manual_seed(0)
    logps, old, advantages = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    values, old_values, returns = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    args = (logps, old, advantages, values, old_values, returns, mask)
    options = {"cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1}
    whole, whole_stats = ppo_loss(*args, **options)  # type: ignore[arg-type]
    n = int(mask.sum())
    parts = [
        ppo_loss(*(a[rows] for a in args), **options, normaliser=n)  # type: ignore[arg-type]
        for rows in (slice(0, 1), slice(1, 4))
    ]
    assert torch.stack([loss for loss, _ in parts]).sum().item() == pytest.approx(
        whole.item(), abs=1e-6
    )
    assert add_stats([s for _, s in parts]).metrics() == pytest.approx(whole_stats.metrics())
