"""Runs a spec by handing it to its method's module, as ``trainer_core.registry`` names it.

Each method is ``trainer_core.methods.<module>.train`` and is imported only when a spec names
it, so a broken or heavy method never slows down or breaks the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from trainer_core.registry import METHODS
from trainer_core.seams import CheckpointStore, MetricSink, RunResult, ShouldStop
from trainer_core.specs import TrainSpec

Method = Callable[[TrainSpec, MetricSink, CheckpointStore, ShouldStop], RunResult]


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    module = importlib.import_module(f"trainer_core.methods.{METHODS[name].module}")
    train: Method = module.train
    return train


def run_spec(
    spec: TrainSpec, sink: MetricSink, store: CheckpointStore, should_stop: ShouldStop
) -> RunResult:
    """Train as ``spec`` says, reporting to ``sink`` and saving checkpoints into ``store``."""
    return method(spec.method)(spec, sink, store, should_stop)
