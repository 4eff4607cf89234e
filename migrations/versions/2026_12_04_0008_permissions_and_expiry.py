"""checkpoint_permissions and files.expires_at: OpenAI's last gaps (issue #14, item 6)

``checkpoint_permissions``: an owner lets another owner (OpenAI's "project") read and
download one checkpoint of its job. ``files.expires_at``: OpenAI's ``expires_after`` on an
upload; null for every existing file (files did not expire before). ``uploads.
file_expires_after_s``: the same, asked for when a multi-part upload is created.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f("ix_files_expires_at"), ["expires_at"], unique=False)
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.add_column(sa.Column("file_expires_after_s", sa.Integer(), nullable=True))
    op.create_table(
        "checkpoint_permissions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("checkpoint_id", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("project_id", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["checkpoints.id"],
            name=op.f("fk_checkpoint_permissions_checkpoint_id_checkpoints"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoint_permissions")),
        sa.UniqueConstraint(
            "checkpoint_id", "project_id", name=op.f("uq_checkpoint_permissions_checkpoint_id")
        ),
    )
    with op.batch_alter_table("checkpoint_permissions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_checkpoint_permissions_checkpoint_id"), ["checkpoint_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_checkpoint_permissions_project_id"), ["project_id"], unique=False
        )


def downgrade() -> None:
    op.drop_table("checkpoint_permissions")
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.drop_column("file_expires_after_s")
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_files_expires_at"))
        batch_op.drop_column("expires_at")
