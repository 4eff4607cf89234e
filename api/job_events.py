"""A job's event log: the one place ``job_events`` rows are written, by the API and the worker.

No HTTP here, so the worker can record events without importing the routes' modules.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.models import Job, JobEvent, new_id, now


def add_event(
    session: Session,
    job: Job,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    # Serialise a job's event inserts on its row, so that their seq order is their commit
    # order and an event stream never skips one (api/streams.py). A no-op on SQLite.
    session.execute(select(Job.id).where(Job.id == job.id).with_for_update(key_share=True))
    session.add(
        JobEvent(
            id=new_id("ftevent"),
            job_id=job.id,
            owner=job.owner,
            created_at=now(),
            level=level,
            type=type,
            message=message,
            data=data,
        )
    )
