"""Typed dependencies for the routes (``Annotated`` aliases, as in full-stack-fastapi-template)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.keys import Principal, authenticate, cached_principal
from api.reads import Reads
from api.services import Services

# Dependencies that do no I/O are ``async def``: FastAPI runs a sync one in the thread pool,
# and each such hop costs a thread and, under load, a wait for one (api/admission.py).


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.sessions() as session:
        yield session


# scope="function": the session (and its pooled connection) is closed once the route has
# returned and its answer is serialised, not after the response is sent; a slow reader or a
# streamed body never holds a connection (issue 13). Streams take sessions of their own.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def get_read_session(services: ServicesDep) -> AsyncIterator[Session]:
    # In the event loop, not in a thread: making a session does no I/O, and closing one in
    # autocommit does none either (psycopg sends no ROLLBACK on an idle connection), so two
    # thread hops of three per GET are saved. SQLite's close is a local rollback.
    with services.read_sessions() as session:
        yield session


# For GET routes that read in a thread: those that touch files too (the model catalog) or
# may run long (a job's whole metric series); the others use ReadsDep.
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]


async def get_reads(services: ServicesDep) -> Reads:
    return services.reads


# For GET routes that only read: ``await reads.run(lambda session: ...)`` (api/reads.py),
# in the event loop on Postgres.
ReadsDep = Annotated[Reads, Depends(get_reads)]


async def current_principal(
    request: Request,
    services: ServicesDep,
) -> Principal:
    """The bearer key's principal: 401 ``invalid_api_key`` when missing, unknown or revoked.

    ``api.keys.AuthMiddleware`` has already resolved it for every ``/v1`` request (and sent the
    401 with ``WWW-Authenticate: Bearer``); a route outside ``/v1`` resolves it here.
    """
    principal = getattr(request.state, "principal", None)
    if isinstance(principal, Principal):
        return principal
    authorization = request.headers.get("authorization")
    cached = cached_principal(services.key_cache, authorization)
    if cached is not None:
        return cached
    return await run_in_threadpool(
        authenticate, services.read_sessions, authorization, services.key_cache
    )


PrincipalDep = Annotated[Principal, Depends(current_principal)]


async def current_owner(principal: PrincipalDep) -> str:
    # Every row carries its owner and every query filters on it: another owner's id is a 404.
    return principal.owner


OwnerDep = Annotated[str, Depends(current_owner)]
