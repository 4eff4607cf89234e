"""Webhooks: the endpoint API through the openai SDK, signed deliveries of a real job's events
that the SDK's ``webhooks.unwrap`` verifies, retries with a delivery log, the host policy,
and tenancy.

Deliveries here go to a receiver on 127.0.0.1, so this module runs a stack of its own: its
own database, an API and a worker (on a queue of their own) that list 127.0.0.1 in
ALIGND_WEBHOOK_ALLOWED_HOSTS and retry fast. The session's API keeps the default policy.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest
from pydantic import ValidationError

from api.db import make_engine, make_sessionmaker
from api.errors import APIError
from api.migration import upgrade
from api.settings import Settings
from api.webhooks import new_secret, post, validate_url
from tests.conftest import PG_ADMIN, Api, WorkerProcess, chat_rows, insert_job
from tests.test_outbound import CASE_IDS, HOST_CASES, rebinding_dns

pytestmark = pytest.mark.timeout(180)

FAST = {
    "webhook_allowed_hosts": "127.0.0.1",
    "webhook_retry_base_s": 0.1,
    "webhook_poll_s": 0.1,
}
ALL_TYPES = [
    "fine_tuning.job.running",
    "fine_tuning.job.checkpoint.created",
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
    "fine_tuning.job.paused",
]


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request; ``/flaky/N`` answers 500 to
    its first N requests, ``/fail`` always 503, ``/redirect`` 302 to ``/redirected``, anything
    else 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    receiver.requests.append((self.path, dict(self.headers.items()), body))
                    seen = sum(1 for p, _, _ in receiver.requests if p == self.path)
                code = 200
                if self.path.startswith("/flaky/") and seen <= int(self.path.split("/")[2]):
                    code = 500
                elif self.path == "/fail":
                    code = 503
                elif self.path == "/redirect":
                    code = 302
                self.send_response(code)
                if code == 302:
                    self.send_header("location", "/redirected")
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def at(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [(h, b) for p, h, b in self.requests if p == path]

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    instance = Receiver()
    yield instance
    instance.stop()


class Stack:
    def __init__(self, settings: Settings, api: Api, worker: WorkerProcess) -> None:
        self.settings, self.api, self.worker = settings, api, worker
        self.sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=api.key, max_retries=0)
        self.sessions = make_sessionmaker(make_engine(settings))


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, redis_url: str
) -> Iterator[Stack]:
    name = f"alignd_hooks_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    queue = f"hooks-{secrets.token_hex(4)}"
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("hooks"),
        database_url=PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        + f"/{name}",
        broker_url=redis_url,
        models_dir=models_dir,
        default_queue=queue,
        **FAST,  # type: ignore[arg-type]
    )
    upgrade(settings)
    api = Api(settings)
    env = {f"ALIGND_{key.upper()}": str(value) for key, value in FAST.items()}
    worker = WorkerProcess(
        settings,
        tmp_path_factory.mktemp("hooks-logs") / "worker.log",
        {**env, "ALIGND_DEFAULT_QUEUE": queue},
    )
    stack = Stack(settings, api, worker)
    try:
        yield stack
    finally:
        worker.stop()
        api.stop()
        stack.sessions.kw["bind"].dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wait_until(predicate: Any, timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def deliveries(api: Api, endpoint_id: str) -> list[dict[str, Any]]:
    response = api.http.get(f"webhook_endpoints/{endpoint_id}/deliveries", params={"limit": 100})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def test_endpoint_crud_through_the_sdk(stack: Stack, receiver: Receiver) -> None:
    sdk = stack.sdk
    created = sdk.webhooks.create(
        name="ci", url=f"{receiver.url}/crud", event_types=["fine_tuning.job.succeeded"]
    )
    assert created.object == "webhook_endpoint" and created.id.startswith("we_")
    assert created.signing_secret.startswith("whsec_")
    assert created.signing_secret_hint == f"whsec_...{created.signing_secret[-4:]}"
    assert created.event_types == ["fine_tuning.job.succeeded"] and created.name == "ci"

    fetched = sdk.webhooks.retrieve(created.id)
    assert fetched.url == created.url and fetched.created_at == created.created_at
    raw = stack.api.http.get(f"webhook_endpoints/{created.id}").json()
    assert "signing_secret" not in raw and raw["status"] == "enabled"
    assert created.id in [e.id for e in sdk.webhooks.list()]
    listed = stack.api.http.get("webhook_endpoints").json()
    assert all("signing_secret" not in e for e in listed["data"])

    updated = sdk.webhooks.update(
        created.id, name="renamed", event_types=["fine_tuning.job.failed", "fine_tuning.job.paused"]
    )
    assert updated.name == "renamed"
    assert updated.event_types == ["fine_tuning.job.failed", "fine_tuning.job.paused"]
    assert updated.url == created.url

    rotated = sdk.webhooks.rotate_secret(created.id)
    assert rotated.signing_secret.startswith("whsec_")
    assert rotated.signing_secret != created.signing_secret

    # The test event is signed with the new secret only; the SDK verifies it.
    result = sdk.webhooks.test(created.id, event_type="fine_tuning.job.succeeded")
    assert result.object == "webhook_endpoint.test" and result.status_code == 200
    assert result.webhook_endpoint_id == created.id
    headers, body = receiver.at("/crud")[-1]
    event = openai.OpenAI(api_key="x", webhook_secret=rotated.signing_secret).webhooks.unwrap(
        body, headers
    )
    assert event.type == "fine_tuning.job.succeeded" and event.data.id == "ftjob-test"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.unwrap(body, headers, secret=created.signing_secret)
    logged = deliveries(stack.api, created.id)
    assert [(d["status"], d["attempts"], d["last_status_code"]) for d in logged] == [
        ("succeeded", 1, 200)
    ]

    # Rotation that keeps the old secret for 24 h signs with both.
    again = sdk.webhooks.rotate_secret(created.id, keep_old_secret_active_for_24_hours=True)
    sdk.webhooks.test(created.id, event_type="fine_tuning.job.failed")
    headers, body = receiver.at("/crud")[-1]
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (again.signing_secret, rotated.signing_secret):
        sdk.webhooks.verify_signature(body, headers, secret=secret)

    deleted = sdk.webhooks.delete(created.id)
    assert deleted.deleted is True and deleted.id == created.id
    assert deleted.object == "webhook_endpoint.deleted"
    with pytest.raises(openai.NotFoundError):
        sdk.webhooks.retrieve(created.id)

    bad = stack.api.http.post(
        "webhook_endpoints", json={"url": f"{receiver.url}/x", "event_types": ["batch.completed"]}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "event_types[0]"
    types = stack.api.http.get("webhook_event_types").json()
    assert set(types["data"]) == set(ALL_TYPES)


def test_a_real_job_is_delivered_signed_and_retried(stack: Stack, receiver: Receiver) -> None:
    api = stack.api
    good = stack.sdk.webhooks.create(name="all", url=f"{receiver.url}/all", event_types=ALL_TYPES)
    flaky = stack.sdk.webhooks.create(
        name="flaky", url=f"{receiver.url}/flaky/2", event_types=["fine_tuning.job.succeeded"]
    )
    # Another tenant's endpoint never hears of our jobs.
    other = api.as_owner("other-tenant").post(
        "webhook_endpoints", json={"url": f"{receiver.url}/other", "event_types": ALL_TYPES}
    )
    assert other.status_code == 200, other.text

    train = api.upload(chat_rows(8, seed=3))
    created = api.http.post(
        "fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": train["id"],
            "seed": 1,
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}},
            },
            "adapter": {"type": "lora", "r": 2, "alpha": 4},
            "max_seq_len": 64,
        },
    )
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    job = api.wait_terminal(job_id, timeout_s=120)
    assert job["status"] == "succeeded", (job, stack.worker.output()[-3000:])

    def types_at(path: str) -> list[str]:
        return [json.loads(body)["type"] for _, body in receiver.at(path)]

    wait_until(
        lambda: len(types_at("/all")) >= 4,
        what=f"four deliveries; worker: {stack.worker.output()[-2000:]}",
    )
    # running, a checkpoint per epoch, succeeded (sent concurrently: in no promised order).
    assert sorted(types_at("/all")) == [
        "fine_tuning.job.checkpoint.created",
        "fine_tuning.job.checkpoint.created",
        "fine_tuning.job.running",
        "fine_tuning.job.succeeded",
    ]
    client = openai.OpenAI(api_key="x", webhook_secret=good.signing_secret)
    checkpoints = api.http.get(f"fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    seen_checkpoints = set()
    for headers, body in receiver.at("/all"):
        event = client.webhooks.unwrap(body, headers)  # raises unless the signature verifies
        payload = json.loads(body)
        assert payload["object"] == "event" and payload["id"].startswith("evt_")
        assert headers["webhook-id"] == payload["id"]
        assert event.data.id == job_id
        if payload["type"] == "fine_tuning.job.checkpoint.created":
            seen_checkpoints.add(payload["data"]["checkpoint_id"])
    assert seen_checkpoints == {c["id"] for c in checkpoints}
    [last] = [(h, b) for h, b in receiver.at("/all") if b"job.succeeded" in b]
    succeeded = client.webhooks.unwrap(last[1], last[0])
    assert type(succeeded).__name__ == "FineTuningJobSucceededWebhookEvent"

    # The flaky receiver failed twice, then took it: three attempts, one event, one body.
    record = wait_until(
        lambda: [d for d in deliveries(api, flaky.id) if d["status"] != "pending"],
        what="the flaky delivery to settle",
    )[0]
    assert record["status"] == "succeeded", record
    assert record["attempts"] == 3
    assert [a["status_code"] for a in record["attempt_log"]] == [500, 500, 200]
    assert record["last_status_code"] == 200 and record["last_error"] is None
    assert record["event_type"] == "fine_tuning.job.succeeded"
    assert record["payload"]["data"] == {"id": job_id}
    sent = receiver.at("/flaky/2")
    assert len(sent) == 3 and len({body for _, body in sent}) == 1
    assert {headers["webhook-id"] for headers, _ in sent} == {record["event_id"]}
    flaky_client = openai.OpenAI(api_key="x", webhook_secret=flaky.signing_secret)
    assert flaky_client.webhooks.unwrap(*reversed(sent[-1])).data.id == job_id

    assert receiver.at("/other") == []


def test_retries_stop_after_the_last_attempt(stack: Stack, receiver: Receiver) -> None:
    # A queued job cancelled at once (api/job_service.py) is an event too; /fail never takes it.
    endpoint = stack.api.http.post(
        "webhook_endpoints",
        json={"url": f"{receiver.url}/fail", "event_types": ["fine_tuning.job.cancelled"]},
    ).json()
    # Never enqueued: no worker will claim it.
    job_id = insert_job(stack.sessions, status="queued")
    cancelled = stack.api.http.post(f"fine_tuning/jobs/{job_id}/cancel")
    assert cancelled.json()["status"] == "cancelled"
    # 6 attempts, 0.1 s x (1, 5, 30, ...) apart would take minutes: cap the wait by making
    # the last attempt come early through the row (the backoff itself is tested above).
    first = wait_until(
        lambda: [d for d in deliveries(stack.api, endpoint["id"]) if d["attempts"] >= 2],
        what="two attempts",
    )[0]
    assert first["status"] == "pending" and first["next_attempt_at"] is not None
    assert [a["status_code"] for a in first["attempt_log"]] == [503, 503]
    from api.models import WebhookDelivery

    with stack.sessions() as session, session.begin():
        row = session.get_one(WebhookDelivery, first["id"])
        row.attempts = stack.settings.webhook_max_attempts - 1
        row.next_attempt_at = time.time()
    final = wait_until(
        lambda: [d for d in deliveries(stack.api, endpoint["id"]) if d["status"] == "failed"],
        what="the delivery to fail",
    )[0]
    assert final["attempts"] == stack.settings.webhook_max_attempts
    assert final["last_status_code"] == 503 and "HTTP 503" in final["last_error"]
    assert final["next_attempt_at"] is None
    assert json.loads(receiver.at("/fail")[0][1])["data"] == {"id": job_id}


def test_host_policy(pg_api: Api, stack: Stack, receiver: Receiver) -> None:
    # The default policy (the session's API): loopback, private and link-local are refused,
    # by address or by a name that resolves to one; so are other schemes and credentials.
    for url in (
        "http://127.0.0.1:9/hook",
        "http://localhost:8080/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "ftp://93.184.216.34/hook",
        "http://user:pw@93.184.216.34/hook",
        "not a url",
    ):
        response = pg_api.http.post(
            "webhook_endpoints", json={"url": url, "event_types": ["fine_tuning.job.failed"]}
        )
        assert response.status_code == 400, url
        assert response.json()["error"]["param"] == "url", url
    public = pg_api.http.post(
        "webhook_endpoints",
        json={"url": "https://93.184.216.34/hook", "event_types": ["fine_tuning.job.failed"]},
    )
    assert public.status_code == 200, public.text
    moved = pg_api.http.post(
        f"webhook_endpoints/{public.json()['id']}", json={"url": "http://127.0.0.1/hook"}
    )
    assert moved.status_code == 400 and moved.json()["error"]["param"] == "url"

    # This stack lists 127.0.0.1, and only that: localhost (the same address) is not listed.
    listed = stack.api.http.post(
        "webhook_endpoints",
        json={"url": f"{receiver.url}/listed", "event_types": ["fine_tuning.job.failed"]},
    )
    assert listed.status_code == 200
    unlisted = stack.api.http.post(
        "webhook_endpoints",
        json={"url": "http://localhost:1/x", "event_types": ["fine_tuning.job.failed"]},
    )
    assert unlisted.status_code == 400 and unlisted.json()["error"]["param"] == "url"


@pytest.mark.parametrize(
    ("case", "url", "entries", "webhooks", "rewards"), HOST_CASES, ids=CASE_IDS
)
def test_webhook_urls_follow_the_outbound_policy(
    case: str, url: str, entries: str, webhooks: bool, rewards: bool
) -> None:
    """The shared table (tests/test_outbound.py): by default public hosts and listed ones;
    with ALIGND_WEBHOOK_ALLOW_PUBLIC_HOSTS=false, listed ones only, as reward functions."""
    for allow_public, expected in ((True, webhooks), (False, rewards)):
        settings = Settings(webhook_allowed_hosts=entries, webhook_allow_public_hosts=allow_public)
        if expected:
            assert validate_url(settings, url) == url
        else:
            with pytest.raises(APIError) as caught:
                validate_url(settings, url)
            assert caught.value.param == "url", (case, allow_public)


def test_a_delivery_goes_to_the_address_that_was_checked(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The name resolves into the listed network for the check, then (were it looked up again)
    # to a documentation address nothing answers on.
    given = rebinding_dns(monkeypatch, "hooks.rebind.test", ["127.0.0.1", "192.0.2.1"])
    port = receiver.url.rsplit(":", 1)[1]
    settings = Settings(webhook_allowed_hosts="127.0.0.0/8", webhook_timeout_s=2)
    url = f"http://hooks.rebind.test:{port}/pinned"
    result = post(settings, url, [new_secret()], "msg_pinned", '{"a": 1}')
    assert result.status_code == 200, result.error
    assert given == ["127.0.0.1"]
    [(headers, body)] = receiver.at("/pinned")
    assert headers["Host"] == f"hooks.rebind.test:{port}"  # the name, though sent to the address
    assert body == b'{"a": 1}'


def test_a_delivery_follows_no_redirect_and_no_proxy(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(webhook_allowed_hosts="127.0.0.1")
    redirected = post(settings, f"{receiver.url}/redirect", [new_secret()], "msg_r", "{}")
    assert redirected.status_code == 302 and not redirected.ok
    assert redirected.error is not None and redirected.error.startswith("HTTP 302")
    assert receiver.at("/redirected") == []
    # A proxy would make its own lookup of the host, after ours: nothing listens on port 9.
    for variable in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    direct = post(settings, f"{receiver.url}/direct", [new_secret()], "msg_d", "{}")
    assert direct.status_code == 200, direct.error
    assert len(receiver.at("/direct")) == 1


def test_a_malformed_allowlist_entry_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    for entry in ("10.0.0.0/33", "hooks.internal:http", "[::1"):
        monkeypatch.setenv("ALIGND_WEBHOOK_ALLOWED_HOSTS", f"hooks.internal, {entry}")
        with pytest.raises(ValidationError):
            Settings()


def test_another_owners_endpoint_is_404(stack: Stack, receiver: Receiver) -> None:
    mine = stack.api.http.post(
        "webhook_endpoints",
        json={"url": f"{receiver.url}/mine", "event_types": ["fine_tuning.job.failed"]},
    ).json()
    other = stack.api.as_owner("intruder")
    path = f"webhook_endpoints/{mine['id']}"
    for method, suffix in (
        ("GET", ""),
        ("POST", ""),
        ("DELETE", ""),
        ("POST", "/rotate_secret"),
        ("POST", "/test"),
        ("GET", "/deliveries"),
    ):
        response = other.request(method, path + suffix, json={} if method == "POST" else None)
        assert response.status_code == 404, (method, suffix)
        assert response.json()["error"]["param"] == "webhook_endpoint_id"
    assert mine["id"] not in [e["id"] for e in other.get("webhook_endpoints").json()["data"]]
    assert receiver.at("/mine") == []
    assert stack.api.http.get(path).status_code == 200
