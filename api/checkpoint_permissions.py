"""OpenAI's checkpoint permissions, in our tenancy: the owner of a job lets other owners read
and download one of its checkpoints.

OpenAI grants a fine-tuned model checkpoint to *projects* of an organisation. alignd has no
projects: a tenant is an owner (api/keys.py), so a ``project_id`` names an owner. A checkpoint
is named as OpenAI names it, by its ``fine_tuned_model_checkpoint``
(``ft:<base>:<owner>:<suffix>:<job>:ckpt-step-N``), or by our checkpoint id (``ftckpt-...``).
Only the checkpoint's owner manages its permissions; to anyone else the checkpoint does not
exist (404), granted or not. A granted owner may retrieve the checkpoint and download its
adapter (``GET /v1/fine_tuning/checkpoints/{ckpt}`` and ``.../adapter``); revoking the
permission takes that away at the next request.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from api.catalog import fine_tuned_name
from api.errors import from_validation_error, invalid, not_found
from api.keys import OWNER_NAME
from api.models import Checkpoint, CheckpointPermission, Job, new_id, now
from api.pagination import ListPage

# One request grants at most this many owners: enough for any real sharing, and a bound on
# the rows one POST writes.
MAX_PROJECT_IDS = 100
_STEP = ":ckpt-step-"


class PermissionCreate(BaseModel):
    """The body of ``POST .../permissions``."""

    model_config = ConfigDict(extra="forbid")

    project_ids: list[str] = Field(
        min_length=1,
        max_length=MAX_PROJECT_IDS,
        description=(
            f"The owners (OpenAI: projects) to grant the checkpoint to; 1 to {MAX_PROJECT_IDS}."
        ),
    )


class CheckpointPermissionObject(BaseModel):
    """OpenAI's ``checkpoint.permission``."""

    id: str = Field(description="The permission id (cp-...).")
    object: Literal["checkpoint.permission"] = Field(description="Always 'checkpoint.permission'.")
    created_at: int = Field(description="When it was granted (Unix seconds).")
    project_id: str = Field(description="The owner it grants the checkpoint to.")


class CheckpointPermissionList(ListPage[CheckpointPermissionObject]):
    """A page of a checkpoint's permissions."""


class CheckpointPermissionDeleted(BaseModel):
    id: str = Field(description="The id of the revoked permission.")
    object: Literal["checkpoint.permission"] = Field(description="Always 'checkpoint.permission'.")
    deleted: bool = Field(description="Always true.")


def render(row: CheckpointPermission) -> CheckpointPermissionObject:
    return CheckpointPermissionObject(
        id=row.id,
        object="checkpoint.permission",
        created_at=row.created_at,
        project_id=row.project_id,
    )


def find_checkpoint(session: Session, name: str) -> tuple[Job, Checkpoint] | None:
    """The checkpoint ``name`` refers to (its ``fine_tuned_model_checkpoint`` or its id) and
    its job, whoever owns them; None when there is none."""
    if name.startswith("ftckpt-"):
        row = session.get(Checkpoint, name)
        if row is None:
            return None
        return session.get_one(Job, row.job_id), row
    model, sep, step = name.rpartition(_STEP)
    if not sep or not step.isdigit():
        return None
    job = session.get(Job, model.rsplit(":", 1)[-1])
    # The whole name must match, not only the job id at its end: the base, owner and suffix
    # are part of what was shown to the user.
    if job is None or fine_tuned_name(job) != model:
        return None
    row = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == int(step))
    )
    return (job, row) if row is not None else None


def owned_checkpoint(session: Session, owner: str, name: str) -> tuple[Job, Checkpoint]:
    """The checkpoint, for managing its permissions: only its owner sees it (404 otherwise)."""
    found = find_checkpoint(session, name)
    if found is None or found[0].owner != owner:
        raise not_found("checkpoint", name, param="fine_tuned_model_checkpoint")
    return found


def readable_checkpoint(session: Session, owner: str, name: str) -> tuple[Job, Checkpoint]:
    """The checkpoint, for reading it: its owner's, or granted to ``owner`` (404 otherwise)."""
    found = find_checkpoint(session, name)
    if found is not None and found[0].owner != owner:
        granted = session.scalar(
            select(CheckpointPermission.id).where(
                CheckpointPermission.checkpoint_id == found[1].id,
                CheckpointPermission.project_id == owner,
            )
        )
        if granted is None:
            found = None
    if found is None:
        raise not_found("checkpoint", name, param="fine_tuned_model_checkpoint")
    return found


def parse_create(raw: Any) -> PermissionCreate:
    """The POST body, checked: each project id must be a well-formed owner name."""
    try:
        body = PermissionCreate.model_validate(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    for index, project_id in enumerate(body.project_ids):
        if not OWNER_NAME.match(project_id):
            raise invalid(
                f"'{project_id}' is not an owner: 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit.",
                param=f"project_ids.{index}",
            )
    return body


def grant(
    session: Session, owner: str, name: str, body: PermissionCreate
) -> list[CheckpointPermission]:
    """Grant the checkpoint to each of ``body.project_ids``, in the order given. Granting an
    owner that already has it returns its existing permission (no duplicate rows), so a
    retried POST is harmless."""
    _, checkpoint = owned_checkpoint(session, owner, name)
    existing = {
        row.project_id: row
        for row in session.scalars(
            select(CheckpointPermission).where(CheckpointPermission.checkpoint_id == checkpoint.id)
        )
    }
    rows: list[CheckpointPermission] = []
    for project_id in dict.fromkeys(body.project_ids):
        row = existing.get(project_id)
        if row is None:
            row = CheckpointPermission(
                id=new_id("cp"),
                checkpoint_id=checkpoint.id,
                owner=owner,
                project_id=project_id,
                created_at=now(),
            )
            session.add(row)
        rows.append(row)
    session.flush()
    return rows


def list_query(
    session: Session,
    owner: str,
    name: str,
    *,
    after: str | None,
    order: Literal["ascending", "descending"],
    project_id: str | None,
) -> Select[Any]:
    _, checkpoint = owned_checkpoint(session, owner, name)
    query = select(CheckpointPermission).where(CheckpointPermission.checkpoint_id == checkpoint.id)
    if project_id is not None:
        query = query.where(CheckpointPermission.project_id == project_id)
    # Ids sort by creation time (api/models.py new_id), so they are the cursor in both orders.
    if order == "ascending":
        if after:
            query = query.where(CheckpointPermission.id > after)
        return query.order_by(CheckpointPermission.id.asc())
    if after:
        query = query.where(CheckpointPermission.id < after)
    return query.order_by(CheckpointPermission.id.desc())


def revoke(
    session: Session, owner: str, name: str, permission_id: str
) -> CheckpointPermissionDeleted:
    _, checkpoint = owned_checkpoint(session, owner, name)
    row = session.get(CheckpointPermission, permission_id)
    if row is None or row.checkpoint_id != checkpoint.id:
        raise not_found("checkpoint permission", permission_id, param="permission_id")
    session.delete(row)
    return CheckpointPermissionDeleted(
        id=permission_id, object="checkpoint.permission", deleted=True
    )
