"""Shared fixtures: one tiny model per session (built offline) and spec/data factories."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.trainer_core.hyperparameters import COMMON
from trainer_core.specs import AdapterSpec, SupervisedHyperparameters, TrainSpec
from trainer_core.tiny_models import create_tiny_model

# A task the tiny model can learn in a few dozen steps: fixed answers to fixed questions.
FACTS = [
    ("What colour is the sky?", "The sky is blue."),
    ("What is 2 + 2?", "2 + 2 = 4."),
    ("Say hello in Spanish.", "Hello in Spanish is hola."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path) -> Any:
    from trainer_core.models import load_tokenizer

    return load_tokenizer(str(tiny_model))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fact_rows(repeat: int = 2) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }
        for _ in range(repeat)
        for question, answer in FACTS
    ]


@pytest.fixture(scope="session")
def facts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "facts.jsonl", fact_rows())


MakeSpec = Callable[..., TrainSpec]


@pytest.fixture
def make_spec(tiny_model: Path, facts_file: Path) -> MakeSpec:
    """A TrainSpec on the tiny model and the facts file; keyword arguments override fields
    (``adapter`` as a dict, hyperparameters by name)."""

    def make(**overrides: Any) -> TrainSpec:
        hp: dict[str, Any] = {
            **COMMON,
        }
        for name in list(overrides):
            if name in SupervisedHyperparameters.model_fields:
                hp[name] = overrides.pop(name)
        fields: dict[str, Any] = {
            "model": str(tiny_model),
            "train_file": str(facts_file),
            "seed": 0,
            "max_seq_len": 128,
            "num_threads": 1,
            "hyperparameters": SupervisedHyperparameters(**hp),
        }
        if "adapter" in overrides:
            overrides["adapter"] = AdapterSpec(**overrides["adapter"])
        return TrainSpec(**(fields | overrides))

    return make


@pytest.fixture
def write_rows(tmp_path: Path) -> Callable[..., Path]:
    """Write rows as JSONL into the test's tmp folder and return the path."""

    def write(rows: Iterable[dict[str, Any]], name: str = "rows.jsonl") -> Path:
        return write_jsonl(tmp_path / name, rows)

    return write
