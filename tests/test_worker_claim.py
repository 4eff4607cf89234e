"""The worker's claim on Postgres: a job runs at most once however often it is delivered."""

from __future__ import annotations

from api.models import Job, now
from api.services import Services
from api.settings import Settings
from tests.conftest import insert_job
from worker.execution import claim, execute, pending_jobs


def test_second_delivery_claims_nothing(pg_settings: Settings) -> None:
    services = Services.build(pg_settings)
    job_id = insert_job(services.sessions)
    first = claim(services, job_id, "worker-a")
    assert first is not None and first.status == "running" and first.worker == "worker-a"
    assert claim(services, job_id, "worker-b") is None
    # execute() on an already-claimed job returns without touching it.
    assert execute(services, job_id, "worker-b") is None
    with services.sessions() as session:
        assert session.get_one(Job, job_id).worker == "worker-a"


def test_cancelled_or_finished_jobs_are_never_claimed(pg_settings: Settings) -> None:
    services = Services.build(pg_settings)
    for status in ("cancelled", "succeeded", "failed"):
        assert claim(services, insert_job(services.sessions, status=status), "w") is None


def test_a_silent_running_job_can_be_claimed_again(pg_settings: Settings) -> None:
    services = Services.build(pg_settings)
    stale = insert_job(
        services.sessions, status="running", heartbeat_at=now() - pg_settings.stale_heartbeat_s - 5
    )
    fresh = insert_job(services.sessions, status="running", heartbeat_at=now())
    pending = pending_jobs(services)
    assert stale in pending and fresh not in pending
    assert claim(services, fresh, "w") is None
    assert claim(services, stale, "w") is not None
