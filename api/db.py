"""Engine and sessions. One engine per process, made from the settings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
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
    # Read sessions run in autocommit (make_read_sessionmaker): returning such a connection
    # to the pool needs no rollback, and SQLAlchemy's call of one is a tenth of a close.
    engine = create_engine(
        url, skip_autocommit_rollback=True, **_pool_options(settings, pool_timeout_s)
    )
    _ping_after_idle(engine, settings.db_ping_idle_s)
    return engine


def make_async_read_engine(settings: Settings) -> AsyncEngine | None:
    """The API's engine for reads (api/reads.py): psycopg's async connections, in autocommit,
    pinged after idling like the others. None on SQLite, which has no async driver here.

    Its pool is apart from the sync engine's, and as large as the API's admission limit:
    every read runs inside an admitted request and holds one connection while it runs.
    """
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        return None
    engine = create_async_engine(
        url,
        isolation_level="AUTOCOMMIT",
        skip_autocommit_rollback=True,
        pool_size=settings.api_places,
        max_overflow=0,
        pool_timeout=settings.db_pool_timeout_s,
    )
    _ping_after_idle(engine.sync_engine, settings.db_ping_idle_s)
    return engine


def _ping_after_idle(engine: Engine, idle_s: float) -> None:
    """Ping a pooled connection on checkout only when it sat in the pool ``idle_s`` or more.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout: a round trip per session, two per
    API request (auth and the route), a tenth of the API's CPU under load (issue 13). A
    connection in steady use was proven alive by its last statement; one that idled may have
    been closed under it (a Postgres restart, an idle timeout on the way), so that one is
    pinged, and a dead one is replaced before anyone uses it. A connection that dies while in
    use fails its statement; SQLAlchemy then invalidates it and every older pooled connection,
    so that after a Postgres restart under load the failures are those in flight at the time.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < idle_s:
            return  # new, or in use moments ago
        dialect = engine.dialect
        try:
            alive = dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as error:
            if dialect.is_disconnect(error, dbapi_connection, None):
                # The pool discards this connection and checks out (or opens) another.
                raise exc.DisconnectionError(str(error)) from error
            raise
        if not alive:
            raise exc.DisconnectionError("the connection did not answer a ping")


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


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions for requests that only read, on the same pool: on Postgres in autocommit.

    Each statement then runs on its own snapshot with no ``BEGIN`` before it and no
    ``ROLLBACK`` when the session closes (psycopg sends none on an idle connection): two
    round trips fewer per request. Two statements of one request may then see snapshots a
    moment apart, which a reader of a changing list sees anyway. Never for
    writes: ``session.begin()`` on these sessions opens no database transaction.
    """
    if engine.dialect.name != "postgresql":
        return make_sessionmaker(engine)  # SQLite: one writer at a time, keep transactions
    return sessionmaker(
        engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
    )


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on any error."""
    with factory() as session, session.begin():
        yield session
