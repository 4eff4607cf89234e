"""Dataset files: stored in the database in chunks, validated while they stream in.

A job's results file is the exception: its bytes are in the artifact store (api/results.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy import ColumnElement, delete, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from api.artifacts import ArtifactStore
from api.errors import APIError, invalid, not_found
from api.models import File, FileChunk, Job, new_id, now
from api.pagination import ListPage
from api.results import results_prefix
from trainer_core.formats import DatasetValidator

# Only fine-tuning datasets are served; OpenAI's other purposes belong to other products.
PURPOSES = ("fine-tune",)
ACTIVE_JOB_STATUSES = ("validating_files", "queued", "running", "paused")
# OpenAI's bounds on expires_after.seconds: an hour to 30 days.
EXPIRES_AFTER_MIN_S = 3600
EXPIRES_AFTER_MAX_S = 2_592_000


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
        description=(
            "When the file expires (Unix seconds): from then on it is not found, and its "
            "bytes are deleted (docs/api.md). Absent when it was uploaded without expires_after."
        ),
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
        expires_at=row.expires_at,
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
    expires_after_s: int | None = None,
) -> File:
    """Copy ``stream`` into the database chunk by chunk and validate it on the way.

    The caller commits; any error rolls the whole upload back, so nothing is half-stored.
    ``expires_after_s`` (``expires_after_seconds`` checked it) sets ``expires_at``.
    """
    if purpose not in PURPOSES:
        raise invalid(
            f"Unsupported purpose '{purpose}'; this server accepts: {', '.join(PURPOSES)}.",
            param="purpose",
        )
    created_at = now()
    row = File(
        id=new_id("file"),
        owner=owner,
        created_at=created_at,
        filename=os.path.basename(filename or "upload.jsonl")[:512] or "upload.jsonl",
        purpose=purpose,
        bytes=0,
        status="uploaded",
        expires_at=created_at + expires_after_s if expires_after_s is not None else None,
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


def expires_after_seconds(anchor: object, seconds: object) -> int | None:
    """OpenAI's ``expires_after`` (form fields of a file, or the JSON of an upload), checked:
    None when neither part is given. Both together or neither; the anchor is ``created_at``;
    the seconds an integer from an hour to 30 days."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise invalid(
            "expires_after[anchor] must be 'created_at'"
            + (f" (got {anchor!r})." if anchor is not None else " (it is missing)."),
            param="expires_after.anchor",
        )
    value: int | None = None
    if isinstance(seconds, int) and not isinstance(seconds, bool):
        value = seconds
    elif isinstance(seconds, str) and seconds.strip().isdigit():
        value = int(seconds)
    if value is None or not EXPIRES_AFTER_MIN_S <= value <= EXPIRES_AFTER_MAX_S:
        raise invalid(
            f"expires_after[seconds] must be an integer from {EXPIRES_AFTER_MIN_S} to "
            f"{EXPIRES_AFTER_MAX_S} (got {seconds!r}).",
            param="expires_after.seconds",
        )
    return value


def expired(row: File, at: int | None = None) -> bool:
    return row.expires_at is not None and row.expires_at <= (now() if at is None else at)


def get_file(session: Session, owner: str, file_id: str, *, param: str | None = None) -> File:
    row = session.get(File, file_id)
    # Another owner's file is "not found", never "forbidden": ids must not leak. An expired
    # file is gone for its owner too, even before the sweep has deleted its bytes.
    if row is None or row.owner != owner or expired(row):
        raise not_found("file", file_id, param=param)
    return row


def list_files(owner: str, *, purpose: str | None, after: str | None, order: str) -> Any:
    query = select(File).where(File.owner == owner, live())
    if purpose:
        query = query.where(File.purpose == purpose)
    if order == "asc":
        if after:
            query = query.where(File.id > after)
        return query.order_by(File.id.asc())
    if after:
        query = query.where(File.id < after)
    return query.order_by(File.id.desc())


def delete_file(
    session: Session, owner: str, file_id: str, artifacts: ArtifactStore
) -> FileDeleted:
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
    if row.artifact_key is not None:  # a results file: its object goes with it
        artifacts.delete_prefix(results_prefix(file_id))
    session.delete(row)
    return FileDeleted(id=file_id, object="file", deleted=True)


def live() -> ColumnElement[bool]:
    """Files that have not expired."""
    return File.expires_at.is_(None) | (File.expires_at > now())


def delete_expired(session: Session) -> list[str]:
    """Delete the expired files that no active job needs (the worker's sweep calls it); the
    caller commits. A job created while its file was live keeps it until the job ends, so a
    queued, running or paused job never loses its data (docs/api.md)."""
    needed = (
        select(Job.training_file)
        .where(Job.status.in_(ACTIVE_JOB_STATUSES))
        .union(
            select(Job.validation_file).where(
                Job.status.in_(ACTIVE_JOB_STATUSES), Job.validation_file.is_not(None)
            )
        )
    )
    ids = list(
        session.scalars(
            select(File.id).where(File.expires_at <= now(), File.id.not_in(needed)).limit(1000)
        )
    )
    if ids:
        # The chunks by name rather than by the foreign key's cascade: a database opened
        # without SQLite's foreign_keys pragma would keep them.
        session.execute(delete(FileChunk).where(FileChunk.file_id.in_(ids)))
        session.execute(delete(File).where(File.id.in_(ids)))
    return ids


def chunk_count(session: Session, file_id: str) -> int:
    return session.scalar(select(func.count()).where(FileChunk.file_id == file_id)) or 0


def content(
    session: Session, sessions: sessionmaker[Session], artifacts: ArtifactStore, row: File
) -> Iterator[bytes]:
    """A file's bytes in chunks, from wherever they live: the artifact store for a results
    file, ``file_chunks`` for an upload."""
    if row.artifact_key is None:
        return iter_content(sessions, row.id, chunk_count(session, row.id))
    if artifacts.stat(row.artifact_key) is None:  # a clean 404, not a broken stream
        raise not_found("file", row.id)
    return artifacts.read(row.artifact_key, 0, row.bytes - 1) if row.bytes else iter(())


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
