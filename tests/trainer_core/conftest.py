"""Shared fixtures and helpers: one tiny model per session (built offline), spec and data
factories, an in-process run, and a hold on the model a method trains.

Importable as ``tests.trainer_core.conftest`` (the folder is a package), so that the helpers
that are not fixtures have one copy too."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel

import trainer_core
from tests.trainer_core.hyperparameters import COMMON
from trainer_core.seams import FolderCheckpointStore, ListSink, RunResult, ShouldStop
from trainer_core.specs import AdapterSpec, SupervisedHyperparameters, TrainSpec
from trainer_core.tiny_models import _SUBJECTS, create_tiny_model

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


# For the online methods (grpo, rloo): a reward that is dense and learnable by a random model,
# 1 / (1 + |chars − 8| / 8). Sixteen random tokens decode to ~40 characters, so the reward
# starts near 0.2; a policy that emits EOS early or picks short tokens scores up to 1.
LENGTH_REWARD = {"type": "length", "name": "short", "target": 8, "unit": "chars"}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight chat prompts for the online methods."""
    rows = [
        {"messages": [{"role": "user", "content": f"Say something about number {i}."}]}
        for i in range(8)
    ]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


MakeSpec = Callable[..., TrainSpec]


def method_spec(
    method: str,
    model: Path,
    train_file: Path,
    hyperparameters: type[BaseModel],
    hp: dict[str, Any],
    /,
    **overrides: Any,
) -> TrainSpec:
    """A spec of ``method`` for a run on a tiny model: seed 0, max_seq_len 64, one thread,
    ``hyperparameters(**hp)``. Keyword arguments override: a hyperparameter by its name,
    ``adapter`` as a dict, any other TrainSpec field (``train_file`` included) as itself."""
    hp = dict(hp)
    for name in list(overrides):
        if name in hyperparameters.model_fields:
            hp[name] = overrides.pop(name)
    if isinstance(overrides.get("adapter"), dict):
        overrides["adapter"] = AdapterSpec(**overrides["adapter"])
    fields: dict[str, Any] = {
        "method": method,
        "model": str(model),
        "train_file": str(train_file),
        "seed": 0,
        "max_seq_len": 64,
        "num_threads": 1,
        "hyperparameters": hyperparameters(**hp),
    }
    return TrainSpec(**(fields | overrides))


@pytest.fixture
def make_spec(tiny_model: Path, facts_file: Path) -> MakeSpec:
    """A supervised TrainSpec on the tiny model and the facts file (max_seq_len 128); keyword
    arguments override fields (``adapter`` as a dict, hyperparameters by name)."""

    def make(**overrides: Any) -> TrainSpec:
        return method_spec(
            "supervised",
            tiny_model,
            facts_file,
            SupervisedHyperparameters,
            COMMON,
            **({"max_seq_len": 128} | overrides),
        )

    return make


def run(
    spec: TrainSpec, root: Path, should_stop: ShouldStop | None = None
) -> tuple[RunResult, ListSink, FolderCheckpointStore]:
    """``spec`` run in this process; its result, its sink and its checkpoints (under root)."""
    sink, store = ListSink(), FolderCheckpointStore(root)
    result = trainer_core.run(spec, sink, store, should_stop)
    return result, sink, store


def stop_after(steps: int) -> ShouldStop:
    """A should_stop that lets ``steps`` steps run and stops the run before the next one (it
    is asked once before every step)."""
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > steps

    return should_stop


KeepModel = Callable[[ModuleType], dict[str, Any]]


@pytest.fixture
def keep_model(monkeypatch: pytest.MonkeyPatch) -> KeepModel:
    """``trained = keep_model(module)``: from then on, each checkpoint saved through
    ``module.save_checkpoint`` (``trainer_core.loop``, through which every method saves)
    also leaves the in-memory model it saved in ``trained["model"]``, to compare with the
    base and with what a reload gives."""

    def keep(module: ModuleType) -> dict[str, Any]:
        trained: dict[str, Any] = {}
        real_save = module.save_checkpoint

        def keep_and_save(store: Any, **kwargs: Any) -> None:
            trained["model"] = kwargs["model"]
            real_save(store, **kwargs)

        monkeypatch.setattr(module, "save_checkpoint", keep_and_save)
        return trained

    return keep


# A preference rule the tiny model can learn, for the paired methods (reward_model, kto, orpo,
# simpo): the chosen answer agrees, the rejected one refuses.
OBJECTS = ["apples", "music", "the rain", "old books", "cold tea"]


def yes_rows(subjects: list[str], objects: list[str]) -> list[dict[str, Any]]:
    """The learnable rule: the chosen answer agrees ("Yes, … likes …"), the rejected refuses.
    KTO reads each pair as a desirable and an undesirable row."""
    return [
        {
            "prompt": f"Does {s} like {o}?",
            "chosen": f" Yes, {s} likes {o}.",
            "rejected": f" No, {s} hates {o}.",
        }
        for s in subjects
        for o in objects
    ]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """36 training pairs; 12 held-out pairs whose subjects and objects training never saw."""
    folder = tmp_path_factory.mktemp("pairs")
    train = write_jsonl(folder / "train.jsonl", yes_rows(_SUBJECTS[:12], OBJECTS[:3]))
    valid = write_jsonl(folder / "valid.jsonl", yes_rows(_SUBJECTS[12:], OBJECTS[3:]))
    return train, valid


@pytest.fixture
def write_rows(tmp_path: Path) -> Callable[..., Path]:
    """Write rows as JSONL into the test's tmp folder and return the path."""

    def write(rows: Iterable[dict[str, Any]], name: str = "rows.jsonl") -> Path:
        return write_jsonl(tmp_path / name, rows)

    return write
