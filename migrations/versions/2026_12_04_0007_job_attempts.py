"""jobs.attempts and jobs.last_error: crash recovery's attempt counter (issue #13)

``attempts`` counts the workers that have started the job since it was last queued by its
owner (created or resumed); a job whose worker is lost goes back to the queue until it has
used ``ALIGND_MAX_ATTEMPTS``. ``last_error`` says how the last worker was lost. Existing jobs
start at 0: a job running during the upgrade counts its current run as its first attempt
when the sweep next sees it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("last_error")
        batch_op.drop_column("attempts")
