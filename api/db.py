"""Engine and sessions. One engine per process, made from the settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from api.settings import Settings


def make_engine(settings: Settings, *, pool_timeout_s: float = 30.0) -> Engine:
    """``pool_timeout_s``: how long a checkout waits for a free connection. The API passes
    its short ``db_pool_timeout_s``; other processes keep SQLAlchemy's 30 s."""
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # The API and the worker are separate processes writing the same file: wait for the
        # lock instead of failing, and use WAL so readers never block the writer.
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            **_pool_options(settings, pool_timeout_s),
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **_pool_options(settings, pool_timeout_s))


def _pool_options(settings: Settings, pool_timeout_s: float) -> dict[str, Any]:
    # In the API the pool is sized with its admission limit (api/admission.py) and the
    # timeout is short: a request waiting for a connection holds a thread, and the answer to
    # a full pool is a quick 503, not a 30 s wait and a 500 (issue 13).
    return {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": pool_timeout_s,
    }


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on any error."""
    with factory() as session, session.begin():
        yield session
