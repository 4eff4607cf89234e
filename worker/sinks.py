"""The worker's side of the trainer core's seams: metrics into the database, checkpoints into
the artifact store. Every write goes through the attempt's ``Lease`` (worker/lease.py):
retried through database blips, and refused once the job is no longer this attempt's."""

from __future__ import annotations

import tarfile
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from api import webhooks
from api.artifacts import ArtifactStore
from api.job_events import add_event
from api.models import Checkpoint, Job, JobMetric, new_id, now
from worker.lease import Lease
from worker.metrics import JobStats

# A metrics event every this many steps (plus the first and the last): enough to follow a
# job in the events list without drowning it; every step is a metric point regardless.
METRICS_EVENT_EVERY = 10
# How often the training loop may touch the database to look for a cancel request.
STOP_POLL_S = 0.5


class DatabaseSink:
    """MetricSink: each metric point is a row; some also become OpenAI ``metrics`` events."""

    def __init__(self, lease: Lease, owner: str, method: str = "unknown") -> None:
        self.lease = lease
        self.stats = JobStats(lease.job_id, method)  # the worker's metrics port (worker/metrics.py)
        self.job_id = lease.job_id
        self.owner = owner
        self.total_steps: int | None = None
        self.started = time.monotonic()
        self.first_step: int | None = None  # the step before this process's first one

    def start(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.started = time.monotonic()
        # A resumed run keeps the step it was paused at until its first metric point.
        self.lease.write(
            lambda session: session.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(total_steps=total_steps, step=func.coalesce(Job.step, 0))
            )
        )

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        clean = {k: float(v) for k, v in values.items()}
        eta = self._eta(step)

        def record(session: Session) -> None:
            # A retried write whose first commit did land (the connection broke while the
            # server answered) must not leave the step twice.
            session.execute(
                delete(JobMetric).where(JobMetric.job_id == self.job_id, JobMetric.step == step)
            )
            session.add(
                JobMetric(
                    job_id=self.job_id, owner=self.owner, created_at=now(), step=step, values=clean
                )
            )
            session.execute(
                update(Job).where(Job.id == self.job_id).values(step=step, estimated_finish=eta)
            )
            if step == 1 or step % METRICS_EVENT_EVERY == 0 or step == self.total_steps:
                job = session.get_one(Job, self.job_id)
                shown = ", ".join(
                    f"{k}={v:.4f}" for k, v in clean.items() if k.startswith("train_")
                )
                add_event(
                    session,
                    job,
                    f"Step {step}/{self.total_steps}: {shown}",
                    type="metrics",
                    data={"step": step, "total_steps": self.total_steps, **clean},
                )

        self.lease.write(record)
        self.stats.update(step, clean)

    def event(
        self, message: str, *, level: str = "info", data: Mapping[str, Any] | None = None
    ) -> None:
        self.lease.write(
            lambda session: add_event(
                session,
                session.get_one(Job, self.job_id),
                message,
                level=level,
                data=dict(data or {}),
            )
        )

    def _eta(self, step: int) -> int | None:
        if self.first_step is None:
            self.first_step = step - 1  # a resumed run starts part way
        done_here = step - self.first_step
        if not self.total_steps or done_here <= 0:
            return None
        per_step = (time.monotonic() - self.started) / done_here
        return int(time.time() + per_step * (self.total_steps - step))


class StopFlag:
    """ShouldStop: reads the job's cancel flag, at most every STOP_POLL_S. Raises what ended
    the attempt's lease (worker/lease.py) so that the training stops at its next step without
    recording anything more."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self._last_poll = 0.0
        self._stop = False

    def __call__(self) -> bool:
        self.lease.check()
        clock = time.monotonic()
        if self._stop or clock - self._last_poll < STOP_POLL_S:
            return self._stop
        self._last_poll = clock
        self._stop = bool(
            self.lease.read(
                lambda session: session.scalar(
                    select(Job.cancel_requested).where(Job.id == self.lease.job_id)
                )
            )
        )
        return self._stop


def tar_folder(folder: Path, dest: Path) -> Path:
    """Tar a folder's contents at the archive's root, so it unpacks into any chosen folder."""
    with tarfile.open(dest, "w") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return dest


class ArtifactCheckpointStore:
    """CheckpointStore: tar, store atomically, then record the row (in that order).

    A checkpoint row exists only once its files are in the store, so the API never lists a
    checkpoint it cannot serve. A store that fails (after its own retries) raises
    ``ArtifactStoreError`` before anything is recorded: the job fails with that error, and
    what did reach the store (the adapter without its state) is named by no row; the next save
    of that step overwrites it, deleting the job's model deletes it.
    """

    def __init__(self, lease: Lease, artifacts: ArtifactStore, owner: str) -> None:
        self.lease = lease
        self.artifacts = artifacts
        self.job_id = lease.job_id
        self.owner = owner

    def save(self, step: int, folder: Path, metrics: Mapping[str, float], *, final: bool) -> None:
        key = f"jobs/{self.job_id}/checkpoints/step-{step}"
        with tempfile.TemporaryDirectory(prefix="alignd-ckpt-") as tmp:
            for part in ("adapter", "state"):
                if (folder / part).is_dir():
                    tarball = tar_folder(folder / part, Path(tmp) / f"{part}.tar")
                    self.artifacts.put_file(f"{key}/{part}.tar", tarball)
        # A process that lost its job may still reach this point; its files are the same
        # step's state as the new attempt's (same data order, same seed), and the fence
        # below keeps it from recording the row.
        self.lease.write(lambda session: self._record(session, step, key, metrics, final))

    def _record(
        self, session: Session, step: int, key: str, metrics: Mapping[str, float], final: bool
    ) -> None:
        job = session.get_one(Job, self.job_id)
        existing = session.scalar(
            select(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.step == step)
        )
        values = {k: float(v) for k, v in metrics.items()}
        if existing is None:
            session.add(
                checkpoint := Checkpoint(
                    id=new_id("ftckpt"),
                    job_id=self.job_id,
                    owner=self.owner,
                    created_at=now(),
                    step=step,
                    metrics=values,
                    artifact_key=key,
                    final=final,
                )
            )
            webhooks.on_checkpoint(session, self.owner, self.job_id, checkpoint.id)
        else:  # the final save of a step that already had a checkpoint
            existing.metrics = values
            existing.final = existing.final or final
        if final:
            job.adapter_key = f"{key}/adapter.tar"
        add_event(
            session,
            job,
            f"Checkpoint saved at step {step}" + (" (final)" if final else ""),
            data={"step": step, **values},
        )
