"""Telling the user, through the sink, what loading a dataset did to its rows."""

from __future__ import annotations

from typing import Protocol

from trainer_core.seams import MetricSink


class TruncationCounts(Protocol):
    @property
    def n_truncated(self) -> int: ...  # rows cut to max_seq_len, dropped ones included

    @property
    def n_dropped(self) -> int: ...  # rows with no loss token left after truncation


def report_truncation(
    sink: MetricSink, data: TruncationCounts, name: str, max_seq_len: int, unit: str = "examples"
) -> None:
    """Warn about rows that were cut or left out; silence when there were none.

    ``name`` is "training" or "validation"; ``unit`` what a row is ("examples", "pairs").
    """
    if data.n_dropped:
        sink.event(
            f"Dropped {data.n_dropped} {name} {unit} longer than {max_seq_len} tokens: "
            "no completion token was left after truncation",
            level="warning",
            data={"file": name, "dropped": data.n_dropped, "max_seq_len": max_seq_len},
        )
    kept_truncated = data.n_truncated - data.n_dropped
    if kept_truncated:
        sink.event(
            f"Truncated {kept_truncated} {name} {unit} to {max_seq_len} tokens",
            level="warning",
            data={"file": name, "truncated": kept_truncated, "max_seq_len": max_seq_len},
        )
