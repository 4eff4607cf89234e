"""Migrations: upgrade → downgrade → upgrade on Postgres (and on SQLite, the embedded default)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import create_engine, inspect, text

from api.migration import downgrade, upgrade
from api.models import Base
from api.settings import Settings
from tests.conftest import PG_ADMIN
from trainer_core.specs import TrainSpec

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
    "checkpoint_permissions",
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


@pytest.fixture
def pg_database(tmp_path: Path) -> Iterator[Settings]:
    name = f"alignd_mig_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = (
            PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
            + f"/{name}"
        )
        yield Settings(data_dir=tmp_path, database_url=url)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_upgrade_downgrade_upgrade_postgres(pg_database: Settings) -> None:
    round_trip(pg_database)


def chunk_compression(settings: Settings) -> dict[str, str]:
    engine = create_engine(settings.resolved_database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT attrelid::regclass::text AS tab, attcompression AS comp FROM pg_attribute "
                    "WHERE attrelid IN ('file_chunks'::regclass, 'upload_part_chunks'::regclass) "
                    "AND attname = 'data'"
                )
            )
            return {row.tab: row.comp for row in rows}
    finally:
        engine.dispose()


def test_chunks_are_compressed_with_lz4_on_postgres(pg_database: Settings) -> None:
    # 'l' is lz4, '' the server default (pglz); this Postgres (Debian's 15) has lz4.
    upgrade(pg_database)
    assert chunk_compression(pg_database) == {"file_chunks": "l", "upload_part_chunks": "l"}
    downgrade(pg_database, "0010")
    assert chunk_compression(pg_database) == {"file_chunks": "", "upload_part_chunks": ""}


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


# Job rows as the API wrote them before jobs had a spec (revision 0005).
SUPERVISED_HP = {
    "n_epochs": 2,
    "batch_size": 4,
    "learning_rate_multiplier": 1.0,
    "learning_rate": 2e-4,
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.0,
    "lr_scheduler": "linear",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "packing": False,
    "completion_only_loss": True,
    "assistant_only_loss": True,
}
GRPO_HP = {
    **{k: v for k, v in SUPERVISED_HP.items() if k not in ("packing", "completion_only_loss")},
    "learning_rate": 1e-5,
    "max_completion_length": 8,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "num_generations": 2,
    "epsilon": 0.2,
    "epsilon_high": None,
    "beta": 0.0,
    "scale_rewards": "group",
    "loss_type": "dapo",
    "num_iterations": 1,
    "mask_truncated_completions": False,
}
del GRPO_HP["assistant_only_loss"]
REWARD = {"type": "length", "name": "short", "target": 4, "unit": "words"}
ADAPTER = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
RESOURCES = {
    "gpus": 2,
    "zero_stage": 2,
    "offload_optimizer": False,
    "gradient_checkpointing": False,
    "precision": "bf16",
    "worker_class": "gpu",
}
OLD_JOBS: list[dict[str, Any]] = [
    {
        "id": "ftjob-sup",
        "validation_file": "file-valid",
        "seed": 11,
        "method": {"type": "supervised", "supervised": {"hyperparameters": SUPERVISED_HP}},
        "extensions": {
            "adapter": ADAPTER,
            "max_seq_len": 256,
            "integrations": [],
            "resources": RESOURCES,
            "resume_from": "ftckpt-1",
        },
    },
    {
        # A job from before resources existed, of an online method.
        "id": "ftjob-grpo",
        "validation_file": None,
        "seed": 12,
        "method": {
            "type": "grpo",
            "grpo": {"hyperparameters": GRPO_HP, "reward_functions": [REWARD]},
        },
        "extensions": {"adapter": ADAPTER, "max_seq_len": 64, "integrations": []},
    },
]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_old_jobs_get_the_spec_their_worker_built(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    settings = (
        Settings(data_dir=tmp_path)
        if backend == "sqlite"
        else request.getfixturevalue("pg_database")
    )
    upgrade(settings, "0005")
    engine = create_engine(settings.resolved_database_url)
    jobs = sa.table(
        "jobs",
        *(sa.column(name) for name in ("id", "owner", "created_at", "model", "status")),
        *(sa.column(name) for name in ("training_file", "validation_file", "seed")),
        sa.column("cancel_requested"),
        sa.column("result_files", sa.JSON),
        sa.column("method", sa.JSON),
        sa.column("extensions", sa.JSON),
    )
    with engine.begin() as conn:
        for job in OLD_JOBS:
            conn.execute(
                sa.insert(jobs).values(
                    **job,
                    owner="local",
                    created_at=1,
                    model="tiny",
                    status="paused",
                    training_file="file-train",
                    result_files=[],
                    cancel_requested=False,
                )
            )
    upgrade(settings)
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.text("SELECT id, spec FROM jobs")).all())
    engine.dispose()
    specs = {
        job_id: TrainSpec.model_validate(spec if isinstance(spec, dict) else json.loads(spec))
        for job_id, spec in stored.items()
    }
    supervised, grpo = specs["ftjob-sup"], specs["ftjob-grpo"]
    # What the worker used to rebuild key by key from method and extensions.
    assert (supervised.method, supervised.model, supervised.seed) == ("supervised", "tiny", 11)
    assert (supervised.train_file, supervised.validation_file) == ("file-train", "file-valid")
    assert supervised.hyperparameters.model_dump() == SUPERVISED_HP
    assert supervised.adapter.model_dump() == ADAPTER and supervised.max_seq_len == 256
    # Stored before the speed levers and resources.deterministic existed: their defaults
    # (deterministic None: the device decides).
    assert supervised.resources.model_dump() == {
        **RESOURCES,
        "deterministic": None,
        "max_tokens_per_batch": None,
        "padding_free": False,
        "compile": False,
        "liger": False,
    }
    assert supervised.resume_from is None  # the worker's: it unpacks the checkpoint itself
    assert grpo.method == "grpo" and grpo.reward_functions == [REWARD]
    assert grpo.hyperparameters.model_dump() == GRPO_HP
    assert grpo.resources.model_dump() == TrainSpec.model_fields["resources"].default.model_dump()
    downgrade(settings, "0005")
    engine = create_engine(settings.resolved_database_url)
    assert "spec" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    engine.dispose()
