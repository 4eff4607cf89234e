"""``/v1/webhook_endpoints``: OpenAI's webhook endpoint API, plus the delivery log (ours)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from sqlalchemy.orm import Session

from api import webhooks
from api.deps import OwnerDep, ReadsDep, ServicesDep, SessionDep
from api.openapi import ERROR_RESPONSES, documented_as
from api.pagination import page
from api.webhook_schemas import (
    WebhookDeliveryList,
    WebhookEndpointDeleted,
    WebhookEndpointList,
    WebhookEndpointObject,
    WebhookEndpointWithSecret,
    WebhookEventTypes,
    WebhookTestResult,
)

router = APIRouter(tags=["webhooks"], responses=ERROR_RESPONSES)


@router.post("/v1/webhook_endpoints")
def create_endpoint(
    services: ServicesDep,
    session: SessionDep,
    owner: OwnerDep,
    body: Annotated[Any, Body(), documented_as(webhooks.EndpointCreate)] = None,
) -> WebhookEndpointWithSecret:
    with session.begin():
        row = webhooks.create_endpoint(session, services.settings, owner, body)
    return webhooks.render_endpoint_with_secret(row)


@router.get("/v1/webhook_endpoints")
async def list_endpoints(
    reads: ReadsDep,
    owner: OwnerDep,
    after: str | None = None,
    limit: Annotated[int, Query()] = 20,
) -> WebhookEndpointList:
    query = webhooks.list_endpoints_query(owner, after)
    return await reads.run(
        lambda session: page(session, query, limit, webhooks.render_endpoint, WebhookEndpointList)
    )


@router.get("/v1/webhook_endpoints/{endpoint_id}")
async def retrieve_endpoint(
    reads: ReadsDep, owner: OwnerDep, endpoint_id: str
) -> WebhookEndpointObject:
    return await reads.run(
        lambda session: webhooks.render_endpoint(webhooks.get_endpoint(session, owner, endpoint_id))
    )


@router.post("/v1/webhook_endpoints/{endpoint_id}")
def update_endpoint(
    services: ServicesDep,
    session: SessionDep,
    owner: OwnerDep,
    endpoint_id: str,
    body: Annotated[Any, Body(), documented_as(webhooks.EndpointUpdate)] = None,
) -> WebhookEndpointObject:
    with session.begin():
        row = webhooks.update_endpoint(session, services.settings, owner, endpoint_id, body)
    return webhooks.render_endpoint(row)


@router.delete("/v1/webhook_endpoints/{endpoint_id}")
def delete_endpoint(
    session: SessionDep, owner: OwnerDep, endpoint_id: str
) -> WebhookEndpointDeleted:
    with session.begin():
        return webhooks.delete_endpoint(session, owner, endpoint_id)


@router.post("/v1/webhook_endpoints/{endpoint_id}/rotate_secret")
def rotate_secret(
    session: SessionDep,
    owner: OwnerDep,
    endpoint_id: str,
    body: Annotated[Any, Body(), documented_as(webhooks.RotateSecret)] = None,
) -> WebhookEndpointWithSecret:
    with session.begin():
        row = webhooks.rotate_secret(session, owner, endpoint_id, body)
    return webhooks.render_endpoint_with_secret(row)


@router.post("/v1/webhook_endpoints/{endpoint_id}/test")
def test_endpoint(
    services: ServicesDep,
    owner: OwnerDep,
    endpoint_id: str,
    body: Annotated[Any, Body(), documented_as(webhooks.SendTest)] = None,
) -> WebhookTestResult:
    return webhooks.send_test(services.sessions, services.settings, owner, endpoint_id, body)


@router.get("/v1/webhook_endpoints/{endpoint_id}/deliveries")
async def list_deliveries(
    reads: ReadsDep,
    owner: OwnerDep,
    endpoint_id: str,
    after: str | None = None,
    limit: Annotated[int, Query()] = 20,
) -> WebhookDeliveryList:
    def read(session: Session) -> WebhookDeliveryList:
        endpoint = webhooks.get_endpoint(session, owner, endpoint_id)
        query = webhooks.deliveries_query(endpoint, after)
        return page(session, query, limit, webhooks.render_delivery, WebhookDeliveryList)

    return await reads.run(read)


@router.get("/v1/webhook_event_types")
def list_event_types(owner: OwnerDep) -> WebhookEventTypes:
    return WebhookEventTypes(object="list", data=list(webhooks.EVENT_TYPES))
