"""jobs.spec: the resolved TrainSpec, stored once at creation (issue #11)

Existing jobs get theirs from the columns the worker used to rebuild it from (``method`` and
``extensions``), with the keys the worker used, so a job queued or paused before this
migration trains exactly as it would have. The mapping is written out here, not imported
from the application, so that this migration keeps meaning what it meant.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

jobs = sa.table(
    "jobs",
    sa.column("id", sa.String),
    sa.column("model", sa.String),
    sa.column("training_file", sa.String),
    sa.column("validation_file", sa.String),
    sa.column("seed", sa.BigInteger),
    sa.column("method", sa.JSON),
    sa.column("extensions", sa.JSON),
    sa.column("spec", sa.JSON),
)


def spec_of(row: Any) -> dict[str, Any]:
    """The stored spec of a job from before this migration (TrainSpec's stored form then)."""
    method = row.method or {}
    method_type = method.get("type", "supervised")
    block = method.get(method_type) or {}
    extensions = row.extensions or {}
    spec: dict[str, Any] = {
        "method": method_type,
        "model": row.model,
        "train_file": row.training_file,
        "validation_file": row.validation_file,
        "seed": row.seed,
        "hyperparameters": block.get("hyperparameters", {}),
        "reward_functions": block.get("reward_functions", []),
        "reward_model": block.get("reward_model"),
    }
    for key in ("max_seq_len", "adapter"):
        if key in extensions:
            spec[key] = extensions[key]
    # Jobs from before resources existed ran with the defaults.
    if extensions.get("resources"):
        spec["resources"] = extensions["resources"]
    return spec


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spec", sa.JSON(), nullable=True))
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(
            jobs.c.id,
            jobs.c.model,
            jobs.c.training_file,
            jobs.c.validation_file,
            jobs.c.seed,
            jobs.c.method,
            jobs.c.extensions,
        )
    ).all()
    for row in rows:
        connection.execute(sa.update(jobs).where(jobs.c.id == row.id).values(spec=spec_of(row)))


def downgrade() -> None:
    # method and extensions still hold everything the spec was made from.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("spec")
