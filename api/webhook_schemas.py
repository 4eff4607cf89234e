"""The shapes of ``/v1/webhook_endpoints``: OpenAI's webhook endpoint objects and our delivery
log, as the routes answer them (``api.webhooks`` renders rows into these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from api.pagination import ListPage


class WebhookEndpointObject(BaseModel):
    """A URL that receives signed events about the owner's jobs."""

    id: str = Field(description="The endpoint id (we_...).")
    object: Literal["webhook_endpoint"] = Field(description="Always 'webhook_endpoint'.")
    created_at: int = Field(description="When it was created (Unix seconds).")
    updated_at: int = Field(description="When it last changed (Unix seconds).")
    name: str = Field(description="A name for people; may be empty.")
    url: str = Field(description="Where events are POSTed (http or https).")
    event_types: list[str] = Field(description="The event types it receives.")
    signing_secret_hint: str = Field(description="'whsec_...' and the secret's last 4 characters.")
    # Ours.
    status: Literal["enabled", "disabled"] = Field(
        description="Ours: a disabled endpoint receives nothing."
    )


class WebhookEndpointWithSecret(WebhookEndpointObject):
    """An endpoint as create and rotate_secret answer it: the only time the secret is shown."""

    signing_secret: str = Field(
        description="whsec_<base64>: the key that signs deliveries (Standard Webhooks)."
    )


class WebhookEndpointList(ListPage[WebhookEndpointObject]):
    """A page of webhook endpoints."""


class WebhookEndpointDeleted(BaseModel):
    id: str = Field(description="The deleted endpoint's id.")
    object: Literal["webhook_endpoint.deleted"] = Field(
        description="Always 'webhook_endpoint.deleted'."
    )
    deleted: bool = Field(description="Always true.")


class WebhookEventTypes(BaseModel):
    object: Literal["list"] = Field(description="Always 'list'.")
    data: list[str] = Field(description="Every event type an endpoint may subscribe to.")


class WebhookTestResult(BaseModel):
    """What ``POST .../{id}/test`` did: one signed delivery, sent at once, not retried."""

    object: Literal["webhook_endpoint.test"] = Field(description="Always 'webhook_endpoint.test'.")
    webhook_endpoint_id: str = Field(description="The endpoint tested.")
    event_type: str = Field(description="The event type sent.")
    success: bool = Field(description="Whether a response came back (any status).")
    status_code: int = Field(description="The receiver's status code; 0 when none came back.")
    # Ours.
    error: str | None = Field(description="Ours: why it failed, if it did.")
    delivery_id: str = Field(description="Ours: the delivery, in the endpoint's delivery log.")
    event_id: str = Field(description="Ours: the event's id (the webhook-id header).")
    duration_ms: int = Field(description="Ours: how long the attempt took.")


class DeliveryAttempt(BaseModel):
    attempt: int = Field(description="1 for the first attempt.")
    at: int = Field(description="When it was made (Unix seconds).")
    status_code: int | None = Field(description="The receiver's status code; null if none.")
    error: str | None = Field(description="Why it failed, if it did.")
    duration_ms: int = Field(description="How long it took.")


class WebhookDeliveryObject(BaseModel):
    """Ours: one event for one endpoint, with every attempt to deliver it."""

    id: str = Field(description="The delivery id (whdel_...).")
    object: Literal["webhook_endpoint.delivery"] = Field(
        description="Always 'webhook_endpoint.delivery'."
    )
    webhook_endpoint_id: str = Field(description="The endpoint it is for.")
    created_at: int = Field(description="When the event happened (Unix seconds).")
    event_id: str = Field(description="The event's id, the same on every attempt (webhook-id).")
    event_type: str = Field(description="The event type.")
    status: Literal["pending", "succeeded", "failed"] = Field(
        description="pending while attempts remain; succeeded on a 2xx; failed when they ran out."
    )
    attempts: int = Field(description="Attempts made so far.")
    last_status_code: int | None = Field(description="The last attempt's status code, if any.")
    last_error: str | None = Field(description="The last attempt's error, if any.")
    next_attempt_at: int | None = Field(
        description="When the next attempt is due (Unix seconds); null once settled."
    )
    attempt_log: list[DeliveryAttempt] = Field(description="Every attempt, oldest first.")
    payload: dict[str, Any] | str = Field(description="The event body that is signed and sent.")


class WebhookDeliveryList(ListPage[WebhookDeliveryObject]):
    """A page of an endpoint's deliveries."""
