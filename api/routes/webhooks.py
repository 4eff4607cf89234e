"""``/v1/webhook_endpoints``: OpenAI's webhook endpoint API, plus the delivery log (ours)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from api import webhooks
from api.deps import OwnerDep, ServicesDep, SessionDep
from api.pagination import page

router = APIRouter(tags=["webhooks"])


@router.post("/v1/webhook_endpoints")
def create_endpoint(
    services: ServicesDep, session: SessionDep, owner: OwnerDep, body: Annotated[Any, Body()] = None
) -> dict[str, Any]:
    with session.begin():
        row = webhooks.create_endpoint(session, services.settings, owner, body)
    return webhooks.render_endpoint(row, with_secret=True)


@router.get("/v1/webhook_endpoints")
def list_endpoints(
    session: SessionDep,
    owner: OwnerDep,
    after: str | None = None,
    limit: Annotated[int, Query()] = 20,
) -> dict[str, Any]:
    return page(
        session, webhooks.list_endpoints_query(owner, after), limit, webhooks.render_endpoint
    )


@router.get("/v1/webhook_endpoints/{endpoint_id}")
def retrieve_endpoint(session: SessionDep, owner: OwnerDep, endpoint_id: str) -> dict[str, Any]:
    return webhooks.render_endpoint(webhooks.get_endpoint(session, owner, endpoint_id))


@router.post("/v1/webhook_endpoints/{endpoint_id}")
def update_endpoint(
    services: ServicesDep,
    session: SessionDep,
    owner: OwnerDep,
    endpoint_id: str,
    body: Annotated[Any, Body()] = None,
) -> dict[str, Any]:
    with session.begin():
        row = webhooks.update_endpoint(session, services.settings, owner, endpoint_id, body)
    return webhooks.render_endpoint(row)


@router.delete("/v1/webhook_endpoints/{endpoint_id}")
def delete_endpoint(session: SessionDep, owner: OwnerDep, endpoint_id: str) -> dict[str, Any]:
    with session.begin():
        return webhooks.delete_endpoint(session, owner, endpoint_id)


@router.post("/v1/webhook_endpoints/{endpoint_id}/rotate_secret")
def rotate_secret(
    session: SessionDep, owner: OwnerDep, endpoint_id: str, body: Annotated[Any, Body()] = None
) -> dict[str, Any]:
    with session.begin():
        row = webhooks.rotate_secret(session, owner, endpoint_id, body)
    return webhooks.render_endpoint(row, with_secret=True)


@router.post("/v1/webhook_endpoints/{endpoint_id}/test")
def test_endpoint(
    services: ServicesDep, owner: OwnerDep, endpoint_id: str, body: Annotated[Any, Body()] = None
) -> dict[str, Any]:
    return webhooks.send_test(services.sessions, services.settings, owner, endpoint_id, body)


@router.get("/v1/webhook_endpoints/{endpoint_id}/deliveries")
def list_deliveries(
    session: SessionDep,
    owner: OwnerDep,
    endpoint_id: str,
    after: str | None = None,
    limit: Annotated[int, Query()] = 20,
) -> dict[str, Any]:
    endpoint = webhooks.get_endpoint(session, owner, endpoint_id)
    return page(
        session, webhooks.deliveries_query(endpoint, after), limit, webhooks.render_delivery
    )


@router.get("/v1/webhook_event_types")
def list_event_types(owner: OwnerDep) -> dict[str, Any]:
    return {"object": "list", "data": list(webhooks.EVENT_TYPES)}
