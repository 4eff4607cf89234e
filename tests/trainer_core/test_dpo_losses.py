"""Every DPO loss type against numbers worked by hand, and how several types combine.

Shared inputs unless a test says otherwise: Δc = 0.5, Δr = −0.5, β = 0.1, so h = Δc − Δr = 1,
βh = 0.1, βΔc = 0.05, βΔr = −0.05, and

    σ(0.1) = 0.524979    logσ(0.1) = −0.644397    logσ(−0.1) = −0.744397
    σ(0.05) = 0.512497   logσ(0.05) = −0.668460   logσ(−0.05) = −0.718460
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer_core.dpo_losses import (
    PAIR_LOSS_TYPES,
    DpoStats,
    add_dpo_stats,
    combined_dpo_loss,
    dpo_loss,
)
from trainer_core.specs import DPO_LOSS_TYPES

CHOSEN = torch.tensor([0.5])
REJECTED = torch.tensor([-0.5])


def loss_of(loss_type: str, **kwargs: float) -> float:
    out = dpo_loss(loss_type, CHOSEN, REJECTED, beta=0.1, **kwargs)  # type: ignore[arg-type]
    assert out.shape == (1,)
    return float(out[0])


def test_every_spec_loss_type_is_covered() -> None:
    assert set(PAIR_LOSS_TYPES) | {"sft"} == set(DPO_LOSS_TYPES)


def test_sigmoid() -> None:
    """−logσ(βh) = −logσ(0.1) = 0.644397; label smoothing is ignored (TRL ≥ 0.29)."""
    assert loss_of("sigmoid") == pytest.approx(0.644397, abs=1e-6)
    assert loss_of("sigmoid", label_smoothing=0.1) == pytest.approx(0.644397, abs=1e-6)


def test_sigmoid_at_initialisation_is_log_2() -> None:
    """Policy = reference: Δc = Δr = 0 → −logσ(0) = log 2 for every pair and any β."""
    zeros = torch.zeros(3)
    out = dpo_loss("sigmoid", zeros, zeros, beta=0.37)
    torch.testing.assert_close(out, torch.full((3,), math.log(2)))


def test_cdpo() -> None:
    """ε = 0.1: −0.9·logσ(0.1) − 0.1·logσ(−0.1) = 0.9·0.644397 + 0.1·0.744397 = 0.654397."""
    assert loss_of("cdpo", label_smoothing=0.1) == pytest.approx(0.654397, abs=1e-6)


def test_ipo_is_length_normalised() -> None:
    """|y_w| = 2, |y_l| = 4: (0.5/2 − (−0.5)/4 − 1/(2·0.1))² = (0.375 − 5)² = 21.390625."""
    out = dpo_loss(
        "ipo",
        CHOSEN,
        REJECTED,
        beta=0.1,
        chosen_lengths=torch.tensor([2]),
        rejected_lengths=torch.tensor([4]),
    )
    assert float(out[0]) == pytest.approx(21.390625, abs=1e-4)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss("ipo", CHOSEN, REJECTED, beta=0.1)


def test_hinge() -> None:
    """relu(1 − βh) = relu(1 − 0.1) = 0.9; and 0 once βh ≥ 1 (h = 20 → relu(−1))."""
    assert loss_of("hinge") == pytest.approx(0.9, abs=1e-6)
    far = dpo_loss("hinge", torch.tensor([10.0]), torch.tensor([-10.0]), beta=0.1)
    assert float(far[0]) == 0.0


def test_robust() -> None:
    """ε = 0.1: [−0.9·logσ(0.1) + 0.1·logσ(−0.1)] / 0.8
    = (0.579957 − 0.074440) / 0.8 = 0.631897."""
    assert loss_of("robust", label_smoothing=0.1) == pytest.approx(0.631897, abs=1e-6)
    with pytest.raises(ValueError, match="robust"):
        loss_of("robust", label_smoothing=0.5)


def test_bco_pair() -> None:
    """−logσ(βΔc) − logσ(−βΔr) = −logσ(0.05) − logσ(0.05) = 2·0.668460 = 1.336919."""
    assert loss_of("bco_pair") == pytest.approx(1.336919, abs=1e-6)


def test_sppo_hard() -> None:
    """(Δc − 1/(2β))² + (Δr + 1/(2β))² = (0.5 − 5)² + (−0.5 + 5)² = 20.25 + 20.25 = 40.5."""
    assert loss_of("sppo_hard") == pytest.approx(40.5, abs=1e-4)


def test_nca_pair() -> None:
    """−logσ(0.05) − ½·logσ(−0.05) − ½·logσ(0.05)
    = 0.668460 + 0.359230 + 0.334230 = 1.361919."""
    assert loss_of("nca_pair") == pytest.approx(1.361919, abs=1e-6)


def test_apo_zero() -> None:
    """(1 − σ(0.05)) + σ(−0.05) = 0.487503 + 0.487503 = 0.975005."""
    assert loss_of("apo_zero") == pytest.approx(0.975005, abs=1e-6)


def test_apo_down() -> None:
    """σ(βΔc) + (1 − σ(βh)) = σ(0.05) + 1 − σ(0.1) = 0.512497 + 0.475021 = 0.987518."""
    assert loss_of("apo_down") == pytest.approx(0.987518, abs=1e-6)


def test_exo_pair() -> None:
    """ε = 0.001: σ(0.1)·(logσ(0.1) − log 0.999) + σ(−0.1)·(logσ(−0.1) − log 0.001)
    = 0.524979·(−0.644397 + 0.001001) + 0.475021·(−0.744397 + 6.907755)
    = −0.337770 + 2.927724 = 2.589954."""
    assert loss_of("exo_pair", label_smoothing=0.001) == pytest.approx(2.589954, abs=1e-5)
    with pytest.raises(ValueError, match="label_smoothing > 0"):
        loss_of("exo_pair")


def test_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown DPO loss type"):
        loss_of("sft")


def combine(**kwargs: object) -> tuple[torch.Tensor, DpoStats]:
    """Two pairs: policy logps chosen (−1, −2), rejected (−3, −2); reference all −2.
    So Δc = (1, 0), Δr = (−1, 0). The chosen rows have 2 completion tokens each, with
    per-token logps (−0.5, −0.5) and (−1, −1) (sum to the sequence logps)."""
    args = {
        "loss_types": ["sigmoid"],
        "loss_weights": None,
        "beta": 0.5,
        "label_smoothing": 0.0,
        "num_pairs": 2,
        "num_chosen_tokens": 4,
    } | kwargs
    return combined_dpo_loss(
        torch.tensor([-1.0, -2.0]),
        torch.tensor([-3.0, -2.0]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([[-0.5, -0.5, 0.0], [-1.0, -1.0, -7.0]]),
        torch.tensor([[1, 1, 0], [1, 1, 0]]),
        torch.tensor([[1, 0, 0], [1, 1, 1]]),
        **args,  # type: ignore[arg-type]
    )


def test_combined_sigmoid_and_stats() -> None:
    """β = 0.5: h = (2, 0) → ℓ = (−logσ(1), log 2) = (0.313262, 0.693147); mean 0.503204.
    rewards: chosen β·Δc = (0.5, 0), rejected (−0.5, 0) → means 0.25, −0.25, margin 0.5;
    accuracy: 0.5 > −0.5 yes, 0 > 0 no → 0.5; logps/chosen mean −1.5, rejected −2.5."""
    loss, stats = combine()

    assert float(loss) == pytest.approx(0.503204, abs=1e-6)
    assert stats.loss == pytest.approx(0.503204, abs=1e-6)
    assert stats.means() == pytest.approx(
        {
            "rewards/chosen": 0.25,
            "rewards/rejected": -0.25,
            "rewards/accuracies": 0.5,
            "rewards/margins": 0.5,
            "logps/chosen": -1.5,
            "logps/rejected": -2.5,
        }
    )


def test_weights_combine_means_of_each_type() -> None:
    """["sigmoid", "hinge", "sft"] with weights (0.8, 0.2, 1.0), β = 0.5:
    sigmoid mean 0.503204; hinge relu(1 − (1, 0)) = (0, 1), mean 0.5;
    sft: token mean NLL of chosen = (0.5 + 0.5 + 1 + 1) / 4 = 0.75 (the −7 is masked).
    L = 0.8·0.503204 + 0.2·0.5 + 1.0·0.75 = 1.252563."""
    loss, stats = combine(loss_types=["sigmoid", "hinge", "sft"], loss_weights=[0.8, 0.2, 1.0])

    assert float(loss) == pytest.approx(1.252563, abs=1e-6)
    assert stats.loss == pytest.approx(1.252563, abs=1e-6)
    # Default weights are 1.0 each: 0.503204 + 0.5 + 0.75.
    loss, _ = combine(loss_types=["sigmoid", "hinge", "sft"])
    assert float(loss) == pytest.approx(1.753204, abs=1e-6)
    with pytest.raises(ValueError, match="one weight per loss_type"):
        combine(loss_types=["sigmoid", "hinge"], loss_weights=[1.0])


def test_micro_batch_shares_add_up_to_the_step_loss() -> None:
    """Normalised by the step's pairs (and tokens), the halves of a batch sum to the whole;
    their stats add up to the whole's stats."""
    types = {"loss_types": ["sigmoid", "sft"], "beta": 0.5}
    whole, whole_stats = combine(**types)
    args = [
        torch.tensor([-1.0, -2.0]),
        torch.tensor([-3.0, -2.0]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([[-0.5, -0.5, 0.0], [-1.0, -1.0, -7.0]]),
        torch.tensor([[1, 1, 0], [1, 1, 0]]),
        torch.tensor([[1, 0, 0], [1, 1, 1]]),
    ]
    halves = [
        combined_dpo_loss(
            *(a[i : i + 1] for a in args),
            loss_types=["sigmoid", "sft"],
            loss_weights=None,
            beta=0.5,
            label_smoothing=0.0,
            num_pairs=2,
            num_chosen_tokens=4,
        )
        for i in range(2)
    ]

    assert float(halves[0][0] + halves[1][0]) == pytest.approx(float(whole), abs=1e-6)
    summed = add_dpo_stats([s for _, s in halves])
    assert summed.loss == pytest.approx(whole_stats.loss, abs=1e-6)
    assert summed.means() == pytest.approx(whole_stats.means())
