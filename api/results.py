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
"""

from __future__ import annotations

import csv
import io
import math

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from api.models import Checkpoint, File, FileChunk, Job, JobMetric, new_id, now

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


def store_results(session: Session, job: Job, *, chunk_bytes: int) -> File:
    """Write the job's results file, owned by the job's owner, in chunks as uploads are stored.

    In the caller's transaction: the file exists exactly when the job is recorded succeeded.
    """
    data = results_csv(session, job.id)
    row = File(
        id=new_id("file"),
        owner=job.owner,
        created_at=now(),
        filename=f"{job.id}_results.csv",
        purpose=PURPOSE,
        bytes=len(data),
        status="processed",
    )
    session.add(row)
    session.flush()
    for index, start in enumerate(range(0, len(data), chunk_bytes)):
        session.execute(
            insert(FileChunk).values(
                file_id=row.id, index=index, data=data[start : start + chunk_bytes]
            )
        )
    return row
