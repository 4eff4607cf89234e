"""A succeeded job's results file: its metrics as a CSV, the way OpenAI's ``result_files`` are.

OpenAI's columns come first (step, train_loss, train_accuracy, valid_loss,
valid_mean_token_accuracy), then every other metric the method logged, by name. One row per
logged step, ascending; a step logged twice (a resumed job) keeps its latest values, as
``GET .../metrics`` does. The validation pass runs when a checkpoint is saved, and its
metrics (``valid_*``) are stored with the checkpoint, not in the step series: they join the
row of the checkpoint's step, as OpenAI's file has valid_loss only at its evaluation steps.
The reinforcement eval pass (trainer_core/rollout_validation.py) is the exception: its
``valid_reward`` is a value of the step's own metric point, so it is a column like any other.
A cell is empty where the step has no value, or a non-finite one.

The file is an object in the artifact store (``files/<file id>/<filename>``), like the job's
adapter, and its ``files`` row names it (``artifact_key``); uploads stay in ``file_chunks``.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.artifacts import ArtifactStore
from api.models import Checkpoint, File, Job, JobMetric, new_id, now

PURPOSE = "fine-tune-results"
# OpenAI's header, and the metric each column reads. Our supervised loop calls the token
# accuracy train_mean_token_accuracy (the name OpenAI's checkpoints use); the CSV calls it
# train_accuracy, as OpenAI's results file does, and does not repeat it.
OPENAI_COLUMNS = {
    "train_loss": "train_loss",
    "train_accuracy": "train_mean_token_accuracy",
    "valid_loss": "valid_loss",
    "valid_mean_token_accuracy": "valid_mean_token_accuracy",
}
# The checkpoint metrics that belong in the CSV: the validation pass's, not the repeated
# train_loss of the checkpoint's step.
VALID_PREFIXES = ("valid_", "full_valid_")


def _cell(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return ""
    return repr(float(value))


def results_csv(session: Session, job_id: str) -> bytes:
    """The job's metric points as CSV bytes (a header only when it logged none)."""
    by_step: dict[int, dict[str, float]] = {}
    query = (
        select(JobMetric.step, JobMetric.values)
        .where(JobMetric.job_id == job_id)
        .order_by(JobMetric.step, JobMetric.seq)
    )
    for step, values in session.execute(query).yield_per(2000):
        by_step[step] = dict(values)  # the latest point of a step wins
    checkpoints = select(Checkpoint.step, Checkpoint.metrics).where(Checkpoint.job_id == job_id)
    for step, metrics in session.execute(checkpoints):
        valid = {k: v for k, v in metrics.items() if k.startswith(VALID_PREFIXES)}
        if valid:
            by_step.setdefault(step, {}).update(valid)
    taken = set(OPENAI_COLUMNS.values())
    extra = sorted({k for values in by_step.values() for k in values} - taken - {"step"})
    sources = [*OPENAI_COLUMNS.values(), *extra]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", *OPENAI_COLUMNS, *extra])
    for step, values in sorted(by_step.items()):
        writer.writerow([step, *(_cell(values.get(name)) for name in sources)])
    return out.getvalue().encode()


@dataclass(frozen=True)
class StoredResults:
    """A results file already in the artifact store, not yet recorded in the database."""

    file_id: str
    filename: str
    key: str
    size: int


def results_prefix(file_id: str) -> str:
    """The folder of a results file's object in the artifact store (deleted as a whole)."""
    return f"files/{file_id}"


def results_key(file_id: str, filename: str) -> str:
    return f"{results_prefix(file_id)}/{filename}"


def upload_results(
    sessions: sessionmaker[Session], artifacts: ArtifactStore, job_id: str
) -> StoredResults:
    """Build the job's results CSV and put it in the artifact store.

    Called before the transaction that records the job's end, so that no row lock is held
    during the upload, and so that the file row (``record_results``) only ever names a
    complete object. A failed put raises ``ArtifactStoreError``: the job fails with
    ``artifact_store_error``, as when a checkpoint cannot be stored.
    """
    with sessions() as session:
        data = results_csv(session, job_id)
    file_id = new_id("file")
    filename = f"{job_id}_results.csv"
    key = results_key(file_id, filename)
    with tempfile.TemporaryDirectory(prefix="alignd-results-") as tmp:
        path = Path(tmp) / filename
        path.write_bytes(data)
        artifacts.put_file(key, path)
    return StoredResults(file_id=file_id, filename=filename, key=key, size=len(data))


def record_results(session: Session, job: Job, stored: StoredResults) -> File:
    """The results file's row, owned by the job's owner, in the caller's transaction (the one
    that records the job succeeded): the file is listed exactly when the job succeeded."""
    row = File(
        id=stored.file_id,
        owner=job.owner,
        created_at=now(),
        filename=stored.filename,
        purpose=PURPOSE,
        bytes=stored.size,
        status="processed",
        artifact_key=stored.key,
    )
    session.add(row)
    return row
