"""``Idempotency-Key`` on POSTs: replays, a different body (400), per-owner scoping, multipart
uploads stored once (even though every attempt draws a new multipart boundary), concurrent
duplicates executed once, failures not stored, expiry after 24 h."""

from __future__ import annotations

import io
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from api.settings import Settings
from tests.conftest import Api, chat_rows


def new_owner(api: Api) -> httpx.Client:
    return api.as_owner(f"idem-{secrets.token_hex(4)}")


def new_key() -> str:
    return f"idem-{secrets.token_hex(8)}"


def upload(
    client: httpx.Client, key: str | None, content: bytes, filename: str = "d.jsonl"
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(
        "files",
        data={"purpose": "fine-tune"},
        files={"file": (filename, content)},
        headers=headers,
    )


def file_ids(client: httpx.Client) -> list[str]:
    return [f["id"] for f in client.get("files", params={"limit": 10000}).json()["data"]]


def error_code(response: httpx.Response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    return str(response.json()["error"]["code"])


def test_multipart_upload_replay_stores_the_file_once(pg_api: Api) -> None:
    client = new_owner(pg_api)
    key, content = new_key(), chat_rows(3).encode()
    first = upload(client, key, content)
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    # httpx draws a new random boundary for this second request: still the same request.
    second = upload(client, key, content)
    assert second.status_code == 200
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()
    assert second.headers["content-type"] == "application/json"
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert file_ids(client) == [first.json()["id"]]
    # The same key with other bytes, or another filename, is a different request.
    assert error_code(upload(client, key, chat_rows(4).encode())) == "idempotency_key_reused"
    assert error_code(upload(client, key, content, "other.jsonl")) == "idempotency_key_reused"
    # Without the key, the same upload is a new file.
    assert upload(client, None, content).json()["id"] != first.json()["id"]


def test_json_replay_and_a_different_body_is_a_400(pg_api: Api) -> None:
    client = new_owner(pg_api)
    train = upload(client, None, chat_rows(4).encode()).json()["id"]
    key = new_key()
    body = {"model": "tiny", "training_file": train, "seed": 5, "suffix": "idem"}
    first = client.post("fine_tuning/jobs", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    job_id = first.json()["id"]
    try:
        second = client.post("fine_tuning/jobs", json=body, headers={"Idempotency-Key": key})
        assert second.status_code == 200
        assert second.headers["idempotent-replayed"] == "true"
        assert second.json()["id"] == job_id
        listed = client.get("fine_tuning/jobs").json()["data"]
        assert [j["id"] for j in listed] == [job_id]
        changed = client.post(
            "fine_tuning/jobs", json={**body, "seed": 6}, headers={"Idempotency-Key": key}
        )
        assert error_code(changed) == "idempotency_key_reused"
        assert changed.json()["error"]["param"] == "Idempotency-Key"
        # The same key on another route is another request too.
        elsewhere = upload(client, key, chat_rows(2).encode())
        assert error_code(elsewhere) == "idempotency_key_reused"
        assert "POST /v1/fine_tuning/jobs" in elsewhere.json()["error"]["message"]
        assert [j["id"] for j in client.get("fine_tuning/jobs").json()["data"]] == [job_id]
    finally:
        client.post(f"fine_tuning/jobs/{job_id}/cancel")


def test_replayed_cancel_returns_the_stored_response(pg_api: Api) -> None:
    client = new_owner(pg_api)
    train = upload(client, None, chat_rows(4).encode()).json()["id"]
    job = client.post("fine_tuning/jobs", json={"model": "tiny", "training_file": train}).json()
    key = new_key()
    # The SDK sends cancel with an empty body; the route never reads it.
    first = client.post(f"fine_tuning/jobs/{job['id']}/cancel", headers={"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    again = client.post(f"fine_tuning/jobs/{job['id']}/cancel", headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    # Without the key it runs again: once the job is cancelled (a worker may have claimed it
    # first, and then stops it at its next step), a second cancel is refused.
    deadline = time.monotonic() + 60
    while client.get(f"fine_tuning/jobs/{job['id']}").json()["status"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert error_code(client.post(f"fine_tuning/jobs/{job['id']}/cancel")) == "invalid_state"


def test_keys_are_scoped_per_owner(pg_api: Api) -> None:
    alice, bob = new_owner(pg_api), new_owner(pg_api)
    key, content = new_key(), chat_rows(2).encode()
    a = upload(alice, key, content)
    b = upload(bob, key, content)
    assert a.status_code == b.status_code == 200
    assert "idempotent-replayed" not in b.headers
    assert a.json()["id"] != b.json()["id"]
    assert file_ids(bob) == [b.json()["id"]]
    # Each owner's replay is its own response.
    assert upload(bob, key, content).json()["id"] == b.json()["id"]
    assert upload(alice, key, content).json()["id"] == a.json()["id"]
    # And another owner's differing body does not collide with anyone's key either.
    assert upload(bob, new_key(), chat_rows(5).encode()).status_code == 200


def test_only_successes_are_stored(pg_api: Api) -> None:
    client = new_owner(pg_api)
    key = new_key()
    refused = client.post(
        "files",
        data={"purpose": "assistants"},
        files={"file": ("d.jsonl", b"{}")},
        headers={"Idempotency-Key": key},
    )
    assert error_code(refused) == "invalid_value"
    # The failure was not stored: the key is free for a (corrected) request.
    fixed = upload(client, key, chat_rows(2).encode())
    assert fixed.status_code == 200 and "idempotent-replayed" not in fixed.headers
    assert upload(client, key, chat_rows(2).encode()).headers["idempotent-replayed"] == "true"


def test_concurrent_duplicates_execute_once(pg_api: Api) -> None:
    client = new_owner(pg_api)
    key = new_key()
    # A few MiB, so the first upload is still streaming while the others arrive.
    content = chat_rows(20000).encode()
    barrier = threading.Barrier(6)
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def send() -> None:
        with httpx.Client(
            base_url=str(client.base_url), headers=dict(client.headers), timeout=60
        ) as own:
            barrier.wait()
            response = upload(own, key, content)
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(responses) == 6
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    assert file_ids(client) == [responses[0].json()["id"]]


def test_a_key_expires_after_24_hours(pg_api: Api, pg_settings: Settings) -> None:
    client = new_owner(pg_api)
    key, content = new_key(), chat_rows(2).encode()
    first = upload(client, key, content).json()["id"]
    engine = create_engine(pg_settings.resolved_database_url)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE idempotency_keys SET created_at = :t WHERE idempotency_key = :k"),
            {"t": int(time.time()) - 24 * 3600 - 1, "k": key},
        )
    engine.dispose()
    again = upload(client, key, content)
    assert again.status_code == 200 and "idempotent-replayed" not in again.headers
    assert again.json()["id"] != first
    assert upload(client, key, content).json()["id"] == again.json()["id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
def test_a_malformed_key_is_a_400(pg_api: Api, key: str) -> None:
    response = pg_api.http.post(
        "fine_tuning/jobs", json={"model": "tiny"}, headers={"Idempotency-Key": key}
    )
    assert error_code(response) == "invalid_idempotency_key"


def test_the_openai_sdk_retry_with_the_same_key_is_a_replay(pg_api: Api) -> None:
    from tests.conftest import create_api_key

    owner_key = create_api_key(pg_api.settings, f"idem-sdk-{secrets.token_hex(3)}")
    client = openai.OpenAI(base_url=f"{pg_api.url}/v1", api_key=owner_key, max_retries=0)
    key = new_key()
    content = chat_rows(3).encode()
    made: list[Any] = [
        client.files.create(
            file=("t.jsonl", io.BytesIO(content)),
            purpose="fine-tune",
            extra_headers={"Idempotency-Key": key},
        )
        for _ in range(2)
    ]
    assert made[0].id == made[1].id
    assert [f.id for f in client.files.list()] == [made[0].id]
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(
            file=("t.jsonl", io.BytesIO(chat_rows(4).encode())),
            purpose="fine-tune",
            extra_headers={"Idempotency-Key": key},
        )
    assert caught.value.code == "idempotency_key_reused"


def test_concurrent_duplicates_execute_once_on_sqlite(tmp_path: Path, models_dir: Path) -> None:
    """The embedded default: the same claim on SQLite's unique primary key."""
    from api.migration import upgrade

    settings = Settings(
        data_dir=tmp_path / "var", database_url=None, broker_url=None, models_dir=models_dir
    )
    upgrade(settings)
    api = Api(settings)
    try:
        key, content = new_key(), chat_rows(5000).encode()
        barrier = threading.Barrier(4)
        responses: list[httpx.Response] = []

        def send() -> None:
            with httpx.Client(
                base_url=f"{api.url}/v1/", headers=dict(api.http.headers), timeout=60
            ) as own:
                barrier.wait()
                responses.append(upload(own, key, content))

        threads = [threading.Thread(target=send) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
        assert len({r.json()["id"] for r in responses}) == 1
        assert file_ids(api.http) == [responses[0].json()["id"]]
    finally:
        api.stop()
