"""Real DPO runs on the tiny model: log 2 at the start, invariances, learning, LoRA, stopping."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_core.conftest import (
    KeepModel,
    MakeSpec,
    method_spec,
    run,
    stop_after,
    write_jsonl,
)
from tests.trainer_core.hyperparameters import COMMON
from trainer_core import loop
from trainer_core.methods import dpo
from trainer_core.specs import AdapterSpec, DpoHyperparameters, TrainSpec

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")

METRIC_KEYS = {
    "train_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "learning_rate",
    "grad_norm",
    "num_tokens",
    "epoch",
}
LOG_2 = math.log(2)

# A learnable preference: the chosen answer names the prompt's animal, the rejected one names
# another. Training pairs use the first two wrong animals of each prompt, held-out pairs the
# rest, so the validation pairs are ones the run never saw.
ANIMALS = ["cat", "dog", "fish", "bird", "owl", "goat"]


def animal_pairs(held_out: bool) -> list[dict[str, Any]]:
    rows = []
    for i, animal in enumerate(ANIMALS):
        wrong = [ANIMALS[(i + k) % len(ANIMALS)] for k in range(1, len(ANIMALS))]
        for other in wrong[2:] if held_out else wrong[:2]:
            rows.append(
                {
                    "prompt": f"The animal is the {animal}. Name it:",
                    "chosen": f" yes, {animal}",
                    "rejected": f" yes, {other}",
                }
            )
    return rows


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """DPO's own pairs (this file's animal rule, not conftest's yes/no rule)."""
    folder = tmp_path_factory.mktemp("pairs")
    files = folder / "train.jsonl", folder / "valid.jsonl"
    for path, held_out in zip(files, (False, True), strict=True):
        write_jsonl(path, animal_pairs(held_out))
    return files


@pytest.fixture
def make_dpo_spec(tiny_model: Path, pair_files: tuple[Path, Path]) -> MakeSpec:
    def make(*, adapter: dict[str, Any] | None = None, **overrides: Any) -> TrainSpec:
        hp = {
            **COMMON,
            "learning_rate": 1e-3,
            "beta": 0.1,
            "loss_type": ["sigmoid"],
            "loss_weights": None,
            "label_smoothing": 0.0,
            "precompute_ref_log_probs": False,
        }
        return method_spec(
            "dpo",
            tiny_model,
            pair_files[0],
            DpoHyperparameters,
            hp,
            **({"adapter": AdapterSpec(**(adapter or {}))} | overrides),
        )

    return make


REFERENCE_MODES: dict[str, dict[str, Any]] = {
    "lora-adapter-off": {"adapter": {"type": "lora", "r": 4, "alpha": 8}},
    "full-frozen-copy": {"adapter": {"type": "full"}},
    "lora-precomputed": {"adapter": {"type": "lora"}, "precompute_ref_log_probs": True},
    "full-precomputed": {"adapter": {"type": "full"}, "precompute_ref_log_probs": True},
}


@pytest.mark.parametrize("mode", sorted(REFERENCE_MODES))
def test_loss_at_initialisation_is_log_2(make_dpo_spec: Any, tmp_path: Path, mode: str) -> None:
    # Policy = reference before the first update (LoRA's B starts at zero; the full copy is
    # taken before training; precomputed values are looked up by example index after the
    # shuffle), so Δc = Δr = 0 and −logσ(0) = log 2. The second step has moved: not log 2.
    spec = make_dpo_spec(learning_rate=1e-2, **REFERENCE_MODES[mode])

    _, sink, _ = run(spec, tmp_path)

    first, second = sink.points[0][1], sink.points[1][1]
    assert first["train_loss"] == pytest.approx(LOG_2, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/accuracies"] == 0.0  # 0 > 0 is false
    assert abs(second["train_loss"] - LOG_2) > 1e-4


def test_precomputed_reference_gives_the_live_losses(make_dpo_spec: Any, tmp_path: Path) -> None:
    # Beyond step 1 too: the reference the precomputed values stand for is the one the live
    # frozen copy computes, step after step (3 steps, 12 pairs shuffled into batches of 4).
    common = {"adapter": {"type": "full"}, "learning_rate": 1e-2}
    _, live, _ = run(make_dpo_spec(**common), tmp_path / "a")
    _, cached, _ = run(make_dpo_spec(precompute_ref_log_probs=True, **common), tmp_path / "b")

    assert len(live.points) == 3
    for (_, a), (_, b) in zip(live.points, cached.points, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-5)


def test_gradient_accumulation_4x1_equals_1x4(make_dpo_spec: Any, tmp_path: Path) -> None:
    # Full fine-tuning, 12 pairs → 3 steps either way, over the same pairs per step. With
    # "sft" added, both normalisers (pairs, chosen tokens) are exercised. A normaliser per
    # micro-batch instead of per step moves weights by ~lr = 1e-4, far above 1e-5.
    common = {
        "adapter": {"type": "full"},
        "learning_rate": 1e-4,
        "max_grad_norm": 1e6,
        "loss_type": ["sigmoid", "sft"],
    }
    _, big_sink, big = run(
        make_dpo_spec(batch_size=4, gradient_accumulation_steps=1, **common), tmp_path / "a"
    )
    _, acc_sink, acc = run(
        make_dpo_spec(batch_size=1, gradient_accumulation_steps=4, **common), tmp_path / "b"
    )

    big_weights = load_file(big.saved[-1][1] / "adapter" / "model.safetensors")
    acc_weights = load_file(acc.saved[-1][1] / "adapter" / "model.safetensors")
    assert big_weights.keys() == acc_weights.keys()
    for name, weight in big_weights.items():
        torch.testing.assert_close(acc_weights[name], weight, atol=1e-5, rtol=0, msg=name)
    for (_, a), (_, b) in zip(big_sink.points, acc_sink.points, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["rewards/accuracies"] == b["rewards/accuracies"]
        assert a["num_tokens"] == b["num_tokens"]


def test_dpo_learns_the_preference_on_held_out_pairs(
    make_dpo_spec: Any, pair_files: tuple[Path, Path], tiny_model: Path, tmp_path: Path
) -> None:
    # 12 training pairs as one batch, 12 epochs of 1 step; 18 held-out pairs (unseen wrong
    # animals). One full batch a step: smaller batches pull each animal up and down in turn
    # (every animal is chosen in 2 pairs and rejected in 2) and need several times the steps.
    spec = make_dpo_spec(
        adapter={"type": "full"},
        learning_rate=3e-3,
        batch_size=12,
        n_epochs=12,
        validation_file=str(pair_files[1]),
        checkpoint_every=1000,
    )

    result, sink, store = run(spec, tmp_path)

    assert result.status == "completed" and (result.step, result.total_steps) == (12, 12)
    assert all(values.keys() == METRIC_KEYS for _, values in sink.points)
    assert [step for step, _ in sink.points] == list(range(1, 13))
    # Measured: train loss 0.18, margin 1.75; held out: loss 0.33, accuracy 0.94, margin 1.1
    # (0.89-0.94 over tiny-model seeds). Chance is accuracy 0.5 and loss log 2 = 0.693.
    last = sink.points[-1][1]
    assert last["train_loss"] < 0.3 and last["rewards/accuracies"] == 1.0
    assert last["rewards/margins"] > 1.0 and last["epoch"] == 12.0
    assert last["rewards/chosen"] > last["rewards/rejected"]
    assert last["logps/chosen"] > sink.points[0][1]["logps/chosen"]
    tokens = [values["num_tokens"] for _, values in sink.points]
    assert tokens == sorted(tokens) and tokens[0] > 0
    [(step, folder, metrics, final)] = store.saved
    assert (step, final) == (12, True)
    assert metrics.keys() == {
        "step",
        "train_loss",
        "valid_loss",
        "valid_rewards/accuracies",
        "valid_rewards/margins",
    }
    assert metrics["valid_rewards/accuracies"] >= 0.8
    assert metrics["valid_loss"] < 0.5 and metrics["valid_rewards/margins"] > 0.5
    assert result.final_metrics == metrics

    # evaluate() on the downloaded model reproduces the checkpoint's validation metrics.
    evaluated = dpo.evaluate(
        str(tiny_model), str(folder / "adapter"), str(pair_files[1]), 64, spec.hyperparameters
    )
    for key, value in evaluated.items():
        assert value == pytest.approx(metrics[key], abs=1e-5), key


def test_lora_moves_the_adapter_only(
    make_dpo_spec: Any, tiny_model: Path, tmp_path: Path, keep_model: KeepModel
) -> None:
    trained = keep_model(loop)
    # LoRA dropout is asked for but switched off (TRL's disable_dropout): the run is the
    # same as one without dropout, step for step.
    spec = make_dpo_spec(
        adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.3},
        learning_rate=1e-2,
        n_epochs=2,
    )

    _, sink, store = run(spec, tmp_path / "a")
    _, without_dropout, _ = run(
        spec.model_copy(update={"adapter": AdapterSpec(r=4, alpha=8)}), tmp_path / "b"
    )

    assert sink.points[0][1]["train_loss"] == pytest.approx(LOG_2, abs=1e-6)
    assert sink.points == without_dropout.points
    model = trained["model"]
    base_file = load_file(tiny_model / "model.safetensors")
    base_now = {
        name.replace(".base_layer", ""): p
        for name, p in model.get_base_model().named_parameters()
        if "lora_" not in name
    }
    assert base_now.keys() == base_file.keys()
    for name, weight in base_file.items():
        assert torch.equal(base_now[name], weight), name
    final = load_file(store.saved[-1][1] / "adapter" / "adapter_model.safetensors")
    lora_b = [w for name, w in final.items() if "lora_B" in name]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b)
    # One checkpoint per epoch, the last one final.
    assert [(step, final) for step, _, _, final in store.saved] == [(3, False), (6, True)]


def test_sft_term_adds_the_chosen_nll(make_dpo_spec: Any, tmp_path: Path) -> None:
    # At step 1 the sigmoid term is log 2, so the sft term is what the loss adds on top: the
    # mean NLL of the chosen tokens, about log(vocab) = log 512 ≈ 6.24 for a random model.
    # Its weight scales it exactly.
    common = {"adapter": {"type": "full"}}
    _, alone, _ = run(make_dpo_spec(**common), tmp_path / "a")
    _, both, _ = run(make_dpo_spec(loss_type=["sigmoid", "sft"], **common), tmp_path / "b")
    _, half, _ = run(
        make_dpo_spec(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], **common),
        tmp_path / "c",
    )

    sigmoid_loss = alone.points[0][1]["train_loss"]
    nll = both.points[0][1]["train_loss"] - sigmoid_loss
    assert sigmoid_loss == pytest.approx(LOG_2, abs=1e-6)
    assert nll == pytest.approx(math.log(512), abs=0.5)
    assert half.points[0][1]["train_loss"] - sigmoid_loss == pytest.approx(nll / 2, abs=1e-5)
    # The sft gradient changes the update, so step 2 differs in its sigmoid part too.
    assert both.points[1][1]["rewards/margins"] != alone.points[1][1]["rewards/margins"]


def test_should_stop_saves_the_current_step(make_dpo_spec: Any, tmp_path: Path) -> None:
    result, sink, store = run(make_dpo_spec(batch_size=2), tmp_path, stop_after(2))

    assert (result.status, result.step, result.total_steps) == ("stopped", 2, 6)
    assert [(step, final) for step, _, _, final in store.saved] == [(2, False)]
    assert [step for step, _ in sink.points] == [1, 2]


def test_events_report_dropped_pairs(make_dpo_spec: Any, write_rows: Any, tmp_path: Path) -> None:
    rows = [
        {"prompt": "the cat sees a red apple " * 20, "chosen": " yes", "rejected": " no"},
        {"prompt": "Hi", "chosen": " there", "rejected": " you"},
    ]
    spec = make_dpo_spec(train_file=str(write_rows(rows)), max_seq_len=32)

    _, sink, _ = run(spec, tmp_path)

    assert [message for _, message, _ in sink.events] == [
        "Dropped 1 training pairs longer than 32 tokens: "
        "no completion token was left after truncation"
    ]
