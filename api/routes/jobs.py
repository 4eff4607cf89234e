"""``/v1/fine_tuning/jobs``: OpenAI's job endpoints plus adapter downloads."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from api import job_queries, job_service, planning, streams
from api.deps import OwnerDep, ServicesDep, SessionDep
from api.downloads import artifact_response
from api.errors import APIError
from api.job_rendering import render_checkpoint, render_event, render_job
from api.pagination import page

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


@router.post("")
def create_job(
    services: ServicesDep, owner: OwnerDep, body: Annotated[Any, Body()] = None
) -> dict[str, Any]:
    # The body is taken as plain JSON and validated by the service, so that every field
    # error comes back in OpenAI's error shape with the ``param`` the user wrote.
    with services.sessions() as session:
        with session.begin():
            job = job_service.create_job(services, session, owner, body)
        # Enqueue only after the commit: a worker must never receive an id it cannot load.
        job_service.enqueue_committed(services, job)
        return render_job(job)


@router.post("/estimate")
def estimate_job(
    services: ServicesDep, session: SessionDep, owner: OwnerDep, body: Annotated[Any, Body()] = None
) -> dict[str, Any]:
    return planning.estimate(services, session, owner, body)


@router.get("")
def list_jobs(
    request: Request,
    session: SessionDep,
    owner: OwnerDep,
    after: str | None = None,
    limit: Annotated[int, Query()] = 20,
) -> dict[str, Any]:
    positions = job_queries.queue_positions(session)
    query = job_queries.list_jobs_query(owner, after, _metadata_filter(request))
    return page(session, query, limit, lambda job: render_job(job, positions.get(job.id)))


def _metadata_filter(request: Request) -> dict[str, str] | None:
    """``metadata[team]=a&metadata[env]=b`` (OpenAI's deepObject style), or ``metadata=null``."""
    if request.query_params.get("metadata") == "null":
        return {}
    pairs = {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    return pairs or None


@router.get("/{job_id}")
def retrieve_job(session: SessionDep, owner: OwnerDep, job_id: str) -> dict[str, Any]:
    job = job_queries.get_job(session, owner, job_id)
    position = job_queries.queue_positions(session).get(job.id) if job.status == "queued" else None
    return render_job(job, position)


@router.post("/{job_id}/cancel")
def cancel_job(session: SessionDep, owner: OwnerDep, job_id: str) -> dict[str, Any]:
    with session.begin():
        job = job_service.cancel_job(session, owner, job_id)
    return render_job(job)


@router.post("/{job_id}/pause")
def pause_job(session: SessionDep, owner: OwnerDep, job_id: str) -> dict[str, Any]:
    with session.begin():
        job = job_service.pause_job(session, owner, job_id)
    return render_job(job)


@router.post("/{job_id}/resume")
def resume_job(services: ServicesDep, owner: OwnerDep, job_id: str) -> dict[str, Any]:
    with services.sessions() as session:
        with session.begin():
            job = job_service.resume_job(session, owner, job_id)
        job_service.enqueue_committed(services, job)
        return render_job(job)


@router.get("/{job_id}/events", response_model=None)
def list_events(
    request: Request,
    services: ServicesDep,
    session: SessionDep,
    owner: OwnerDep,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query()] = 20,
    stream: bool = False,
    last_event_id: Annotated[str | None, Header(alias="last-event-id")] = None,
) -> dict[str, Any] | StreamingResponse:
    if stream:  # the same as .../events/stream (api/routes/streams.py)
        return streams.stream_response(
            request, services, owner, job_id, last_event_id or after, "events"
        )
    job = job_queries.get_job(session, owner, job_id)
    return page(session, job_queries.events_query(session, job, after), limit, render_event)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(
    session: SessionDep,
    owner: OwnerDep,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query()] = 10,
) -> dict[str, Any]:
    job = job_queries.get_job(session, owner, job_id)
    return page(
        session,
        job_queries.checkpoints_query(job, after),
        limit,
        lambda row: render_checkpoint(job, row),
    )


@router.get("/{job_id}/adapter")
def download_adapter(
    request: Request, services: ServicesDep, session: SessionDep, owner: OwnerDep, job_id: str
) -> Response:
    job = job_queries.get_job(session, owner, job_id)
    if not job.adapter_key:
        raise APIError(
            404,
            f"Job {job_id} has no final adapter (status {job.status}).",
            param="fine_tuning_job_id",
            code="adapter_not_found",
        )
    return artifact_response(request, services.artifacts, job.adapter_key, f"{job.id}-adapter.tar")


@router.get("/{job_id}/checkpoints/{checkpoint_id}/adapter")
def download_checkpoint_adapter(
    request: Request,
    services: ServicesDep,
    session: SessionDep,
    owner: OwnerDep,
    job_id: str,
    checkpoint_id: str,
) -> Response:
    job = job_queries.get_job(session, owner, job_id)
    row = job_queries.get_checkpoint(session, job, checkpoint_id)
    return artifact_response(
        request,
        services.artifacts,
        f"{row.artifact_key}/adapter.tar",
        f"{job.id}-step-{row.step}-adapter.tar",
    )
