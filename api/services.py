"""What every request needs, built once per app: settings, sessions, queue, artifacts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.artifacts import ArtifactStore, artifact_store
from api.db import (
    make_async_read_engine,
    make_engine,
    make_read_sessionmaker,
    make_sessionmaker,
)
from api.key_cache import LISTENER_NAME, KeyCache
from api.keys import Principal
from api.queue import JobQueue
from api.reads import Reads
from api.settings import Settings


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    # Autocommit on Postgres (api/db.py), never for writes: the key lookups, in a thread.
    read_sessions: sessionmaker[Session]
    # How the GET routes read: in the event loop on Postgres (api/reads.py).
    reads: Reads
    queue: JobQueue
    artifacts: ArtifactStore
    # Valid API keys remembered by this process (api/key_cache.py); off on SQLite.
    key_cache: KeyCache[Principal]

    @classmethod
    def build(cls, settings: Settings) -> Services:
        engine = make_engine(settings, pool_timeout_s=settings.db_pool_timeout_s)
        read_sessions = make_read_sessionmaker(engine)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_sessionmaker(engine),
            read_sessions=read_sessions,
            reads=Reads(make_async_read_engine(settings), read_sessions),
            queue=JobQueue(settings),
            artifacts=artifact_store(settings),
            key_cache=KeyCache(listener_connect(engine), settings.api_key_cache_s),
        )


def listener_connect(engine: Engine) -> Any:
    """Opens a connection of its own, outside the pool, with the pool's connection arguments:
    the key cache's listener holds it for the process's life. None where there is no NOTIFY."""
    if engine.dialect.name != "postgresql":
        return None
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    cparams = {**cparams, "application_name": LISTENER_NAME}
    return lambda: engine.dialect.loaded_dbapi.connect(*cargs, **cparams)
