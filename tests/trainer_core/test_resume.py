"""Resume at step k equals the uninterrupted run, for every method.

A run stopped before step 5 saves a checkpoint at step 4 (mid-epoch); a new run resumed from
it must log exactly the metrics the uninterrupted run logged for steps 5 and 6: the weights,
optimizer, scheduler, RNG and data position all came back.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

import trainer_core
from trainer_core.seams import FolderCheckpointStore, ListSink
from trainer_core.specs import METHODS, AdapterSpec, TrainSpec, resolve_hyperparameters

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("resume-data")
    rng = random.Random(0)
    pairs, chats = [], []
    for _ in range(12):
        animal, wrong = rng.sample(ANIMALS, 2)
        pairs.append(
            {"prompt": f"I named a {animal}.", "chosen": f"A {animal}.", "rejected": f"A {wrong}."}
        )
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": f"Name a {animal}."},
                    {"role": "assistant", "content": f"A {animal}."},
                ]
            }
        )
    files = {"preference": folder / "pairs.jsonl", "chat": folder / "chat.jsonl"}
    files["preference"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
    files["chat"].write_text("".join(json.dumps(r) + "\n" for r in chats))
    return files


def spec_for(
    method: str, model: Path, data: dict[str, Path], adapter: str, resume_from: str | None = None
) -> TrainSpec:
    request = METHODS[method][0].model_validate(
        {
            "n_epochs": 2,
            "batch_size": 4,
            "learning_rate_multiplier": 20,
            "lr_scheduler": "linear",
            "warmup_ratio": 0.2,
        }
    )
    hp = resolve_hyperparameters(method, request, adapter_type=adapter, n_examples=12)
    return TrainSpec(
        method=method,  # type: ignore[arg-type]
        model=str(model),
        train_file=str(data["chat" if method == "supervised" else "preference"]),
        seed=3,
        max_seq_len=48,
        adapter=AdapterSpec(type=adapter, r=4, alpha=8, dropout=0.1),  # type: ignore[arg-type]
        hyperparameters=hp,
        num_threads=1,
        resume_from=resume_from,
    )


def run(
    spec: TrainSpec, root: Path, stop_before: int | None = None
) -> tuple[Any, ListSink, FolderCheckpointStore]:
    sink, store = ListSink(), FolderCheckpointStore(root)
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1  # called once before every optimizer step
        return stop_before is not None and calls == stop_before

    return trainer_core.run(spec, sink, store, should_stop), sink, store


@pytest.mark.parametrize(
    ("method", "adapter"),
    [
        ("supervised", "lora"),
        ("supervised", "full"),
        ("dpo", "lora"),
        ("dpo", "full"),
        ("reward_model", "lora"),
        ("kto", "lora"),
        ("orpo", "lora"),
        ("simpo", "lora"),
    ],
)
def test_resume_at_step_k_equals_the_uninterrupted_run(
    method: str, adapter: str, tiny_model: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    whole, whole_sink, _ = run(spec_for(method, tiny_model, data, adapter), tmp_path / "whole")
    # 12 rows in batches of 4 over 2 epochs: 6 steps (KTO unpairs each pair: 12 steps).
    assert whole.status == "completed" and whole.step in (6, 12)
    k = whole.step - 2  # in the middle of the second epoch

    stopped, _, _ = run(
        spec_for(method, tiny_model, data, adapter), tmp_path / "stopped", stop_before=k + 1
    )
    assert (stopped.status, stopped.step) == ("stopped", k)
    checkpoint = tmp_path / "stopped" / f"step-{k}"
    assert (checkpoint / "state" / "trainer_state.json").is_file()

    resumed, resumed_sink, _ = run(
        spec_for(method, tiny_model, data, adapter, str(checkpoint)), tmp_path / "resumed"
    )
    assert (resumed.status, resumed.step) == ("completed", whole.step)
    assert resumed.trained_tokens == whole.trained_tokens
    expected = {step: values for step, values in whole_sink.points if step > k}
    got = dict(resumed_sink.points)
    assert sorted(got) == [k + 1, k + 2]
    for step, values in expected.items():
        for key, value in values.items():
            assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)
