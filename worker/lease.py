"""A running attempt's hold on its job: fenced, retried writes and a heartbeat.

Every write the training side makes (metrics, events, checkpoint rows, heartbeats) goes
through ``Lease.write``, which in the same transaction bumps the job's heartbeat only if the
job is still ``running`` under this attempt (``jobs.attempts``). So:

- a process whose job was taken from it (the sweep saw its heartbeat go stale and queued the
  job again) writes nothing more: the write raises ``LostClaim`` and the process stops;
- a write that meets a database blip retries with backoff (tenacity) for ``db_retry_s``;
  past that it raises ``DatabaseUnavailable`` and the process stops itself, keeping the
  checkpoints it has stored. Its job stays ``running`` with a heartbeat that goes stale, and
  the sweep of any worker resumes it from the last checkpoint (worker/recovery.py).

``Beat`` is a thread that beats every ``heartbeat_s`` even while one step takes minutes;
when it cannot, it records why, and the next ``StopFlag`` check raises it in the training
loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from api.models import Job, now

log = logging.getLogger("alignd.worker")

T = TypeVar("T")


class Abandoned(Exception):
    """The attempt must stop without recording anything more: its job is left as it is."""


class LostClaim(Abandoned):
    """The job is no longer this attempt's (re-queued by the sweep, or ended)."""


class DatabaseUnavailable(Abandoned):
    """The database stayed unreachable past the retry budget."""


def transient(exc: BaseException) -> bool:
    """A failure worth retrying: the connection, not the statement (a lost server, a reset
    connection, a restart in progress)."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class Lease:
    def __init__(
        self, sessions: sessionmaker[Session], job_id: str, attempt: int, retry_s: float
    ) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.attempt = attempt
        self.retry_s = retry_s
        # Set by the Beat thread when the lease is gone; raised by the next check().
        self.lost: Abandoned | None = None

    def write(self, work: Callable[[Session], T]) -> T:
        """``work(session)`` in one transaction with a fenced heartbeat, retried on
        connection failures for ``retry_s``."""
        return self._retrying(self._fenced, work)

    def read(self, work: Callable[[Session], T]) -> T:
        """``work(session)`` retried as ``write`` is, without the fence (a cancel poll)."""
        return self._retrying(self._plain, work)

    def beat(self) -> None:
        self.write(lambda _session: None)

    def check(self) -> None:
        if self.lost is not None:
            raise self.lost

    def _retrying(
        self, once: Callable[[Callable[[Session], T]], T], work: Callable[[Session], T]
    ) -> T:
        retrying = Retrying(
            retry=retry_if_exception(transient),
            stop=stop_after_delay(self.retry_s),
            wait=wait_exponential_jitter(initial=0.2, max=5.0),
            before_sleep=lambda state: log.warning(
                "job %s: database write failed (%s); retrying",
                self.job_id,
                state.outcome.exception() if state.outcome else "?",
            ),
        )
        try:
            return retrying(once, work)
        except RetryError as exc:
            raise DatabaseUnavailable(
                f"the database was unreachable for {self.retry_s:.0f} s: "
                f"{exc.last_attempt.exception()}"
            ) from exc

    def _fenced(self, work: Callable[[Session], T]) -> T:
        with self.sessions() as session, session.begin():
            held = session.execute(
                update(Job)
                .where(
                    Job.id == self.job_id,
                    Job.status == "running",
                    Job.attempts == self.attempt,
                )
                .values(heartbeat_at=now())
            )
            if not held.rowcount:  # type: ignore[attr-defined]
                raise LostClaim(f"job {self.job_id} is no longer held by attempt {self.attempt}")
            return work(session)

    def _plain(self, work: Callable[[Session], T]) -> T:
        with self.sessions() as session, session.begin():
            return work(session)


class Beat:
    """A daemon thread that calls ``lease.beat()`` every ``every_s`` until stopped or lost."""

    def __init__(self, lease: Lease, every_s: float) -> None:
        self.lease = lease
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alignd-heartbeat", daemon=True)

    def start(self) -> Beat:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating (the job is ending: its end is recorded next). Idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            # A beat still retrying is fenced: once the job has ended it changes nothing.
            self._thread.join(timeout=1)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.lease.beat()
            except Abandoned as exc:
                log.error("job %s: %s; stopping it", self.lease.job_id, exc)
                self.lease.lost = exc
                return
