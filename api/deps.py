"""Typed dependencies for the routes (``Annotated`` aliases, as in full-stack-fastapi-template)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from api.services import Services
from api.settings import LOCAL_OWNER


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def current_owner(authorization: Annotated[str | None, Header()] = None) -> str:
    # Keys and tenants come with the integration issue; until then every request, with any
    # bearer token or none, belongs to the one local owner. Rows carry the owner already,
    # and every query filters on it, so adding keys changes only this function.
    return LOCAL_OWNER


OwnerDep = Annotated[str, Depends(current_owner)]
