"""API keys: the operator CLI, bearer auth on every /v1 route (401 in the error shape), revocation,
the openai SDK with a wrong key, the per-key rate limit, and the embedded default's key file."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from alignd.processes import free_port, start_alignd
from api.db import make_engine, make_sessionmaker
from api.errors import APIError
from api.key_cache import CHANNEL, LISTENER_NAME, KeyCache
from api.keys import Principal, authenticate, ensure_local_key, revoke_key
from api.migration import upgrade
from api.rate_limit import RateLimiter
from api.settings import Settings
from tests.conftest import Api, create_api_key, settings_env


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alignd", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_401(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 401, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["x-request-id"].startswith("req_")
    return dict(body["error"])


def db_rows(settings: Settings, sql: str, **params: object) -> list[dict[str, object]]:
    engine = create_engine(settings.resolved_database_url)
    try:
        with engine.connect() as conn:
            return [dict(row) for row in conn.execute(text(sql), params).mappings()]
    finally:
        engine.dispose()


def db_write(settings: Settings, sql: str, **params: object) -> None:
    """Run ``sql`` in a transaction of its own and commit it (a NOTIFY is sent at commit)."""
    engine = create_engine(settings.resolved_database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql), params)
    finally:
        engine.dispose()


def test_cli_create_list_revoke(pg_settings: Settings, pg_api: Api) -> None:
    env = settings_env(pg_settings)
    created = run_cli(env, "keys", "create", "--owner", "acme", "--name", "ci")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-alignd-") and len(key) > 40

    # Only the hash is stored: the key (nor its random part) is nowhere in the table.
    rows = db_rows(pg_settings, "SELECT * FROM api_keys")
    assert key not in json.dumps(rows, default=str)
    assert key.removeprefix("sk-alignd-")[:20] not in json.dumps(rows, default=str)
    (row,) = [r for r in rows if r["key_hash"] == hashlib.sha256(key.encode()).hexdigest()]
    assert row["owner"] == "acme" and row["name"] == "ci" and row["revoked_at"] is None
    key_id = str(row["id"])
    assert key_id in created.stdout

    # The key acts as its owner: what it uploads is acme's, not local's.
    acme = pg_api.client(key)
    uploaded = acme.post(
        "files", data={"purpose": "fine-tune"}, files={"file": ("a.jsonl", b'{"text":"x"}\n')}
    )
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["id"] in [f["id"] for f in acme.get("files").json()["data"]]
    assert uploaded.json()["id"] not in [f["id"] for f in pg_api.http.get("files").json()["data"]]

    listed = run_cli(env, "keys", "list", "--owner", "acme")
    assert listed.returncode == 0, listed.stderr
    assert key_id in listed.stdout and "acme" in listed.stdout and "active" in listed.stdout
    assert key not in listed.stdout and f"...{key[-4:]}" in listed.stdout

    revoked = run_cli(env, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    # The API remembers the key as valid (api/key_cache.py) for 10 s; the revocation's NOTIFY
    # reaches it in milliseconds, but on another thread than this request's.
    error = assert_401(first_refusal(acme))
    assert "revoked" in error["message"]
    assert "revoked" in run_cli(env, "keys", "list", "--owner", "acme").stdout
    missing = run_cli(env, "keys", "revoke", "key-nope")
    assert missing.returncode == 1 and "no API key" in missing.stderr
    bad_owner = run_cli(env, "keys", "create", "--owner", "has:colon")
    assert bad_owner.returncode == 1 and "owner" in bad_owner.stderr


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "sk-alignd-not-even-bearer",
        "Bearer sk-alignd-wrongwrongwrongwrongwrongwrongwrongwrong",
        "Bearer not-an-alignd-key",
        "Bearer a b",
    ],
)
def test_missing_malformed_or_wrong_key_is_401_on_every_route(
    pg_api: Api, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    client = pg_api.client(None)
    for method, path in [
        ("GET", "files"),
        ("POST", "files"),
        ("GET", "files/file-x"),
        ("DELETE", "files/file-x"),
        ("GET", "files/file-x/content"),
        ("GET", "fine_tuning/jobs"),
        ("POST", "fine_tuning/jobs"),
        ("GET", "fine_tuning/jobs/ftjob-x"),
        ("POST", "fine_tuning/jobs/ftjob-x/cancel"),
        ("GET", "fine_tuning/jobs/ftjob-x/events"),
        ("GET", "fine_tuning/jobs/ftjob-x/checkpoints"),
        ("GET", "fine_tuning/jobs/ftjob-x/adapter"),
        ("GET", "models"),
        ("GET", "models/tiny"),
        # Unknown routes too: without a key nothing under /v1 answers anything but 401.
        ("GET", "no/such/route"),
    ]:
        assert_401(client.request(method, path, headers=headers))


def test_health_ready_and_metrics_need_no_key(pg_api: Api) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{pg_api.url}{path}").status_code == 200


def test_the_openai_sdk_with_a_wrong_key_raises_authentication_error(pg_api: Api) -> None:
    client = openai.OpenAI(base_url=f"{pg_api.url}/v1", api_key="sk-alignd-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.files.list()
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.fine_tuning.jobs.create(model="tiny", training_file="file-x")
    good = openai.OpenAI(base_url=f"{pg_api.url}/v1", api_key=pg_api.key, max_retries=0)
    assert good.files.list().data is not None


def test_last_used_at_is_written_at_most_once_a_minute(pg_settings: Settings, pg_api: Api) -> None:
    key = create_api_key(pg_settings, "lastused")
    digest = hashlib.sha256(key.encode()).hexdigest()
    sql = "SELECT last_used_at FROM api_keys WHERE key_hash = :h"
    assert db_rows(pg_settings, sql, h=digest)[0]["last_used_at"] is None
    client = pg_api.client(key)
    assert client.get("files").status_code == 200
    first = db_rows(pg_settings, sql, h=digest)[0]["last_used_at"]
    assert isinstance(first, int) and abs(first - time.time()) < 5

    def set_last_used(value: int) -> None:
        db_write(
            pg_settings,
            "UPDATE api_keys SET last_used_at = :v WHERE key_hash = :h",
            v=value,
            h=digest,
        )

    # A lookup writes it; the API's key cache is emptied first so that each request looks up.
    recent = int(time.time()) - 30
    set_last_used(recent)
    forget_keys(pg_settings, pg_api)
    assert client.get("files").status_code == 200
    assert db_rows(pg_settings, sql, h=digest)[0]["last_used_at"] == recent
    set_last_used(int(time.time()) - 61)
    forget_keys(pg_settings, pg_api)
    assert client.get("files").status_code == 200
    assert db_rows(pg_settings, sql, h=digest)[0]["last_used_at"] >= int(time.time()) - 2  # type: ignore[operator]


def first_refusal(client: httpx.Client, within_s: float = 2.0) -> httpx.Response:
    """The first answer to GET /files that is not a 200, within ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        response = client.get("files")
        if response.status_code != 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.01)


def key_cache(api: Api) -> KeyCache[Principal]:
    """The key cache of the app ``api`` serves (it runs in this process: its state is ours
    to read, to know when its listener has done its work)."""
    cache: KeyCache[Principal] = api.server.config.app.state.services.key_cache
    return cache


def wait_until(what: str, ok: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not ok():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def forget_keys(settings: Settings, api: Api) -> None:
    """What a revocation does: a NOTIFY on the keys' channel; returns once the API's listener
    has emptied its cache."""
    cache = key_cache(api)
    before = cache.generation()
    db_write(settings, "SELECT pg_notify(:channel, 'test')", channel=CHANNEL)
    wait_until("the listener empties the cache", lambda: cache.generation() > before)


def revoke_quietly(settings: Settings, key: str) -> None:
    """Revoke ``key`` in the database without the NOTIFY (as a lost notice would leave it)."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    db_write(settings, "UPDATE api_keys SET revoked_at = 1 WHERE key_hash = :h", h=digest)


def test_valid_keys_are_remembered_until_a_revocation_notice(
    pg_settings: Settings, pg_api: Api
) -> None:
    cache = key_cache(pg_api)
    assert cache.enabled and pg_settings.api_key_cache_s == 10.0
    wait_until("the listener listens", lambda: cache.listening)
    key = create_api_key(pg_settings, "cached")
    client = pg_api.client(key)
    assert client.get("files").status_code == 200
    # Revoked behind the API's back (no NOTIFY): the remembered key still serves, so no
    # request looked it up ...
    revoke_quietly(pg_settings, key)
    for _ in range(5):
        assert client.get("files").status_code == 200
    # ... until a notice on the channel: then it is looked up, found revoked, refused.
    forget_keys(pg_settings, pg_api)
    error = assert_401(client.get("files"))
    assert "revoked" in error["message"]


def test_a_lost_listener_connection_empties_the_cache_until_it_listens_again(
    pg_settings: Settings, pg_api: Api
) -> None:
    cache = key_cache(pg_api)
    wait_until("the listener listens", lambda: cache.listening)
    key = create_api_key(pg_settings, "listener")
    client = pg_api.client(key)
    assert client.get("files").status_code == 200
    before = cache.generation()
    # The listener's connection is killed by the server (what a Postgres restart does to it).
    killed = db_rows(
        pg_settings,
        "SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity "
        "WHERE application_name = :name AND datname = current_database()",
        name=LISTENER_NAME,
    )
    assert killed and all(row["killed"] for row in killed)
    # It reconnects by itself (a reset when the connection fails, another when it listens).
    wait_until(
        "the listener listens again", lambda: cache.generation() >= before + 2 and cache.listening
    )
    # Whatever was revoked while nobody listened is not served from memory: the cache
    # started over when the listener came back.
    revoke_quietly(pg_settings, key)
    error = assert_401(client.get("files"))
    assert "revoked" in error["message"]


@pytest.fixture()
def limited_api(pg_settings: Settings) -> Iterator[Api]:
    """A second app on the same database with a limit of 3 requests a minute per key."""
    settings = Settings(
        data_dir=pg_settings.data_dir,
        database_url=pg_settings.database_url,
        broker_url=pg_settings.broker_url,
        models_dir=pg_settings.models_dir,
        rate_limit_per_minute=3,
    )
    api = Api(settings)
    yield api
    api.stop()


def test_rate_limit_is_per_key_and_answers_429_with_retry_after(limited_api: Api) -> None:
    for remaining in (2, 1, 0):
        response = limited_api.http.get("files")
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-remaining-requests"] == str(remaining)
    limited = limited_api.http.get("files")
    assert limited.status_code == 429
    error = limited.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    retry_after = limited.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= 20
    assert limited.headers["x-request-id"].startswith("req_")
    # Another key (of the same owner, even) has its own bucket.
    other = limited_api.client(create_api_key(limited_api.settings, "local"))
    assert other.get("files").status_code == 200
    # Health, readiness and metrics are never limited.
    for _ in range(5):
        assert httpx.get(f"{limited_api.url}/healthz").status_code == 200
    # The openai SDK sees a RateLimitError (its retries are off here).
    client = openai.OpenAI(base_url=f"{limited_api.url}/v1", api_key=limited_api.key, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.files.list()


def test_token_bucket_refills_and_says_when() -> None:
    clock = [100.0]
    limiter = RateLimiter(60, clock=lambda: clock[0])  # one a second, burst 60
    assert all(limiter.acquire("k").allowed for _ in range(60))
    refused = limiter.acquire("k")
    assert not refused.allowed and refused.retry_after_s == 1
    assert limiter.acquire("other").allowed
    clock[0] += 2.5
    assert limiter.acquire("k").allowed and limiter.acquire("k").allowed
    assert not limiter.acquire("k").allowed
    slow = RateLimiter(2, clock=lambda: clock[0])  # one every 30 s
    assert slow.acquire("k").allowed and slow.acquire("k").allowed
    assert slow.acquire("k").retry_after_s == 30
    assert RateLimiter(0).acquire("k").allowed  # 0: no limit


def embedded(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var", database_url=None, broker_url=None)


def test_embedded_bootstrap_writes_the_key_file_0600_and_reuses_it(tmp_path: Path) -> None:
    settings = embedded(tmp_path)
    upgrade(settings)
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    key = ensure_local_key(settings, sessions)
    path = settings.api_key_file
    assert path == settings.data_dir / "api_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == key and key.startswith("sk-alignd-")
    assert authenticate(sessions, f"Bearer {key}").owner == "local"
    # The next start reuses it.
    assert ensure_local_key(settings, sessions) == key
    assert path.read_text().strip() == key
    # A revoked local key is replaced at the next start (that is how it is rotated).
    key_id = authenticate(sessions, f"Bearer {key}").key_id
    with sessions() as session, session.begin():
        revoke_key(session, key_id)
    with pytest.raises(APIError):
        authenticate(sessions, f"Bearer {key}")
    new_key = ensure_local_key(settings, sessions)
    assert new_key != key and path.read_text().strip() == new_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    engine.dispose()


@pytest.mark.slow
def test_embedded_serve_creates_the_key_and_the_cli_uses_it(
    tmp_path: Path, models_dir: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    port = free_port()
    env.update(
        {
            "ALIGND_DATA_DIR": str(tmp_path / "var"),
            "ALIGND_MODELS_DIR": str(models_dir),
            "ALIGND_API_URL": f"http://127.0.0.1:{port}/v1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    key_file = tmp_path / "var" / "api_key"
    keys_seen = []
    for _ in range(2):  # a second start reuses the key
        server = start_alignd(
            ["serve", "--no-worker", "--port", str(port), "--log-level", "warning"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "serve did not come up"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).is_success:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
            keys_seen.append(key_file.read_text().strip())
            # The CLI client finds the key file by itself ...
            listed = run_cli(env, "files", "list")
            assert listed.returncode == 0, listed.stderr
            # ... ALIGND_API_KEY wins over it, and a wrong one is a 401 with a hint.
            wrong = run_cli({**env, "ALIGND_API_KEY": "sk-alignd-wrong"}, "files", "list")
            assert wrong.returncode == 1
            assert "HTTP 401" in wrong.stderr and "ALIGND_API_KEY" in wrong.stderr
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    assert keys_seen[0] == keys_seen[1] and keys_seen[0].startswith("sk-alignd-")
