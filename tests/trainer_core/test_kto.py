"""KTO runs on the tiny model: it starts at the reference, learns the rule, keeps the base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import trainer_core
from tests.trainer_core.conftest import KeepModel, method_spec, run
from tests.trainer_core.hyperparameters import COMMON
from trainer_core import loop
from trainer_core.methods.kto import collate_with_mismatched
from trainer_core.preference_data import UnpairedExample
from trainer_core.seams import FolderCheckpointStore, ListSink
from trainer_core.specs import KtoHyperparameters, TrainSpec

METRIC_KEYS = {
    "train_loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "learning_rate",
    "grad_norm",
    "num_tokens",
    "epoch",
}


def make_spec(model: Path, train_file: Path, **overrides: Any) -> TrainSpec:
    hp = {
        **COMMON,
        "batch_size": 8,
        "beta": 0.1,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
    }
    return method_spec("kto", model, train_file, KtoHyperparameters, hp, **overrides)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
def test_lora_kto_learns_the_rule_and_keeps_the_base(
    tiny_model: Path, pair_files: tuple[Path, Path], tmp_path: Path, keep_model: KeepModel
) -> None:
    trained = keep_model(loop)
    train, valid = pair_files
    # 72 rows in batches of 8: 9 steps an epoch, 2 epochs.
    spec = make_spec(
        tiny_model,
        train,
        adapter={"type": "lora", "r": 4, "alpha": 8},
        n_epochs=2,
        checkpoint_every=9,
        validation_file=str(valid),
    )

    result, sink, store = run(spec, tmp_path)

    assert (result.status, result.step) == ("completed", 18)
    assert all(values.keys() == METRIC_KEYS for _, values in sink.points)
    # Step 1: the policy is the reference (LoRA's B is 0, dropout is off), so Δ = z = 0 and
    # every row's loss is 1 − σ(0) = 0.5.
    first = sink.points[0][1]
    assert (first["train_loss"], first["kl"], first["rewards/chosen"]) == (0.5, 0.0, 0.0)
    # It learns: on held-out rows the implicit reward β·Δ rises on the desirable and falls on
    # the undesirable completions, and the loss drops from 0.5.
    final = store.saved[-1][2]
    assert final["valid_rewards/chosen"] > 0.5 and final["valid_rewards/rejected"] < -0.3
    assert final["valid_loss"] < 0.4
    assert {"valid_kl", "valid_logps/chosen", "valid_logps/rejected"} <= final.keys()
    assert sink.points[-1][1]["train_loss"] < 0.4

    # The reference was the base: its weights are bit-identical, the adapter moved.
    model = trained["model"]
    base_file = load_file(tiny_model / "model.safetensors")
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_file[name.replace(".base_layer", "")]), name
    adapter = load_file(store.saved[-1][1] / "adapter" / "adapter_model.safetensors")
    assert all(w.abs().sum() > 0 for name, w in adapter.items() if "lora_B" in name)


def test_full_kto_learns_against_a_frozen_copy(
    tiny_model: Path, pair_files: tuple[Path, Path], tmp_path: Path
) -> None:
    # Were the reference the live model, Δ would stay 0 and the loss 0.5 at every step.
    train, _ = pair_files
    spec = make_spec(tiny_model, train, adapter={"type": "full"}, learning_rate=1e-3)

    _, sink, store = run(spec, tmp_path)

    losses = [values["train_loss"] for _, values in sink.points]
    assert len(losses) == 9 and losses[0] == 0.5
    assert losses[-1] < 0.4
    folder = store.saved[-1][1] / "adapter"
    model = AutoModelForCausalLM.from_pretrained(folder)
    base = load_file(tiny_model / "model.safetensors")
    assert not torch.equal(model.lm_head.weight, base["lm_head.weight"])


def test_batch_size_one_is_refused(tiny_model: Path, pair_files: tuple[Path, Path]) -> None:
    spec = make_spec(tiny_model, pair_files[0], batch_size=1)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        trainer_core.run(spec, ListSink(), FolderCheckpointStore(Path("/nonexistent")), None)


def test_mismatched_rows_rotate_completions_by_one() -> None:
    # Rows (prompt, completion): a→A, b→B, c→C, d→D. The batch [0, 1, 2] pairs each prompt
    # with the previous row's completion, the first with the last's: a→C, b→A, c→B (TRL).
    examples = [
        UnpairedExample([1, p], [10 + p, 20 + p, 30 + p], label=p % 2 == 0, line=p)
        for p in range(4)
    ]
    batch, kl_batch = collate_with_mismatched(examples, [0, 1, 2], max_seq_len=64, pad=0)
    assert batch.input_ids.tolist() == [[1, 0, 10, 20, 30], [1, 1, 11, 21, 31], [1, 2, 12, 22, 32]]
    assert kl_batch.input_ids.tolist() == [
        [1, 0, 12, 22, 32],
        [1, 1, 10, 20, 30],
        [1, 2, 11, 21, 31],
    ]
    assert kl_batch.completion_mask.tolist() == batch.completion_mask.tolist()
    # A lone row (an epoch's last micro-batch) borrows the next example's completion, cut to
    # max_seq_len = 4 with its 2 prompt tokens: d→A[:2].
    _, lone = collate_with_mismatched(examples, [3], max_seq_len=4, pad=0)
    assert lone.input_ids.tolist() == [[1, 3, 10, 20]]
