"""Files over real HTTP against the app on Postgres: OpenAI's shapes, validation, errors."""

from __future__ import annotations

import json

from tests.conftest import Api, chat_rows


def test_upload_list_retrieve_content_delete(pg_api: Api) -> None:
    body = chat_rows(5)
    created = pg_api.upload(body, filename="train.jsonl")
    assert created["object"] == "file"
    assert created["id"].startswith("file-")
    assert created["status"] == "processed"
    # optional, not nullable in OpenAI's schema: absent when unset, never null
    assert "status_details" not in created and "expires_at" not in created
    assert created["bytes"] == len(body.encode())
    assert created["purpose"] == "fine-tune"
    assert created["filename"] == "train.jsonl"
    assert created["format"] == "chat"
    assert created["num_examples"] == 5

    listed = pg_api.http.get("files").json()
    assert listed["object"] == "list"
    assert created["id"] in [row["id"] for row in listed["data"]]

    retrieved = pg_api.http.get(f"files/{created['id']}")
    assert retrieved.status_code == 200
    assert retrieved.json() == created

    content = pg_api.http.get(f"files/{created['id']}/content")
    assert content.status_code == 200
    assert content.content == body.encode()

    deleted = pg_api.http.delete(f"files/{created['id']}")
    assert deleted.json() == {"id": created["id"], "object": "file", "deleted": True}
    gone = pg_api.http.get(f"files/{created['id']}")
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "not_found"


def test_large_file_round_trips_across_chunks(pg_api: Api) -> None:
    # Several 1 MiB chunks, so storage and streaming cross chunk boundaries.
    row = {
        "messages": [
            {"role": "user", "content": "x" * 2000},
            {"role": "assistant", "content": "y" * 2000},
        ]
    }
    body = (json.dumps(row) + "\n") * 1500
    assert len(body) > 5 * 1024 * 1024
    created = pg_api.upload(body)
    assert created["status"] == "processed"
    assert created["num_examples"] == 1500
    assert pg_api.http.get(f"files/{created['id']}/content").content == body.encode()


def test_malformed_file_gets_error_with_line_numbers(pg_api: Api) -> None:
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    lines = [
        good,
        "{not json",
        json.dumps(
            {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}
        ),
        good,
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps(
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}
        ),
        good,
    ]
    created = pg_api.upload("\n".join(lines) + "\n")
    assert created["status"] == "error"
    details = created["status_details"]
    assert "line 2: " in details and "JSON" in details
    assert "line 3: " in details and "unknown role 'bot'" in details
    assert "line 5: " in details and "no assistant turn" in details
    assert "line 6: " in details and "empty" in details
    assert "line 1:" not in details and "line 4:" not in details


def test_empty_file_is_an_error(pg_api: Api) -> None:
    created = pg_api.upload("")
    assert created["status"] == "error"
    assert "no examples" in created["status_details"]


def test_unknown_purpose_is_a_400_naming_purpose(pg_api: Api) -> None:
    response = pg_api.http.post(
        "files", data={"purpose": "assistants"}, files={"file": ("a.jsonl", b"{}")}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "purpose"
    assert error["type"] == "invalid_request_error"
    before = {
        row["id"]
        for row in pg_api.http.get("files", params={"purpose": "fine-tune"}).json()["data"]
    }
    # Nothing was half-stored: the list did not grow.
    assert before == {
        row["id"]
        for row in pg_api.http.get("files", params={"purpose": "fine-tune"}).json()["data"]
    }


def test_missing_multipart_field_is_error_shape(pg_api: Api) -> None:
    response = pg_api.http.post("files", data={"purpose": "fine-tune"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "file"
    assert "detail" not in response.json()


def test_unknown_route_and_request_id(pg_api: Api) -> None:
    response = pg_api.http.get("no/such/route")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"].startswith("req_")
    echoed = pg_api.http.get("files", headers={"x-request-id": "caller-123"})
    assert echoed.headers["x-request-id"] == "caller-123"


def test_health_ready_metrics(pg_api: Api) -> None:
    import httpx

    assert httpx.get(f"{pg_api.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{pg_api.url}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    assert "# TYPE alignd_jobs gauge" in httpx.get(f"{pg_api.url}/metrics").text
