"""Planning before running: token counts, a job's steps and duration, a file's fitness for a
method. Nothing here queues or stores anything.

Token counts use the base model's own ``tokenizer.json`` through the ``tokenizers`` library
(no torch), over the text of every row; chat-template tokens are not counted, so the figure is
a slight undercount. Without a tokenizer file it falls back to bytes / 4 and says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import catalog
from api.errors import invalid
from api.files import chunk_count, get_file, iter_content
from api.job_rendering import FineTuningJobMethod
from api.job_service import plan_job
from api.models import Job
from api.services import Services
from trainer_core.registry import METHODS, MethodType
from trainer_core.specs import TrainSpec

TokenCount = Literal["tokenizer", "approximate"]
TOKEN_COUNT = (
    "tokenizer: counted with the base model's tokenizer.json (chat-template tokens left out); "
    "approximate: bytes / 4, for a model without one."
)


class JobEstimate(BaseModel):
    """What a job would take, planned without queueing anything."""

    object: Literal["fine_tuning.job.estimate"] = Field(
        description="Always 'fine_tuning.job.estimate'."
    )
    model: str = Field(description="The base model.")
    method: FineTuningJobMethod = Field(  # type: ignore[valid-type]
        description="The method as the job would store it, every 'auto' resolved."
    )
    num_examples: int = Field(description="Valid rows in the training file.")
    tokens_per_epoch: int = Field(description="Tokens of one pass over the training file.")
    train_tokens: int = Field(description="tokens_per_epoch times n_epochs.")
    total_steps: int = Field(description="Optimizer steps the run would make.")
    tokens_per_second: float = Field(
        description="Throughput assumed: this server's measured one on the model, or the setting."
    )
    est_duration_s: int | None = Field(description="train_tokens / tokens_per_second, rounded up.")
    token_count: TokenCount = Field(description=TOKEN_COUNT)
    warnings: list[str] = Field(description="What makes the estimate rougher.")


class FileValidateRequest(BaseModel):
    """The body of ``POST /v1/files/{id}/validate`` (both fields optional)."""

    method: MethodType | dict[str, Any] | None = Field(  # type: ignore[valid-type]
        None, description="A method type, or a job's method object ({'type': ...})."
    )
    model: str | None = Field(None, description="A base model whose tokenizer counts the tokens.")


class FileValidationError(BaseModel):
    line: int | None = Field(description="The line's number (1-based); null for the whole file.")
    field: str | None = Field(description="The field of the row at fault, if one is.")
    code: str = Field(description="A machine-readable reason.")
    message: str = Field(description="What is wrong.")


class FileValidation(BaseModel):
    """A file's validation report, and whether it suits a method."""

    object: Literal["file.validation"] = Field(description="Always 'file.validation'.")
    file_id: str = Field(description="The file.")
    method: str | None = Field(description="The method it was checked for, if any.")
    ok: bool = Field(description="Valid, non-empty, and in a format the method takes.")
    format: str | None = Field(description="The dataset format of its rows.")
    num_examples: int = Field(description="Valid rows.")
    num_tokens: int = Field(description="Tokens of one pass over the file.")
    token_count: TokenCount = Field(description=TOKEN_COUNT)
    error_count: int = Field(description="Errors in all (more than errors lists when many).")
    errors: list[FileValidationError] = Field(description="The first errors, by line.")
    warnings: list[str] = Field(description="Warnings (e.g. skipped blank lines).")


# Keys whose string values are structure, not text the model reads.
_NON_TEXT_KEYS = {"role", "type", "name", "tool_call_id", "id"}


@lru_cache(maxsize=8)
def _tokenizer(path: str, _mtime: float) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def tokenizer_for(services: Services, model: str) -> Any | None:
    path = Path(catalog.model_path(services.settings, model)) / "tokenizer.json"
    if not path.is_file():
        return None
    return _tokenizer(str(path), path.stat().st_mtime)


def _texts(value: Any, key: str | None = None) -> Iterator[str]:
    if isinstance(value, str):
        if key not in _NON_TEXT_KEYS:
            yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _texts(v, k)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item, key)


def _lines(services: Services, file_id: str, chunks: int) -> Iterator[bytes]:
    pending = b""
    for chunk in iter_content(services.sessions, file_id, chunks):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from complete
    if pending:
        yield pending


def count_tokens(
    services: Services, session: Session, file_id: str, model: str | None
) -> tuple[int, str]:
    """Tokens of one pass over a file: ``(count, "tokenizer" | "approximate")``."""
    tokenizer = tokenizer_for(services, model) if model else None
    chunks = chunk_count(session, file_id)
    if tokenizer is None:
        size = sum(len(line) for line in _lines(services, file_id, chunks))
        return size // 4, "approximate"
    total = 0
    for line in _lines(services, file_id, chunks):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        texts = list(_texts(row))
        if texts:
            total += sum(
                len(enc.ids) for enc in tokenizer.encode_batch(texts, add_special_tokens=False)
            )
    return total, "tokenizer"


def recent_tokens_per_second(session: Session, model: str) -> float | None:
    """This server's measured throughput on ``model``: its last few succeeded jobs."""
    rows = session.execute(
        select(Job.trained_tokens, Job.started_at, Job.finished_at)
        .where(Job.model == model, Job.status == "succeeded", Job.started_at.is_not(None))
        .order_by(Job.id.desc())
        .limit(5)
    ).all()
    tokens = sum(r.trained_tokens or 0 for r in rows)
    seconds = sum(max(1, (r.finished_at or 0) - (r.started_at or 0)) for r in rows)
    return tokens / seconds if rows and tokens else None


def estimate(services: Services, session: Session, owner: str, raw: Any) -> JobEstimate:
    job = plan_job(services, session, owner, raw)  # the same validation as a real create
    hp = TrainSpec.model_validate(job.spec).hyperparameters
    n_examples = get_file(session, owner, job.training_file).num_examples or 0
    tokens_per_epoch, counted_by = count_tokens(services, session, job.training_file, job.model)
    per_step = hp.batch_size * hp.gradient_accumulation_steps
    total_steps = math.ceil(n_examples / per_step) * hp.n_epochs
    train_tokens = tokens_per_epoch * hp.n_epochs
    measured = recent_tokens_per_second(session, job.model)
    rate = measured or services.settings.estimate_tokens_per_s
    warnings = []
    if counted_by == "approximate":
        warnings.append("no tokenizer.json for this model: tokens estimated as bytes / 4")
    if measured is None:
        warnings.append(
            "no finished job on this model yet: duration from ALIGND_ESTIMATE_TOKENS_PER_S "
            f"({services.settings.estimate_tokens_per_s:g} tokens/s)"
        )
    return JobEstimate(
        object="fine_tuning.job.estimate",
        model=job.model,
        method=FineTuningJobMethod.model_validate(job.method),
        num_examples=n_examples,
        tokens_per_epoch=tokens_per_epoch,
        train_tokens=train_tokens,
        total_steps=total_steps,
        tokens_per_second=round(rate, 1),
        est_duration_s=math.ceil(train_tokens / rate) if rate else None,
        token_count=counted_by,
        warnings=warnings,
    )


def validate_file(
    services: Services, session: Session, owner: str, file_id: str, raw: Any
) -> FileValidation:
    body = raw if isinstance(raw, dict) else {}
    method = body.get("method")
    if isinstance(method, dict):  # {"type": "dpo"} like a job's method, or a bare name
        method = method.get("type")
    if method is not None and (not isinstance(method, str) or method not in METHODS):
        raise invalid(
            f"Unknown method '{method}'. Known: {', '.join(METHODS)}.",
            param="method",
        )
    model = body.get("model")
    if model is not None:
        model = catalog.resolve_base_model(services.settings, str(model))
    row = get_file(session, owner, file_id)
    report = row.validation or {}
    errors = list(report.get("errors", []))
    formats = METHODS[method].dataset_formats if method is not None else ()
    if method is not None and row.format is not None and row.format not in formats:
        errors.append(
            {
                "line": None,
                "field": None,
                "code": "invalid_file_format",
                "message": f"the file is in the {row.format} format; a {method} job takes "
                + ", ".join(formats),
            }
        )
    num_tokens, counted_by = count_tokens(services, session, file_id, model)
    return FileValidation(
        object="file.validation",
        file_id=file_id,
        method=method,
        ok=not errors and report.get("error_count", 0) == 0 and (row.num_examples or 0) > 0,
        format=row.format,
        num_examples=row.num_examples or 0,
        num_tokens=num_tokens,
        token_count=counted_by,
        error_count=max(report.get("error_count", 0), len(errors)),
        errors=errors,
        warnings=report.get("warnings", []),
    )
