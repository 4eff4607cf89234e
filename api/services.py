"""What every request needs, built once per app: settings, sessions, queue, artifacts."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.artifacts import ArtifactStore, artifact_store
from api.db import make_engine, make_sessionmaker
from api.queue import JobQueue
from api.settings import Settings


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    queue: JobQueue
    artifacts: ArtifactStore

    @classmethod
    def build(cls, settings: Settings) -> Services:
        engine = make_engine(settings, pool_timeout_s=settings.db_pool_timeout_s)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_sessionmaker(engine),
            queue=JobQueue(settings),
            artifacts=artifact_store(settings),
        )
