"""GRPO and RLOO advantages and losses against hand-computed numbers (arithmetic in each test)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer_core.rl_losses import (
    aggregate_loss,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    k3_kl,
    rloo_advantages,
    rloo_loss,
    sequence_k1,
)

REWARDS = torch.tensor([1.0, 3.0, 2.0, 2.0])  # two groups of G = 2


def test_group_advantages_under_each_scaling() -> None:
    """Group means [2, 2]; group stds (unbiased) [√2, 0]; batch std √(2/3) (mean 2, Σd² = 2)."""
    none, zero_std = group_advantages(REWARDS, 2, "none")
    assert none.tolist() == [-1.0, 1.0, 0.0, 0.0]
    assert zero_std.tolist() == [False, False, True, True]  # frac_reward_zero_std = 0.5

    group, _ = group_advantages(REWARDS, 2, "group")
    s = math.sqrt(2) + 1e-4
    assert group.tolist() == pytest.approx([-1 / s, 1 / s, 0.0, 0.0], abs=1e-7)

    batch, batch_zero = group_advantages(REWARDS, 2, "batch")
    b = math.sqrt(2 / 3) + 1e-4
    assert batch.tolist() == pytest.approx([-1 / b, 1 / b, 0.0, 0.0], abs=1e-7)
    assert not batch_zero.any()  # the batch std is not 0


def test_an_unscorable_reward_gets_no_advantage_and_is_left_out_of_its_group() -> None:
    """Group 2 = [NaN, 5, 3]: its mean is 4 over the two scorable rows, A = [0, 1, -1] unscaled."""
    rewards = torch.tensor([1.0, 2.0, 3.0, float("nan"), 5.0, 3.0])
    advantages, _ = group_advantages(rewards, 3, "none")
    assert advantages.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0, 1.0, -1.0])


def test_rloo_leave_one_out_baseline() -> None:
    """r = [1, 2, 6]: b = [(9−1)/2, (9−2)/2, (9−6)/2] = [4, 3.5, 1.5], A = r − b."""
    advantages = rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), 3)
    assert advantages.tolist() == pytest.approx([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])


def test_rloo_folds_the_kl_into_the_reward() -> None:
    """β = 0.5, kl = [1, 0, −1]: r' = [0.5, 2, 6.5] (Σ 9), b = [4.25, 3.5, 1.25]."""
    advantages = rloo_advantages(
        torch.tensor([1.0, 2.0, 6.0]), 3, kl=torch.tensor([1.0, 0.0, -1.0]), beta=0.5
    )
    assert advantages.tolist() == pytest.approx([-3.75, -1.5, 5.25])


def test_rloo_normalised_advantages() -> None:
    """A = [−3, −1.5, 4.5]: mean 0, unbiased std √((9 + 2.25 + 20.25)/2) = √15.75."""
    advantages = rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, normalize=True)
    s = math.sqrt(15.75) + 1e-4
    assert advantages.tolist() == pytest.approx([-3 / s, -1.5 / s, 4.5 / s], abs=1e-7)


def test_k3_kl_estimator() -> None:
    """logp = −1, ref = −2: Δ = ref − logp = −1, e⁻¹ − (−1) − 1 = 0.367879; equal → 0."""
    kl = k3_kl(torch.tensor([[-1.0, -0.5]]), torch.tensor([[-2.0, -0.5]]))
    assert kl[0].tolist() == pytest.approx([math.exp(-1), 0.0])


def test_sequence_k1_sums_old_minus_ref_over_the_completion() -> None:
    """(−1 − −1.5) + (−2 − −1) = −0.5; the third token is masked out."""
    kl = sequence_k1(
        torch.tensor([[-1.0, -2.0, -3.0]]),
        torch.tensor([[-1.5, -1.0, -9.0]]),
        torch.tensor([[1, 1, 0]]),
    )
    assert kl.tolist() == pytest.approx([-0.5])


LOSSES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        ("grpo", (6 / 3 + 4 / 1) / 2),  # mean per sequence, then over sequences = 3
        ("bnpo", 10 / 4),  # over the 4 active tokens
        ("dr_grpo", 10 / (2 * 4)),  # B = 2 rows × max_completion_length 4
        ("dapo", 10 / 8),  # num_items_in_batch = 8 tokens in the whole rollout
    ],
)
def test_each_loss_aggregation(loss_type: str, expected: float) -> None:
    loss = aggregate_loss(
        LOSSES,
        MASK,
        loss_type,
        max_completion_length=4,
        num_items_in_batch=8,  # type: ignore[arg-type]
    )
    assert float(loss) == pytest.approx(expected)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_four_micro_batches_add_up_to_the_whole_batch(loss_type: str) -> None:
    """Gradient accumulation 4×1 equals 1×4 for the aggregations that are batch means."""
    losses = torch.arange(12.0).view(4, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    whole = aggregate_loss(
        losses,
        mask,
        loss_type,
        max_completion_length=3,
        num_items_in_batch=9,  # type: ignore[arg-type]
    )
    parts = sum(
        aggregate_loss(
            losses[i : i + 1],
            mask[i : i + 1],
            loss_type,  # type: ignore[arg-type]
            max_completion_length=3,
            num_items_in_batch=9,
            num_micro_batches=4,
        )
        for i in range(4)
    )
    assert float(parts) == pytest.approx(float(whole))


@pytest.mark.parametrize(
    ("ratio", "advantage", "low", "high"),
    [
        (1.27, 1.0, False, False),  # inside the band [0.8, 1.28]
        (1.29, 1.0, False, True),  # above it, A > 0: clipped
        (1.29, -1.0, False, False),  # above it, A < 0: min keeps ρA, not clipped
        (0.81, -1.0, False, False),  # inside
        (0.79, -1.0, True, False),  # below it, A < 0: clipped
        (0.79, 1.0, False, False),  # below it, A > 0: min keeps ρA, not clipped
    ],
)
def test_clipping_engages_exactly_outside_the_band(
    ratio: float, advantage: float, low: bool, high: bool
) -> None:
    """ε_low = 0.2, ε_high = 0.28 (DAPO). Unclipped: loss −ρA, d/dlogρ = −ρA; clipped: the
    loss is −clip(ρ)A and no gradient flows."""
    log_ratio = torch.tensor([math.log(ratio)], requires_grad=True)
    loss, _, is_low, is_high = clipped_surrogate(
        log_ratio, torch.tensor([advantage]), epsilon_low=0.2, epsilon_high=0.28
    )
    loss.sum().backward()
    assert (bool(is_low), bool(is_high)) == (low, high)
    assert log_ratio.grad is not None
    if low or high:
        bound = 0.8 if low else 1.28
        assert float(loss.detach()) == pytest.approx(-bound * advantage)
        assert float(log_ratio.grad) == 0.0
    else:
        assert float(loss.detach()) == pytest.approx(-ratio * advantage)
        assert float(log_ratio.grad) == pytest.approx(-ratio * advantage)


def test_grpo_loss_on_policy_is_minus_the_token_weighted_advantage() -> None:
    """π_old = π_θ (None): ρ = 1, ℓ_t = −A_i. dapo over 4 tokens: −(3·0.5 + 1·(−1))/4 = −0.125."""
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    loss, stats = grpo_loss(
        logps,
        None,
        torch.tensor([0.5, -1.0]),
        MASK,
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type="dapo",
        max_completion_length=3,
        num_items_in_batch=4,
    )
    assert float(loss.detach()) == pytest.approx(-0.125)
    assert float(stats.num_tokens) == 4 and float(stats.clip_low_sum + stats.clip_high_sum) == 0
    loss.backward()
    assert logps.grad is not None  # d loss / d logp_t = −A_i m_t / 4
    assert logps.grad.flatten().tolist() == pytest.approx([-0.125] * 3 + [0.25, 0.0, 0.0])


def test_grpo_kl_term_value_and_its_bias_corrected_gradient() -> None:
    """logp = −1, ref = −2, A = 0, β = 0.1, one token: loss = β·k3 = 0.1·e⁻¹.

    With TRL's bias correction the term is β·k3·ρ; at ρ = 1 its gradient is
    β·(1 − e^Δ + k3) = β·(−Δ) = β·(logp − ref) = 0.1 (the reverse-KL gradient)."""
    logps = torch.tensor([[-1.0]], requires_grad=True)
    loss, stats = grpo_loss(
        logps,
        None,
        torch.tensor([0.0]),
        torch.tensor([[1]]),
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type="bnpo",
        max_completion_length=1,
        num_items_in_batch=1,
        beta=0.1,
        ref_per_token_logps=torch.tensor([[-2.0]]),
    )
    assert float(loss.detach()) == pytest.approx(0.1 * math.exp(-1))
    assert stats.means()["kl"] == pytest.approx(math.exp(-1))
    loss.backward()
    assert logps.grad is not None
    assert float(logps.grad) == pytest.approx(0.1)


def test_rloo_loss_on_sequence_ratios() -> None:
    """ρ = [1, e^0.5 = 1.6487], A = [1, −1], ε = 0.2: row 2 has A < 0 and ρ above the band,
    so min keeps ρA: losses [−1, 1.6487], mean 0.32436; nothing clipped."""
    loss, stats = rloo_loss(
        torch.tensor([-5.0, -6.0]),
        torch.tensor([-5.0, -6.5]),
        torch.tensor([1.0, -1.0]),
        epsilon_low=0.2,
        epsilon_high=0.2,
    )
    assert float(loss) == pytest.approx((-1 + math.exp(0.5)) / 2)
    assert stats.means()["clip_ratio"] == 0.0
    # Flip the sign of A on row 2: now ρ > 1.2 with A > 0 is clipped: loss (−1 − 1.2)/2.
    loss, stats = rloo_loss(
        torch.tensor([-5.0, -6.0]),
        torch.tensor([-5.0, -6.5]),
        torch.tensor([1.0, 1.0]),
        epsilon_low=0.2,
        epsilon_high=0.2,
    )
    assert float(loss) == pytest.approx((-1 - 1.2) / 2)
    assert stats.means()["clip_ratio"] == 0.5
