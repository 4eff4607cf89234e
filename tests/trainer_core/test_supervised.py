"""Real SFT runs on the tiny model: invariances, learning, adapters, checkpoints, stopping."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trainer_core.conftest import KeepModel, run, stop_after
from trainer_core import loop
from trainer_core.__main__ import main
from trainer_core.adapters import apply_adapter, load_trained
from trainer_core.checkpoint import load_state
from trainer_core.methods import supervised
from trainer_core.models import load_model
from trainer_core.optim import build_optimizer, build_scheduler
from trainer_core.seams import FolderCheckpointStore
from trainer_core.supervised_data import load_supervised

METRIC_KEYS = {
    "train_loss",
    "train_mean_token_accuracy",
    "num_tokens",
    "learning_rate",
    "grad_norm",
    "epoch",
}


def test_gradient_accumulation_4x1_equals_1x4(make_spec: Any, tmp_path: Path) -> None:
    # Full fine-tuning, 8 rows → 2 optimizer steps either way, over the same rows per step.
    # A small learning rate keeps Adam's near-sign first step from amplifying float noise
    # in tiny gradients; a wrong normaliser moves weights by ~lr = 1e-4, far above 1e-5.
    common = {"adapter": {"type": "full"}, "learning_rate": 1e-4, "max_grad_norm": 1e6}
    _, big_sink, big = run(
        make_spec(batch_size=4, gradient_accumulation_steps=1, **common), tmp_path / "a"
    )
    _, acc_sink, acc = run(
        make_spec(batch_size=1, gradient_accumulation_steps=4, **common), tmp_path / "b"
    )

    big_weights = load_file(big.saved[-1][1] / "adapter" / "model.safetensors")
    acc_weights = load_file(acc.saved[-1][1] / "adapter" / "model.safetensors")
    assert big_weights.keys() == acc_weights.keys()
    for name, weight in big_weights.items():
        torch.testing.assert_close(acc_weights[name], weight, atol=1e-5, rtol=0, msg=name)
    # The reported step losses agree too.
    for (_, a), (_, b) in zip(big_sink.points, acc_sink.points, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["num_tokens"] == b["num_tokens"]


def test_training_learns_the_facts(
    make_spec: Any, tokenizer: Any, facts_file: Path, tmp_path: Path
) -> None:
    # 8 rows of 4 fixed question → answer facts, 15 epochs of 2 steps.
    spec = make_spec(adapter={"type": "full"}, n_epochs=15, checkpoint_every=1000)

    result, sink, store = run(spec, tmp_path)

    losses = [values["train_loss"] for _, values in sink.points]
    # Untrained: about log(vocab) = log 512 ≈ 6.24 nats per token.
    assert losses[0] == pytest.approx(math.log(512), abs=0.3)
    assert losses[-1] < 1.5
    assert sink.points[-1][1]["train_mean_token_accuracy"] > 0.5
    assert result.status == "completed"
    assert (result.step, result.total_steps, sink.total_steps) == (30, 30, 30)
    # trained_tokens: every non-padding token, prompt and completion, of every epoch.
    rows = load_supervised(facts_file, tokenizer, spec.max_seq_len).examples
    assert result.trained_tokens == 15 * sum(len(e.input_ids) for e in rows)
    # Exactly the documented keys; num_tokens is cumulative; epoch runs to n_epochs.
    assert all(values.keys() == METRIC_KEYS for _, values in sink.points)
    assert [step for step, _ in sink.points] == list(range(1, 31))
    tokens = [values["num_tokens"] for _, values in sink.points]
    assert tokens == sorted(tokens) and tokens[1] > tokens[0]
    assert sink.points[-1][1]["epoch"] == 15.0
    # checkpoint_every=1000 > total steps: only the final checkpoint.
    assert [(step, final) for step, _, _, final in store.saved] == [(30, True)]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
def test_lora_moves_the_adapter_only_and_reloads_exactly(
    make_spec: Any, tiny_model: Path, facts_file: Path, tmp_path: Path, keep_model: KeepModel
) -> None:
    trained = keep_model(loop)  # the in-memory model, for comparison below
    spec = make_spec(
        adapter={"type": "lora", "r": 4, "alpha": 8},
        n_epochs=2,
        checkpoint_every=1,
        validation_file=str(facts_file),
    )

    result, _, store = run(spec, tmp_path)

    model = trained["model"].eval()
    final_dir = store.saved[-1][1] / "adapter"
    assert store.saved[-1][3] is True and (final_dir / "adapter_config.json").is_file()

    # Base weights are bit-identical to the files they came from.
    base_file = load_file(tiny_model / "model.safetensors")
    base_now = {
        name.replace(".base_layer", ""): p
        for name, p in model.get_base_model().named_parameters()
        if "lora_" not in name
    }
    assert base_now.keys() == base_file.keys()
    for name, weight in base_file.items():
        assert torch.equal(base_now[name], weight), name

    # Every adapter matrix moved: B starts at zero; A gets no gradient until B is non-zero,
    # so it is compared with the step-1 checkpoint.
    final = load_file(final_dir / "adapter_model.safetensors")
    step1 = load_file(store.saved[0][1] / "adapter" / "adapter_model.safetensors")
    assert store.saved[0][0] == 1
    assert final and all(name.startswith("base_model.model.") for name in final)
    for name, weight in final.items():
        if "lora_B" in name:
            assert weight.abs().sum() > 0, name
        else:
            assert not torch.equal(weight, step1[name]), name

    # The saved adapter on a freshly loaded base gives the trained model's logits.
    reloaded = PeftModel.from_pretrained(load_model(str(tiny_model)), str(final_dir)).eval()
    assert isinstance(load_trained(str(tiny_model), final_dir), PeftModel)
    input_ids = torch.tensor([[1, 40, 41, 42, 2, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=input_ids).logits,
            model(input_ids=input_ids).logits,
            atol=1e-5,
            rtol=0,
        )

    # evaluate() on the downloaded adapter reproduces the final checkpoint's valid_loss.
    final_metrics = store.saved[-1][2]
    assert final_metrics.keys() == {
        "step",
        "train_loss",
        "train_mean_token_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
    }
    assert result.final_metrics == final_metrics
    evaluated = supervised.evaluate(
        str(tiny_model), str(final_dir), str(facts_file), max_seq_len=128
    )
    assert evaluated["valid_loss"] == pytest.approx(final_metrics["valid_loss"], abs=1e-5)
    assert evaluated["valid_mean_token_accuracy"] == pytest.approx(
        final_metrics["valid_mean_token_accuracy"], abs=1e-9
    )
    base_only = supervised.evaluate(str(tiny_model), None, str(facts_file), max_seq_len=128)
    assert base_only["valid_loss"] > evaluated["valid_loss"]


def test_full_fine_tuning_saves_a_loadable_model(
    make_spec: Any, tiny_model: Path, tmp_path: Path
) -> None:
    _, _, store = run(make_spec(adapter={"type": "full"}), tmp_path)

    folder = store.saved[-1][1] / "adapter"
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    base = load_file(tiny_model / "model.safetensors")
    assert not torch.equal(model.model.embed_tokens.weight, base["model.embed_tokens.weight"])
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    assert not (folder / "adapter_config.json").exists()


def test_same_seed_same_metrics(make_spec: Any, tmp_path: Path) -> None:
    # LoRA dropout and shuffling both draw on the seeded RNGs.
    spec = make_spec(adapter={"dropout": 0.1}, n_epochs=2, batch_size=3)

    _, first, _ = run(spec, tmp_path / "a")
    _, second, _ = run(spec, tmp_path / "b")
    _, other_seed, _ = run(spec.model_copy(update={"seed": 1}), tmp_path / "c")

    assert len(first.points) == 6
    assert first.points == second.points
    assert first.points != other_seed.points


@pytest.mark.parametrize("checkpoint_every", [None, 2])
def test_should_stop_saves_the_current_step(
    make_spec: Any, tmp_path: Path, checkpoint_every: int | None
) -> None:
    spec = make_spec(batch_size=1, n_epochs=2, checkpoint_every=checkpoint_every)

    result, sink, store = run(spec, tmp_path, stop_after(2))

    assert (result.status, result.step, result.total_steps) == ("stopped", 2, 16)
    # One checkpoint at step 2, not final; with checkpoint_every=2 it is not saved twice.
    assert [(step, final) for step, _, _, final in store.saved] == [(2, False)]
    assert [step for step, _ in sink.points] == [1, 2]
    state = load_state(store.saved[0][1] / "state")
    assert (state.trainer.step, state.trainer.epoch, state.trainer.steps_in_epoch) == (2, 0, 2)
    assert state.trainer.trained_tokens == result.trained_tokens > 0
    # Resuming is possible: the state loads into a fresh optimizer and scheduler of the model.
    model = apply_adapter(load_model(spec.model), spec.adapter)
    optimizer = build_optimizer(model, learning_rate=1.0, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, kind="constant", total_steps=16, warmup_ratio=0.0)
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    assert scheduler.last_epoch == 2
    assert optimizer.param_groups[0]["lr"] == spec.hyperparameters.learning_rate
    assert all(s["step"] == 2 for s in optimizer.state.values())


def test_events_report_dropped_rows(make_spec: Any, write_rows: Any, tmp_path: Path) -> None:
    rows = [
        {"prompt": "the cat sees a red apple " * 20, "completion": " yes"},
        {"prompt": "Hi", "completion": " there"},
    ]
    spec = make_spec(train_file=str(write_rows(rows)), max_seq_len=32)

    _, sink, _ = run(spec, tmp_path)

    assert [message for _, message, _ in sink.events] == [
        "Dropped 1 training examples longer than 32 tokens: "
        "no completion token was left after truncation"
    ]


def test_cli_runs_a_spec_and_builds_a_tiny_model(
    make_spec: Any, tmp_path: Path, capsys: Any
) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(make_spec().model_dump_json())

    assert main(["run", str(spec_file), "--output", str(tmp_path / "out")]) == 0

    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["step"] == 2
    assert (tmp_path / "out" / "final" / "adapter" / "adapter_config.json").is_file()
    assert main(["create-tiny", str(tmp_path / "m"), "--seed", "1"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_packing_trains_like_separate_rows(make_spec: Any, tmp_path: Path) -> None:
    # The 8 fact rows (~40 tokens) fit 3 packed rows of 128: one step of batch 3 packed rows
    # against one step of batch 8 single rows, over the same 8 examples.
    common = {"adapter": {"type": "full"}, "learning_rate": 1e-4, "max_grad_norm": 1e6}
    _, plain_sink, plain = run(make_spec(batch_size=8, **common), tmp_path / "a")
    _, packed_sink, packed = run(make_spec(batch_size=3, packing=True, **common), tmp_path / "b")

    assert [message for _, message, _ in packed_sink.events] == [
        "Packed 8 training examples into 3 rows of up to 128 tokens"
    ]
    assert len(plain_sink.points) == len(packed_sink.points) == 1
    (_, a), (_, b) = plain_sink.points[0], packed_sink.points[0]
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
    assert (b["num_tokens"], b["train_mean_token_accuracy"]) == (
        a["num_tokens"],
        a["train_mean_token_accuracy"],
    )
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    plain_weights = load_file(plain.saved[-1][1] / "adapter" / "model.safetensors")
    packed_weights = load_file(packed.saved[-1][1] / "adapter" / "model.safetensors")
    for name, weight in plain_weights.items():
        torch.testing.assert_close(packed_weights[name], weight, atol=1e-5, rtol=0, msg=name)


def test_assistant_only_loss_off_trains_every_token(
    make_spec: Any, tokenizer: Any, facts_file: Path, tmp_path: Path
) -> None:
    rows = load_supervised(facts_file, tokenizer, 128).examples

    _, only_sink, only = run(make_spec(batch_size=8), tmp_path / "a")
    _, every_sink, every = run(make_spec(batch_size=8, assistant_only_loss=False), tmp_path / "b")

    def loss_tokens(store: FolderCheckpointStore) -> int:
        return load_state(store.saved[-1][1] / "state").trainer.num_tokens

    # Position 0 of a row is never a target: nothing predicts it.
    assert loss_tokens(only) == sum(sum(e.completion_mask[1:]) for e in rows)
    assert loss_tokens(every) == sum(len(e.input_ids) - 1 for e in rows)
    # The num_tokens metric counts every non-padding token (TRL's), trained on or not.
    assert only_sink.points[0][1]["num_tokens"] == every_sink.points[0][1]["num_tokens"]
    assert every_sink.points[0][1]["num_tokens"] == sum(len(e.input_ids) for e in rows)
    # Headers and questions are harder to guess than answers the model has seen: the loss moves.
    assert every_sink.points[0][1]["train_loss"] != only_sink.points[0][1]["train_loss"]
