"""ORPO and SimPO runs on the tiny model: they learn the rule from below chance, keep the base
under LoRA, accumulate exactly, and ORPO's NLL covers what TRL's does."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.trainer_core.conftest import OBJECTS, KeepModel, method_spec, run, yes_rows
from tests.trainer_core.hyperparameters import COMMON
from trainer_core import loop
from trainer_core.logprobs import next_token_logps
from trainer_core.models import load_model
from trainer_core.preference_data import collate_pairs, load_preference
from trainer_core.specs import OrpoHyperparameters, SimpoHyperparameters, TrainSpec
from trainer_core.tiny_models import _SUBJECTS

PAIR_KEYS = {
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
METRIC_KEYS = {"orpo": PAIR_KEYS | {"nll_loss", "log_odds_ratio"}, "simpo": PAIR_KEYS}
HYPERPARAMETERS: dict[str, tuple[type[BaseModel], dict[str, Any]]] = {
    "orpo": (OrpoHyperparameters, {"beta": 0.1}),
    "simpo": (SimpoHyperparameters, {"beta": 2.0, "gamma": 0.5}),
}


def make_spec(method: str, model: Path, train_file: Path, **overrides: Any) -> TrainSpec:
    hp_cls, hp = HYPERPARAMETERS[method]
    hp = {**COMMON, "batch_size": 8, **hp}
    return method_spec(method, model, train_file, hp_cls, hp, **overrides)


@pytest.mark.parametrize("method", ["orpo", "simpo"])
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
def test_lora_learns_the_rule_and_keeps_the_base(
    method: str,
    tiny_model: Path,
    pair_files: tuple[Path, Path],
    tmp_path: Path,
    keep_model: KeepModel,
) -> None:
    trained = keep_model(loop)
    train, valid = pair_files
    # 36 pairs in batches of 8: 5 steps an epoch, 2 epochs.
    spec = make_spec(
        method,
        tiny_model,
        train,
        adapter={"type": "lora", "r": 4, "alpha": 8},
        n_epochs=2,
        validation_file=str(valid),
    )

    result, sink, store = run(spec, tmp_path)

    assert (result.status, result.step) == ("completed", 10)
    assert all(values.keys() == METRIC_KEYS[method] for _, values in sink.points)
    # The untrained model ranks the refusal higher (step 1's metrics are taken before its
    # update); ten steps later held-out pairs are ranked right and the loss has dropped.
    first, last = sink.points[0][1], sink.points[-1][1]
    assert first["rewards/accuracies"] <= 0.25
    assert last["rewards/accuracies"] == 1.0
    # The length-averaged log-prob gap (β-free, in nats per token) opened by 0.3 or more.
    gap = {
        k: v["logps/chosen"] - v["logps/rejected"] for k, v in (("first", first), ("last", last))
    }
    assert gap["last"] > gap["first"] + 0.3
    assert last["train_loss"] < first["train_loss"] - 0.5
    assert [(step, final) for step, _, _, final in store.saved] == [(5, False), (10, True)]
    final = store.saved[-1][2]
    assert final.keys() == {
        "step",
        "train_loss",
        "valid_loss",
        "valid_rewards/accuracies",
        "valid_rewards/margins",
    }
    assert final["valid_rewards/accuracies"] >= 0.9 and final["valid_rewards/margins"] > 0

    # No reference, but LoRA still leaves the base bit-identical; the adapter moved.
    model = trained["model"]
    base_file = load_file(tiny_model / "model.safetensors")
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_file[name.replace(".base_layer", "")]), name
    adapter = load_file(store.saved[-1][1] / "adapter" / "adapter_model.safetensors")
    assert all(w.abs().sum() > 0 for name, w in adapter.items() if "lora_B" in name)


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_full_fine_tuning_learns_and_saves_a_model(
    method: str, tiny_model: Path, pair_files: tuple[Path, Path], tmp_path: Path
) -> None:
    spec = make_spec(
        method, tiny_model, pair_files[0], adapter={"type": "full"}, n_epochs=2, learning_rate=1e-3
    )

    _, sink, store = run(spec, tmp_path)

    first, last = sink.points[0][1], sink.points[-1][1]
    assert last["train_loss"] < first["train_loss"]
    assert last["rewards/margins"] > first["rewards/margins"]
    model = AutoModelForCausalLM.from_pretrained(store.saved[-1][1] / "adapter")
    base = load_file(tiny_model / "model.safetensors")
    assert not torch.equal(model.lm_head.weight, base["lm_head.weight"])


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_gradient_accumulation_4x1_equals_1x4(
    method: str, tiny_model: Path, write_rows: Any, tmp_path: Path
) -> None:
    # 10 pairs of uneven lengths → steps of 4, 4 and 2 pairs either way. ORPO's NLL is a mean
    # over the step's chosen tokens and its odds ratio a mean over its pairs; a per-micro-batch
    # mean of either would move weights by ~lr = 1e-4 (see test_reward_model's version).
    rows = [
        {"prompt": f"Does {s} like tea?", "chosen": " Yes!", "rejected": f" No, {s} does not."}
        for s in _SUBJECTS[:10]
    ]
    train = write_rows(rows)
    common = {"adapter": {"type": "full"}, "learning_rate": 1e-4, "max_grad_norm": 1e6}
    _, big_sink, big = run(
        make_spec(method, tiny_model, train, batch_size=4, **common), tmp_path / "a"
    )
    _, acc_sink, acc = run(
        make_spec(method, tiny_model, train, batch_size=1, gradient_accumulation_steps=4, **common),
        tmp_path / "b",
    )

    big_weights = load_file(big.saved[-1][1] / "adapter" / "model.safetensors")
    acc_weights = load_file(acc.saved[-1][1] / "adapter" / "model.safetensors")
    for name, weight in big_weights.items():
        torch.testing.assert_close(acc_weights[name], weight, atol=1e-5, rtol=0, msg=name)
    assert len(big_sink.points) == len(acc_sink.points) == 3
    for (_, a), (_, b) in zip(big_sink.points, acc_sink.points, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)


def test_orpo_nll_covers_the_whole_chosen_sequence(
    tiny_model: Path, tokenizer: Any, write_rows: Any, tmp_path: Path
) -> None:
    """One step over 8 pairs: its nll_loss is the untrained model's mean −log p over every
    chosen-row token after the first, prompt included (TRL's labels), and log_odds_ratio the
    mean log σ of the log-odds difference of the length-averaged completion logps."""
    train = write_rows(yes_rows(_SUBJECTS[:4], OBJECTS[:2]))
    _, sink, _ = run(make_spec("orpo", tiny_model, train), tmp_path)

    batch = collate_pairs(load_preference(train, tokenizer, 64).examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = load_model(str(tiny_model))(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits
    per_token_logps = next_token_logps(logits, batch.input_ids)  # (16, T-1)
    chosen_tokens = batch.attention_mask[:8, 1:].bool()
    nll = -per_token_logps[:8][chosen_tokens].mean().item()
    completion = batch.completion_mask[:, 1:].bool()
    averaged = [per_token_logps[i][completion[i]].mean().item() for i in range(16)]

    def log_odds(p: float) -> float:
        return p - math.log(1 - math.exp(p))

    ratio = [
        -math.log1p(math.exp(-(log_odds(c) - log_odds(r))))
        for c, r in zip(averaged[:8], averaged[8:], strict=True)
    ]
    metrics = sink.points[0][1]
    assert metrics["nll_loss"] == pytest.approx(nll, abs=1e-5)
    assert metrics["log_odds_ratio"] == pytest.approx(sum(ratio) / 8, abs=1e-5)
    assert metrics["train_loss"] == pytest.approx(nll - 0.1 * sum(ratio) / 8, abs=1e-5)
    # The completion-only NLL would be a different number.
    completion_nll = -per_token_logps[:8][completion[:8]].mean().item()
    assert abs(completion_nll - nll) > 0.01
