"""The Uploads API through the unmodified openai SDK: parts assembled into a validated file."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Api, chat_rows


@pytest.fixture(scope="module")
def client(pg_api: Api) -> openai.OpenAI:
    return (
        pg_api.openai_client()
        if hasattr(pg_api, "openai_client")
        else openai.OpenAI(
            base_url=f"{pg_api.url}/v1",
            api_key=pg_api.http.headers["Authorization"].removeprefix("Bearer "),
            max_retries=0,
        )
    )


def test_chunked_upload_becomes_a_processed_file(client: openai.OpenAI) -> None:
    data = chat_rows(40).encode()
    # Small parts so the file spans several, with part boundaries inside lines.
    upload = client.uploads.upload_file_chunked(
        file=data,
        filename="big.jsonl",
        bytes=len(data),
        mime_type="application/jsonl",
        purpose="fine-tune",
        part_size=997,
    )
    assert upload.status == "completed"
    assert upload.file is not None and upload.file.status == "processed"
    assert upload.file.bytes == len(data)
    assert client.files.content(upload.file.id).read() == data
    assert client.files.retrieve(upload.file.id).model_extra["num_examples"] == 40


def test_parts_in_the_listed_order_and_validation_applies(client: openai.OpenAI) -> None:
    lines = chat_rows(2).encode().split(b"\n")
    good, bad = lines[0] + b"\n", b"{broken\n"
    upload = client.uploads.create(
        bytes=len(good) + len(bad),
        filename="x.jsonl",
        mime_type="application/jsonl",
        purpose="fine-tune",
    )
    assert upload.status == "pending"
    second = client.uploads.parts.create(upload.id, data=bad)
    first = client.uploads.parts.create(upload.id, data=good)
    done = client.uploads.complete(upload.id, part_ids=[first.id, second.id])
    assert done.file is not None
    assert done.file.status == "error"
    assert "line 2" in (done.file.status_details or "")
    assert client.files.content(done.file.id).read() == good + bad


def test_wrong_total_and_cancel(client: openai.OpenAI) -> None:
    upload = client.uploads.create(
        bytes=100, filename="x.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    part = client.uploads.parts.create(upload.id, data=b"{}\n")
    with pytest.raises(openai.BadRequestError) as err:
        client.uploads.complete(upload.id, part_ids=[part.id])
    assert err.value.code == "bytes_mismatch" and err.value.param == "part_ids"
    cancelled = client.uploads.cancel(upload.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.BadRequestError) as again:
        client.uploads.parts.create(upload.id, data=b"x")
    assert again.value.code == "invalid_state"
    with pytest.raises(openai.BadRequestError) as purpose:
        client.uploads.create(bytes=1, filename="x", mime_type="text/plain", purpose="assistants")
    assert purpose.value.param == "purpose"
