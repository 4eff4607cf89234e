"""Reading jobs and what hangs off them, always within one owner: lookups that 404 across
tenants, the list/event/checkpoint queries the pages run, queue places."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, case, func, select
from sqlalchemy.orm import Session, aliased, defer

from api.errors import invalid, not_found
from api.models import Checkpoint, Job, JobEvent
from api.pagination import PAGE_LIMIT

# What a job object shows (api/job_rendering.py) needs no resolved spec, the largest JSON of a
# row: pages and lookups that only render leave it unread (a lookup that uses it after all
# loads it then, in the same session).
WITHOUT_SPEC = (defer(Job.spec),)


def get_job(session: Session, owner: str, job_id: str, *, with_spec: bool = True) -> Job:
    job = session.get(Job, job_id, options=() if with_spec else WITHOUT_SPEC)
    if job is None or job.owner != owner:
        raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id")
    return job


def get_checkpoint(session: Session, job: Job, checkpoint_id: str) -> Checkpoint:
    row = session.get(Checkpoint, checkpoint_id)
    if row is None or row.job_id != job.id:
        raise not_found("checkpoint", checkpoint_id, param="checkpoint_id")
    return row


def succeeded_job_named(session: Session, owner: str, fine_tuned_model: str) -> Job | None:
    """The owner's succeeded job whose fine-tuned model has this name."""
    return session.scalar(
        select(Job).where(
            Job.owner == owner, Job.fine_tuned_model == fine_tuned_model, Job.status == "succeeded"
        )
    )


def _queue_place() -> ColumnElement[int | None]:
    """A job row's 1-based place in the queue, null unless it is queued: the queued jobs of
    every owner up to and including it (ids grow with time, so oldest first). Selected beside
    the job, it costs no round trip of its own; nothing of the other owners' jobs is shown,
    only how many there are ahead."""
    ahead = aliased(Job)
    count = (
        select(func.count())
        .select_from(ahead)
        .where(ahead.status == "queued", ahead.id <= Job.id)
        .scalar_subquery()
    )
    return case((Job.status == "queued", count), else_=None)


# Built once: an alias of a mapped class costs about a millisecond to make.
QUEUE_PLACE = _queue_place()


# The reads polled most, built once with bound parameters: SQLAlchemy then reuses their
# cache keys as well as their SQL, where building a statement and its key cost more than
# running it. A job with its queue place (spec unread), an owner's jobs newest first, a job's
# events newest first (pages: api/pagination.py, page()). A filter or a cursor is added to
# the built statement; its parameters stay the same.
_JOB_ROWS = select(Job, QUEUE_PLACE).options(*WITHOUT_SPEC)
_JOB_WITH_PLACE = _JOB_ROWS.where(Job.id == bindparam("job_id"), Job.owner == bindparam("owner"))
_JOBS = (
    _JOB_ROWS.where(Job.owner == bindparam("owner"))
    .order_by(Job.id.desc())
    .limit(bindparam(PAGE_LIMIT))
)
_EVENTS = (
    select(JobEvent)
    .where(JobEvent.job_id == bindparam("job_id"), JobEvent.owner == bindparam("owner"))
    .order_by(JobEvent.seq.desc())
    .limit(bindparam(PAGE_LIMIT))
)

Query = tuple[Select[*tuple[Any, ...]], dict[str, Any]]


def list_jobs_query(
    owner: str,
    after: str | None,
    metadata: dict[str, str] | None = None,
    status: str | None = None,
) -> Query:
    """Newest first, each job with its queue place, and the parameters for ``page()``.
    ``metadata``: OpenAI's ``metadata[k]=v`` filter (all pairs must match); an empty dict
    selects jobs without metadata (the SDK's ``metadata=null``). ``status``: ours, jobs in that
    status only (the dashboard's filter)."""
    query = _JOBS
    if status is not None:
        query = query.where(Job.status == status)
    if metadata == {}:
        query = query.where(Job.user_metadata.is_(None) | (Job.user_metadata.as_string() == "null"))
    for key, value in (metadata or {}).items():
        query = query.where(Job.user_metadata[key].as_string() == value)
    if after:
        query = query.where(Job.id < after)
    return query, {"owner": owner}


def events_query(session: Session, owner: str, job_id: str, after: str | None) -> Query:
    """The owner's events of a job, newest first, and the parameters for ``page()``. Events
    carry their job's owner, so no job lookup comes first: a page that comes back empty is
    checked by the caller."""
    params = {"job_id": job_id, "owner": owner}
    if not after:
        return _EVENTS, params
    seq = session.scalar(
        select(JobEvent.seq).where(
            JobEvent.id == after, JobEvent.job_id == job_id, JobEvent.owner == owner
        )
    )
    if seq is None:
        get_job(session, owner, job_id, with_spec=False)  # no such job: 404 first
        raise invalid(f"No event '{after}' in job {job_id}.", param="after")
    return _EVENTS.where(JobEvent.seq < seq), params


def checkpoints_query(job: Job, after: str | None) -> Select[Any]:
    query = select(Checkpoint).where(Checkpoint.job_id == job.id)
    if after:
        query = query.where(Checkpoint.id < after)
    return query.order_by(Checkpoint.id.desc())


def get_job_with_place(session: Session, owner: str, job_id: str) -> tuple[Job, int | None]:
    """The owner's job (spec unread) and its place in the queue, in one query."""
    row = session.execute(_JOB_WITH_PLACE, {"job_id": job_id, "owner": owner}).first()
    if row is None:
        raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id")
    return row[0], row[1]
