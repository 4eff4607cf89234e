"""Fine-tuning jobs: creation (validate, resolve "auto", store, enqueue), cancel, rendering.

A job is resolved once, at creation: its ``TrainSpec`` (docs/operations.md, "The job spec")
is stored on the row beside the OpenAI-shaped ``method`` and ``extensions`` it is shown
with, and the worker trains from that spec.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session

from api import catalog, webhooks, workers
from api.errors import APIError, from_validation_error, invalid, not_found
from api.files import get_file
from api.models import Checkpoint, Job, JobEvent, new_id, now
from api.services import Services
from trainer_core.registry import METHODS, required_options, resolve_hyperparameters
from trainer_core.specs import AdapterSpec, ResourcesSpec, TrainSpec

log = logging.getLogger("alignd.api")

TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_MAX_SEQ_LEN = 1024
_SUFFIX = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class JobCreate(BaseModel):
    """The body of ``POST /v1/fine_tuning/jobs``: OpenAI's fields plus our extensions."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=512)]
    training_file: Annotated[str, Field(min_length=1, max_length=64)]
    validation_file: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    suffix: str | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] | None = None  # OpenAI's deprecated top-level form
    integrations: list[dict[str, Any]] | None = None
    # Ours (the SDK sends them through extra_body).
    adapter: AdapterSpec | None = None
    max_seq_len: Annotated[int, Field(ge=8, le=1_048_576)] | None = None
    resources: ResourcesSpec | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        # The suffix becomes part of a model name split on ':', so keep it to a safe alphabet.
        if value is not None and not _SUFFIX.match(value):
            raise ValueError("must be 1-64 characters of letters, digits, '.', '_' or '-'")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > 16:
            raise ValueError("at most 16 key-value pairs")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("keys are at most 64 characters and values at most 512")
        return value


def parse_body(raw: Any) -> JobCreate:
    if not isinstance(raw, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_body")
    try:
        return JobCreate.model_validate(raw)
    except ValidationError as exc:
        error = from_validation_error(exc)
        if error.param == "resources" and "offload_optimizer" in error.message:
            # ResourcesSpec's cross-field rule reports on the whole object; name the field.
            error.param = "resources.offload_optimizer"
        raise error from None


def _method_request(body: JobCreate) -> tuple[str, BaseModel, str]:
    """Return (method type, its hyperparameters request, the param path they came from)."""
    if body.method is None:
        return (
            "supervised",
            _hyperparameters("supervised", body.hyperparameters, "hyperparameters"),
            "hyperparameters",
        )
    if body.hyperparameters is not None:
        raise invalid(
            "Give hyperparameters inside 'method', not also at the top level.",
            param="hyperparameters",
        )
    method_type = body.method.get("type")
    if not isinstance(method_type, str):
        raise invalid(
            "Missing required parameter: 'method.type'.",
            param="method.type",
            code="missing_required_parameter",
        )
    if method_type not in METHODS:
        raise invalid(
            f"Unsupported method type '{method_type}'. Supported: {', '.join(METHODS)}.",
            param="method.type",
            code="unsupported_method",
        )
    for key in body.method:
        if key not in ("type", method_type):
            raise invalid(
                f"Unknown parameter: 'method.{key}'.",
                param=f"method.{key}",
                code="unknown_parameter",
            )
    block = body.method.get(method_type) or {}
    if not isinstance(block, dict):
        raise invalid(f"'method.{method_type}' must be an object.", param=f"method.{method_type}")
    options = METHODS[method_type].options.model_fields
    for key in block:
        if key != "hyperparameters" and key not in options:
            raise invalid(
                f"Unknown parameter: 'method.{method_type}.{key}'.",
                param=f"method.{method_type}.{key}",
                code="unknown_parameter",
            )
    for key in required_options(method_type):
        if block.get(key) is None:
            raise invalid(
                f"Missing required parameter: 'method.{method_type}.{key}'.",
                param=f"method.{method_type}.{key}",
                code="missing_required_parameter",
            )
    prefix = f"method.{method_type}.hyperparameters"
    return method_type, _hyperparameters(method_type, block.get("hyperparameters"), prefix), prefix


def _hyperparameters(method_type: str, raw: Any, prefix: str) -> BaseModel:
    if raw is not None and not isinstance(raw, dict):
        raise invalid(f"'{prefix}' must be an object.", param=prefix)
    try:
        return METHODS[method_type].request.model_validate(raw or {})
    except ValidationError as exc:
        raise from_validation_error(exc, prefix=prefix) from None


def _method_options(
    session: Session,
    owner: str,
    method_type: str,
    block: dict[str, Any],
    http_allowed_hosts: list[str],
) -> dict[str, Any]:
    """Validate and normalise a method block's options (reward functions, reward model).

    Reward functions are data (trainer_core.graders checks them); every reward model they or
    PPO name must be a succeeded reward_model job of the same owner.
    """
    from trainer_core import graders  # no torch: plain data validation

    options: dict[str, Any] = {}
    prefix = f"method.{method_type}"
    try:
        if "reward_functions" in block:
            options["reward_functions"] = graders.validate_reward_functions(
                block["reward_functions"],
                param=f"{prefix}.reward_functions",
                http_allowed_hosts=http_allowed_hosts,
            )
        if "grader" in block:
            options["grader"] = block["grader"]
            options["reward_functions"] = graders.grader_to_reward_functions(
                block["grader"], param=f"{prefix}.grader", http_allowed_hosts=http_allowed_hosts
            )
    except graders.GraderError as exc:
        raise invalid(str(exc), param=exc.param, code="invalid_grader") from None
    names = graders.reward_model_names(options.get("reward_functions", []))
    for name in sorted(names):
        _reward_model_job(session, owner, name, f"{prefix}.reward_functions")
    if "reward_model" in block:
        name = block["reward_model"]
        if not isinstance(name, str):
            raise invalid("'reward_model' must be a model name.", param=f"{prefix}.reward_model")
        _reward_model_job(session, owner, name, f"{prefix}.reward_model")
        options["reward_model"] = name
    return options


def _reward_model_job(session: Session, owner: str, name: str, param: str) -> Job:
    job = session.scalar(
        select(Job).where(
            Job.owner == owner, Job.fine_tuned_model == name, Job.status == "succeeded"
        )
    )
    if job is None or job.method.get("type") != "reward_model":
        raise invalid(
            f"'{name}' is not a finished reward_model fine-tune of yours.",
            param=param,
            code="reward_model_not_found",
        )
    return job


def _check_file(session: Session, owner: str, file_id: str, param: str, method_type: str) -> int:
    """The file must exist, be processed, and be in a format the method trains on."""
    try:
        row = get_file(session, owner, file_id, param=param)
    except APIError:
        raise invalid(f"File '{file_id}' not found.", param=param, code="file_not_found") from None
    if row.status == "error":
        raise invalid(
            f"File '{file_id}' failed validation: {row.status_details}",
            param=param,
            code="invalid_file",
        )
    if row.status != "processed":
        raise invalid(
            f"File '{file_id}' is not processed yet (status {row.status}).",
            param=param,
            code="file_not_ready",
        )
    formats = METHODS[method_type].dataset_formats
    if row.format not in formats:
        raise invalid(
            f"File '{file_id}' is in the {row.format} format, which a {method_type} job cannot "
            f"train on (it takes: {', '.join(formats)}).",
            param=param,
            code="invalid_file_format",
        )
    return row.num_examples or 0


def add_event(
    session: Session,
    job: Job,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    # Serialise a job's event inserts on its row, so that their seq order is their commit
    # order and an event stream never skips one (api/streams.py). A no-op on SQLite.
    session.execute(select(Job.id).where(Job.id == job.id).with_for_update(key_share=True))
    session.add(
        JobEvent(
            id=new_id("ftevent"),
            job_id=job.id,
            owner=job.owner,
            created_at=now(),
            level=level,
            type=type,
            message=message,
            data=data,
        )
    )


def plan_job(services: Services, session: Session, owner: str, raw: Any) -> Job:
    """Validate a job body and resolve it into an unsaved Job row (create and estimate)."""
    body = parse_body(raw)
    method_type, request, _ = _method_request(body)
    block = (body.method or {}).get(method_type) or {}
    options = _method_options(
        session, owner, method_type, block, list(services.settings.reward_http_allowed_hosts)
    )
    model = catalog.resolve_base_model(services.settings, body.model)
    n_examples = _check_file(session, owner, body.training_file, "training_file", method_type)
    if body.validation_file is not None:
        _check_file(session, owner, body.validation_file, "validation_file", method_type)
    adapter = body.adapter or AdapterSpec()
    resolved = resolve_hyperparameters(
        method_type, request, adapter_type=adapter.type, n_examples=n_examples
    )
    max_seq_len = body.max_seq_len or DEFAULT_MAX_SEQ_LEN
    resources = body.resources or ResourcesSpec()
    substatus = workers.check_resources(session, services.settings, method_type, resources)
    completion = getattr(resolved, "max_completion_length", None)
    if completion is not None and completion >= max_seq_len:
        # The sequence holds the prompt too: fail here, not at the worker's first step.
        raise invalid(
            f"max_completion_length ({completion}) must be below max_seq_len ({max_seq_len}), "
            "which also holds the prompt.",
            param=f"method.{method_type}.hyperparameters.max_completion_length",
        )
    # OpenAI picks a random seed when none is given, and reports it on the job.
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    spec = TrainSpec(
        method=method_type,
        model=model,
        train_file=body.training_file,
        validation_file=body.validation_file,
        seed=seed,
        max_seq_len=max_seq_len,
        adapter=adapter,
        hyperparameters=resolved,
        reward_functions=options.get("reward_functions", []),
        reward_model=options.get("reward_model"),
        resources=resources,
    )
    return Job(
        id=new_id("ftjob"),
        owner=owner,
        created_at=now(),
        model=model,
        status="queued",
        substatus=substatus,
        training_file=body.training_file,
        validation_file=body.validation_file,
        method={
            "type": method_type,
            method_type: {"hyperparameters": resolved.model_dump(), **options},
        },
        extensions={
            "adapter": adapter.model_dump(),
            "max_seq_len": max_seq_len,
            "integrations": body.integrations or [],
            "resources": resources.model_dump(),
        },
        spec=spec.stored(),
        seed=seed,
        suffix=body.suffix,
        user_metadata=body.metadata,
        result_files=[],
        cancel_requested=False,
    )


def create_job(services: Services, session: Session, owner: str, raw: Any) -> Job:
    job = plan_job(services, session, owner, raw)
    session.add(job)
    session.flush()
    add_event(session, job, f"Created fine-tuning job: {job.id}")
    return job


def enqueue_committed(services: Services, job: Job) -> None:
    """Hand a committed job to the broker, on its queue; if that fails, fail the job rather
    than lose it."""
    queue = workers.job_queue(services.settings, job.extensions)
    if job.status == "queued" and job.substatus is None:
        _note_unserved(services, job, queue)  # a resumed job: is its queue still served?
    try:
        services.queue.enqueue(job.id, queue)
    except Exception as exc:
        log.exception("could not enqueue %s", job.id)
        with services.sessions() as session, session.begin():
            failed = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == "queued")
                .values(
                    status="failed",
                    finished_at=now(),
                    error={
                        "code": "queue_unavailable",
                        "message": f"The job queue is unreachable: {exc}",
                        "param": None,
                    },
                )
            )
            if failed.rowcount:  # type: ignore[attr-defined]
                webhooks.on_status(session, job.owner, job.id, "failed")
        raise APIError(
            503, "The job queue is unreachable; the job was not started.", code="queue_unavailable"
        ) from exc


def _note_unserved(services: Services, job: Job, queue: str) -> None:
    with services.sessions() as session, session.begin():
        if workers.known_workers(session, services.settings, queue):
            return
        note = workers.unserved_substatus(queue)
        done = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "queued", Job.substatus.is_(None))
            .values(substatus=note)
        )
        if done.rowcount:  # type: ignore[attr-defined]
            job.substatus = note


def get_job(session: Session, owner: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.owner != owner:
        raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id")
    return job


def cancel_job(session: Session, owner: str, job_id: str) -> Job:
    """Queued or paused: cancelled at once. Running: flagged; the worker stops at the next step."""
    job = get_job(session, owner, job_id)
    if job.status in TERMINAL:
        # 400, not 409: the openai SDK retries 409s.
        raise invalid(
            f"Job {job_id} is already {job.status} and cannot be cancelled.", code="invalid_state"
        )
    if _settle_at_once(session, job, "cancelled"):
        add_event(session, job, "Job cancelled")
        return job
    if job.status == "running" and job.substatus != "cancelling":
        job.cancel_requested = True
        job.substatus = "cancelling"
        add_event(session, job, "Cancellation requested; the job stops at its next step")
    return job


def pause_job(session: Session, owner: str, job_id: str) -> Job:
    """Queued: paused at once. Running: the worker stops at its next step, saves a
    checkpoint there and frees itself; the job is then ``paused`` until resumed."""
    job = get_job(session, owner, job_id)
    if job.status == "paused":
        return job
    if job.status in TERMINAL:
        raise invalid(f"Job {job_id} is {job.status} and cannot be paused.", code="invalid_state")
    if job.status != "running" and _settle_at_once(session, job, "paused"):
        add_event(session, job, "Job paused")
        return job
    if job.status == "running" and not job.cancel_requested:
        job.cancel_requested = True
        job.substatus = "pausing"
        add_event(session, job, "Pause requested; the job stops at its next step with a checkpoint")
    return job


def resume_job(session: Session, owner: str, job_id: str) -> Job:
    """Paused or failed: queue it again, to continue from its latest checkpoint if it has one."""
    job = get_job(session, owner, job_id)
    if job.status not in ("paused", "failed"):
        raise invalid(
            f"Job {job_id} is {job.status}; only paused or failed jobs can be resumed.",
            code="invalid_state",
        )
    latest = session.scalar(
        select(Checkpoint)
        .where(Checkpoint.job_id == job.id)
        .order_by(Checkpoint.step.desc())
        .limit(1)
    )
    # A new dict: SQLAlchemy notices a JSON column change only on assignment.
    job.extensions = {**job.extensions, "resume_from": latest.id if latest else None}
    job.status = "queued"
    job.substatus = None
    job.cancel_requested = False
    job.error = None
    job.finished_at = None
    job.estimated_finish = None
    if latest is not None:
        add_event(
            session,
            job,
            f"Job resumed from its checkpoint at step {latest.step}",
            data={"step": latest.step},
        )
    else:
        add_event(session, job, "Job requeued from the start (it has no checkpoint)")
    return job


def _settle_at_once(session: Session, job: Job, status: str) -> bool:
    """Move a job no worker holds (queued or paused) straight to ``status``.

    A conditional update, so a worker claiming the job at the same moment wins cleanly:
    then nothing changes here and the caller falls back to asking the worker to stop.
    """
    if job.status not in ("queued", "validating_files", "paused"):
        return False
    finished = now() if status in TERMINAL else None
    done = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == job.status)
        .values(status=status, finished_at=finished, substatus=None)
    )
    session.refresh(job)
    if done.rowcount:  # type: ignore[attr-defined]
        webhooks.on_status(session, job.owner, job.id, status)
    return bool(done.rowcount)  # type: ignore[attr-defined]


def list_jobs_query(
    owner: str, after: str | None, metadata: dict[str, str] | None = None
) -> Select[Any]:
    """Newest first. ``metadata``: OpenAI's ``metadata[k]=v`` filter (all pairs must match);
    an empty dict selects jobs without metadata (the SDK's ``metadata=null``)."""
    query = select(Job).where(Job.owner == owner)
    if metadata == {}:
        query = query.where(Job.user_metadata.is_(None) | (Job.user_metadata.as_string() == "null"))
    for key, value in (metadata or {}).items():
        query = query.where(Job.user_metadata[key].as_string() == value)
    if after:
        query = query.where(Job.id < after)
    return query.order_by(Job.id.desc())


def events_query(session: Session, job: Job, after: str | None) -> Select[Any]:
    query = select(JobEvent).where(JobEvent.job_id == job.id)
    if after:
        seq = session.scalar(
            select(JobEvent.seq).where(JobEvent.id == after, JobEvent.job_id == job.id)
        )
        if seq is None:
            raise invalid(f"No event '{after}' in job {job.id}.", param="after")
        query = query.where(JobEvent.seq < seq)
    return query.order_by(JobEvent.seq.desc())


def checkpoints_query(job: Job, after: str | None) -> Select[Any]:
    query = select(Checkpoint).where(Checkpoint.job_id == job.id)
    if after:
        query = query.where(Checkpoint.id < after)
    return query.order_by(Checkpoint.id.desc())


def get_checkpoint(session: Session, job: Job, checkpoint_id: str) -> Checkpoint:
    row = session.get(Checkpoint, checkpoint_id)
    if row is None or row.job_id != job.id:
        raise not_found("checkpoint", checkpoint_id, param="checkpoint_id")
    return row


def queue_positions(session: Session) -> dict[str, int]:
    """1-based place in the queue of every queued job, across all owners (oldest first).

    Other owners' jobs count, since they are ahead in the same queue, but nothing of them
    is shown: a caller only ever sees the positions of its own jobs.
    """
    queued = session.scalars(select(Job.id).where(Job.status == "queued").order_by(Job.id))
    return {job_id: i + 1 for i, job_id in enumerate(queued)}


def render_job(job: Job, queue_position: int | None = None) -> dict[str, Any]:
    method_type = job.method["type"]
    hyperparameters = job.method[method_type]["hyperparameters"]
    progress = None
    if job.total_steps:
        step = job.step or 0
        progress = {
            "step": step,
            "total_steps": job.total_steps,
            "percent": round(100.0 * step / job.total_steps, 1),
        }
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": job.owner,
        "status": job.status,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "result_files": job.result_files,
        "trained_tokens": job.trained_tokens,
        # OpenAI shows the supervised three at the top level too (deprecated there).
        "hyperparameters": {
            key: hyperparameters[key]
            for key in ("n_epochs", "batch_size", "learning_rate_multiplier")
            if key in hyperparameters
        },
        "method": job.method,
        "seed": job.seed,
        "error": job.error,
        "estimated_finish": job.estimated_finish if job.status == "running" else None,
        "integrations": job.extensions.get("integrations", []),
        "metadata": job.user_metadata,
        "suffix": job.suffix,
        "user_provided_suffix": job.suffix,
        # Ours.
        "substatus": job.substatus,
        "queue_position": queue_position,
        "progress": progress,
        "adapter": job.extensions.get("adapter"),
        "max_seq_len": job.extensions.get("max_seq_len"),
        # Jobs from before resources existed ran with the defaults.
        "resources": job.extensions.get("resources") or ResourcesSpec().model_dump(),
    }


def render_event(row: JobEvent) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.job.event",
        "created_at": row.created_at,
        "level": row.level,
        "message": row.message,
        "type": row.type,
        "data": row.data or {},
    }


def render_checkpoint(job: Job, row: Checkpoint) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": row.created_at,
        "fine_tuned_model_checkpoint": f"{catalog.fine_tuned_name(job)}:ckpt-step-{row.step}",
        "fine_tuning_job_id": job.id,
        "step_number": row.step,
        "metrics": {"step": float(row.step), **row.metrics},
    }
