"""Preference losses against hand-worked numbers, and against TRL 1.16's own code where it can
be called without a trainer."""

from __future__ import annotations

import math
import types

import pytest
import torch

from trainer_core.preference_losses import (
    add_stats,
    bradley_terry_loss,
    completion_logps,
    kto_loss,
    log1mexp,
    orpo_loss,
    simpo_loss,
)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_completion_logps_sum_and_average() -> None:
    # Row 0: tokens 2 and 3 count → sum −5, mean −2.5. Row 1: token 1 only → −1 either way.
    per_token_logps = torch.tensor([[-9.0, -2.0, -3.0], [-1.0, -7.0, -7.0]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    assert completion_logps(per_token_logps, mask).tolist() == [-5.0, -1.0]
    assert completion_logps(per_token_logps, mask, average=True).tolist() == [-2.5, -1.0]


def test_bradley_terry_plain() -> None:
    """r_c = [2, 0], r_r = [0, 1]: ℓ = [−log σ(2), −log σ(−1)] = [0.126928, 1.313262],
    L = 1.440190 / 2 = 0.720095. One pair of two ranks chosen higher: accuracy ½; margins
    [2, −1] → ½; rewards {2, 0, 0, 1}: mean ¾, min 0, max 2."""
    loss, stats = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))

    assert loss.item() == pytest.approx(0.720095, abs=1e-6)
    assert stats.metrics() == pytest.approx(
        {
            "train_loss": 0.720095,
            "accuracy": 0.5,
            "margin": 0.5,
            "mean_reward": 0.75,
            "min_reward": 0.0,
            "max_reward": 2.0,
        },
        abs=1e-6,
    )


def test_bradley_terry_margin_and_centering() -> None:
    """m = [1, 0], c = 0.1: ℓ_0 = −log σ(2 − 0 − 1) + 0.1·(2 + 0)² = 0.313262 + 0.4 = 0.713262,
    ℓ_1 = −log σ(0 − 1 − 0) + 0.1·(0 + 1)² = 1.313262 + 0.1 = 1.413262; L = 1.063262.
    The margin moves the loss, not the accuracy or the reported margin (still r_c − r_r)."""
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    loss, stats = bradley_terry_loss(
        chosen, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), center_rewards_coefficient=0.1
    )

    assert loss.item() == pytest.approx(1.063262, abs=1e-6)
    assert stats.metrics()["accuracy"] == 0.5 and stats.metrics()["margin"] == 0.5
    # ∂L/∂r_c,0 = (−(1 − σ(1)) + 0.2·2) / 2 = (−0.268941 + 0.4) / 2 = 0.065529.
    loss.backward()
    assert chosen.grad is not None
    assert chosen.grad[0].item() == pytest.approx(0.065529, abs=1e-6)


def test_bradley_terry_normaliser_is_the_step() -> None:
    # The two pairs above as two micro-batches with N = 2 add up to the one-batch loss.
    halves = [
        bradley_terry_loss(torch.tensor([c]), torch.tensor([r]), normaliser=2)
        for c, r in ((2.0, 0.0), (0.0, 1.0))
    ]
    assert sum(loss.item() for loss, _ in halves) == pytest.approx(0.720095, abs=1e-6)
    total = add_stats([stats for _, stats in halves])
    assert total.metrics()["min_reward"] == 0.0 and total.metrics()["max_reward"] == 2.0
    assert total.metrics()["mean_reward"] == 0.75 and int(total.num_pairs) == 2


def test_kto_hand_worked() -> None:
    """Δ = policy − ref = [−1, −3, −2] − [−2, −2, −2] = [1, −1, 0]; labels [T, F, T].
    z = max(0, mean([−4, −4] − [−5, −4])) = 0.5. β = 1, λ_D = 2, λ_U = 1:
    ℓ_0 = 2·(1 − σ(1 − 0.5))  = 2·0.377541 = 0.755081   (desirable)
    ℓ_1 = 1·(1 − σ(0.5 + 1))  = 0.182426                (undesirable)
    ℓ_2 = 2·(1 − σ(0 − 0.5))  = 2·0.622459 = 1.244919   (desirable)
    L = 2.182426 / 3 = 0.727475. rewards/chosen = mean(1, 0) = 0.5, rewards/rejected = −1,
    logps/chosen = mean(−1, −2) = −1.5, logps/rejected = −3."""
    policy_kl = torch.tensor([-4.0, -4.0], requires_grad=True)
    policy = torch.tensor([-1.0, -3.0, -2.0], requires_grad=True)
    loss, stats = kto_loss(
        policy,
        torch.tensor([-2.0, -2.0, -2.0]),
        torch.tensor([True, False, True]),
        policy_kl,
        torch.tensor([-5.0, -4.0]),
        beta=1.0,
        desirable_weight=2.0,
        undesirable_weight=1.0,
    )

    assert loss.item() == pytest.approx(0.727475, abs=1e-6)
    assert stats.metrics() == pytest.approx(
        {
            "train_loss": 0.727475,
            "kl": 0.5,
            "rewards/chosen": 0.5,
            "rewards/rejected": -1.0,
            "logps/chosen": -1.5,
            "logps/rejected": -3.0,
        },
        abs=1e-6,
    )
    # z is a baseline, not a target: no gradient reaches the mismatched pairs.
    loss.backward()
    assert policy_kl.grad is None
    # ∂ℓ_0/∂Δ_0 = −2·σ'(0.5) = −2·0.235004; divided by N = 3 → −0.156669.
    assert policy.grad is not None
    assert policy.grad[0].item() == pytest.approx(-2 * sigmoid(0.5) * (1 - sigmoid(0.5)) / 3)


def test_kto_kl_estimate_is_clamped_at_zero() -> None:
    """KL logps policy −6 vs ref −5: mean −1 → z = 0. One desirable example, Δ = 0, β = 0.1:
    ℓ = 1 − σ(0) = 0.5 (a negative z would have given 1 − σ(0.1) = 0.475021)."""
    loss, stats = kto_loss(
        torch.tensor([-2.0]),
        torch.tensor([-2.0]),
        torch.tensor([True]),
        torch.tensor([-6.0]),
        torch.tensor([-5.0]),
        beta=0.1,
    )
    assert loss.item() == pytest.approx(0.5)
    # No undesirable example: its metrics are left out rather than reported as 0 or NaN.
    assert stats.metrics() == {
        "train_loss": 0.5,
        "kl": 0.0,
        "rewards/chosen": 0.0,
        "logps/chosen": -2.0,
    }


def test_simpo_hand_worked() -> None:
    """π̄_c = [−1, −2], π̄_r = [−2, −1], β = 2, γ = 0.5: β·Δ − γ = [2 − 0.5, −2 − 0.5],
    ℓ = [−log σ(1.5), −log σ(−2.5)] = [0.201413, 2.578890], L = 1.390151.
    rewards = β·π̄: chosen [−2, −4] → −3, rejected [−4, −2] → −3; accuracy ½ (−2 > −4)."""
    loss, stats = simpo_loss(
        torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), beta=2.0, gamma=0.5
    )

    assert loss.item() == pytest.approx(1.390151, abs=1e-6)
    assert stats.metrics() == pytest.approx(
        {
            "train_loss": 1.390151,
            "rewards/chosen": -3.0,
            "rewards/rejected": -3.0,
            "rewards/accuracies": 0.5,
            "rewards/margins": 0.0,
            "logps/chosen": -1.5,
            "logps/rejected": -1.5,
        },
        abs=1e-6,
    )


def test_simpo_at_equal_logps_is_the_margin_loss() -> None:
    # Δ = 0: ℓ = −log σ(−γ) = −log σ(−1) = log(1 + e) = 1.313262, whatever β is.
    loss, _ = simpo_loss(torch.tensor([-3.0]), torch.tensor([-3.0]), beta=2.5, gamma=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.e), abs=1e-6)


def test_orpo_hand_worked() -> None:
    """π̄_c = log ½: odds ½/½ → log-odds 0. π̄_r = log ¼: odds ¼/¾ → log-odds −log 3.
    log σ(0 − (−log 3)) = log(3/4) = −0.287682. NLL: per-token logps [[−1, −2, −9]] with
    mask [[1, 1, 0]] → 3 over M = 2 tokens = 1.5. β = 0.1:
    L = 1.5 − 0.1·(−0.287682) = 1.528768; rewards β·π̄ = −0.069315 and −0.138629."""
    loss, pairs, orpo = orpo_loss(
        torch.tensor([math.log(0.5)]),
        torch.tensor([math.log(0.25)]),
        torch.tensor([[-1.0, -2.0, -9.0]]),
        torch.tensor([[1, 1, 0]]),
        beta=0.1,
    )

    assert loss.item() == pytest.approx(1.528768, abs=1e-6)
    assert orpo.metrics(pairs, beta=0.1) == pytest.approx(
        {
            "train_loss": 1.528768,
            "nll_loss": 1.5,
            "log_odds_ratio": -0.287682,
            "rewards/chosen": -0.069315,
            "rewards/rejected": -0.138629,
            "rewards/accuracies": 1.0,
            "rewards/margins": 0.069315,
            "logps/chosen": -0.693147,
            "logps/rejected": -1.386294,
        },
        abs=1e-6,
    )
    assert float(orpo.log_odds_chosen_sum) == pytest.approx(math.log(3), abs=1e-6)


def test_orpo_normalisers_split_a_step() -> None:
    # NLL tokens 2 and 1 (sums 3 and 4) over M = 3, and two pairs over N = 2, add up to the
    # one-batch loss: (3 + 4)/3 + 0.1·(0.287682 + log 2)/2; the second pair has equal π̄ so
    # log-odds 0 and log σ(0) = −log 2.
    args = [
        (math.log(0.5), math.log(0.25), [[-1.0, -2.0]], [[1, 1]]),
        (math.log(0.3), math.log(0.3), [[-4.0, -5.0]], [[1, 0]]),
    ]
    parts = [
        orpo_loss(
            torch.tensor([c]),
            torch.tensor([r]),
            torch.tensor(logps),
            torch.tensor(mask),
            beta=0.1,
            nll_normaliser=3,
            normaliser=2,
        )[0].item()
        for c, r, logps, mask in args
    ]
    assert sum(parts) == pytest.approx(7 / 3 + 0.1 * (0.287682 + math.log(2)) / 2, abs=1e-6)


def test_log1mexp_both_ends() -> None:
    # log(1 − e^{−0.5}) = −0.932752; near 0, log(1 − e^{−1e−10}) = log(1e−10) = −23.025851;
    # far below, log(1 − e^{−50}) = −e^{−50} ≈ −1.93e−22 (not 0, not NaN).
    values = log1mexp(torch.tensor([-0.5, -1e-10, -50.0], dtype=torch.float64))
    assert values[0].item() == pytest.approx(-0.932752, abs=1e-6)
    assert values[1].item() == pytest.approx(-23.025851, abs=1e-5)
    assert values[2].item() == pytest.approx(-math.exp(-50), rel=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_orpo_and_simpo_match_trl() -> None:
    """TRL 1.16's own loss methods on the same random logps (they need only β and a device
    from their trainer, so a namespace stands in for it)."""
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    generator = torch.Generator().manual_seed(0)
    chosen = -torch.rand(6, generator=generator) * 3 - 0.01  # length-averaged logps < 0
    rejected = -torch.rand(6, generator=generator) * 3 - 0.01
    device = types.SimpleNamespace(device="cpu")

    orpo_self = types.SimpleNamespace(beta=0.25, accelerator=device)
    trl_ratio_losses, trl_chosen_rewards, _, trl_ratio, _ = ORPOTrainer.odds_ratio_loss(
        orpo_self, chosen, rejected
    )
    no_nll = torch.zeros(6, 1), torch.zeros(6, 1)
    loss, pairs, orpo = orpo_loss(chosen, rejected, *no_nll, beta=0.25, nll_normaliser=1)
    torch.testing.assert_close(loss, -trl_ratio_losses.mean())
    assert float(orpo.log_odds_ratio_sum) / 6 == pytest.approx(trl_ratio.item(), abs=1e-6)
    assert float(pairs.chosen_rewards_sum) == pytest.approx(trl_chosen_rewards.sum().item())

    cpo_self = types.SimpleNamespace(
        beta=2.0, simpo_gamma=0.7, label_smoothing=0.0, loss_type="simpo", alpha=0.0
    )
    cpo_self.accelerator = device
    trl_losses, trl_chosen_rewards, _ = CPOTrainer.cpo_loss(cpo_self, chosen, rejected)
    loss, stats = simpo_loss(chosen, rejected, beta=2.0, gamma=0.7)
    torch.testing.assert_close(loss, trl_losses.mean())
    assert float(stats.chosen_rewards_sum) == pytest.approx(trl_chosen_rewards.sum().item())
