"""Migrations: upgrade → downgrade → upgrade on Postgres (and on SQLite, the embedded default)."""

from __future__ import annotations

import secrets
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, inspect

from api.migration import downgrade, upgrade
from api.models import Base
from api.settings import Settings
from tests.conftest import PG_ADMIN

TABLES = {
    "files",
    "file_chunks",
    "jobs",
    "job_events",
    "job_metrics",
    "checkpoints",
    "api_keys",
    "idempotency_keys",
    "job_logs",
    "webhook_endpoints",
    "webhook_deliveries",
    "uploads",
    "upload_parts",
    "upload_part_chunks",
    "workers",
}


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def round_trip(settings: Settings) -> None:
    url = settings.resolved_database_url
    upgrade(settings)
    assert tables(url) == TABLES
    # The migration creates exactly the columns the models declare.
    engine = create_engine(url)
    inspector = inspect(engine)
    for table in Base.metadata.sorted_tables:
        assert {c["name"] for c in inspector.get_columns(table.name)} == set(table.columns.keys())
    engine.dispose()
    downgrade(settings, "base")
    assert tables(url) == set()
    upgrade(settings)
    assert tables(url) == TABLES


def test_upgrade_downgrade_upgrade_postgres(tmp_path: Path) -> None:
    name = f"alignd_mig_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = (
            PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
            + f"/{name}"
        )
        round_trip(Settings(data_dir=tmp_path, database_url=url))
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_upgrade_downgrade_upgrade_sqlite(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.resolved_database_url.startswith("sqlite:///")
    round_trip(settings)


@pytest.mark.parametrize(
    "env",
    [{}, {"ALIGND_DATABASE_URL": "postgresql+psycopg://x/y", "ALIGND_BROKER_URL": "redis://h:1/0"}],
)
def test_settings_from_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]
) -> None:
    monkeypatch.setenv("ALIGND_DATA_DIR", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.data_dir == tmp_path.resolve()
    if env:
        assert settings.resolved_database_url == env["ALIGND_DATABASE_URL"]
        assert not settings.embedded_broker
    else:
        assert settings.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'alignd.db'}"
        assert settings.embedded_broker and settings.resolved_broker_url == "filesystem://"
        assert settings.artifacts_root == tmp_path.resolve() / "artifacts"
