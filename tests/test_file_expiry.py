"""OpenAI's ``expires_after`` on uploads (issue #14 item 6): it sets ``expires_at``; from then
on the file is not served, and the worker's sweep deletes its bytes once no active job needs
them. The clock is moved by writing ``expires_at`` into the past, then the real sweep step
runs."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from sqlalchemy import func, select, update

from api.models import File, FileChunk, Job
from api.services import Services
from api.settings import Settings
from tests.conftest import Api, chat_rows, insert_job
from worker.recovery import expire_files


@pytest.fixture
def sdk(pg_api: Api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pg_api.url}/v1", api_key=pg_api.key, max_retries=0)


def upload(sdk: openai.OpenAI, **options: Any) -> Any:
    return sdk.files.create(
        file=("data.jsonl", chat_rows(4, seed=9).encode()), purpose="fine-tune", **options
    )


def expire(services: Services, file_id: str) -> None:
    with services.sessions() as session, session.begin():
        session.execute(
            update(File).where(File.id == file_id).values(expires_at=File.created_at - 1)
        )


def stored(services: Services, file_id: str) -> tuple[int, int]:
    """(file rows, chunk rows) of ``file_id`` in the database."""
    with services.sessions() as session:
        rows = session.scalar(select(func.count()).where(File.id == file_id)) or 0
        chunks = session.scalar(select(func.count()).where(FileChunk.file_id == file_id)) or 0
    return rows, chunks


def test_expires_after_bounds_are_400_naming_the_field(sdk: openai.OpenAI, pg_api: Api) -> None:
    for seconds in (3599, 2_592_001):
        with pytest.raises(openai.BadRequestError) as caught:
            upload(sdk, expires_after={"anchor": "created_at", "seconds": seconds})
        assert caught.value.param == "expires_after.seconds"
        assert "3600 to 2592000" in caught.value.message
    # The form fields as OpenAI's multipart sends them, wrong in every other way.
    for fields, param in (
        ({"expires_after[anchor]": "last_used_at", "expires_after[seconds]": "3600"}, "anchor"),
        ({"expires_after[seconds]": "3600"}, "anchor"),
        ({"expires_after[anchor]": "created_at"}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "1e4"}, "seconds"),
    ):
        answer = pg_api.http.post(
            "files",
            data={"purpose": "fine-tune", **fields},
            files={"file": ("d.jsonl", chat_rows(2).encode())},
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == f"expires_after.{param}"
    # Without expires_after a file never expires: the field is absent, not null.
    plain = pg_api.upload(chat_rows(2))
    assert "expires_at" not in plain


def test_an_expired_file_is_gone_and_the_sweep_deletes_its_bytes(
    sdk: openai.OpenAI, pg_api: Api, pg_settings: Settings
) -> None:
    services = Services.build(pg_settings)
    made = upload(sdk, expires_after={"anchor": "created_at", "seconds": 3600})
    assert made.expires_at == made.created_at + 3600
    assert sdk.files.retrieve(made.id).expires_at == made.expires_at
    assert made.id in [f.id for f in sdk.files.list()]
    keep = upload(sdk, expires_after={"anchor": "created_at", "seconds": 2_592_000})

    expire(services, made.id)
    # Never served once expired, even before the sweep has run.
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        sdk.files.content(made.id)
    assert made.id not in [f.id for f in sdk.files.list()]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.fine_tuning.jobs.create(model="tiny", training_file=made.id)
    assert caught.value.code == "file_not_found"
    assert stored(services, made.id)[0] == 1

    removed = expire_files(services)
    assert made.id in removed and keep.id not in removed
    assert stored(services, made.id) == (0, 0)
    assert stored(services, keep.id)[0] == 1 and sdk.files.retrieve(keep.id).id == keep.id


def test_an_active_job_keeps_its_expired_file_until_it_ends(
    sdk: openai.OpenAI, pg_settings: Settings
) -> None:
    services = Services.build(pg_settings)
    train = upload(sdk, expires_after={"anchor": "created_at", "seconds": 3600})
    valid = upload(sdk, expires_after={"anchor": "created_at", "seconds": 3600})
    job_id = insert_job(
        services.sessions, status="paused", training_file=train.id, validation_file=valid.id
    )
    expire(services, train.id)
    expire(services, valid.id)
    removed = expire_files(services)
    assert train.id not in removed and valid.id not in removed
    assert stored(services, train.id)[1] >= 1 and stored(services, valid.id)[1] >= 1
    with pytest.raises(openai.NotFoundError):  # kept for the job, not served
        sdk.files.retrieve(train.id)

    with services.sessions() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(status="cancelled"))
    removed = expire_files(services)
    assert train.id in removed and valid.id in removed
    assert stored(services, train.id) == stored(services, valid.id) == (0, 0)


def test_a_multipart_upload_passes_expires_after_to_its_file(sdk: openai.OpenAI) -> None:
    data = chat_rows(4, seed=2).encode()
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.uploads.create(
            bytes=len(data),
            filename="d.jsonl",
            mime_type="application/jsonl",
            purpose="fine-tune",
            expires_after={"anchor": "created_at", "seconds": 60},
        )
    assert caught.value.param == "expires_after.seconds"
    upload = sdk.uploads.create(
        bytes=len(data),
        filename="d.jsonl",
        mime_type="application/jsonl",
        purpose="fine-tune",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )
    part = sdk.uploads.parts.create(upload.id, data=data)
    done = sdk.uploads.complete(upload.id, part_ids=[part.id])
    assert done.file is not None
    assert done.file.expires_at == done.file.created_at + 7200
    assert sdk.files.retrieve(done.file.id).expires_at == done.file.expires_at
