"""The webhook dispatcher: sends due ``webhook_deliveries`` rows, retries them with backoff.

Each ``alignd worker`` runs one in its main process (``worker/celery_app.py`` starts it when
the worker is ready). Not as a Celery task: a GPU worker runs one job at a time, so a delivery
queued behind a training job would wait for it to end (hours), and a ``running`` event would
arrive after the job finished. The outbox rows are the queue instead. A dispatcher claims a
due row with a conditional update that moves its ``next_attempt_at`` a lease ahead, so two
workers never send the same attempt, and a row whose dispatcher died comes due again when
the lease runs out. Retries survive restarts and a lost broker because they are rows too.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy import select, update

from api import webhooks
from api.models import WebhookDelivery, WebhookEndpoint
from api.services import Services

log = logging.getLogger("alignd.webhooks")


def claim_due(services: Services, limit: int) -> list[str]:
    """Take up to ``limit`` due deliveries for this process (for ``LEASE_S``)."""
    clock = time.time()
    claimed: list[str] = []
    with services.sessions() as session, session.begin():
        due = session.execute(
            select(WebhookDelivery.id, WebhookDelivery.next_attempt_at)
            .where(
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at <= clock,
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        ).all()
        for delivery_id, next_attempt_at in due:
            taken = session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == delivery_id,
                    WebhookDelivery.status == "pending",
                    WebhookDelivery.next_attempt_at == next_attempt_at,
                )
                .values(next_attempt_at=clock + webhooks.LEASE_S)
            )
            if taken.rowcount:  # type: ignore[attr-defined]
                claimed.append(delivery_id)
    return claimed


def deliver(services: Services, delivery_id: str) -> None:
    """One attempt of a claimed delivery; its outcome is written on the row."""
    settings = services.settings
    with services.sessions() as session:
        row = session.get(WebhookDelivery, delivery_id)
        if row is None or row.status != "pending":
            return
        endpoint = session.get(WebhookEndpoint, row.endpoint_id)
        if endpoint is None:  # deleted: its deliveries go with it
            return
        enabled = endpoint.status == "enabled"
        url, keys = endpoint.url, webhooks.active_secrets(endpoint)
        event_id, body = row.event_id, row.payload
    if enabled:
        result = webhooks.post(settings, url, keys, event_id, body)
    else:
        result = webhooks.AttemptResult(None, "the endpoint is disabled", 0, permanent=True)
    with services.sessions() as session, session.begin():
        row = session.get(WebhookDelivery, delivery_id)
        if row is None or row.status != "pending":
            return
        webhooks.record_attempt(settings, row, result)
        outcome = row.status
    log.info(
        "webhook %s (%s, attempt %d) to endpoint %s: %s%s",
        delivery_id,
        row.event_type,
        row.attempts,
        row.endpoint_id,
        outcome,
        f" ({result.error})" if result.error else "",
    )


class Dispatcher:
    """A daemon thread that claims due deliveries and hands them to a small thread pool."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.concurrency = services.settings.webhook_concurrency
        self.poll_s = services.settings.webhook_poll_s
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="alignd-webhook")
        self._inflight: set[Future[None]] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="alignd-webhooks", daemon=True)

    def start(self) -> Dispatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._inflight.discard(future)
        if future.exception() is not None:
            log.error("webhook delivery crashed", exc_info=future.exception())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    free = self.concurrency - len(self._inflight)
                claimed = claim_due(self.services, free) if free > 0 else []
                for delivery_id in claimed:
                    future = self._pool.submit(deliver, self.services, delivery_id)
                    with self._lock:
                        self._inflight.add(future)
                    future.add_done_callback(self._done)
            except Exception:
                log.exception("webhook dispatcher: could not claim deliveries")
                claimed = []
            if not claimed:
                self._stop.wait(self.poll_s)
