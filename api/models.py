"""The service's tables. Every row has an owner from the start (design: tenants)."""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints so Alembic can drop them on every backend (SQLite included).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY, not a BIGINT one.
SeqType = BigInteger().with_variant(Integer(), "sqlite")


def now() -> int:
    return int(time.time())


_id_lock = threading.Lock()
_last = 0


def new_id(prefix: str) -> str:
    """A public id that sorts by creation time: prefix, 12 hex digits of ms, 12 random.

    Lists are ordered by id, so this gives the stable newest-first order OpenAI's lists use.
    Within a process the millisecond part never repeats (it moves on by one when two ids fall
    in the same millisecond), so rows made one after another in one request (several grants
    of one POST, say) list in the order they were made rather than by their random part.
    """
    global _last
    with _id_lock:
        _last = max(int(time.time() * 1000), _last + 1)
        ms = _last
    return f"{prefix}-{ms:012x}{secrets.token_hex(6)}"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class File(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(32))
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Ours: the dataset format the validator found, and its full report.
    format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    num_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    validation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # OpenAI's expires_after: from then on the file is not served, and the sweep deletes it
    # once no active job needs it (api/files.py).
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    # Set for a job's results file: its bytes are an object in the artifact store (written by
    # the worker, like the job's adapter), not file_chunks. Uploads stay in file_chunks: they
    # are validated while they stream in, in the one transaction that records them.
    artifact_key: Mapped[str | None] = mapped_column(String(512), nullable=True)


class FileChunk(Base):
    """File contents in fixed-size chunks, so nothing is ever held whole in memory."""

    __tablename__ = "file_chunks"

    file_id: Mapped[str] = mapped_column(
        ForeignKey("files.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    model: Mapped[str] = mapped_column(String(512))
    fine_tuned_model: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    # Finer state than OpenAI's status vocabulary: "cancelling", "uploading_artifacts", ...
    substatus: Mapped[str | None] = mapped_column(String(64), nullable=True)
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # {"type": ..., "<type>": {"hyperparameters": {resolved values}}}
    method: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Our extension fields as the job shows them (adapter, max_seq_len, integrations,
    # resources), and its state: resume_from, the checkpoint a resumed job continues from.
    extensions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The resolved TrainSpec, as the API stores it (docs/operations.md, "The job spec"): what
    # the worker trains from, filling in only local paths and settings. Null only for rows
    # made outside the API (tests' fixtures); jobs from before the column were migrated.
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The body as submitted (after validation; null for jobs from before revision 0009).
    # Deferred: only GET .../jobs/{id}/spec reads it, never a list of jobs.
    request: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, deferred=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_files: Mapped[list[str]] = mapped_column(JSON, default=list)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Running: the last beat of the process training it (docs/operations.md, "Jobs survive
    # faults"). Queued: when it was last handed to the broker or seen by a worker, so that the
    # sweep can re-send a job whose message was lost.
    heartbeat_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Workers that have started the job since its owner last queued it (created or resumed);
    # also the fence of the running attempt: a process whose attempt is no longer the job's
    # writes nothing more (worker/lease.py). How the last worker was lost, if one was.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(256), nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    adapter_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)

    # Insertion order across processes comes from the database, not from clocks.
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    owner: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(16))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class JobMetric(Base):
    __tablename__ = "job_metrics"
    __table_args__ = (Index("ix_job_metrics_job_step", "job_id", "step"),)

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    owner: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger)
    step: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, float]] = mapped_column(JSON)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_step", "job_id", "step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    owner: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    # Where the checkpoint lives in the artifact store: "<key>/adapter.tar", "<key>/state.tar".
    artifact_key: Mapped[str] = mapped_column(String(1024))
    final: Mapped[bool] = mapped_column(Boolean, default=False)


class CheckpointPermission(Base):
    """OpenAI's checkpoint permission: the owner ``project_id`` may read and download this
    checkpoint of another owner's job (api/checkpoint_permissions.py)."""

    __tablename__ = "checkpoint_permissions"
    __table_args__ = (UniqueConstraint("checkpoint_id", "project_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    checkpoint_id: Mapped[str] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="CASCADE"), index=True
    )
    owner: Mapped[str] = mapped_column(String(128))  # the checkpoint's owner, who granted it
    project_id: Mapped[str] = mapped_column(String(128), index=True)  # the grantee (an owner)
    created_at: Mapped[int] = mapped_column(BigInteger)


class ApiKey(Base):
    """A bearer key. Only its SHA-256 is stored: the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # "sk-alignd-...wxyz": enough for an operator to tell keys apart, useless to an attacker.
    hint: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[int] = mapped_column(BigInteger)
    last_used_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class IdempotencyRecord(Base):
    """One ``Idempotency-Key`` of one owner: in progress (``status_code`` null) or its 2xx reply."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)

    owner: Mapped[str] = mapped_column(String(128), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # "POST /v1/files": a key is bound to the request it was first used with.
    request: Mapped[str] = mapped_column(String(2048))
    # Null while the first request runs (its body is hashed as it streams in).
    body_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    content_type: Mapped[str | None] = mapped_column(String(255), nullable=True)
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class JobLog(Base):
    """A job's log lines (the worker's and the trainer's, captured while it runs), redacted."""

    __tablename__ = "job_logs"
    __table_args__ = (Index("ix_job_logs_job_seq", "job_id", "seq"),)

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    owner: Mapped[str] = mapped_column(String(128))
    # Unix seconds with sub-second precision: log lines come many to a second.
    created_at: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(16))
    line: Mapped[str] = mapped_column(Text)


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(256))
    url: Mapped[str] = mapped_column(String(2048))
    event_types: Mapped[list[str]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # enabled | disabled
    # Stored as given to the user (whsec_...): it must be usable to sign. See docs/operations.md.
    secret: Mapped[str] = mapped_column(String(128))
    # After a rotation that keeps the old secret for 24 h, deliveries carry both signatures.
    previous_secret: Mapped[str | None] = mapped_column(String(128), nullable=True)
    previous_secret_expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class WebhookDelivery(Base):
    """One event for one endpoint: the outbox row, its attempts, and how it ended."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    owner: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    # The exact JSON body that is signed and sent (the same bytes on every attempt).
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # pending | succeeded | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Unix seconds (fractional); null once the delivery is settled.
    next_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # [{attempt, at, status_code, error, duration_ms}], one entry per attempt.
    attempt_log: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)


class Upload(Base):
    """OpenAI's Uploads API: a file sent in parts, assembled into a File on completion."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    mime_type: Mapped[str] = mapped_column(String(128))
    # pending | completed | cancelled ("expired" is derived from expires_at when shown)
    status: Mapped[str] = mapped_column(String(16))
    file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # OpenAI's expires_after of the file the upload becomes (seconds after its creation).
    file_expires_after_s: Mapped[int | None] = mapped_column(Integer, nullable=True)


class UploadPart(Base):
    __tablename__ = "upload_parts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)


class UploadPartChunk(Base):
    """A part's bytes in chunks, like a file's, so a 64 MB part is never held whole."""

    __tablename__ = "upload_part_chunks"

    part_id: Mapped[str] = mapped_column(
        ForeignKey("upload_parts.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Worker(Base):
    """A registered ``alignd worker``: its queues and what it can run (operator data).

    Not a tenant's row, so it has no owner: no ``/v1`` route shows it. Each worker upserts
    its row when it is ready and refreshes ``last_seen`` while it runs; a stopped worker's row
    stays, and counts as known until ``ALIGND_WORKER_REGISTRY_TTL_S`` after its last refresh.
    """

    __tablename__ = "workers"

    # The Celery node name (``celery@host``), as jobs record it in ``jobs.worker``.
    hostname: Mapped[str] = mapped_column(String(256), primary_key=True)
    queues: Mapped[list[str]] = mapped_column(JSON)
    device_kind: Mapped[str] = mapped_column(String(16))  # cuda | cpu
    # Devices it hands out to jobs (GPUs, or CPU processes on a machine without CUDA).
    slots: Mapped[int] = mapped_column(Integer)
    device_name: Mapped[str | None] = mapped_column(String(256), nullable=True)
    precisions: Mapped[list[str]] = mapped_column(JSON)
    zero_stages: Mapped[list[int]] = mapped_column(JSON)
    # Unix seconds (fractional).
    started_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
