"""Reward-model runs on the tiny model: it learns a rule, LoRA trains the adapter and the head
only and reloads exactly, accumulation is exact, pooling reads the last real token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tests.trainer_core.conftest import OBJECTS, KeepModel, method_spec, run, stop_after, yes_rows
from tests.trainer_core.hyperparameters import COMMON
from trainer_core import loop
from trainer_core.methods import reward_model
from trainer_core.preference_data import collate_pairs, load_preference
from trainer_core.reward_models import RewardModel, load_reward_base, score
from trainer_core.specs import RewardModelHyperparameters, TrainSpec
from trainer_core.tiny_models import _SUBJECTS

METRIC_KEYS = {
    "train_loss",
    "accuracy",
    "margin",
    "mean_reward",
    "min_reward",
    "max_reward",
    "learning_rate",
    "grad_norm",
    "num_tokens",
    "epoch",
}


def make_spec(model: Path, train_file: Path, **overrides: Any) -> TrainSpec:
    hp = {**COMMON, "batch_size": 8, "center_rewards_coefficient": 0.0}
    return method_spec(
        "reward_model", model, train_file, RewardModelHyperparameters, hp, **overrides
    )


def held_out(tokenizer: Any, valid: Path) -> Any:
    examples = load_preference(valid, tokenizer, 64).examples
    return collate_pairs(examples, tokenizer.pad_token_id)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
def test_lora_reward_model_learns_the_rule_and_reloads_exactly(
    tiny_model: Path,
    tokenizer: Any,
    pair_files: tuple[Path, Path],
    tmp_path: Path,
    keep_model: KeepModel,
) -> None:
    trained = keep_model(loop)  # the in-memory model, for comparison below
    train, valid = pair_files
    # 36 pairs in batches of 8: 5 steps an epoch, 3 epochs, a checkpoint every 5 steps.
    spec = make_spec(
        tiny_model,
        train,
        adapter={"type": "lora", "r": 4, "alpha": 8},
        n_epochs=3,
        checkpoint_every=5,
        validation_file=str(valid),
    )

    result, sink, store = run(spec, tmp_path)

    # The run: exactly the documented keys at every step, epoch running to n_epochs.
    assert (result.status, result.step, result.total_steps) == ("completed", 15, 15)
    assert [step for step, _ in sink.points] == list(range(1, 16))
    assert all(values.keys() == METRIC_KEYS for _, values in sink.points)
    assert sink.points[-1][1]["epoch"] == 3.0
    assert [(step, final) for step, _, _, final in store.saved] == [
        (5, False),
        (10, False),
        (15, True),
    ]
    # It learns: held-out pairs (unseen subjects and objects) ranked right at the end, well
    # above the 0.5 of chance, and the loss far below log 2 = 0.693 of a blind model.
    final_metrics = store.saved[-1][2]
    assert final_metrics.keys() == {
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        "valid_accuracy",
    }
    assert result.final_metrics == final_metrics
    assert final_metrics["valid_accuracy"] >= 0.9
    assert final_metrics["valid_loss"] < 0.2
    assert sink.points[-1][1]["accuracy"] == 1.0

    model = trained["model"].eval()
    # Base weights are bit-identical to the files they came from (the LM head is unused).
    base_file = load_file(tiny_model / "model.safetensors")
    base_now = {
        name.replace(".base_layer", ""): p
        for name, p in model.get_base_model().named_parameters()
        if "lora_" not in name and "score" not in name
    }
    assert base_now.keys() == base_file.keys() - {"lm_head.weight"}
    for name, weight in base_now.items():
        assert torch.equal(weight, base_file[name]), name

    # The adapter moved, and the head was trained whole (the random head it started from is
    # kept by peft beside the trained copy).
    final_dir = store.saved[-1][1] / "adapter"
    final = load_file(final_dir / "adapter_model.safetensors")
    step5 = load_file(store.saved[0][1] / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in final
    for name, weight in final.items():
        if "lora_B" in name:
            assert weight.abs().sum() > 0, name
        else:
            assert not torch.equal(weight, step5[name]), name
    head = model.get_base_model().score
    assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)

    # The folder loads as PEFT documents it and reproduces the rewards of the trained model.
    batch = held_out(tokenizer, valid)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    reloaded = PeftModel.from_pretrained(base, str(final_dir)).eval()
    with torch.no_grad():
        expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    # score() reads the same tokens as training did and ranks the held-out pairs right.
    rows = yes_rows(_SUBJECTS[12:], OBJECTS[3:])
    texts = [r["prompt"] + r[side] for side in ("chosen", "rejected") for r in rows]
    rewards = torch.tensor(score(str(tiny_model), final_dir, texts))
    torch.testing.assert_close(rewards, expected.squeeze(-1), atol=1e-5, rtol=0)
    chosen, rejected = rewards.chunk(2)
    assert (chosen > rejected).float().mean() >= 0.9
    # evaluate() on the downloaded folder reproduces the final checkpoint's numbers.
    evaluated = reward_model.evaluate(str(tiny_model), final_dir, str(valid), max_seq_len=64)
    assert evaluated == pytest.approx(
        {k: final_metrics[k] for k in ("valid_loss", "valid_accuracy")}, abs=1e-5
    )


def test_full_fine_tuning_saves_a_reward_model(
    tiny_model: Path, tokenizer: Any, pair_files: tuple[Path, Path], tmp_path: Path
) -> None:
    train, valid = pair_files
    _, sink, store = run(make_spec(tiny_model, train, adapter={"type": "full"}), tmp_path)

    folder = store.saved[-1][1] / "adapter"
    assert not (folder / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    base = load_file(tiny_model / "model.safetensors")
    assert not torch.equal(model.model.embed_tokens.weight, base["model.embed_tokens.weight"])
    batch = held_out(tokenizer, valid)
    with torch.no_grad():
        expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rewards = RewardModel.load(str(tiny_model), folder).score(batch.input_ids[:1].tolist())
    assert rewards.item() == pytest.approx(expected[0].item(), abs=1e-5)
    assert len(sink.points) == 5


def test_gradient_accumulation_4x1_equals_1x4(
    tiny_model: Path, pair_files: tuple[Path, Path], write_rows: Any, tmp_path: Path
) -> None:
    # Full fine-tuning, 10 pairs → optimizer steps of 4, 4 and 2 pairs either way, over the
    # same pairs per step. A small learning rate keeps Adam's near-sign first step from
    # amplifying float noise in tiny gradients. Adam undoes a constant scale of the gradient,
    # so the uneven last step is what makes a per-micro-batch mean show (it scales the steps
    # by 4, 4 and 2): it moves weights by ~lr = 1e-4, far above 1e-5.
    rows = [
        {"prompt": f"Does {s} like tea?", "chosen": " Yes!", "rejected": f" No, {s} does not."}
        for s in _SUBJECTS[:10]
    ]
    train = write_rows(rows)
    common = {"adapter": {"type": "full"}, "learning_rate": 1e-4, "max_grad_norm": 1e6}
    _, big_sink, big = run(
        make_spec(tiny_model, train, batch_size=4, gradient_accumulation_steps=1, **common),
        tmp_path / "a",
    )
    _, acc_sink, acc = run(
        make_spec(tiny_model, train, batch_size=1, gradient_accumulation_steps=4, **common),
        tmp_path / "b",
    )

    big_weights = load_file(big.saved[-1][1] / "adapter" / "model.safetensors")
    acc_weights = load_file(acc.saved[-1][1] / "adapter" / "model.safetensors")
    assert big_weights.keys() == acc_weights.keys()
    for name, weight in big_weights.items():
        torch.testing.assert_close(acc_weights[name], weight, atol=1e-5, rtol=0, msg=name)
    assert len(big_sink.points) == len(acc_sink.points) == 3
    for (_, a), (_, b) in zip(big_sink.points, acc_sink.points, strict=True):
        for key in ("train_loss", "accuracy", "margin", "mean_reward", "min_reward"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert a["num_tokens"] == b["num_tokens"]


def test_pad_token_id_goes_on_the_config(tiny_model: Path, tokenizer: Any, tmp_path: Path) -> None:
    # A base whose config names no pad token (as Llama's): without the tokenizer's pad id on
    # the config, transformers refuses padded batches, or (TRL #2758) pools the wrong token.
    model_dir = tmp_path / "no-pad"
    shutil.copytree(tiny_model, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    del config["pad_token_id"]
    (model_dir / "config.json").write_text(json.dumps(config))

    torch.manual_seed(0)
    model = load_reward_base(str(model_dir), pad_token_id=tokenizer.pad_token_id)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    scorer = RewardModel(model, tokenizer)
    short, long = "Does the cat like tea? Yes.", "Does the old man like music? No, he does not."
    # Alone the short row has no padding; beside the long one it is padded on the right. The
    # reward is read at its last real token either way.
    alone = scorer.score([short])
    together = scorer.score([short, long])
    assert together[0].item() == pytest.approx(alone.item(), abs=1e-5)
    assert together[0].item() != pytest.approx(together[1].item(), abs=1e-3)
    # Conversations go through the chat template, token ids as they are.
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert scorer.token_ids(chat) == list(ids)
    assert scorer.score([chat]).item() == pytest.approx(scorer.score([ids]).item(), abs=1e-6)


def test_margin_and_centering_reach_the_loss(
    tiny_model: Path, write_rows: Any, tmp_path: Path
) -> None:
    # One step on the same pairs and the same fresh head: a margin of 5 on every pair adds to
    # every logit's deficit, so the step-1 loss grows; centring adds c·mean((r_c + r_r)²) ≥ 0.
    rows = yes_rows(_SUBJECTS[:4], OBJECTS[:2])
    plain = run(make_spec(tiny_model, write_rows(rows, "a.jsonl")), tmp_path / "a")[1]
    with_margin = [r | {"margin": 5.0} for r in rows]
    margin = run(make_spec(tiny_model, write_rows(with_margin, "b.jsonl")), tmp_path / "b")[1]
    centred = run(
        make_spec(tiny_model, write_rows(rows, "c.jsonl"), center_rewards_coefficient=10.0),
        tmp_path / "c",
    )[1]

    first = {name: sink.points[0][1] for name, sink in (("plain", plain), ("margin", margin))}
    first["centred"] = centred.points[0][1]
    # Same model, same rewards: only the loss differs.
    assert first["margin"]["mean_reward"] == first["plain"]["mean_reward"]
    assert first["margin"]["train_loss"] > first["plain"]["train_loss"] + 3
    mean = first["plain"]["mean_reward"]
    assert first["centred"]["train_loss"] >= first["plain"]["train_loss"] + 10 * (2 * mean) ** 2


def test_should_stop_saves_the_current_step(
    tiny_model: Path, pair_files: tuple[Path, Path], tmp_path: Path
) -> None:
    train, _ = pair_files
    spec = make_spec(tiny_model, train, checkpoint_every=2)

    result, sink, store = run(spec, tmp_path, stop_after(2))

    assert (result.status, result.step, result.total_steps) == ("stopped", 2, 5)
    assert [(step, final) for step, _, _, final in store.saved] == [(2, False)]
    assert [step for step, _ in sink.points] == [1, 2]
    assert result.trained_tokens == sink.points[-1][1]["num_tokens"] > 0
