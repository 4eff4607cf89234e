"""Input limits over real HTTP against the app on Postgres (issue 13, item 6): download
headers safe for any filename, the cap on JSON bodies, metadata and integrations limits,
bounds on every numeric hyperparameter, and ``invalid_json`` for malformed bodies."""

from __future__ import annotations

import json
import re
import socket
from typing import Any
from urllib.parse import unquote

import pytest

from api.settings import Settings
from tests.conftest import Api, chat_rows
from trainer_core.registry import METHODS, required_options

ROW = chat_rows(1).encode()


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def upload_named(api: Api, filename: str) -> dict[str, Any]:
    """A file stored under ``filename`` through the Uploads API, whose JSON body takes any
    string as the name (a multipart upload's name passes through the client's quoting)."""
    created = api.http.post(
        "uploads",
        json={
            "bytes": len(ROW),
            "filename": filename,
            "purpose": "fine-tune",
            "mime_type": "application/jsonl",
        },
    )
    assert created.status_code == 200, created.text
    upload_id = created.json()["id"]
    part = api.http.post(f"uploads/{upload_id}/parts", files={"data": ("part", ROW)})
    assert part.status_code == 200, part.text
    done = api.http.post(f"uploads/{upload_id}/complete", json={"part_ids": [part.json()["id"]]})
    assert done.status_code == 200, done.text
    file = done.json()["file"]
    assert file["filename"] == filename
    return dict(file)


def disposition_names(header: str) -> tuple[str, str]:
    """(the ASCII fallback, the decoded ``filename*``) of an RFC 6266 header."""
    match = re.fullmatch(
        r"attachment; filename=\"([^\"\\\r\n]*)\"; filename\*=UTF-8''(\S+)", header
    )
    assert match, header
    encoded = match.group(2)
    # RFC 5987 attr-chars only: nothing that could end the parameter or the header.
    assert re.fullmatch(r"[A-Za-z0-9!#$&+\-.^_`|~%]+", encoded), encoded
    return match.group(1), unquote(encoded, encoding="utf-8", errors="strict")


@pytest.mark.parametrize(
    "filename",
    [
        'quo"te.jsonl',
        "semi;colon=1.jsonl",
        "line\r\nX-Injected: yes.jsonl",
        "数据集.jsonl",
        'café "menü".jsonl',
        "...",
        "\\back\\slash\t.jsonl",
        '"',
    ],
)
def test_download_header_is_safe_for_any_filename(pg_api: Api, filename: str) -> None:
    file = upload_named(pg_api, filename)
    response = pg_api.http.get(f"files/{file['id']}/content")
    assert response.status_code == 200
    assert response.content == ROW
    assert "x-injected" not in response.headers
    fallback, exact = disposition_names(response.headers["content-disposition"])
    assert exact == filename
    assert re.fullmatch(r"[A-Za-z0-9 ._()+-]+", fallback), fallback


def test_multipart_upload_with_a_non_latin1_name_downloads(pg_api: Api) -> None:
    file = pg_api.upload(ROW, filename="обучение.jsonl")
    response = pg_api.http.get(f"files/{file['id']}/content")
    assert response.status_code == 200
    fallback, exact = disposition_names(response.headers["content-disposition"])
    assert (fallback, exact) == ("________.jsonl", "обучение.jsonl")


# -- the cap on JSON bodies ---------------------------------------------------------------


def test_json_body_over_the_cap_is_a_413(pg_api: Api) -> None:
    limit = Settings().max_json_body_bytes
    body = {"model": "tiny", "training_file": "file-x", "metadata": {"k": "v" * 100}}
    body["integrations"] = [{"type": "wandb", "wandb": {"project": "x" * limit}}]
    response = pg_api.http.post("fine_tuning/jobs", json=body)
    error = error_of(response, 413)
    assert error["code"] == "request_too_large"
    assert error["type"] == "invalid_request_error"
    assert str(limit) in error["message"]
    assert response.headers["x-request-id"]


def test_chunked_json_body_over_the_cap_is_a_413(pg_api: Api) -> None:
    # No Content-Length: the body is counted as it arrives.
    limit = Settings().max_json_body_bytes

    def chunks() -> Any:
        yield b'{"model": "tiny", "training_file": "file-x", "suffix": "'
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    response = pg_api.http.post(
        "fine_tuning/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert error_of(response, 413)["code"] == "request_too_large"


def test_declared_length_over_the_cap_is_refused_before_the_body(pg_api: Api) -> None:
    # The server answers from the headers alone; the client never sends the 2 GB it declared.
    host, port = "127.0.0.1", pg_api.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {pg_api.key}\r\nContent-Type: application/json\r\n"
                "Content-Length: 2000000000\r\n\r\n{"
            ).encode()
        )
        answer = ""
        while not answer.endswith("}}"):
            chunk = sock.recv(65536).decode("latin-1")
            assert chunk, answer
            answer += chunk
    assert answer.startswith("HTTP/1.1 413"), answer
    assert '"code":"request_too_large"' in answer.replace(" ", "")


def test_multipart_body_to_a_json_route_is_capped(pg_api: Api) -> None:
    # Only the upload routes are exempt: a JSON route reads any body whole.
    big = b"x" * (Settings().max_json_body_bytes + 1)
    response = pg_api.http.post("fine_tuning/jobs", files={"file": ("big.jsonl", big)})
    assert error_of(response, 413)["code"] == "request_too_large"


def test_file_uploads_are_not_json_bodies(pg_api: Api) -> None:
    # A 3 MB multipart upload passes a 1 MiB JSON cap; files keep their own limits.
    body = chat_rows(1) * (3 * 1024 * 1024 // len(chat_rows(1)) + 1)
    assert len(body) > 3 * Settings().max_json_body_bytes
    assert pg_api.upload(body)["status"] == "processed"
    # The same bytes as one part of the Uploads API.
    data = body.encode()
    created = pg_api.http.post(
        "uploads",
        json={
            "bytes": len(data),
            "filename": "big.jsonl",
            "purpose": "fine-tune",
            "mime_type": "application/jsonl",
        },
    )
    part = pg_api.http.post(f"uploads/{created.json()['id']}/parts", files={"data": ("p", data)})
    assert part.status_code == 200, part.text


# -- metadata and integrations -------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"metadata": {"k": 1}}, "metadata.k"),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p" * 9000}}]}, "integrations"),
        ({"integrations": [{"type": "wandb"}] * 11}, "integrations"),
    ],
)
def test_metadata_and_integrations_limits(pg_api: Api, patch: dict[str, Any], param: str) -> None:
    body = {"model": "tiny", "training_file": "file-x", **patch}
    error = error_of(pg_api.http.post("fine_tuning/jobs", json=body), 400)
    assert error["param"] == param, error
    assert error["code"] == "invalid_value"


def test_metadata_at_the_limits_is_accepted(pg_api: Api) -> None:
    # Validation passes, so the next error is the missing file, not the metadata.
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    integrations = [{"type": "wandb", "wandb": {"project": "p", "tags": ["t" * 100] * 64}}]
    body = {
        "model": "tiny",
        "training_file": "file-x",
        "metadata": metadata,
        "integrations": integrations,
    }
    error = error_of(pg_api.http.post("fine_tuning/jobs", json=body), 400)
    assert error["param"] == "training_file", error


# -- numeric hyperparameters ------------------------------------------------------------------


def _numbers(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every integer or number in a JSON schema, with its path."""
    defs = schema.get("$defs", {})
    found: list[tuple[str, dict[str, Any]]] = []

    def visit(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        if "$ref" in node:
            visit(defs[node["$ref"].rsplit("/", 1)[-1]], path)
            return
        if node.get("type") in ("integer", "number"):
            found.append((path, node))
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(key, []):
                visit(sub, path)
        for key, sub in node.get("properties", {}).items():
            visit(sub, f"{path}.{key}")
        if "items" in node:
            visit(node["items"], f"{path}[]")

    visit(schema, "")
    return found


@pytest.mark.parametrize("method", list(METHODS))
def test_every_numeric_hyperparameter_is_bounded(method: str) -> None:
    numbers = _numbers(METHODS[method].request.model_json_schema())
    assert numbers
    for path, node in numbers:
        assert "minimum" in node or "exclusiveMinimum" in node, (method, path)
        assert "maximum" in node or "exclusiveMaximum" in node, (method, path)


@pytest.mark.parametrize(
    ("method", "field", "value"),
    [
        ("reinforcement", "eval_samples", 10**30),
        ("reinforcement", "eval_interval", 10**30),
        ("reinforcement", "eval_samples", -1),
        ("dpo", "loss_weights", [1e300]),
        ("dpo", "loss_weights", [1.0] * 13),
        ("supervised", "n_epochs", 10**30),
        ("supervised", "learning_rate_multiplier", 1e308),
        ("grpo", "temperature", 0),
    ],
)
def test_out_of_bounds_hyperparameters_are_refused(
    pg_api: Api, method: str, field: str, value: Any
) -> None:
    # Required options are only checked for presence before the hyperparameters.
    block = {key: {} for key in required_options(method)}
    body = {
        "model": "tiny",
        "training_file": "file-x",
        "method": {"type": method, method: {**block, "hyperparameters": {field: value}}},
    }
    error = error_of(pg_api.http.post("fine_tuning/jobs", json=body), 400)
    path = f"method.{method}.hyperparameters.{field}"
    # An item of a list is named by its index (loss_weights[0]).
    assert error["param"] in (path, f"{path}[0]"), error
    assert error["code"] == "invalid_value"


# -- malformed JSON ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "fine_tuning/jobs",
        "fine_tuning/jobs/estimate",
        "files/file-x/validate",
        "uploads",
        "uploads/upload-x/complete",
        "webhook_endpoints",
        "fine_tuning/alpha/graders/validate",
        "fine_tuning/alpha/graders/run",
    ],
)
@pytest.mark.parametrize("body", [b"{bad json", b'{"model": "tiny",}', b"\xff\xfe"])
def test_malformed_json_is_invalid_json(pg_api: Api, path: str, body: bytes) -> None:
    response = pg_api.http.post(path, content=body, headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert error["code"] == "invalid_json", (path, error)
    assert error["param"] is None
    json.dumps(error)
