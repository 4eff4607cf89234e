"""The two seams between the trainer core and whoever runs it, with the fakes beside them.

The worker implements these against the database and the artifact store; tests and
``python -m trainer_core run`` use the in-memory and folder versions below. No torch here.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol


class MetricSink(Protocol):
    """Receives what a run reports. Called from the training loop, so keep it cheap."""

    def start(self, total_steps: int) -> None: ...

    def metrics(self, step: int, values: Mapping[str, float]) -> None: ...

    def event(
        self, message: str, *, level: str = "info", data: Mapping[str, Any] | None = None
    ) -> None: ...


class CheckpointStore(Protocol):
    """Takes a finished checkpoint folder and keeps it.

    The folder holds ``adapter/`` (a PEFT folder under LoRA, a full Hugging Face model folder
    under full fine-tuning, either loadable on its own) and ``state/`` (optimizer, scheduler,
    RNG and data position for resuming). The store may move the folder away.
    """

    def save(
        self, step: int, folder: Path, metrics: Mapping[str, float], *, final: bool
    ) -> None: ...


ShouldStop = Callable[[], bool]


@dataclass
class RunResult:
    status: Literal["completed", "stopped"]
    step: int
    total_steps: int
    trained_tokens: int
    final_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ListSink:
    """A MetricSink that keeps everything in lists (tests, the standalone CLI)."""

    total_steps: int | None = None
    points: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    events: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    echo: bool = False

    def start(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        self.points.append((step, dict(values)))
        if self.echo:
            shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            print(f"step {step}: {shown}", flush=True)

    def event(
        self, message: str, *, level: str = "info", data: Mapping[str, Any] | None = None
    ) -> None:
        self.events.append((level, message, dict(data) if data is not None else None))
        if self.echo:
            print(f"[{level}] {message}", flush=True)


class NullSink:
    """A MetricSink that drops everything: ranks other than 0 compute what rank 0 reports."""

    def start(self, total_steps: int) -> None:
        pass

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def event(
        self, message: str, *, level: str = "info", data: Mapping[str, Any] | None = None
    ) -> None:
        pass


@dataclass
class FolderCheckpointStore:
    """A CheckpointStore that moves each checkpoint to ``root/step-N`` (and ``root/final``)."""

    root: Path
    saved: list[tuple[int, Path, dict[str, float], bool]] = field(default_factory=list)

    def save(self, step: int, folder: Path, metrics: Mapping[str, float], *, final: bool) -> None:
        dest = self.root / ("final" if final else f"step-{step}")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), dest)
        self.saved.append((step, dest, dict(metrics), final))
