"""Runs a spec by handing it to its method; the one place that maps method names to code."""

from __future__ import annotations

from collections.abc import Callable

from trainer_core.methods import supervised
from trainer_core.seams import CheckpointStore, MetricSink, RunResult, ShouldStop
from trainer_core.specs import TrainSpec

Method = Callable[[TrainSpec, MetricSink, CheckpointStore, ShouldStop], RunResult]

METHODS: dict[str, Method] = {
    "supervised": supervised.train,
}


def run_spec(
    spec: TrainSpec, sink: MetricSink, store: CheckpointStore, should_stop: ShouldStop
) -> RunResult:
    """Train as ``spec`` says, reporting to ``sink`` and saving checkpoints into ``store``."""
    if spec.method not in METHODS:
        raise ValueError(f"unknown method {spec.method!r}; known: {sorted(METHODS)}")
    return METHODS[spec.method](spec, sink, store, should_stop)
