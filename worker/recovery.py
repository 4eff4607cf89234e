"""Jobs survive faults: every live worker sweeps for jobs that lost their worker or their
broker message, and hands them back to the queue (docs/operations.md, "Jobs survive faults").

- A ``running`` job whose heartbeat is older than ``stale_heartbeat_s`` lost the process
  training it (a killed worker, a dead pool child, a process that stopped itself because the
  database was away). One sweeping worker wins a conditional update that puts it back to
  ``queued`` (or ends it: ``worker_lost`` once ``max_attempts`` workers have started it; or
  ``cancelled``/``paused`` when its owner had asked for that), and sends it to its queue. The
  worker that claims it resumes it from its last checkpoint (``execution.recovery_point``).
- A ``queued`` job of the sweeping worker's queues neither handed to the broker nor seen by
  a worker for that long may have lost its message (a broker restarted without persistence): one sweeping worker wins the
  update of its ``heartbeat_at`` and sends it again. A duplicate is harmless: the claim lets
  one delivery run it.

When a pool child dies under a job, the worker's parent sees it at once (Celery's
``WorkerLostError``) and requeues the job the same way without waiting for the heartbeat to
go stale (``requeue_lost``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection
from functools import partial

from sqlalchemy import or_, select, update

from api import files, webhooks
from api.job_events import add_event
from api.models import Job, now
from api.services import Services
from api.workers import job_queue
from worker.periodic import Periodic

log = logging.getLogger("alignd.worker")


def requeue_lost(
    services: Services, job_id: str, reason: str, *, worker: str | None = None
) -> str | None:
    """Take a running job from the process that lost it: back to ``queued`` and to its
    queue, or ended when its attempts are used up or its owner asked it to stop. Only if it
    is still in the state this was decided on (one caller wins); ``worker``: only if that
    worker holds it (a dead pool child's job). The status it got, or None when another
    caller won or the job was no longer lost."""
    settings = services.settings
    with services.sessions() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None or job.status != "running":
            return None
        if worker is not None and job.worker != worker:
            return None
        held_by = [Job.id == job_id, Job.status == "running", Job.attempts == job.attempts]
        if worker is None:  # the sweep: only while the heartbeat it saw is still the last
            held_by.append(Job.heartbeat_at == job.heartbeat_at)
        error = None
        if job.cancel_requested:
            status = "paused" if job.substatus == "pausing" else "cancelled"
        elif job.attempts >= settings.max_attempts:
            status = "failed"
            error = {
                "code": "worker_lost",
                "message": (
                    f"The job lost its worker {job.attempts} times, the most allowed "
                    f"(ALIGND_MAX_ATTEMPTS={settings.max_attempts}); the last time: {reason}"
                )[:2000],
                "param": None,
            }
        else:
            status = "queued"
        ended = status != "queued"
        done = session.execute(
            update(Job)
            .where(*held_by)
            .values(
                status=status,
                substatus=None,
                last_error=reason[:2000],
                # Queued: when it was handed to the broker (just below).
                heartbeat_at=now(),
                worker=None,
                cancel_requested=False,
                estimated_finish=None,
                error=error,
                finished_at=now() if ended and status != "paused" else None,
            )
        )
        if not done.rowcount:  # type: ignore[attr-defined]
            return None
        job = session.get_one(Job, job_id)
        if status == "queued":
            add_event(
                session,
                job,
                f"The worker was lost ({reason}); the job is queued again "
                f"(attempt {job.attempts + 1} of {settings.max_attempts} comes next)",
                level="warning",
                data={"attempt": job.attempts, "reason": reason},
            )
        elif status == "failed":
            assert error is not None
            add_event(session, job, f"The job failed: {error['message']}", level="error")
        else:
            add_event(session, job, f"Job {status} at step {job.step or 0} (its worker was lost)")
        if ended:
            webhooks.on_status(session, job.owner, job.id, status)
        queue = job_queue(settings, job.extensions)
    log.warning("job %s lost its worker (%s): %s", job_id, reason, status)
    if status == "queued":
        # After the commit: the delivery must find the job queued. Should the broker be
        # away now, the job is queued with a fresh heartbeat_at, and the next sweep after
        # stale_heartbeat_s sends it again.
        services.queue.enqueue(job_id, queue)
    return status


def resend_queued(services: Services, job_id: str, seen: int | None) -> bool:
    """Send a queued job again whose ``heartbeat_at`` is still ``seen`` (one caller wins)."""
    with services.sessions() as session, session.begin():
        done = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == "queued",
                Job.heartbeat_at == seen if seen is not None else Job.heartbeat_at.is_(None),
            )
            .values(heartbeat_at=now())
        )
        if not done.rowcount:  # type: ignore[attr-defined]
            return False
        job = session.get_one(Job, job_id)
        queue = job_queue(services.settings, job.extensions)
    log.info("re-sending queued job %s to queue %s (no worker has seen it lately)", job_id, queue)
    services.queue.enqueue(job_id, queue)
    return True


def sweep(services: Services, queues: Collection[str]) -> None:
    """One pass: requeue running jobs with a stale heartbeat, re-send forgotten queued ones of
    ``queues`` (the sweeping worker's own: a queue no live worker consumes gets no copies
    piling up in the broker; its jobs are re-sent once a worker for it sweeps), and delete
    expired files."""
    settings = services.settings
    stale_before = now() - int(settings.stale_heartbeat_s)
    with services.sessions() as session:
        lost = session.execute(
            select(Job.id, Job.heartbeat_at, Job.worker).where(
                # Every claim sets heartbeat_at: a running row without one was not started by
                # a worker (made by hand), and is none of the sweep's business.
                Job.status == "running",
                Job.heartbeat_at < stale_before,
            )
        ).all()
        forgotten = session.execute(
            select(Job.id, Job.heartbeat_at, Job.extensions).where(
                Job.status == "queued",
                or_(
                    Job.heartbeat_at < stale_before,
                    Job.heartbeat_at.is_(None) & (Job.created_at < stale_before),
                ),
            )
        ).all()
    for job_id, beat, worker in lost:
        age = f"{now() - beat} s" if beat is not None else "ever"
        try:
            requeue_lost(services, job_id, f"no heartbeat from {worker or 'its worker'} for {age}")
        except Exception:  # the broker is away: the job is queued, the next sweep re-sends it
            log.exception("sweep: could not requeue job %s", job_id)
    for job_id, seen, extensions in forgotten:
        if job_queue(settings, extensions) not in queues:
            continue
        try:
            resend_queued(services, job_id, seen)
        except Exception:
            log.exception("sweep: could not re-send job %s", job_id)
    expire_files(services)


def expire_files(services: Services) -> list[str]:
    """Delete the files whose ``expires_after`` has passed and that no active job needs
    (``api.files.delete_expired``); the API stopped serving them when they expired."""
    with services.sessions() as session, session.begin():
        removed = files.delete_expired(session)
    if removed:
        log.info("sweep: deleted %d expired files: %s", len(removed), ", ".join(removed))
    return removed


def touch_queued(services: Services, job_id: str) -> None:
    """A worker received the queued job's message (and is sending it back for later): the
    message is alive, so the sweep has nothing to re-send."""
    with services.sessions() as session, session.begin():
        session.execute(
            update(Job).where(Job.id == job_id, Job.status == "queued").values(heartbeat_at=now())
        )


def sweeper(services: Services, queues: Collection[str]) -> Periodic:
    """``sweep`` at once, then every ``sweep_interval_s`` times a random 0.75-1.25 (workers
    started together drift apart), on a daemon thread of the worker's parent process."""
    interval = services.settings.sweep_interval_s
    return Periodic(
        "sweep",
        partial(sweep, services, frozenset(queues)),
        lambda: interval * random.uniform(0.75, 1.25),
        at_once=True,
    )
