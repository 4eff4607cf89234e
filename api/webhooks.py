"""Webhooks: endpoints, the delivery outbox, Standard Webhooks signing, and one delivery attempt.

An event becomes one ``webhook_deliveries`` row per subscribed endpoint, written in the same
transaction as the status change it reports (an outbox: no event is lost to a crash between
the commit and the send, and none is sent for a change that rolled back). Each worker's
dispatcher (``worker/webhooks.py``) sends due rows and retries with backoff; every attempt is
recorded on the row.

Deliveries are signed as Standard Webhooks (https://www.standardwebhooks.com), which is what
the openai SDK's ``client.webhooks.unwrap`` verifies: headers ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{ts}.{body}")>``
where ``key`` is the base64-decoded part of the ``whsec_`` secret.

URLs are checked against the outbound host policy (``trainer_core.outbound``, configured by
``ALIGND_WEBHOOK_ALLOWED_HOSTS`` and ``ALIGND_WEBHOOK_ALLOW_PUBLIC_HOSTS``) at create and update,
and again right before every attempt (DNS may have changed meanwhile); the attempt connects to
the address that check approved.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Select, select
from sqlalchemy.orm import Session, sessionmaker

from api.errors import from_validation_error, invalid, not_found
from api.models import WebhookDelivery, WebhookEndpoint, now
from api.settings import Settings
from api.webhook_schemas import (
    WebhookDeliveryObject,
    WebhookEndpointDeleted,
    WebhookEndpointObject,
    WebhookEndpointWithSecret,
    WebhookTestResult,
)
from trainer_core import outbound

# OpenAI's three, plus ours.
EVENT_TYPES = (
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
    "fine_tuning.job.running",
    "fine_tuning.job.paused",
    "fine_tuning.job.checkpoint.created",
)
# Job statuses that have an event of their own.
STATUS_EVENTS = {
    status: f"fine_tuning.job.{status}"
    for status in ("running", "paused", "succeeded", "failed", "cancelled")
}
TEST_JOB_ID = "ftjob-test"
# Waits between attempts, in units of ``webhook_retry_base_s``: 1 s, 5 s, 30 s, 2 min, 10 min.
BACKOFF = (1, 5, 30, 120, 600)
# A dispatcher holds a delivery this long while it sends it; a crashed one's rows come back.
LEASE_S = 120.0
MAX_ERROR_CHARS = 500
USER_AGENT = "alignd-webhooks/1"


def public_id(prefix: str) -> str:
    """``we_`` / ``evt_`` / ``whdel_`` ids, sorting by creation time like the other ids."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


# ---------------------------------------------------------------------------------------------
# Signing


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    digest = hmac.new(
        secret_key(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256
    ).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    secrets_: Sequence[str], msg_id: str, body: str, timestamp: int | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers; one signature per secret, space-separated."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(sign(s, msg_id, ts, body) for s in secrets_),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def active_secrets(endpoint: WebhookEndpoint) -> list[str]:
    found = [endpoint.secret]
    if endpoint.previous_secret and (endpoint.previous_secret_expires_at or 0) > now():
        found.append(endpoint.previous_secret)
    return found


# ---------------------------------------------------------------------------------------------
# URL policy


def host_policy(settings: Settings) -> outbound.HostPolicy:
    return outbound.HostPolicy.from_entries(
        settings.webhook_allowed_hosts.split(","),
        allow_public=settings.webhook_allow_public_hosts,
        setting="ALIGND_WEBHOOK_ALLOWED_HOSTS",
    )


def check_url(settings: Settings, url: str) -> outbound.Destination:
    """Where the operator's policy lets webhooks for ``url`` go; ``outbound.Refused`` if not."""
    return outbound.check(host_policy(settings), url)


def validate_url(settings: Settings, url: str) -> str:
    try:
        check_url(settings, url)
    except outbound.Refused as exc:
        raise invalid(f"Webhook URL refused: {exc}.", param="url", code="invalid_url") from None
    return url


# ---------------------------------------------------------------------------------------------
# Endpoints


class EndpointCreate(BaseModel):
    """The body of ``POST /v1/webhook_endpoints``."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, Field(min_length=1, max_length=2048)] = Field(
        description="Where events are POSTed: http or https, a public host unless allowlisted."
    )
    event_types: Annotated[list[str], Field(min_length=1, max_length=len(EVENT_TYPES))] = Field(
        description="The event types to receive (GET /v1/webhook_event_types lists them)."
    )
    name: Annotated[str, Field(max_length=256)] = Field("", description="A name for people.")
    # Ours.
    status: Annotated[str, Field(pattern="^(enabled|disabled)$")] = Field(
        "enabled", description="Ours: enabled or disabled."
    )


class EndpointUpdate(BaseModel):
    """The body of ``POST /v1/webhook_endpoints/{id}``: only the fields to change."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, Field(min_length=1, max_length=2048)] | None = Field(
        None, description="A new URL (checked as at creation)."
    )
    event_types: Annotated[list[str], Field(min_length=1, max_length=len(EVENT_TYPES))] | None = (
        Field(None, description="The complete new set of event types.")
    )
    name: Annotated[str, Field(max_length=256)] | None = Field(None, description="A new name.")
    status: Annotated[str, Field(pattern="^(enabled|disabled)$")] | None = Field(
        None, description="Ours: enabled or disabled."
    )


class RotateSecret(BaseModel):
    """The body of ``POST /v1/webhook_endpoints/{id}/rotate_secret`` (may be empty)."""

    model_config = ConfigDict(extra="forbid")

    keep_old_secret_active_for_24_hours: bool = Field(
        False, description="Sign with the old secret too for 24 h, so receivers can switch."
    )


class SendTest(BaseModel):
    """The body of ``POST /v1/webhook_endpoints/{id}/test`` (may be empty)."""

    event_type: str = Field(
        "fine_tuning.job.succeeded", description="The event type to send, for job ftjob-test."
    )


def _parse(model: type[BaseModel], raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_body")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _event_types(values: list[str]) -> list[str]:
    for index, value in enumerate(values):
        if value not in EVENT_TYPES:
            raise invalid(
                f"Unsupported event type '{value}'. Supported: {', '.join(EVENT_TYPES)}.",
                param=f"event_types[{index}]",
            )
    return list(dict.fromkeys(values))


def get_endpoint(session: Session, owner: str, endpoint_id: str) -> WebhookEndpoint:
    row = session.get(WebhookEndpoint, endpoint_id)
    if row is None or row.owner != owner:
        raise not_found("webhook endpoint", endpoint_id, param="webhook_endpoint_id")
    return row


def create_endpoint(session: Session, settings: Settings, owner: str, raw: Any) -> WebhookEndpoint:
    body: EndpointCreate = _parse(EndpointCreate, raw)
    row = WebhookEndpoint(
        id=public_id("we"),
        owner=owner,
        created_at=now(),
        updated_at=now(),
        name=body.name,
        url=validate_url(settings, body.url),
        event_types=_event_types(body.event_types),
        status=body.status,
        secret=new_secret(),
    )
    session.add(row)
    session.flush()
    return row


def update_endpoint(
    session: Session, settings: Settings, owner: str, endpoint_id: str, raw: Any
) -> WebhookEndpoint:
    row = get_endpoint(session, owner, endpoint_id)
    body: EndpointUpdate = _parse(EndpointUpdate, raw)
    changes: dict[str, Any] = {}
    if body.url is not None and body.url != row.url:
        changes["url"] = validate_url(settings, body.url)
    if body.event_types is not None:
        types = _event_types(body.event_types)
        if types != row.event_types:
            changes["event_types"] = types
    for key in ("name", "status"):
        value = getattr(body, key)
        if value is not None and value != getattr(row, key):
            changes[key] = value
    if changes:
        for key, value in changes.items():
            setattr(row, key, value)
        row.updated_at = now()
    return row


def rotate_secret(session: Session, owner: str, endpoint_id: str, raw: Any) -> WebhookEndpoint:
    row = get_endpoint(session, owner, endpoint_id)
    body: RotateSecret = _parse(RotateSecret, raw)
    if body.keep_old_secret_active_for_24_hours:
        row.previous_secret = row.secret
        row.previous_secret_expires_at = now() + 24 * 3600
    else:
        row.previous_secret = None
        row.previous_secret_expires_at = None
    row.secret = new_secret()
    row.updated_at = now()
    return row


def delete_endpoint(session: Session, owner: str, endpoint_id: str) -> WebhookEndpointDeleted:
    row = get_endpoint(session, owner, endpoint_id)
    session.delete(row)  # its deliveries go with it (ON DELETE CASCADE)
    return WebhookEndpointDeleted(id=endpoint_id, object="webhook_endpoint.deleted", deleted=True)


def list_endpoints_query(owner: str, after: str | None) -> Select[Any]:
    query = select(WebhookEndpoint).where(WebhookEndpoint.owner == owner)
    if after:
        query = query.where(WebhookEndpoint.id < after)
    return query.order_by(WebhookEndpoint.id.desc())


def deliveries_query(endpoint: WebhookEndpoint, after: str | None) -> Select[Any]:
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
    if after:
        query = query.where(WebhookDelivery.id < after)
    return query.order_by(WebhookDelivery.id.desc())


def render_endpoint(row: WebhookEndpoint) -> WebhookEndpointObject:
    return WebhookEndpointObject(
        id=row.id,
        object="webhook_endpoint",
        created_at=row.created_at,
        updated_at=row.updated_at,
        name=row.name,
        url=row.url,
        event_types=row.event_types,
        signing_secret_hint=f"whsec_...{row.secret[-4:]}",
        status=row.status,
    )


def render_endpoint_with_secret(row: WebhookEndpoint) -> WebhookEndpointWithSecret:
    return WebhookEndpointWithSecret(**render_endpoint(row).model_dump(), signing_secret=row.secret)


def render_delivery(row: WebhookDelivery) -> WebhookDeliveryObject:
    try:
        payload = json.loads(row.payload)
    except ValueError:
        payload = row.payload
    return WebhookDeliveryObject(
        id=row.id,
        object="webhook_endpoint.delivery",
        webhook_endpoint_id=row.endpoint_id,
        created_at=row.created_at,
        event_id=row.event_id,
        event_type=row.event_type,
        status=row.status,
        attempts=row.attempts,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        next_attempt_at=int(row.next_attempt_at) if row.next_attempt_at else None,
        attempt_log=row.attempt_log,
        payload=payload,
    )


# ---------------------------------------------------------------------------------------------
# The outbox


def event_body(event_id: str, event_type: str, created_at: int, data: dict[str, Any]) -> str:
    """OpenAI's event shape, ids only (receivers fetch what they need)."""
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created_at": created_at,
            "data": data,
        },
        separators=(",", ":"),
    )


def enqueue_event(
    session: Session, owner: str, job_id: str, event_type: str, **extra: str
) -> list[str]:
    """Record ``event_type`` for job ``job_id`` for every subscribed, enabled endpoint.

    Call it inside the transaction that makes the change: the rows commit (or roll back) with
    it, and the workers' dispatchers send them. Returns the delivery ids.
    """
    endpoints = session.scalars(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.owner == owner, WebhookEndpoint.status == "enabled")
        .order_by(WebhookEndpoint.id)
    ).all()
    targets = [e for e in endpoints if event_type in e.event_types]
    if not targets:
        return []
    created = now()
    event_id = public_id("evt")
    body = event_body(event_id, event_type, created, {"id": job_id, **extra})
    ids = []
    for endpoint in targets:
        row = WebhookDelivery(
            id=public_id("whdel"),
            endpoint_id=endpoint.id,
            owner=owner,
            created_at=created,
            event_id=event_id,
            event_type=event_type,
            payload=body,
            status="pending",
            attempts=0,
            next_attempt_at=time.time(),
            attempt_log=[],
        )
        session.add(row)
        ids.append(row.id)
    return ids


def on_status(session: Session, owner: str, job_id: str, status: str) -> list[str]:
    """The hook for a job's status change (running, paused, succeeded, failed, cancelled)."""
    event_type = STATUS_EVENTS.get(status)
    return enqueue_event(session, owner, job_id, event_type) if event_type else []


def on_checkpoint(session: Session, owner: str, job_id: str, checkpoint_id: str) -> list[str]:
    return enqueue_event(
        session, owner, job_id, "fine_tuning.job.checkpoint.created", checkpoint_id=checkpoint_id
    )


# ---------------------------------------------------------------------------------------------
# Sending


@dataclass
class AttemptResult:
    status_code: int | None
    error: str | None
    duration_ms: int
    # Not worth retrying: the URL is refused by the host policy, or the endpoint is disabled.
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post(
    settings: Settings, url: str, secrets_: Sequence[str], msg_id: str, body: str
) -> AttemptResult:
    """One signed POST, to the address the host policy checked just now. Redirects are not
    followed (a 3xx is a failed attempt)."""
    started = time.monotonic()
    try:
        destination = check_url(settings, url)
    except outbound.Refused as exc:
        return AttemptResult(None, f"refused: {exc}", 0, permanent=not exc.transient)
    connection = outbound.connection(destination, settings.webhook_timeout_s)
    try:
        connection.request(
            "POST",
            destination.target,
            body=body.encode(),
            headers=signed_headers(secrets_, msg_id, body),
        )
        response = connection.getresponse()
        code = response.status
        error = None
        if not 200 <= code < 300:
            # 200 characters of the answer say enough; reading no more bounds a huge one.
            text = response.read(800).decode(errors="replace")[:200]
            error = f"HTTP {code}: {text}"
        return AttemptResult(code, error, int((time.monotonic() - started) * 1000))
    except (OSError, http.client.HTTPException) as exc:
        message = f"{exc.__class__.__name__}: {exc}"[:MAX_ERROR_CHARS]
        return AttemptResult(None, message, int((time.monotonic() - started) * 1000))
    finally:
        connection.close()


def backoff_s(settings: Settings, attempts: int) -> float:
    """The wait after the ``attempts``-th failed attempt."""
    step = BACKOFF[min(attempts, len(BACKOFF)) - 1]
    return float(settings.webhook_retry_base_s * step)


def record_attempt(
    settings: Settings, row: WebhookDelivery, result: AttemptResult, *, retry: bool = True
) -> None:
    """Write an attempt's outcome on the row: settled, or due again after the backoff."""
    row.attempts += 1
    row.last_status_code = result.status_code
    row.last_error = (result.error or None) and result.error[:MAX_ERROR_CHARS]
    row.attempt_log = [
        *row.attempt_log,
        {
            "attempt": row.attempts,
            "at": now(),
            "status_code": result.status_code,
            "error": row.last_error,
            "duration_ms": result.duration_ms,
        },
    ]
    if result.ok:
        row.status = "succeeded"
        row.next_attempt_at = None
    elif not retry or result.permanent or row.attempts >= settings.webhook_max_attempts:
        row.status = "failed"
        row.next_attempt_at = None
    else:
        row.status = "pending"
        row.next_attempt_at = time.time() + backoff_s(settings, row.attempts)


def send_test(
    sessions: sessionmaker[Session], settings: Settings, owner: str, endpoint_id: str, raw: Any
) -> WebhookTestResult:
    """``POST /v1/webhook_endpoints/{id}/test``: one signed delivery, now, with no retries.

    The event is ``fine_tuning.job.succeeded``-shaped (or the ``event_type`` asked for) for the
    job ``ftjob-test``; it is recorded in the endpoint's delivery log like any other. No
    transaction is held open while the receiver answers.
    """
    if raw is not None and not isinstance(raw, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_body")
    event_type = (raw or {}).get("event_type") or "fine_tuning.job.succeeded"
    if event_type not in EVENT_TYPES:
        raise invalid(
            f"Unsupported event type '{event_type}'. Supported: {', '.join(EVENT_TYPES)}.",
            param="event_type",
        )
    with sessions() as session:
        endpoint = get_endpoint(session, owner, endpoint_id)
        url, keys = endpoint.url, active_secrets(endpoint)
    created = now()
    event_id = public_id("evt")
    body = event_body(event_id, event_type, created, {"id": TEST_JOB_ID})
    row = WebhookDelivery(
        id=public_id("whdel"),
        endpoint_id=endpoint_id,
        owner=owner,
        created_at=created,
        event_id=event_id,
        event_type=event_type,
        payload=body,
        status="pending",
        attempts=0,
        next_attempt_at=None,
        attempt_log=[],
    )
    result = post(settings, url, keys, event_id, body)
    record_attempt(settings, row, result, retry=False)
    with sessions() as session, session.begin():
        if session.get(WebhookEndpoint, endpoint_id) is not None:  # not deleted meanwhile
            session.add(row)
    return WebhookTestResult(
        object="webhook_endpoint.test",
        webhook_endpoint_id=endpoint_id,
        event_type=event_type,
        # As OpenAI: success means the request was made; status_code says how it went.
        # Ours: 0 when no response came back, with the reason in ``error``.
        success=result.status_code is not None,
        status_code=result.status_code or 0,
        error=result.error,
        delivery_id=row.id,
        event_id=event_id,
        duration_ms=result.duration_ms,
    )
