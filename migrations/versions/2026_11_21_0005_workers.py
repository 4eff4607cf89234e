"""workers: the worker registry (queues, slots and capabilities of each alignd worker)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("hostname", sa.String(length=256), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("device_kind", sa.String(length=16), nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("device_name", sa.String(length=256), nullable=True),
        sa.Column("precisions", sa.JSON(), nullable=False),
        sa.Column("zero_stages", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("hostname", name=op.f("pk_workers")),
    )


def downgrade() -> None:
    op.drop_table("workers")
