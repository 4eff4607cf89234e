"""Fine-tuning jobs as a service: create (check, resolve "auto", store the spec, enqueue),
and the state machine of cancel, pause and resume.

A job is resolved once, here: its ``TrainSpec`` (docs/operations.md, "The job spec") is
stored on the row beside the OpenAI-shaped ``method`` and ``extensions`` it is shown with,
and the worker trains from that spec. Functions take the caller's session and never commit;
the routes own the transactions.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api import catalog, webhooks, workers
from api.errors import APIError, invalid
from api.files import get_file
from api.job_events import add_event
from api.job_queries import get_job, succeeded_job_named
from api.job_schemas import MethodRequest, parse_body, parse_method
from api.models import Checkpoint, Job, new_id, now
from api.services import Services
from trainer_core.registry import METHODS, resolve_hyperparameters
from trainer_core.specs import AdapterSpec, ResourcesSpec, TrainSpec

log = logging.getLogger("alignd.api")

TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_MAX_SEQ_LEN = 1024


def _method_options(
    session: Session, owner: str, method: MethodRequest, http_allowed_hosts: list[str]
) -> dict[str, Any]:
    """Validate and normalise a method block's options (reward functions, reward model).

    Reward functions are data (trainer_core.graders checks them); every reward model they or
    PPO name must be a succeeded reward_model job of the same owner.
    """
    from trainer_core import graders  # no torch: plain data validation

    given = method.options
    options: dict[str, Any] = {}
    prefix = f"method.{method.type}"
    try:
        if "reward_functions" in given:
            options["reward_functions"] = graders.validate_reward_functions(
                given["reward_functions"],
                param=f"{prefix}.reward_functions",
                http_allowed_hosts=http_allowed_hosts,
            )
        if "grader" in given:
            options["grader"] = given["grader"]
            options["reward_functions"] = graders.grader_to_reward_functions(
                given["grader"], param=f"{prefix}.grader", http_allowed_hosts=http_allowed_hosts
            )
    except graders.GraderError as exc:
        raise invalid(str(exc), param=exc.param, code="invalid_grader") from None
    names = graders.reward_model_names(options.get("reward_functions", []))
    for name in sorted(names):
        _reward_model_job(session, owner, name, f"{prefix}.reward_functions")
    if "reward_model" in given:
        name = given["reward_model"]
        if not isinstance(name, str):
            raise invalid("'reward_model' must be a model name.", param=f"{prefix}.reward_model")
        _reward_model_job(session, owner, name, f"{prefix}.reward_model")
        options["reward_model"] = name
    return options


def _reward_model_job(session: Session, owner: str, name: str, param: str) -> Job:
    job = succeeded_job_named(session, owner, name)
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


def plan_job(services: Services, session: Session, owner: str, raw: Any) -> Job:
    """Validate a job body and resolve it into an unsaved Job row (create and estimate)."""
    body = parse_body(raw)
    method = parse_method(body)
    options = _method_options(
        session, owner, method, list(services.settings.reward_http_allowed_hosts)
    )
    model = catalog.resolve_base_model(services.settings, body.model)
    n_examples = _check_file(session, owner, body.training_file, "training_file", method.type)
    if body.validation_file is not None:
        _check_file(session, owner, body.validation_file, "validation_file", method.type)
    adapter = body.adapter or AdapterSpec()
    resolved = resolve_hyperparameters(
        method.type, method.hyperparameters, adapter_type=adapter.type, n_examples=n_examples
    )
    max_seq_len = body.max_seq_len or DEFAULT_MAX_SEQ_LEN
    resources = body.resources or ResourcesSpec()
    substatus = workers.check_resources(session, services.settings, method.type, resources)
    completion = getattr(resolved, "max_completion_length", None)
    if completion is not None and completion >= max_seq_len:
        # The sequence holds the prompt too: fail here, not at the worker's first step.
        raise invalid(
            f"max_completion_length ({completion}) must be below max_seq_len ({max_seq_len}), "
            "which also holds the prompt.",
            param=f"method.{method.type}.hyperparameters.max_completion_length",
        )
    # OpenAI picks a random seed when none is given, and reports it on the job.
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    spec = TrainSpec(
        method=method.type,
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
            "type": method.type,
            method.type: {"hyperparameters": resolved.model_dump(), **options},
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
    job.request = raw  # valid, since plan_job accepted it: a JSON object
    session.add(job)
    session.flush()
    add_event(session, job, f"Created fine-tuning job: {job.id}")
    effort = job.method[job.method["type"]]["hyperparameters"].get("reasoning_effort")
    if effort not in (None, "default"):
        # OpenAI's reinforcement knob for its reasoning models; ours have no reasoning mode.
        # Said once, where the user looks, rather than ignored in silence (issue 14).
        add_event(
            session,
            job,
            f"reasoning_effort '{effort}' has no effect on this model: it has no reasoning "
            "mode, so the job trains as with 'default'",
            level="warning",
            data={"param": f"method.{job.method['type']}.hyperparameters.reasoning_effort"},
        )
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
    # A fresh run for crash recovery: its own attempts (worker/recovery.py), and sent to the
    # broker now (the sweep re-sends a queued job unseen for ALIGND_STALE_HEARTBEAT_S).
    job.attempts = 0
    job.last_error = None
    job.heartbeat_at = now()
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
