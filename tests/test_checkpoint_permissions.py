"""OpenAI's checkpoint permissions in our tenancy (issue #14 item 6): the job's owner grants a
checkpoint to other owners, who can then read it and download its adapter until the grant is
revoked; nobody else can see the checkpoint or its permissions. Over real HTTP and through
the unmodified ``openai`` SDK; the job and its stored checkpoint are put in place directly
(no training needed to share one)."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import openai
import pytest

from api.models import Checkpoint, new_id, now
from api.services import Services
from api.settings import Settings
from tests.conftest import Api, insert_job


class Shared:
    """A succeeded job of owner ``alice`` with a stored checkpoint at step 2."""

    def __init__(self, api: Api, settings: Settings, tmp_path: Path) -> None:
        tag = secrets.token_hex(3)
        self.alice, self.bob, self.carol = f"alice-{tag}", f"bob-{tag}", f"carol-{tag}"
        services = Services.build(settings)
        self.job_id = insert_job(
            services.sessions, owner=self.alice, status="succeeded", suffix="shared"
        )
        self.checkpoint_id = new_id("ftckpt")
        key = f"jobs/{self.job_id}/checkpoints/step-2"
        self.adapter = secrets.token_bytes(3000)  # stands for the tar: served byte for byte
        (tmp_path / "adapter.tar").write_bytes(self.adapter)
        services.artifacts.put_file(f"{key}/adapter.tar", tmp_path / "adapter.tar")
        with services.sessions() as session, session.begin():
            session.add(
                Checkpoint(
                    id=self.checkpoint_id,
                    job_id=self.job_id,
                    owner=self.alice,
                    created_at=now(),
                    step=2,
                    metrics={"train_loss": 1.5},
                    artifact_key=key,
                )
            )
        self.name = f"ft:tiny:{self.alice}:shared:{self.job_id}:ckpt-step-2"
        self.http = {who: api.as_owner(who) for who in (self.alice, self.bob, self.carol)}
        self.sdk = {
            who: openai.OpenAI(
                base_url=f"{api.url}/v1",
                api_key=client.headers["Authorization"].removeprefix("Bearer "),
                max_retries=0,
            )
            for who, client in self.http.items()
        }

    def adapter_of(self, who: str, name: str | None = None) -> httpx.Response:
        return self.http[who].get(f"fine_tuning/checkpoints/{name or self.name}/adapter")


@pytest.fixture
def shared(pg_api: Api, pg_settings: Settings, tmp_path: Path) -> Shared:
    return Shared(pg_api, pg_settings, tmp_path)


def test_a_grant_gives_access_and_a_revoke_takes_it_away(shared: Shared) -> None:
    alice, bob, carol = shared.alice, shared.bob, shared.carol
    # Before any grant, the checkpoint is the owner's alone.
    assert shared.adapter_of(alice).content == shared.adapter
    for who in (bob, carol):
        assert shared.adapter_of(who).status_code == 404
        assert shared.http[who].get(f"fine_tuning/checkpoints/{shared.name}").status_code == 404

    permissions = shared.sdk[alice].fine_tuning.checkpoints.permissions
    created = permissions.create(shared.name, project_ids=[bob, carol])
    assert [p.project_id for p in created.data] == [bob, carol]
    assert all(p.object == "checkpoint.permission" and p.id.startswith("cp-") for p in created.data)
    by_project = {p.project_id: p.id for p in created.data}
    # Granting again is harmless: the existing permission, no second row.
    again = permissions.create(shared.name, project_ids=[bob])
    assert [p.id for p in again.data] == [by_project[bob]]

    # A grantee reads the checkpoint and downloads its adapter, byte for byte, with Range.
    for who in (bob, carol):
        got = shared.adapter_of(who)
        assert got.status_code == 200 and got.content == shared.adapter
        shown = shared.http[who].get(f"fine_tuning/checkpoints/{shared.name}").json()
        assert shown["fine_tuned_model_checkpoint"] == shared.name
        assert (shown["id"], shown["step_number"]) == (shared.checkpoint_id, 2)
    part = shared.http[bob].get(
        f"fine_tuning/checkpoints/{shared.name}/adapter", headers={"Range": "bytes=10-19"}
    )
    assert part.status_code == 206 and part.content == shared.adapter[10:20]
    # ... but it does not manage the checkpoint's permissions: to it they do not exist.
    assert (
        shared.http[bob].get(f"fine_tuning/checkpoints/{shared.name}/permissions").status_code
        == 404
    )
    with pytest.raises(openai.NotFoundError):
        shared.sdk[bob].fine_tuning.checkpoints.permissions.create(shared.name, project_ids=[bob])

    # The owner lists them (newest first by default; OpenAI's page with first_id/last_id).
    listed = permissions.retrieve(shared.name)
    assert [p.project_id for p in listed.data] == [carol, bob]
    assert (listed.first_id, listed.last_id, listed.has_more) == (
        by_project[carol],
        by_project[bob],
        False,
    )
    assert [p.project_id for p in permissions.retrieve(shared.name, project_id=bob).data] == [bob]
    first = permissions.retrieve(shared.name, limit=1, order="ascending")
    assert ([p.project_id for p in first.data], first.has_more) == ([bob], True)
    rest = permissions.retrieve(shared.name, limit=1, order="ascending", after=first.last_id)
    assert ([p.project_id for p in rest.data], rest.has_more) == ([carol], False)
    assert [p.project_id for p in permissions.list(shared.name)] == [carol, bob]

    # Revoking bob's takes his access away at once; carol keeps hers.
    deleted = permissions.delete(by_project[bob], fine_tuned_model_checkpoint=shared.name)
    assert (deleted.id, deleted.object, deleted.deleted) == (
        by_project[bob],
        "checkpoint.permission",
        True,
    )
    assert shared.adapter_of(bob).status_code == 404
    assert shared.adapter_of(carol).content == shared.adapter
    with pytest.raises(openai.NotFoundError):
        permissions.delete(by_project[bob], fine_tuned_model_checkpoint=shared.name)
    # Another owner cannot revoke what it did not grant.
    gone = shared.http[carol].delete(
        f"fine_tuning/checkpoints/{shared.name}/permissions/{by_project[carol]}"
    )
    assert gone.status_code == 404
    assert shared.adapter_of(carol).status_code == 200


def test_checkpoint_names_and_bodies(shared: Shared) -> None:
    alice, bob = shared.alice, shared.bob
    http = shared.http[alice]
    base = "fine_tuning/checkpoints"
    # Our checkpoint id names it as well as OpenAI's checkpoint model name.
    created = http.post(f"{base}/{shared.checkpoint_id}/permissions", json={"project_ids": [bob]})
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["object"] == "list" and body["has_more"] is False
    assert body["first_id"] == body["last_id"] == body["data"][0]["id"]
    assert set(body["data"][0]) == {"id", "object", "created_at", "project_id"}
    assert shared.adapter_of(bob, shared.checkpoint_id).content == shared.adapter
    # A name must match whole: right job id, wrong owner or step is no checkpoint.
    for wrong in (
        shared.name.replace(f":{alice}:", f":{bob}:"),
        shared.name.replace("ckpt-step-2", "ckpt-step-3"),
        shared.name.replace("ckpt-step-2", "ckpt-step-x"),
        f"ft:tiny:{alice}:shared:ftjob-nope:ckpt-step-2",
        "ftckpt-nope",
    ):
        answer = http.get(f"{base}/{wrong}/permissions")
        assert answer.status_code == 404, wrong
        assert answer.json()["error"]["param"] == "fine_tuned_model_checkpoint"
    # Bodies are checked field by field, OpenAI's error shape naming the field.
    for sent, param in (
        ({}, "project_ids"),
        ({"project_ids": []}, "project_ids"),
        ({"project_ids": [bob, "not:an-owner"]}, "project_ids.1"),
        ({"project_ids": [bob], "extra": 1}, "extra"),
        ({"project_ids": [bob] * 101}, "project_ids"),
    ):
        answer = http.post(f"{base}/{shared.name}/permissions", json=sent)
        assert answer.status_code == 400, (sent, answer.text)
        assert answer.json()["error"]["param"] == param, answer.text
    listed = http.get(f"{base}/{shared.name}/permissions", params={"order": "sideways"})
    assert listed.status_code == 400
    unknown = http.delete(f"{base}/{shared.name}/permissions/cp-nope")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "permission_id"
