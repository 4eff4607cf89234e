"""``/v1/files``: OpenAI's file endpoints, plus our validation report."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from api import files, planning
from api.deps import OwnerDep, ReadsDep, ServicesDep, SessionDep
from api.downloads import content_disposition
from api.openapi import ERROR_RESPONSES, documented_as, streamed
from api.pagination import page

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES)


@router.post("")
def create_file(
    services: ServicesDep,
    session: SessionDep,
    owner: OwnerDep,
    purpose: Annotated[str, Form(description="What the file is for: 'fine-tune'.")],
    file: Annotated[UploadFile, File(description="The JSONL dataset, one example a line.")],
    expires_after_anchor: Annotated[
        str | None,
        Form(alias="expires_after[anchor]", description="OpenAI's expires_after: 'created_at'."),
    ] = None,
    expires_after_seconds: Annotated[
        str | None,
        Form(
            alias="expires_after[seconds]",
            description="OpenAI's expires_after: the file expires this long after its upload "
            f"({files.EXPIRES_AFTER_MIN_S} to {files.EXPIRES_AFTER_MAX_S} s).",
        ),
    ] = None,
) -> files.FileObject:
    settings = services.settings
    expires_after_s = files.expires_after_seconds(expires_after_anchor, expires_after_seconds)
    with session.begin():
        row = files.store_upload(
            session,
            owner=owner,
            purpose=purpose,
            filename=file.filename or "upload.jsonl",
            stream=file.file,
            chunk_bytes=settings.upload_chunk_bytes,
            max_bytes=settings.max_upload_bytes,
            expires_after_s=expires_after_s,
        )
    return files.render_file(row)


@router.get("")
async def list_files(
    reads: ReadsDep,
    owner: OwnerDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query()] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> files.FileList:
    query = files.list_files(owner, purpose=purpose, after=after, order=order)
    return await reads.run(
        lambda session: page(session, query, limit, files.render_file, files.FileList)
    )


@router.get("/{file_id}")
async def retrieve_file(reads: ReadsDep, owner: OwnerDep, file_id: str) -> files.FileObject:
    return await reads.run(
        lambda session: files.render_file(files.get_file(session, owner, file_id))
    )


@router.delete("/{file_id}")
def delete_file(
    services: ServicesDep, session: SessionDep, owner: OwnerDep, file_id: str
) -> files.FileDeleted:
    with session.begin():
        return files.delete_file(session, owner, file_id, services.artifacts)


@router.post("/{file_id}/validate")
def validate_file(
    services: ServicesDep,
    session: SessionDep,
    owner: OwnerDep,
    file_id: str,
    body: Annotated[Any, Body(), documented_as(planning.FileValidateRequest)] = None,
) -> planning.FileValidation:
    return planning.validate_file(services, session, owner, file_id, body)


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses=streamed("The file's bytes, as uploaded.", "application/octet-stream"),
)
def file_content(
    services: ServicesDep, session: SessionDep, owner: OwnerDep, file_id: str
) -> StreamingResponse:
    row = files.get_file(session, owner, file_id)
    return StreamingResponse(
        files.content(session, services.sessions, services.artifacts, row),
        media_type="application/octet-stream",
        headers={
            "content-length": str(row.bytes),
            "content-disposition": content_disposition(row.filename),
        },
    )
