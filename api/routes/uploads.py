"""``/v1/uploads``: OpenAI's Uploads API for files too large for one request."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, File, UploadFile

from api import uploads
from api.deps import OwnerDep, ServicesDep, SessionDep
from api.openapi import ERROR_RESPONSES, documented_as

router = APIRouter(prefix="/v1/uploads", tags=["uploads"], responses=ERROR_RESPONSES)


@router.post("")
def create_upload(
    services: ServicesDep,
    session: SessionDep,
    owner: OwnerDep,
    body: Annotated[Any, Body(), documented_as(uploads.UploadCreate)] = None,
) -> uploads.UploadObject:
    with session.begin():
        row = uploads.create_upload(session, owner, body, services.settings.max_upload_bytes)
    return uploads.render_upload(session, row)


@router.post("/{upload_id}/parts")
def add_part(
    services: ServicesDep,
    session: SessionDep,
    owner: OwnerDep,
    upload_id: str,
    data: Annotated[UploadFile, File(description="The part's bytes (at most 64 MB).")],
) -> uploads.UploadPartObject:
    with session.begin():
        part = uploads.add_part(
            session, owner, upload_id, data.file, services.settings.upload_chunk_bytes
        )
    return uploads.render_part(part)


@router.post("/{upload_id}/complete")
def complete_upload(
    services: ServicesDep,
    session: SessionDep,
    owner: OwnerDep,
    upload_id: str,
    body: Annotated[Any, Body(), documented_as(uploads.UploadComplete)] = None,
) -> uploads.UploadObject:
    with session.begin():
        row = uploads.complete_upload(
            session, owner, upload_id, body, services.settings.upload_chunk_bytes
        )
    return uploads.render_upload(session, row)


@router.post("/{upload_id}/cancel")
def cancel_upload(session: SessionDep, owner: OwnerDep, upload_id: str) -> uploads.UploadObject:
    with session.begin():
        row = uploads.cancel_upload(session, owner, upload_id)
    return uploads.render_upload(session, row)
