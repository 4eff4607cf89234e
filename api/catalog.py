"""Base models (folders in the models dir) and finished fine-tunes, as ``/v1/models`` shows them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import invalid, not_found
from api.models import Checkpoint, Job
from api.settings import Settings

_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelObject(BaseModel):
    """A model this owner can fine-tune or use: a base model of the server."""

    id: str = Field(description="The name jobs give as 'model' (or a fine-tune's full name).")
    object: Literal["model"] = Field(description="Always 'model'.")
    created: int = Field(description="When it was added or finished training (Unix seconds).")
    owned_by: str = Field(description="'system' for base models; the owner for fine-tunes.")


class FineTunedModelObject(ModelObject):
    """One of the owner's succeeded fine-tunes."""

    # Ours: what the fine-tune is (a reward_model job's model scores, it does not chat).
    method: str = Field(description="Ours: the method that trained it (method.type).")
    parent: str = Field(description="Ours: the base model it was trained from.")


class ModelList(BaseModel):
    object: Literal["list"] = Field(description="Always 'list'.")
    data: list[FineTunedModelObject | ModelObject] = Field(
        description="Base models (by name), then the owner's fine-tunes (newest first)."
    )
    has_more: bool = Field(description="Always false: the list is never paged.")


class ModelDeleted(BaseModel):
    id: str = Field(description="The deleted fine-tune's name.")
    object: Literal["model"] = Field(description="Always 'model'.")
    deleted: bool = Field(description="Always true.")


def base_model_dirs(settings: Settings) -> list[Path]:
    root = settings.resolved_models_dir
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "config.json").is_file())


def resolve_base_model(settings: Settings, name: str) -> str:
    """Check that ``name`` is a model this server can train; returns the name to store."""
    if name.startswith("ft:"):
        raise invalid(
            "Fine-tuning a fine-tuned model is not supported yet; name its base model.",
            param="model",
            code="model_not_supported",
        )
    if _FOLDER_NAME.match(name) and (settings.resolved_models_dir / name / "config.json").is_file():
        return name
    if settings.allow_hub and _HUB_ID.match(name):
        return name
    available = ", ".join(p.name for p in base_model_dirs(settings)) or "none"
    raise invalid(
        f"Model '{name}' not found. Available base models: {available}.",
        param="model",
        code="model_not_found",
    )


def model_path(settings: Settings, name: str) -> str:
    """Where the worker loads ``name`` from: its folder, or the hub id itself."""
    folder = settings.resolved_models_dir / name
    return str(folder) if (folder / "config.json").is_file() else name


def fine_tuned_name(job: Job) -> str:
    return f"ft:{job.model}:{job.owner}:{job.suffix or ''}:{job.id}"


def list_models(session: Session, settings: Settings, owner: str) -> list[ModelObject]:
    models = [
        ModelObject(
            id=p.name,
            object="model",
            created=int((p / "config.json").stat().st_mtime),
            owned_by="system",
        )
        for p in base_model_dirs(settings)
    ]
    jobs = session.scalars(
        select(Job)
        .where(Job.owner == owner, Job.status == "succeeded", Job.fine_tuned_model.is_not(None))
        # A deleted fine-tune keeps its job (history) but loses its adapter.
        .where(Job.adapter_key.is_not(None))
        .order_by(Job.id.desc())
    )
    models += [
        FineTunedModelObject(
            id=job.fine_tuned_model,
            object="model",
            created=job.finished_at or job.created_at,
            owned_by=owner,
            method=job.method["type"],
            parent=job.model,
        )
        for job in jobs
    ]
    return models


def get_model(session: Session, settings: Settings, owner: str, model_id: str) -> ModelObject:
    for model in list_models(session, settings, owner):
        if model.id == model_id:
            return model
    raise not_found("model", model_id, param="model")


def delete_model(
    session: Session, settings: Settings, owner: str, model_id: str, artifacts: Any
) -> ModelDeleted:
    """Delete one of the owner's fine-tunes: its adapter and checkpoints go; its job stays."""
    job = session.scalar(
        select(Job).where(
            Job.owner == owner, Job.fine_tuned_model == model_id, Job.adapter_key.is_not(None)
        )
    )
    if job is None:
        if any(p.name == model_id for p in base_model_dirs(settings)):
            raise invalid(
                f"'{model_id}' is a base model; base models are managed by the operator.",
                param="model",
                code="model_not_deletable",
            )
        raise not_found("model", model_id, param="model")
    artifacts.delete_prefix(f"jobs/{job.id}")
    job.adapter_key = None
    for checkpoint in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)):
        session.delete(checkpoint)
    return ModelDeleted(id=model_id, object="model", deleted=True)
