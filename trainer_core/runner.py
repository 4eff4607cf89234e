"""Runs a spec by handing it to its method; the one place that maps method names to code.

Each method is ``trainer_core.methods.<name>.train`` and is imported only when a spec names
it, so a broken or heavy method never slows down or breaks the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from trainer_core.seams import CheckpointStore, MetricSink, RunResult, ShouldStop
from trainer_core.specs import TrainSpec

Method = Callable[[TrainSpec, MetricSink, CheckpointStore, ShouldStop], RunResult]

# method type -> module under trainer_core.methods holding its ``train``.
METHOD_MODULES: dict[str, str] = {
    "supervised": "supervised",
    "dpo": "dpo",
    "reward_model": "reward_model",
    "kto": "kto",
    "orpo": "orpo",
    "simpo": "simpo",
    "grpo": "grpo",
    # OpenAI's reinforcement is GRPO driven by its grader (mapped when the job is created).
    "reinforcement": "grpo",
    "rloo": "rloo",
    "ppo": "ppo",
}


def method(name: str) -> Method:
    if name not in METHOD_MODULES:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHOD_MODULES)}")
    module = importlib.import_module(f"trainer_core.methods.{METHOD_MODULES[name]}")
    train: Method = module.train
    return train


def run_spec(
    spec: TrainSpec, sink: MetricSink, store: CheckpointStore, should_stop: ShouldStop
) -> RunResult:
    """Train as ``spec`` says, reporting to ``sink`` and saving checkpoints into ``store``."""
    return method(spec.method)(spec, sink, store, should_stop)
