"""OpenAI's Uploads API: a large file sent in parts, then assembled into one File.

Parts are stored in the database in chunks as they arrive, like files; ``complete`` streams
them, in the order the caller lists, through the same path as a direct upload (chunked
storage plus validation), so an assembled file is indistinguishable from an uploaded one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from api.errors import APIError, invalid, not_found
from api.files import PURPOSES, FileObject, expires_after_seconds, render_file, store_upload
from api.models import File, Upload, UploadPart, UploadPartChunk, new_id, now

UPLOAD_TTL_S = 3600  # OpenAI: an upload expires an hour after it is created
MAX_PART_BYTES = 64 * 1024 * 1024  # OpenAI: each part is at most 64 MB
MAX_UPLOAD_BYTES = 8 * 1024**3


class UploadCreate(BaseModel):
    """The body of ``POST /v1/uploads`` (checked by ``create_upload``)."""

    bytes: int = Field(description="The size of the whole file; the parts must add up to it.")
    filename: str = Field(description="The name the assembled file gets.")
    mime_type: str = Field(description="The file's MIME type (e.g. application/jsonl).")
    purpose: str = Field(description="What it is for: 'fine-tune'.")


class UploadComplete(BaseModel):
    """The body of ``POST /v1/uploads/{id}/complete``."""

    part_ids: list[str] = Field(description="The parts, in the order they make the file.")
    md5: str | None = Field(None, description="Accepted as OpenAI does; not checked.")


class UploadObject(BaseModel):
    """OpenAI's ``upload`` object: a file sent in parts."""

    id: str = Field(description="The upload id (upload-...).")
    object: Literal["upload"] = Field(description="Always 'upload'.")
    bytes: int = Field(description="The size of the whole file, as declared.")
    created_at: int = Field(description="When the upload was created (Unix seconds).")
    expires_at: int = Field(description="When it expires if not completed (Unix seconds).")
    filename: str = Field(description="The name the assembled file gets.")
    purpose: str = Field(description="What it is for: 'fine-tune'.")
    status: Literal["pending", "completed", "cancelled", "expired"] = Field(
        description="pending until completed or cancelled; expired an hour after creation."
    )
    file: FileObject | None = Field(
        description="The assembled, validated file once completed; else null."
    )


class UploadPartObject(BaseModel):
    id: str = Field(description="The part id (part-...), to list in complete's part_ids.")
    object: Literal["upload.part"] = Field(description="Always 'upload.part'.")
    created_at: int = Field(description="When the part was stored (Unix seconds).")
    upload_id: str = Field(description="The upload it belongs to.")


def render_upload(session: Session, row: Upload) -> UploadObject:
    file = session.get(File, row.file_id) if row.file_id else None
    return UploadObject(
        id=row.id,
        object="upload",
        bytes=row.bytes,
        created_at=row.created_at,
        expires_at=row.expires_at,
        filename=row.filename,
        purpose=row.purpose,
        status=_status(row),
        file=render_file(file) if file else None,
    )


def _status(row: Upload) -> str:
    if row.status == "pending" and now() >= row.expires_at:
        return "expired"
    return row.status


def create_upload(session: Session, owner: str, body: Any, max_bytes: int) -> Upload:
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_body")
    for field in ("bytes", "filename", "purpose", "mime_type"):
        if field not in body:
            raise invalid(
                f"Missing required parameter: '{field}'.",
                param=field,
                code="missing_required_parameter",
            )
    size = body["bytes"]
    if (
        not isinstance(size, int)
        or isinstance(size, bool)
        or not 0 < size <= min(max_bytes, MAX_UPLOAD_BYTES)
    ):
        raise invalid(
            f"'bytes' must be an integer between 1 and {min(max_bytes, MAX_UPLOAD_BYTES)}.",
            param="bytes",
        )
    if body["purpose"] not in PURPOSES:
        raise invalid(
            f"Unsupported purpose '{body['purpose']}'; this server accepts: {', '.join(PURPOSES)}.",
            param="purpose",
        )
    if not isinstance(body["filename"], str) or not body["filename"]:
        raise invalid("'filename' must be a non-empty string.", param="filename")
    expires_after = body.get("expires_after")
    if expires_after is not None and not isinstance(expires_after, dict):
        raise invalid("'expires_after' must be an object.", param="expires_after")
    # The file the upload becomes expires this long after it is made (at completion).
    file_expires_after_s = (
        expires_after_seconds(expires_after.get("anchor"), expires_after.get("seconds"))
        if expires_after is not None
        else None
    )
    row = Upload(
        id=new_id("upload"),
        owner=owner,
        created_at=now(),
        expires_at=now() + UPLOAD_TTL_S,
        filename=body["filename"][:512],
        purpose=body["purpose"],
        bytes=size,
        mime_type=str(body["mime_type"])[:128],
        status="pending",
        file_expires_after_s=file_expires_after_s,
    )
    session.add(row)
    return row


def get_upload(session: Session, owner: str, upload_id: str) -> Upload:
    row = session.get(Upload, upload_id)
    if row is None or row.owner != owner:
        raise not_found("upload", upload_id, param="upload_id")
    return row


def _pending(row: Upload) -> None:
    status = _status(row)
    if status != "pending":
        raise invalid(f"Upload {row.id} is {status}.", code="invalid_state")


def add_part(
    session: Session, owner: str, upload_id: str, stream: BinaryIO, chunk_bytes: int
) -> UploadPart:
    row = get_upload(session, owner, upload_id)
    _pending(row)
    part = UploadPart(id=new_id("part"), upload_id=row.id, owner=owner, created_at=now(), bytes=0)
    session.add(part)
    session.flush()
    index = 0
    while chunk := stream.read(chunk_bytes):
        part.bytes += len(chunk)
        if part.bytes > MAX_PART_BYTES:
            raise APIError(
                413,
                f"A part is at most {MAX_PART_BYTES} bytes.",
                param="data",
                code="part_too_large",
            )
        session.execute(insert(UploadPartChunk).values(part_id=part.id, index=index, data=chunk))
        index += 1
    return part


def render_part(part: UploadPart) -> UploadPartObject:
    return UploadPartObject(
        id=part.id, object="upload.part", created_at=part.created_at, upload_id=part.upload_id
    )


class _PartsReader:
    """A read()-able stream over the parts' stored chunks, in the listed order."""

    def __init__(self, session: Session, part_ids: list[str]) -> None:
        self._chunks = self._iter(session, part_ids)
        self._buffer = b""

    @staticmethod
    def _iter(session: Session, part_ids: list[str]) -> Iterator[bytes]:
        for part_id in part_ids:
            count = (
                session.scalar(select(func.count()).where(UploadPartChunk.part_id == part_id)) or 0
            )
            for index in range(count):
                data = session.scalar(
                    select(UploadPartChunk.data).where(
                        UploadPartChunk.part_id == part_id, UploadPartChunk.index == index
                    )
                )
                if data:
                    yield data

    def read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out


def complete_upload(
    session: Session, owner: str, upload_id: str, body: Any, chunk_bytes: int
) -> Upload:
    row = get_upload(session, owner, upload_id)
    _pending(row)
    part_ids = body.get("part_ids") if isinstance(body, dict) else None
    if (
        not isinstance(part_ids, list)
        or not part_ids
        or not all(isinstance(p, str) for p in part_ids)
    ):
        raise invalid("'part_ids' must be a non-empty list of part ids.", param="part_ids")
    if len(set(part_ids)) != len(part_ids):
        raise invalid("'part_ids' lists a part twice.", param="part_ids")
    parts = {
        p.id: p for p in session.scalars(select(UploadPart).where(UploadPart.upload_id == row.id))
    }
    unknown = [p for p in part_ids if p not in parts]
    if unknown:
        raise invalid(f"Part '{unknown[0]}' is not a part of upload {row.id}.", param="part_ids")
    total = sum(parts[p].bytes for p in part_ids)
    if total != row.bytes:
        raise invalid(
            f"The parts hold {total} bytes but the upload was created for {row.bytes}.",
            param="part_ids",
            code="bytes_mismatch",
        )
    file = store_upload(
        session,
        owner=owner,
        purpose=row.purpose,
        filename=row.filename,
        stream=_PartsReader(session, part_ids),  # type: ignore[arg-type]
        chunk_bytes=chunk_bytes,
        max_bytes=row.bytes,
        expires_after_s=row.file_expires_after_s,
    )
    row.file_id = file.id
    row.status = "completed"
    _drop_parts(session, row.id)
    return row


def cancel_upload(session: Session, owner: str, upload_id: str) -> Upload:
    row = get_upload(session, owner, upload_id)
    _pending(row)
    row.status = "cancelled"
    _drop_parts(session, row.id)
    return row


def _drop_parts(session: Session, upload_id: str) -> None:
    for part in session.scalars(select(UploadPart).where(UploadPart.upload_id == upload_id)):
        session.delete(part)
