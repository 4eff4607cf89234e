"""Tenancy: owner B, with its own valid key, tries every route on owner A's ids and gets the 404
a missing id gets (never a 403: ids must not leak); A's resources are untouched; lists never
show another owner's rows.

A's jobs are inserted directly (with a checkpoint, an adapter in the artifact store and
events), so the adapter routes have something to serve, and no worker ever picks them up.
"""

from __future__ import annotations

import io
import re
import secrets
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.job_events import add_event
from api.models import Checkpoint, Job, new_id, now
from api.services import Services
from api.settings import Settings
from tests.conftest import Api, chat_rows, job_row


@dataclass
class Tenant:
    owner: str
    http: httpx.Client
    file_id: str
    done_job: str  # succeeded, with a checkpoint and an adapter
    paused_job: str  # cancellable
    checkpoint_id: str
    model: str


def insert_job(services: Services, owner: str, file_id: str, status: str, tmp: Path) -> Job:
    job = job_row(
        owner=owner,
        status=status,
        training_file=file_id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
        suffix="t",
    )
    job_id = job.id
    with services.sessions() as session, session.begin():
        session.add(job)
        session.flush()
        add_event(session, job, f"Created fine-tuning job: {job_id}")
        if status == "succeeded":
            key = f"jobs/{job_id}/checkpoints/step-1"
            tar_path = tmp / f"{job_id}.tar"
            with tarfile.open(tar_path, "w") as tar:
                data = b'{"peft_type": "LORA"}'
                info = tarfile.TarInfo("adapter_config.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            services.artifacts.put_file(f"{key}/adapter.tar", tar_path)
            job.adapter_key = f"{key}/adapter.tar"
            job.fine_tuned_model = f"ft:tiny:{owner}:t:{job_id}"
            job.finished_at = now()
            session.add(
                Checkpoint(
                    id=new_id("ftckpt"),
                    job_id=job_id,
                    owner=owner,
                    created_at=now(),
                    step=1,
                    metrics={"train_loss": 1.0},
                    artifact_key=key,
                    final=True,
                )
            )
    return job


def make_tenant(api: Api, services: Services, owner: str, tmp: Path) -> Tenant:
    http = api.as_owner(owner)
    uploaded = http.post(
        "files",
        data={"purpose": "fine-tune"},
        files={"file": (f"{owner}.jsonl", chat_rows(4).encode())},
    )
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    done = insert_job(services, owner, file_id, "succeeded", tmp)
    paused = insert_job(services, owner, file_id, "paused", tmp)
    with services.sessions() as session:
        checkpoint_id = session.query(Checkpoint.id).filter(Checkpoint.job_id == done.id).scalar()
    return Tenant(
        owner=owner,
        http=http,
        file_id=file_id,
        done_job=done.id,
        paused_job=paused.id,
        checkpoint_id=str(checkpoint_id),
        model=str(done.fine_tuned_model),
    )


@pytest.fixture(scope="module")
def tenants(
    pg_api: Api, pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Tenant, Tenant]:
    services = Services.build(pg_settings)
    tmp = tmp_path_factory.mktemp("tenancy")
    suffix = secrets.token_hex(3)
    return (
        make_tenant(pg_api, services, f"tenant-a-{suffix}", tmp),
        make_tenant(pg_api, services, f"tenant-b-{suffix}", tmp),
    )


def routes_on(t: Tenant) -> list[tuple[str, str]]:
    job, paused = t.done_job, t.paused_job
    return [
        ("GET", f"files/{t.file_id}"),
        ("GET", f"files/{t.file_id}/content"),
        ("DELETE", f"files/{t.file_id}"),
        ("GET", f"fine_tuning/jobs/{job}"),
        ("POST", f"fine_tuning/jobs/{paused}/cancel"),
        ("GET", f"fine_tuning/jobs/{job}/events"),
        ("GET", f"fine_tuning/jobs/{job}/checkpoints"),
        ("GET", f"fine_tuning/jobs/{job}/adapter"),
        ("GET", f"fine_tuning/jobs/{job}/checkpoints/{t.checkpoint_id}/adapter"),
        ("GET", f"models/{t.model}"),
    ]


def assert_404(response: httpx.Response) -> None:
    assert response.status_code == 404, (response.request.url, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}


def test_another_owner_gets_404_on_every_route_and_changes_nothing(
    tenants: tuple[Tenant, Tenant],
) -> None:
    a, b = tenants
    for method, path in routes_on(a):
        assert_404(b.http.request(method, path))

    # B cannot train on A's file either: the same 400 as for a file that does not exist.
    created = b.http.post("fine_tuning/jobs", json={"model": "tiny", "training_file": a.file_id})
    assert created.status_code == 400
    assert created.json()["error"]["code"] == "file_not_found"
    assert created.json()["error"]["param"] == "training_file"

    # A's resources are untouched, and A can still reach every one of them.
    assert a.http.get(f"files/{a.file_id}").json()["status"] == "processed"
    assert a.http.get(f"files/{a.file_id}/content").content == chat_rows(4).encode()
    assert a.http.get(f"fine_tuning/jobs/{a.paused_job}").json()["status"] == "paused"
    done = a.http.get(f"fine_tuning/jobs/{a.done_job}").json()
    assert done["status"] == "succeeded" and done["fine_tuned_model"] == a.model
    assert len(a.http.get(f"fine_tuning/jobs/{a.done_job}/events").json()["data"]) == 1
    assert [
        c["id"] for c in a.http.get(f"fine_tuning/jobs/{a.done_job}/checkpoints").json()["data"]
    ] == [a.checkpoint_id]
    assert a.http.get(f"fine_tuning/jobs/{a.done_job}/adapter").status_code == 200
    adapter = a.http.get(f"fine_tuning/jobs/{a.done_job}/checkpoints/{a.checkpoint_id}/adapter")
    assert adapter.status_code == 200
    assert a.http.get(f"models/{a.model}").json()["owned_by"] == a.owner
    # And A's own cancel works (B's did nothing).
    assert a.http.post(f"fine_tuning/jobs/{a.paused_job}/cancel").json()["status"] == "cancelled"


def test_lists_never_include_another_owners_rows(
    pg_api: Api, tenants: tuple[Tenant, Tenant]
) -> None:
    a, b = tenants
    for me, other in ((a, b), (b, a)):
        files = [f["id"] for f in me.http.get("files", params={"limit": 10000}).json()["data"]]
        assert files == [me.file_id]
        jobs = [
            j["id"] for j in me.http.get("fine_tuning/jobs", params={"limit": 100}).json()["data"]
        ]
        assert sorted(jobs) == sorted([me.done_job, me.paused_job])
        models = [m["id"] for m in me.http.get("models").json()["data"]]
        assert me.model in models and other.model not in models
        assert all(not m.startswith("ft:") or f":{me.owner}:" in m for m in models)
    local_files = [
        f["id"] for f in pg_api.http.get("files", params={"limit": 10000}).json()["data"]
    ]
    assert a.file_id not in local_files and b.file_id not in local_files
    # A cursor naming another owner's id pages only through one's own rows.
    after = b.http.get("files", params={"after": a.file_id, "order": "asc"}).json()["data"]
    assert all(f["id"] == b.file_id for f in after)


_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


def test_every_v1_route_with_an_id_hides_other_owners_rows(
    pg_settings: Settings, tenants: tuple[Tenant, Tenant]
) -> None:
    """Every /v1 route with ids, present and future (streams, pause, ...): B on A's ids gets
    exactly what B gets on ids that do not exist, and GETs are 404."""
    a, b = tenants
    ids = {
        "file_id": (a.file_id, "file-doesnotexist"),
        "job_id": (a.done_job, "ftjob-doesnotexist"),
        "fine_tuning_job_id": (a.done_job, "ftjob-doesnotexist"),
        "checkpoint_id": (a.checkpoint_id, "ftckpt-doesnotexist"),
        "model_id": (a.model, "ft:tiny:nobody:t:ftjob-doesnotexist"),
    }
    paths = create_app(pg_settings).openapi()["paths"]
    if "/v1/webhook_endpoints" in paths:
        # A public address literal: nothing resolves names here, and nothing is ever sent.
        endpoint = a.http.post(
            "webhook_endpoints",
            json={
                "url": "https://93.184.216.34/hook",
                "event_types": ["fine_tuning.job.succeeded"],
            },
        )
        assert endpoint.status_code == 200, endpoint.text
        ids["endpoint_id"] = (endpoint.json()["id"], "we_doesnotexist")
        assert endpoint.json()["id"] not in [
            e["id"] for e in b.http.get("webhook_endpoints").json()["data"]
        ]
    checked = 0
    for path, operations in paths.items():
        names = _PARAM.findall(path)
        if not path.startswith("/v1/") or not names or not set(names) <= set(ids):
            continue
        for method in sorted(op.upper() for op in operations):
            theirs = _PARAM.sub(lambda m: ids[m.group(1)][0], path).removeprefix("/v1/")
            missing = _PARAM.sub(lambda m: ids[m.group(1)][1], path).removeprefix("/v1/")
            body: Any = {} if method == "POST" else None
            got = b.http.request(method, theirs, json=body, timeout=10)
            expected = b.http.request(method, missing, json=body, timeout=10)
            assert got.status_code == expected.status_code, (method, path, got.text)
            assert got.json()["error"]["code"] == expected.json()["error"]["code"], (method, path)
            if method == "GET":
                assert_404(got)
            checked += 1
    assert checked >= len(routes_on(a))
