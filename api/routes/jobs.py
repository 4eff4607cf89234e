"""``/v1/fine_tuning/jobs``: OpenAI's job endpoints plus estimates and adapter downloads."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.orm import Session

from api import job_queries, job_service, planning, streams
from api.deps import OwnerDep, ReadsDep, ServicesDep, SessionDep
from api.downloads import artifact_response
from api.errors import APIError
from api.job_rendering import (
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobEventList,
    FineTuningJobList,
    FineTuningJobSpec,
    JobStatus,
    render_checkpoint,
    render_event,
    render_job,
)
from api.job_schemas import JobCreate
from api.openapi import ERROR_RESPONSES, documented_as, streamed
from api.pagination import page

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=ERROR_RESPONSES)

# The body is taken as plain JSON and validated by the service, so that every field error
# comes back in OpenAI's error shape with the ``param`` the user wrote (api/openapi.py).
JobBody = Annotated[Any, Body(), documented_as(JobCreate)]
ADAPTER_TAR = streamed(
    "A tar of the PEFT adapter folder (adapter_config.json, weights), for "
    "PeftModel.from_pretrained once unpacked.",
    "application/x-tar",
)


@router.post("")
def create_job(services: ServicesDep, owner: OwnerDep, body: JobBody = None) -> FineTuningJob:
    with services.sessions() as session:
        with session.begin():
            job = job_service.create_job(services, session, owner, body)
        # Enqueue only after the commit: a worker must never receive an id it cannot load.
        job_service.enqueue_committed(services, job)
        return render_job(job)


@router.post("/estimate")
def estimate_job(
    services: ServicesDep, session: SessionDep, owner: OwnerDep, body: JobBody = None
) -> planning.JobEstimate:
    return planning.estimate(services, session, owner, body)


@router.get("")
async def list_jobs(
    request: Request,
    reads: ReadsDep,
    owner: OwnerDep,
    after: str | None = None,
    limit: Annotated[int, Query()] = 20,
    status: Annotated[
        JobStatus | None, Query(description="Ours: only the jobs in this status.")
    ] = None,
) -> FineTuningJobList:
    query, params = job_queries.list_jobs_query(owner, after, _metadata_filter(request), status)
    return await reads.run(
        lambda session: page(session, query, limit, render_job, FineTuningJobList, params)
    )


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
async def retrieve_job(reads: ReadsDep, owner: OwnerDep, job_id: str) -> FineTuningJob:
    return await reads.run(
        lambda session: render_job(*job_queries.get_job_with_place(session, owner, job_id))
    )


@router.get("/{job_id}/spec")
async def job_spec(reads: ReadsDep, owner: OwnerDep, job_id: str) -> FineTuningJobSpec:
    """Ours: the body as submitted beside the spec as resolved (the dashboard shows both)."""

    def read(session: Session) -> FineTuningJobSpec:
        job = job_queries.get_job(session, owner, job_id)
        return FineTuningJobSpec(
            object="fine_tuning.job.spec",
            fine_tuning_job_id=job.id,
            submitted=job.request,
            resolved=job.spec,
        )

    return await reads.run(read)


@router.post("/{job_id}/cancel")
def cancel_job(session: SessionDep, owner: OwnerDep, job_id: str) -> FineTuningJob:
    with session.begin():
        job = job_service.cancel_job(session, owner, job_id)
    return render_job(job)


@router.post("/{job_id}/pause")
def pause_job(session: SessionDep, owner: OwnerDep, job_id: str) -> FineTuningJob:
    with session.begin():
        job = job_service.pause_job(session, owner, job_id)
    return render_job(job)


@router.post("/{job_id}/resume")
def resume_job(services: ServicesDep, owner: OwnerDep, job_id: str) -> FineTuningJob:
    with services.sessions() as session:
        with session.begin():
            job = job_service.resume_job(session, owner, job_id)
        job_service.enqueue_committed(services, job)
        return render_job(job)


@router.get(
    "/{job_id}/events",
    response_model=FineTuningJobEventList,
    responses=streamed(
        "A page of events, newest first; with stream=true, the events as server-sent events "
        "(as .../events/stream).",
        "text/event-stream",
    ),
)
async def list_events(
    request: Request,
    services: ServicesDep,
    reads: ReadsDep,
    owner: OwnerDep,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query()] = 20,
    stream: bool = False,
    last_event_id: Annotated[str | None, Header(alias="last-event-id")] = None,
) -> FineTuningJobEventList | StreamingResponse:
    if stream:  # the same as .../events/stream (api/routes/streams.py)
        return streams.stream_response(
            request, services, owner, job_id, last_event_id or after, "events"
        )

    def read(session: Session) -> FineTuningJobEventList:
        query, params = job_queries.events_query(session, owner, job_id, after)
        events = page(session, query, limit, render_event, FineTuningJobEventList, params)
        if not events.data:  # no event of this owner's: is there such a job at all?
            job_queries.get_job(session, owner, job_id, with_spec=False)
        return events

    return await reads.run(read)


@router.get("/{job_id}/checkpoints")
async def list_checkpoints(
    reads: ReadsDep,
    owner: OwnerDep,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query()] = 10,
) -> FineTuningJobCheckpointList:
    def read(session: Session) -> FineTuningJobCheckpointList:
        job = job_queries.get_job(session, owner, job_id)
        return page(
            session,
            job_queries.checkpoints_query(job, after),
            limit,
            lambda row: render_checkpoint(job, row),
            FineTuningJobCheckpointList,
        )

    return await reads.run(read)


@router.get("/{job_id}/adapter", response_class=Response, responses=ADAPTER_TAR)
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


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}/adapter", response_class=Response, responses=ADAPTER_TAR
)
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
