"""``/v1/fine_tuning/checkpoints``: OpenAI's checkpoint permissions, and what a permission
gives: the checkpoint and its adapter (api/checkpoint_permissions.py says who sees what).

``{ckpt}`` is a ``fine_tuned_model_checkpoint`` (``ft:...:ckpt-step-N``) or a checkpoint id.
It takes the rest of the path: a base model named by a hub id holds a '/'.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from api import checkpoint_permissions as permissions
from api.deps import OwnerDep, ReadsDep, ServicesDep, SessionDep
from api.downloads import artifact_response
from api.job_rendering import FineTuningJobCheckpoint, render_checkpoint
from api.openapi import ERROR_RESPONSES, documented_as
from api.pagination import page
from api.routes.jobs import ADAPTER_TAR

router = APIRouter(
    prefix="/v1/fine_tuning/checkpoints", tags=["fine-tuning"], responses=ERROR_RESPONSES
)

PermissionBody = Annotated[Any, Body(), documented_as(permissions.PermissionCreate)]


@router.post("/{ckpt:path}/permissions")
def create_permissions(
    session: SessionDep, owner: OwnerDep, ckpt: str, body: PermissionBody = None
) -> permissions.CheckpointPermissionList:
    request = permissions.parse_create(body)
    with session.begin():
        rows = permissions.grant(session, owner, ckpt, request)
        data = [permissions.render(row) for row in rows]
    return permissions.CheckpointPermissionList(
        object="list",
        data=data,
        has_more=False,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{ckpt:path}/permissions")
async def list_permissions(
    reads: ReadsDep,
    owner: OwnerDep,
    ckpt: str,
    after: str | None = None,
    limit: Annotated[int, Query()] = 10,
    order: Literal["ascending", "descending"] = "descending",
    project_id: str | None = None,
) -> permissions.CheckpointPermissionList:
    def read(session: Session) -> permissions.CheckpointPermissionList:
        query = permissions.list_query(
            session, owner, ckpt, after=after, order=order, project_id=project_id
        )
        return page(session, query, limit, permissions.render, permissions.CheckpointPermissionList)

    return await reads.run(read)


@router.delete("/{ckpt:path}/permissions/{permission_id}")
def delete_permission(
    session: SessionDep, owner: OwnerDep, ckpt: str, permission_id: str
) -> permissions.CheckpointPermissionDeleted:
    with session.begin():
        return permissions.revoke(session, owner, ckpt, permission_id)


@router.get("/{ckpt:path}/adapter", response_class=Response, responses=ADAPTER_TAR)
def download_adapter(
    request: Request, services: ServicesDep, session: SessionDep, owner: OwnerDep, ckpt: str
) -> Response:
    job, row = permissions.readable_checkpoint(session, owner, ckpt)
    return artifact_response(
        request,
        services.artifacts,
        f"{row.artifact_key}/adapter.tar",
        f"{job.id}-step-{row.step}-adapter.tar",
    )


@router.get("/{ckpt:path}")
async def retrieve_checkpoint(
    reads: ReadsDep, owner: OwnerDep, ckpt: str
) -> FineTuningJobCheckpoint:
    return await reads.run(
        lambda session: render_checkpoint(*permissions.readable_checkpoint(session, owner, ckpt))
    )
