"""file and upload-part chunks: lz4 TOAST compression on Postgres (issue #13, uploads)

Postgres compresses a 1 MiB chunk before it stores it, by default with pglz: under a 200 MB
upload that compression was the largest cost after validation (docs/benchmarks.md, "API
under load": 88.6 -> 114.0 MB/s for 600-byte rows, 145 -> 227 MB/s for 50 KB rows with lz4).
lz4 compresses JSONL a little less and several times faster. Chunks stored before this
revision keep pglz; Postgres reads both. A server built without lz4 keeps pglz, and SQLite
has no TOAST: nothing changes there.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHUNK_COLUMNS = (("file_chunks", "data"), ("upload_part_chunks", "data"))


def _lz4_available() -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    query = sa.text(
        "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
    )
    return bool(bind.execute(query).scalar())


def _set_compression(method: str) -> None:
    for table, column in CHUNK_COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method}")


def upgrade() -> None:
    if _lz4_available():
        _set_compression("lz4")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _set_compression("default")
