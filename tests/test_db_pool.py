"""The API's database pool (api/db.py) against a real Postgres: a connection that idled is
pinged before use and replaced when the server closed it; one in steady use is not pinged,
and a request that finds it closed is a 503 to retry; read sessions run in autocommit, with
no transaction around their statements, and the GET routes' reads (api/reads.py) run in the
event loop on Postgres, in a thread on SQLite."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from api.db import make_async_read_engine, make_engine, make_read_sessionmaker, make_sessionmaker
from api.key_cache import LISTENER_NAME
from api.migration import upgrade
from api.reads import Reads
from api.settings import Settings
from tests.conftest import PG_ADMIN, Api


def pool_engine(settings: Settings, ping_idle_s: float) -> Engine:
    # One pooled connection, so that every checkout gets the same one while it lives.
    return make_engine(
        settings.model_copy(
            update={"db_ping_idle_s": ping_idle_s, "db_pool_size": 1, "db_max_overflow": 0}
        )
    )


def backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def terminate(settings: Settings, pid: int) -> None:
    admin = create_engine(settings.resolved_database_url)
    with admin.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    admin.dispose()


def test_an_idle_connection_closed_by_the_server_is_replaced_before_use(
    pg_settings: Settings,
) -> None:
    engine = pool_engine(pg_settings, ping_idle_s=0.2)
    try:
        first = backend_pid(engine)
        assert backend_pid(engine) == first  # the pool keeps it
        terminate(pg_settings, first)
        time.sleep(0.3)  # idle past db_ping_idle_s: pinged at checkout, found dead
        second = backend_pid(engine)  # no error: the pool opened another
        assert second != first
    finally:
        engine.dispose()


def test_a_connection_in_steady_use_is_not_pinged(pg_settings: Settings) -> None:
    # Idle less than db_ping_idle_s: no ping, so a connection killed under it fails its next
    # statement (SQLAlchemy then discards it, and the one after gets a new connection).
    engine = pool_engine(pg_settings, ping_idle_s=3600)
    try:
        first = backend_pid(engine)
        terminate(pg_settings, first)
        with pytest.raises(OperationalError):
            backend_pid(engine)
        assert backend_pid(engine) != first
    finally:
        engine.dispose()


def test_read_sessions_run_in_autocommit_and_write_sessions_in_a_transaction(
    pg_settings: Settings,
) -> None:
    engine = pool_engine(pg_settings, ping_idle_s=1.0)
    try:
        status = text("SELECT now() = statement_timestamp()")
        with make_read_sessionmaker(engine)() as session:
            # In autocommit each statement is its own transaction: its start is the statement's.
            time.sleep(0.01)
            assert session.execute(status).scalar() is True
        with make_sessionmaker(engine)() as session:
            session.execute(text("SELECT 1"))
            time.sleep(0.01)
            assert session.execute(status).scalar() is False  # now(): when BEGIN ran
        # The shared connection went back to the pool out of autocommit for the writers.
        with make_sessionmaker(engine)() as session:
            assert session.connection().connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]
    finally:
        engine.dispose()


def test_reads_run_in_the_event_loop_in_autocommit_and_in_a_thread_on_sqlite(
    pg_settings: Settings, tmp_path: Path
) -> None:
    status = text("SELECT now() = statement_timestamp()")

    def read(session: Session) -> tuple[object, threading.Thread]:
        time.sleep(0.01)  # in a transaction, now() would lag the statement's start
        return session.execute(status).scalar(), threading.current_thread()

    async def on_postgres() -> tuple[object, threading.Thread]:
        engine = pool_engine(pg_settings, ping_idle_s=1.0)
        reads = Reads(make_async_read_engine(pg_settings), make_read_sessionmaker(engine))
        try:
            return await reads.run(read)
        finally:
            await reads.dispose()
            engine.dispose()

    value, thread = asyncio.run(on_postgres())
    assert value is True and thread is threading.main_thread()  # no thread, no transaction

    sqlite = Settings(data_dir=tmp_path)
    engine = make_engine(sqlite)
    try:
        reads = Reads(make_async_read_engine(sqlite), make_read_sessionmaker(engine))
        assert reads.engine is None
        _, thread = asyncio.run(reads.run(lambda session: (None, threading.current_thread())))
        assert thread is not threading.main_thread()
    finally:
        engine.dispose()


@pytest.fixture
def own_database(pg_settings: Settings) -> Iterator[Settings]:
    """A database of this test's alone: it may close every connection to it."""
    name = f"alignd_pool_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg_settings.resolved_database_url.rsplit("/", 1)[0] + f"/{name}"
    settings = pg_settings.model_copy(update={"database_url": url})
    upgrade(settings)
    yield settings
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def lose_the_connections(settings: Settings) -> int:
    """Closes every connection to the test's own database but the key cache's listener (and
    this one): both of the API's pools lose theirs, as in a Postgres restart."""
    admin = create_engine(settings.resolved_database_url)
    with admin.connect() as conn:
        killed = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND application_name <> :listener"
            ),
            {"listener": LISTENER_NAME},
        ).scalar_one()
    admin.dispose()
    return int(killed)


def test_a_connection_lost_under_the_api_is_a_503_to_retry_then_served(
    own_database: Settings,
) -> None:
    # One pooled connection, never pinged: the server closing it is seen by the next request.
    settings = own_database.model_copy(
        update={"db_pool_size": 1, "db_max_overflow": 0, "db_ping_idle_s": 3600.0}
    )
    api = Api(settings)
    try:
        assert api.http.get("files").status_code == 200  # its key is now remembered
        # Every connection to the database: the key lookup's pool's and the route's among them.
        assert lose_the_connections(settings) >= 2
        # In a route: the statement fails, the connection is discarded, the client is told
        # to come back (the openai SDK retries a 503 after Retry-After).
        lost = api.http.get("files")
        assert lost.status_code == 503, lost.text
        assert lost.headers["retry-after"] == "1"
        assert lost.json()["error"]["code"] == "database_unavailable"
        assert api.http.get("files").status_code == 200  # a new connection
        # In the key lookup (a key not seen before), before any route: its pool's connection
        # was closed in the same blow and has not been used since. The same answer.
        fresh = api.as_owner("db-pool")
        lost = fresh.get("files")
        assert lost.status_code == 503, lost.text
        assert lost.json()["error"]["code"] == "database_unavailable"
        assert fresh.get("files").status_code == 200
    finally:
        api.stop()
