"""Jobs, their events and checkpoints as the API answers them: OpenAI's ``fine_tuning.job``,
``fine_tuning.job.event`` and ``fine_tuning.job.checkpoint`` objects (plus our fields)."""

from __future__ import annotations

from typing import Any

from api import catalog
from api.models import Checkpoint, Job, JobEvent
from trainer_core.specs import ResourcesSpec


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
