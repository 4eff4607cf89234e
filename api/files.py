"""Dataset files: stored in the database in chunks, validated while they stream in."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from api.errors import APIError, invalid, not_found
from api.models import File, FileChunk, Job, new_id, now
from api.pagination import ListPage
from trainer_core.formats import DatasetValidator

# Only fine-tuning datasets are served; OpenAI's other purposes belong to other products.
PURPOSES = ("fine-tune",)
ACTIVE_JOB_STATUSES = ("validating_files", "queued", "running", "paused")


def _is_none(value: object) -> bool:
    return value is None


class FileObject(BaseModel):
    """An uploaded dataset file (OpenAI's ``file`` object, plus what our validator found)."""

    id: str = Field(description="The file id (file-...), as jobs name it.")
    object: Literal["file"] = Field(description="Always 'file'.")
    bytes: int = Field(description="The size of the file, in bytes.")
    created_at: int = Field(description="When it was uploaded (Unix seconds).")
    filename: str = Field(description="The name it was uploaded with.")
    purpose: str = Field(
        description="What it is for: 'fine-tune' (uploads) or 'fine-tune-results' (a job's results)."
    )
    status: Literal["uploaded", "processed", "error"] = Field(
        description=(
            "processed: valid, usable by a job; error: invalid (see status_details). The file "
            "is validated while it uploads, so an answer never says 'uploaded'."
        )
    )
    # OpenAI declares these two optional but not nullable: absent, never null, when unset.
    status_details: str | SkipJsonSchema[None] = Field(
        None,
        exclude_if=_is_none,
        description=(
            "Why the file is invalid, naming its first bad lines by number; absent when valid."
        ),
    )
    expires_at: int | SkipJsonSchema[None] = Field(
        None,
        exclude_if=_is_none,
        description="When the file expires (Unix seconds); absent: files do not expire.",
    )
    # Ours: what the validator found.
    format: str | None = Field(
        description=(
            "Ours: the dataset format of its rows (chat, prompt_completion, text, preference, "
            "kto, prompt_only); null when none was found."
        )
    )
    num_examples: int | None = Field(description="Ours: the number of valid rows.")


class FileList(ListPage[FileObject]):
    """A page of files."""


class FileDeleted(BaseModel):
    id: str = Field(description="The id of the deleted file.")
    object: Literal["file"] = Field(description="Always 'file'.")
    deleted: bool = Field(description="Always true.")


def render_file(row: File) -> FileObject:
    return FileObject(
        id=row.id,
        object="file",
        bytes=row.bytes,
        created_at=row.created_at,
        filename=row.filename,
        purpose=row.purpose,
        status=row.status,
        status_details=row.status_details,
        expires_at=None,
        format=row.format,
        num_examples=row.num_examples,
    )


def store_upload(
    session: Session,
    *,
    owner: str,
    purpose: str,
    filename: str,
    stream: BinaryIO,
    chunk_bytes: int,
    max_bytes: int,
) -> File:
    """Copy ``stream`` into the database chunk by chunk and validate it on the way.

    The caller commits; any error rolls the whole upload back, so nothing is half-stored.
    """
    if purpose not in PURPOSES:
        raise invalid(
            f"Unsupported purpose '{purpose}'; this server accepts: {', '.join(PURPOSES)}.",
            param="purpose",
        )
    row = File(
        id=new_id("file"),
        owner=owner,
        created_at=now(),
        filename=os.path.basename(filename or "upload.jsonl")[:512] or "upload.jsonl",
        purpose=purpose,
        bytes=0,
        status="uploaded",
    )
    session.add(row)
    session.flush()
    validator = DatasetValidator()
    index = 0
    while chunk := stream.read(chunk_bytes):
        row.bytes += len(chunk)
        if row.bytes > max_bytes:
            raise APIError(
                413,
                f"File is larger than the limit of {max_bytes} bytes.",
                param="file",
                code="file_too_large",
            )
        # Core insert, not ORM objects: the session must not keep every chunk alive.
        session.execute(insert(FileChunk).values(file_id=row.id, index=index, data=chunk))
        validator.feed(chunk)
        index += 1
    report = validator.finish()
    row.status = "processed" if report.ok else "error"
    row.status_details = report.status_details()
    row.format = report.format
    row.num_examples = report.num_examples
    row.validation = report.to_dict()
    return row


def get_file(session: Session, owner: str, file_id: str, *, param: str | None = None) -> File:
    row = session.get(File, file_id)
    # Another owner's file is "not found", never "forbidden": ids must not leak.
    if row is None or row.owner != owner:
        raise not_found("file", file_id, param=param)
    return row


def list_files(owner: str, *, purpose: str | None, after: str | None, order: str) -> Any:
    query = select(File).where(File.owner == owner)
    if purpose:
        query = query.where(File.purpose == purpose)
    if order == "asc":
        if after:
            query = query.where(File.id > after)
        return query.order_by(File.id.asc())
    if after:
        query = query.where(File.id < after)
    return query.order_by(File.id.desc())


def delete_file(session: Session, owner: str, file_id: str) -> FileDeleted:
    row = get_file(session, owner, file_id)
    in_use = session.scalar(
        select(Job.id)
        .where(Job.owner == owner, Job.status.in_(ACTIVE_JOB_STATUSES))
        .where((Job.training_file == file_id) | (Job.validation_file == file_id))
        .limit(1)
    )
    if in_use:
        raise invalid(
            f"File {file_id} is in use by job {in_use}; cancel the job or wait for it to end.",
            code="file_in_use",
        )
    session.delete(row)
    return FileDeleted(id=file_id, object="file", deleted=True)


def chunk_count(session: Session, file_id: str) -> int:
    return session.scalar(select(func.count()).where(FileChunk.file_id == file_id)) or 0


def iter_content(sessions: sessionmaker[Session], file_id: str, chunks: int) -> Iterator[bytes]:
    """Yield a file's bytes one chunk per query, so memory stays at one chunk."""
    for index in range(chunks):
        with sessions() as session:
            data = session.scalar(
                select(FileChunk.data).where(FileChunk.file_id == file_id, FileChunk.index == index)
            )
        if data is None:
            return
        yield data
