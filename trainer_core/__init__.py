"""alignd's trainer core: alignment fine-tuning methods over shared building blocks.

A library usable on its own (``python -m trainer_core run spec.json``). It imports nothing of
``api`` or ``worker``, and this module and ``specs``/``seams`` import no torch, so the API can
validate specs without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer_core.seams import CheckpointStore, MetricSink, RunResult, ShouldStop
    from trainer_core.specs import TrainSpec


def run(
    spec: TrainSpec,
    sink: MetricSink,
    store: CheckpointStore,
    should_stop: ShouldStop | None = None,
) -> RunResult:
    """Run the method the spec names; torch is imported only here."""
    from trainer_core.runner import run_spec

    return run_spec(spec, sink, store, should_stop or (lambda: False))
