"""The worker's claim, sweep and lease on Postgres: a job runs at most once however often it
is delivered, exactly one sweeping worker takes back a job whose worker went silent, and the
attempt that lost it writes nothing more."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from alignd.processes import free_port
from api.db import make_engine, make_sessionmaker
from api.models import Job, JobEvent, JobMetric, now
from api.services import Services
from api.settings import Settings
from tests.conftest import insert_job
from worker.execution import claim, execute, pending_jobs
from worker.lease import DatabaseUnavailable, Lease, LostClaim
from worker.recovery import requeue_lost, sweep
from worker.sinks import DatabaseSink


def test_second_delivery_claims_nothing(pg_settings: Settings) -> None:
    services = Services.build(pg_settings)
    job_id = insert_job(services.sessions)
    first = claim(services, job_id, "worker-a")
    assert first is not None and first.status == "running" and first.worker == "worker-a"
    assert first.attempts == 1
    assert claim(services, job_id, "worker-b") is None
    # execute() on an already-claimed job returns without touching it.
    assert execute(services, job_id, "worker-b") is None
    with services.sessions() as session:
        assert session.get_one(Job, job_id).worker == "worker-a"


def test_cancelled_or_finished_jobs_are_never_claimed(pg_settings: Settings) -> None:
    services = Services.build(pg_settings)
    for status in ("cancelled", "succeeded", "failed"):
        assert claim(services, insert_job(services.sessions, status=status), "w") is None


def test_a_silent_running_job_is_requeued_by_one_sweeper_then_claimed(
    pg_settings: Settings,
) -> None:
    services = Services.build(pg_settings)
    old = now() - int(pg_settings.stale_heartbeat_s) - 5
    # On a queue no live worker serves: the session's real worker (pg_worker) sweeps this
    # database too, and would otherwise re-send and run the requeued job under the test.
    mine = {"extensions": {"resources": {"worker_class": "claim-test"}}}
    stale = insert_job(services.sessions, status="running", heartbeat_at=old, attempts=1, **mine)
    fresh = insert_job(services.sessions, status="running", heartbeat_at=now(), attempts=1, **mine)
    # A running job is never claimed by a delivery, stale or not: the sweep decides.
    assert claim(services, stale, "w") is None and claim(services, fresh, "w") is None
    sweep(services, ["claim-test"])
    # A second sweeper (or the same one again) finds nothing left to take.
    assert requeue_lost(services, stale, "again") is None
    with services.sessions() as session:
        job = session.get_one(Job, stale)
        assert job.status == "queued" and job.attempts == 1
        assert job.last_error is not None and "no heartbeat" in job.last_error
        assert session.get_one(Job, fresh).status == "running"
        assert session.query(JobEvent).filter_by(job_id=stale).count() == 1
    assert stale in pending_jobs(services) and fresh not in pending_jobs(services)
    again = claim(services, stale, "w")
    assert again is not None and again.attempts == 2


def test_a_job_out_of_attempts_fails_with_worker_lost(pg_settings: Settings) -> None:
    services = Services.build(pg_settings)
    old = now() - int(pg_settings.stale_heartbeat_s) - 5
    job_id = insert_job(
        services.sessions,
        status="running",
        heartbeat_at=old,
        attempts=pg_settings.max_attempts,
        worker="celery@gone",
    )
    assert requeue_lost(services, job_id, "no heartbeat from celery@gone") == "failed"
    with services.sessions() as session:
        job = session.get_one(Job, job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error is not None and job.error["code"] == "worker_lost"
    assert "no heartbeat from celery@gone" in job.error["message"]


def test_a_lost_job_its_owner_was_stopping_ends_as_asked(pg_settings: Settings) -> None:
    services = Services.build(pg_settings)
    old = now() - int(pg_settings.stale_heartbeat_s) - 5
    pausing = insert_job(
        services.sessions,
        status="running",
        heartbeat_at=old,
        attempts=1,
        cancel_requested=True,
        substatus="pausing",
    )
    cancelling = insert_job(
        services.sessions,
        status="running",
        heartbeat_at=old,
        attempts=1,
        cancel_requested=True,
        substatus="cancelling",
    )
    assert requeue_lost(services, pausing, "lost") == "paused"
    assert requeue_lost(services, cancelling, "lost") == "cancelled"


def test_a_lease_whose_job_was_taken_writes_nothing(pg_settings: Settings) -> None:
    services = Services.build(pg_settings)
    job_id = insert_job(services.sessions)
    job = claim(services, job_id, "w")
    assert job is not None
    lease = Lease(services.sessions, job_id, job.attempts, retry_s=1)
    DatabaseSink(lease, job.owner).metrics(1, {"train_loss": 1.0})
    # The sweep takes the job back (its worker looked lost) and another worker claims it.
    with services.sessions() as session, session.begin():
        session.get_one(Job, job_id).heartbeat_at = 0
    assert requeue_lost(services, job_id, "silent") == "queued"
    assert claim(services, job_id, "w2") is not None
    with pytest.raises(LostClaim):
        DatabaseSink(lease, job.owner).metrics(2, {"train_loss": 0.5})
    with services.sessions() as session:
        steps = session.scalars(select(JobMetric.step).where(JobMetric.job_id == job_id)).all()
    assert steps == [1]


def test_a_lease_gives_up_on_an_unreachable_database_within_its_budget(
    pg_settings: Settings,
) -> None:
    # Nothing listens on this port: every connection attempt fails at once.
    gone = Settings(
        data_dir=pg_settings.data_dir,
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres",
    )
    engine = make_engine(gone)
    try:
        lease = Lease(make_sessionmaker(engine), "ftjob-x", 1, retry_s=1.5)
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="unreachable for 2 s"):
            lease.beat()
        # Retried for the budget (with backoff), then gave up: not at once, not forever.
        assert 1.5 <= time.monotonic() - started < 8
    finally:
        engine.dispose()


def test_a_stale_threshold_within_the_retry_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="ALIGND_STALE_HEARTBEAT_S must exceed"):
        Settings(stale_heartbeat_s=30, db_retry_s=30, heartbeat_s=5)
