"""One job, start to end: claim it, fetch its files, run the method, record how it ended.

Safe to deliver twice: the claim is a conditional update (queued → running), so a second
delivery finds nothing to claim and returns. Whatever happens in training, the job ends in a
terminal status with a reason; it is never left ``running`` by an exception.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path

from sqlalchemy import ColumnElement, delete, select, update

import trainer_core
from api import webhooks
from api.artifacts import ArtifactStoreError
from api.catalog import fine_tuned_name, model_path
from api.files import chunk_count, iter_content
from api.job_events import add_event
from api.job_queries import succeeded_job_named
from api.models import Checkpoint, File, Job, JobMetric, now
from api.results import StoredResults, record_results, results_prefix, upload_results
from api.services import Services
from trainer_core import graders
from trainer_core.seams import RunResult
from trainer_core.specs import RewardModelRef, TrainSpec
from worker import integrations, job_logs, launch
from worker import metrics as worker_metrics
from worker.lease import Abandoned, Beat, Lease, transient
from worker.sinks import ArtifactCheckpointStore, DatabaseSink, StopFlag

log = logging.getLogger("alignd.worker")


def claimable() -> ColumnElement[bool]:
    """Jobs a delivery may start: queued ones. A running job whose worker was lost is queued
    again by the sweep first (worker/recovery.py), which counts its attempts."""
    return Job.status == "queued"


def claim(services: Services, job_id: str, worker: str) -> Job | None:
    """queued → running, as attempt ``attempts + 1``: one delivery wins, the others see
    nothing to claim."""
    with services.sessions() as session, session.begin():
        result = session.execute(
            update(Job)
            .where(Job.id == job_id)
            .where(claimable())
            .values(
                status="running",
                started_at=now(),
                heartbeat_at=now(),
                worker=worker,
                substatus=None,
                attempts=Job.attempts + 1,
            )
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            return None
        job = session.get_one(Job, job_id)
        if job.attempts == 1:
            add_event(session, job, "Fine-tuning job started", data={"worker": worker})
            webhooks.on_status(session, job.owner, job.id, "running")
        return job


def recovery_point(services: Services, job: Job) -> Checkpoint | None:
    """Where a re-claimed job (attempt 2 or later) continues: its last complete checkpoint
    (a row exists only once its files are stored). The lost attempt's metric points after it
    are deleted, so that the series has each step once, from the run that the job continues;
    the event says where it resumed."""
    with services.sessions() as session, session.begin():
        latest = session.scalar(
            select(Checkpoint)
            .where(Checkpoint.job_id == job.id)
            .order_by(Checkpoint.step.desc())
            .limit(1)
        )
        step = latest.step if latest is not None else 0
        session.execute(delete(JobMetric).where(JobMetric.job_id == job.id, JobMetric.step > step))
        row = session.get_one(Job, job.id)
        row.step = step
        if latest is not None:
            message = f"Resumed at step {step} after the worker was lost (attempt {job.attempts})"
        else:
            message = (
                "Restarted from the beginning after the worker was lost (attempt "
                f"{job.attempts}): no checkpoint had been saved yet"
            )
        add_event(
            session,
            row,
            message,
            data={"step": step, "attempt": job.attempts, "last_error": job.last_error},
        )
        return latest


def fetch_file(services: Services, owner: str, file_id: str, dest: Path) -> Path:
    with services.sessions() as session:
        row = session.scalar(select(File).where(File.id == file_id, File.owner == owner))
        if row is None:
            raise FileNotFoundError(f"file {file_id} no longer exists")
        chunks = chunk_count(session, file_id)
    with open(dest, "wb") as fh:
        for data in iter_content(services.sessions, file_id, chunks):
            fh.write(data)
    return dest


def fetch_checkpoint(services: Services, checkpoint_id: str, dest: Path) -> Path:
    """Unpack a stored checkpoint (adapter/ and state/) into ``dest`` to resume from it."""
    with services.sessions() as session:
        row = session.get(Checkpoint, checkpoint_id)
        if row is None:
            raise FileNotFoundError(f"checkpoint {checkpoint_id} to resume from no longer exists")
        key = row.artifact_key
    dest.mkdir(parents=True, exist_ok=True)
    for part in ("adapter", "state"):
        tar_path = dest / f"{part}.tar"
        services.artifacts.get_file(f"{key}/{part}.tar", tar_path)
        with tarfile.open(tar_path) as tar:
            tar.extractall(dest / part, filter="data")
        tar_path.unlink()
    return dest


def fetch_reward_models(
    services: Services, owner: str, names: set[str], dest: Path
) -> dict[str, RewardModelRef]:
    """Download the final adapter of each named reward_model fine-tune next to the job."""
    refs: dict[str, RewardModelRef] = {}
    for name in sorted(names):
        with services.sessions() as session:
            job = succeeded_job_named(session, owner, name)
        if job is None or not job.adapter_key:
            raise FileNotFoundError(f"reward model {name} no longer exists")
        folder = dest / job.id
        tar_path = dest / f"{job.id}.tar"
        dest.mkdir(parents=True, exist_ok=True)
        services.artifacts.get_file(job.adapter_key, tar_path)
        with tarfile.open(tar_path) as tar:
            tar.extractall(folder, filter="data")
        tar_path.unlink()
        refs[name] = RewardModelRef(
            base=model_path(services.settings, job.model), adapter=str(folder)
        )
    return refs


def build_spec(
    services: Services,
    job: Job,
    train_path: Path,
    valid_path: Path | None,
    resume_dir: Path | None = None,
) -> TrainSpec:
    """The job's stored spec with what only this machine knows filled in: the model's folder
    and the files' paths in place of their names and ids, the checkpoint to resume from, the
    reward models' folders, and the operator's settings (docs/operations.md, "The job spec")."""
    if job.spec is None:
        raise ValueError(f"job {job.id} has no stored spec (it was not created through the API)")
    spec = TrainSpec.model_validate(job.spec)
    settings = services.settings
    names = graders.reward_model_names(spec.reward_functions) if spec.reward_functions else set()
    if spec.reward_model:
        names.add(spec.reward_model)
    local = spec.model_copy(
        update={
            "model": model_path(settings, spec.model),
            "train_file": str(train_path),
            "validation_file": str(valid_path) if valid_path else None,
            "resume_from": str(resume_dir) if resume_dir else None,
            "reward_models": fetch_reward_models(
                services, job.owner, names, train_path.parent / "reward_models"
            ),
            "trust_remote_code": settings.trust_remote_code,
            "allow_hub": settings.allow_hub,
            "num_threads": settings.torch_threads,
            "reward_http_allowed_hosts": list(settings.reward_http_allowed_hosts),
            "reward_http_timeout_s": settings.reward_http_timeout_s,
        }
    )
    # model_copy does not validate: check the operator's values as every spec field is checked
    # (ALIGND_TORCH_THREADS=0 fails the job here, not inside torch).
    return TrainSpec.model_validate(local.model_dump())


def discard_results(services: Services, results: StoredResults) -> None:
    """Delete an uploaded results file that no row will name; a failure only leaves it."""
    try:
        services.artifacts.delete_prefix(results_prefix(results.file_id))
    except ArtifactStoreError as exc:
        log.warning("could not delete the unrecorded results file %s: %s", results.key, exc)


def finish(
    services: Services,
    job_id: str,
    status: str,
    *,
    result: RunResult | None = None,
    error: dict[str, str | None] | None = None,
    attempt: int | None = None,
    results: StoredResults | None = None,
) -> None:
    """Record how the job ended. With ``attempt``: only while that attempt still holds the
    running job (the sweep may have queued it again meanwhile). A success needs ``results``,
    its results file already in the artifact store (``upload_results``)."""
    if status == "succeeded" and results is None:
        raise ValueError("a succeeded job's end needs its uploaded results file")
    with services.sessions() as session, session.begin():
        job = session.get_one(Job, job_id, with_for_update=True)
        if attempt is not None and (job.status != "running" or job.attempts != attempt):
            log.warning(
                "job %s: attempt %s no longer holds it; not recording its end", job_id, attempt
            )
            if results is not None:  # no row will name it
                discard_results(services, results)
            return
        if status == "cancelled" and job.substatus == "pausing":
            status = "paused"  # the stop was a pause: the job waits for a resume
        job.status = status
        webhooks.on_status(session, job.owner, job.id, status)
        job.substatus = None
        job.cancel_requested = False
        job.finished_at = now() if status != "paused" else None
        job.estimated_finish = None
        if result is not None:
            job.trained_tokens = result.trained_tokens
            job.step = result.step
        if status == "succeeded" and results is not None:  # a success always has it
            job.fine_tuned_model = fine_tuned_name(job)
            job.result_files = [record_results(session, job, results).id]
            add_event(session, job, f"New fine-tuned model created: {job.fine_tuned_model}")
            add_event(session, job, "The job has successfully completed")
        elif status == "paused":
            add_event(session, job, f"Job paused at step {job.step or 0}; resume it to continue")
        elif status == "cancelled":
            add_event(session, job, f"Job cancelled at step {job.step or 0}")
        else:
            job.error = error
            add_event(
                session,
                job,
                f"The job failed: {error['message'] if error else 'unknown error'}",
                level="error",
            )


def execute(
    services: Services,
    job_id: str,
    worker: str,
    *,
    devices: list[str] | None = None,
    device_kind: str = "cpu",
) -> str | None:
    """Run one job; returns its terminal status, or None when there was nothing to claim."""
    job = claim(services, job_id, worker)
    if job is None:
        log.info("job %s not claimable (already taken, cancelled or finished)", job_id)
        return None
    logs = job_logs.capture(services, job)  # this thread's log lines, into the job's log
    log.info("job %s started on %s (method %s)", job_id, worker, job.method["type"])
    workdir = services.settings.work_dir / job_id
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    settings = services.settings
    lease = Lease(services.sessions, job_id, job.attempts, settings.db_retry_s)
    # The heart beats from the claim on: fetching a large file or a reward model may take
    # longer than the stale threshold.
    beat = Beat(lease, settings.heartbeat_s).start()
    try:
        train_path = fetch_file(services, job.owner, job.training_file, workdir / "train.jsonl")
        valid_path = (
            fetch_file(services, job.owner, job.validation_file, workdir / "valid.jsonl")
            if job.validation_file
            else None
        )
        resume_from: str | None = job.extensions.get("resume_from")
        if job.attempts > 1:  # the job lost its worker: continue where it was last saved
            latest = recovery_point(services, job)
            resume_from = latest.id if latest is not None else None
        resume_dir = None
        if resume_from:
            resume_dir = fetch_checkpoint(services, resume_from, workdir / "resume")
        spec = build_spec(services, job, train_path, valid_path, resume_dir)
        lease.check()
        result: RunResult | None
        if spec.resources.distributed or device_kind == "cuda":
            # Its own processes: several ranks, DeepSpeed, or GPUs pinned to this job.
            result = launch.run_group(
                spec,
                job_id=job_id,
                owner=job.owner,
                attempt=job.attempts,
                workdir=workdir,
                should_stop=StopFlag(lease),
                devices=devices,
                device_kind=device_kind,
            )
        else:
            with integrations.reporting(
                DatabaseSink(lease, job.owner, method=job.method["type"]),
                job_id=job_id,
                integrations=job.extensions.get("integrations", []),
                config=job.spec or {},
            ) as sink:
                result = trainer_core.run(
                    spec,
                    sink,
                    ArtifactCheckpointStore(lease, services.artifacts, job.owner),
                    StopFlag(lease),
                )
        beat.stop()
        status = "cancelled" if result is None or result.status == "stopped" else "succeeded"
        # The results file goes to the store before the finishing transaction locks the job's
        # row; a failed put fails the job below (artifact_store_error), with nothing recorded.
        results = (
            upload_results(services.sessions, services.artifacts, job_id)
            if status == "succeeded"
            else None
        )
        finish(services, job_id, status, result=result, attempt=job.attempts, results=results)
        if result is not None:
            log.info("job %s ended at step %s (%s)", job_id, result.step, result.status)
        else:
            log.info("job %s ended (stopped before rank 0 reported)", job_id)
        return status
    except Abandoned as exc:
        # Nothing more may be recorded: the job is another attempt's now, or the database is
        # gone and the sweep will resume it from its last checkpoint once it is back.
        log.error("job %s: attempt %d stopped: %s", job_id, job.attempts, exc)
        return None
    except Exception as exc:
        if transient(exc):  # a read outside the lease (the files) met a database blip
            log.error(
                "job %s: the database failed under it (%s); the sweep resumes it", job_id, exc
            )
            return None
        log.exception("job %s failed", job_id)
        code = (
            "file_not_found"
            if isinstance(exc, FileNotFoundError)
            else "artifact_store_error"
            if isinstance(exc, ArtifactStoreError)
            else "training_error"
        )
        message = str(exc) or exc.__class__.__name__
        finish(
            services,
            job_id,
            "failed",
            error={"code": code, "message": message[:2000], "param": None},
            attempt=job.attempts,
        )
        return "failed"
    finally:
        beat.stop()
        worker_metrics.job_ended()
        shutil.rmtree(workdir, ignore_errors=True)
        logs.close()


def pending_jobs(services: Services) -> list[str]:
    """Queued jobs (a broker may have lost their messages)."""
    with services.sessions() as session:
        return list(session.scalars(select(Job.id).where(claimable()).order_by(Job.id)))
