"""How the GET routes read: a route hands a function of a session to :meth:`Reads.run`.

On Postgres the function runs in the event loop, on an autocommit session of an async engine
(psycopg's async connection), through SQLAlchemy's ``AsyncSession.run_sync``: the ORM code
stays the same synchronous code the rest of the API uses, and each statement waits for its
answer without a thread. A thread per request, as sync routes take, was about a tenth of a
read's CPU at 64 clients, and the event loop queued with the request threads for the GIL
(issue 13; docs/benchmarks.md, "API under load"). SQLite has no async driver here: the
function runs in a thread on a plain session, as before.

The function must do all its loading inside: rendering included, since an attribute loaded
lazily after the session is gone fails. It returns what the route answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

Result = TypeVar("Result")


class Reads:
    """``engine``: the async read engine (``api.db.make_async_read_engine``), None on SQLite,
    where ``sessions`` (read sessions of the sync engine) serve in a thread instead."""

    def __init__(self, engine: AsyncEngine | None, sessions: sessionmaker[Session]) -> None:
        self.engine = engine
        self._async: async_sessionmaker[AsyncSession] | None = None
        if engine is not None:
            self._async = async_sessionmaker(engine, expire_on_commit=False)
        self._sessions = sessions

    async def run(self, read: Callable[[Session], Result]) -> Result:
        if self._async is None:
            return await run_in_threadpool(self._in_thread, read)
        async with self._async() as session:
            return await session.run_sync(read)

    def _in_thread(self, read: Callable[[Session], Result]) -> Result:
        with self._sessions() as session:
            return read(session)

    async def dispose(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
