"""The ``resources`` extension field: defaults, validation, and the checks against the
registered workers of the job's class (rows put in the ``workers`` table as a fixture).

Jobs here go to queues no worker process consumes, so they stay queued; they are cancelled
at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import delete

from api.db import make_engine, make_sessionmaker
from api.errors import APIError
from api.models import Job, Worker
from api.services import Services
from api.settings import Settings
from api.workers import check_resources
from tests.conftest import Api, chat_rows
from trainer_core.specs import ResourcesSpec
from worker import registry

QUIET_QUEUE = "resources-test-quiet"
DEFAULTS = {
    "gpus": 1,
    "zero_stage": 0,
    "offload_optimizer": False,
    "gradient_checkpointing": False,
    "precision": "fp32",
    "deterministic": None,
    "worker_class": None,
    "max_tokens_per_batch": None,
    "padding_free": False,
    "compile": False,
    "liger": False,
}


@pytest.fixture(scope="module")
def api(pg_settings: Settings) -> Iterator[Api]:
    """The same database; jobs without a class go to a queue no worker serves."""
    api = Api(pg_settings.model_copy(update={"default_queue": QUIET_QUEUE}))
    yield api
    for job in api.http.get("fine_tuning/jobs", params={"limit": 1000}).json()["data"]:
        if job["status"] == "queued":
            api.http.post(f"fine_tuning/jobs/{job['id']}/cancel")
    api.stop()


@pytest.fixture(scope="module")
def db(pg_settings: Settings) -> Iterator[Any]:
    engine = make_engine(pg_settings)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def workers(db: Any) -> Iterator[None]:
    """Registered workers of a few classes, as `alignd worker` would have written them."""
    clock = time.time()
    rows = [
        # Class res-gpu: two GPU hosts, the larger with 4 GPUs; no DeepSpeed; no bf16.
        ("res-gpu-1", ["res-gpu"], "cuda", 2, ["fp32", "fp16"], [0], clock),
        ("res-gpu-2", ["res-gpu", "res-other"], "cuda", 4, ["fp32", "fp16"], [0], clock),
        # Class res-ds: DeepSpeed only on the 2-GPU host.
        ("res-ds-1", ["res-ds"], "cuda", 2, ["fp32", "bf16", "fp16"], [0, 1, 2, 3], clock),
        ("res-ds-2", ["res-ds"], "cuda", 8, ["fp32", "bf16", "fp16"], [0], clock),
        # Class res-cpu: a CPU worker.
        ("res-cpu-1", ["res-cpu"], "cpu", 2, ["fp32", "bf16"], [0, 1, 2, 3], clock),
        # Class res-stale: a worker not seen for two days does not count.
        ("res-stale-1", ["res-stale"], "cuda", 8, ["fp32"], [0], clock - 2 * 86_400),
    ]
    with db() as session, session.begin():
        for hostname, queues, kind, slots, precisions, stages, seen in rows:
            session.merge(
                Worker(
                    hostname=hostname,
                    queues=queues,
                    device_kind=kind,
                    slots=slots,
                    device_name="test" if kind == "cuda" else None,
                    precisions=precisions,
                    zero_stages=stages,
                    started_at=seen,
                    last_seen=seen,
                )
            )
    yield
    with db() as session, session.begin():
        for row in rows:
            session.execute(delete(Worker).where(Worker.hostname == row[0]))


@pytest.fixture(scope="module")
def train_id(api: Api) -> str:
    return str(api.upload(chat_rows(8))["id"])


def body(train_id: str, resources: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": "tiny",
        "training_file": train_id,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
        **extra,
    }
    if resources is not None:
        out["resources"] = resources
    return out


def create(api: Api, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = api.http.post("fine_tuning/jobs", json=payload)
    return response.status_code, response.json()


def test_defaults_are_stored_and_rendered(api: Api, db: Any, train_id: str) -> None:
    status, job = create(api, body(train_id))
    assert status == 200, job
    assert job["resources"] == DEFAULTS == ResourcesSpec().model_dump()
    with db() as session:
        assert session.get_one(Job, job["id"]).extensions["resources"] == DEFAULTS

    status, job = create(api, body(train_id, {"gradient_checkpointing": True}))
    assert status == 200, job
    assert job["resources"] == {**DEFAULTS, "gradient_checkpointing": True}
    fetched = api.http.get(f"fine_tuning/jobs/{job['id']}").json()
    assert fetched["resources"] == job["resources"]


def test_deterministic_is_accepted_and_echoed(api: Api, db: Any, train_id: str) -> None:
    # null (the default: the worker's device decides) is echoed as null, an explicit value
    # as itself, stored with the job for the worker to read.
    for asked in (True, False):
        status, job = create(api, body(train_id, {"deterministic": asked}))
        assert status == 200, job
        assert job["resources"] == {**DEFAULTS, "deterministic": asked}
        with db() as session:
            stored = session.get_one(Job, job["id"]).extensions["resources"]
        assert stored["deterministic"] is asked


@pytest.mark.parametrize(
    ("resources", "param", "code"),
    [
        ({"gpu": 2}, "resources.gpu", "unknown_parameter"),
        ({"zero_stage": 4}, "resources.zero_stage", "invalid_value"),
        ({"gpus": 0}, "resources.gpus", "invalid_value"),
        ({"precision": "int8"}, "resources.precision", "invalid_value"),
        ({"deterministic": "sometimes"}, "resources.deterministic", "invalid_value"),
        ({"offload_optimizer": True}, "resources.offload_optimizer", "invalid_value"),
        ({"worker_class": "no spaces"}, "resources.worker_class", "invalid_value"),
        ({"max_tokens_per_batch": 4}, "resources.max_tokens_per_batch", "invalid_value"),
        ({"padding_free": "yes please"}, "resources.padding_free", "invalid_value"),
        ("two gpus", "resources", "invalid_value"),
    ],
)
def test_invalid_resources_are_400_naming_the_field(
    api: Api, train_id: str, resources: Any, param: str, code: str
) -> None:
    status, answer = create(api, body(train_id, resources))
    assert status == 400, answer
    assert answer["error"]["param"] == param, answer
    assert answer["error"]["code"] == code, answer


def test_distributed_only_for_the_distributed_methods(
    api: Api, db: Any, pg_settings: Settings
) -> None:
    # The registry says which methods run distributed and under which ZeRO stages
    # (trainer_core/registry.py): every one (kto/orpo/simpo since issue #11, grpo/
    # reinforcement/rloo and ppo since issue #12), ppo under ZeRO stage 0 only.
    for stage in (1, 2, 3):
        for gpus in (1, 2):
            with db() as session, pytest.raises(APIError) as refused:
                check_resources(
                    session, pg_settings, "ppo", ResourcesSpec(gpus=gpus, zero_stage=stage)
                )
            assert refused.value.status == 400
            assert refused.value.param == "resources.zero_stage"
            assert refused.value.code == "unsupported_resources"
            assert refused.value.message == (
                f"Method 'ppo' runs under resources.zero_stage 0 only, not {stage}."
            )
    # Two processes in plain data parallelism pass the method's check (the worker checks
    # follow: this test's queue has no worker, hence the substatus rather than a refusal).
    with db() as session:
        check_resources(session, pg_settings, "ppo", ResourcesSpec(gpus=2))
    # The same resources on the methods that run distributed are accepted.
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": f"Name {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"It is {i}."}],
            "non_preferred_output": [{"role": "assistant", "content": "No."}],
        }
        for i in range(4)
    ]
    pairs = api.upload("".join(json.dumps(row) + "\n" for row in rows))
    prompts = api.upload("".join(json.dumps({"prompt": f"Name {i}?"}) + "\n" for i in range(4)))
    reward = {"type": "length", "name": "short", "target": 8}
    methods: list[tuple[str, dict[str, Any]]] = [
        (method, {"training_file": pairs["id"], "method": {"type": method}})
        for method in ("dpo", "kto", "orpo", "simpo")
    ] + [
        (
            method,
            {
                "training_file": prompts["id"],
                "method": {"type": method, method: {"reward_functions": [reward]}},
            },
        )
        for method in ("grpo", "rloo")
    ]
    for method, fields in methods:
        body = {"model": "tiny", **fields, "resources": {"gpus": 2, "zero_stage": 2}}
        status, answer = create(api, body)
        assert status == 200, (method, answer)
        assert answer["resources"]["gpus"] == 2 and answer["resources"]["zero_stage"] == 2


def test_gpus_above_the_largest_worker_of_the_class(api: Api, workers: None, train_id: str) -> None:
    status, answer = create(api, body(train_id, {"gpus": 5, "worker_class": "res-gpu"}))
    assert status == 400, answer
    error = answer["error"]
    assert error["param"] == "resources.gpus"
    assert "asks for 5 GPUs; the most any worker of class 'res-gpu' has is 4" in error["message"]
    # Four fit the larger host: accepted, and the class is served (no substatus).
    status, job = create(api, body(train_id, {"gpus": 4, "worker_class": "res-gpu"}))
    assert status == 200, job
    assert job["status"] == "queued" and job["substatus"] is None
    assert job["resources"]["worker_class"] == "res-gpu"
    # The estimate validates the same way.
    estimate = api.http.post(
        "fine_tuning/jobs/estimate", json=body(train_id, {"gpus": 5, "worker_class": "res-gpu"})
    )
    assert estimate.status_code == 400
    assert estimate.json()["error"]["param"] == "resources.gpus"


def test_zero_stage_needs_a_deepspeed_worker(api: Api, workers: None, train_id: str) -> None:
    status, answer = create(api, body(train_id, {"zero_stage": 1, "worker_class": "res-gpu"}))
    assert status == 400, answer
    assert answer["error"]["param"] == "resources.zero_stage"
    assert "DeepSpeed" in answer["error"]["message"]
    # In res-ds only the 2-GPU host has DeepSpeed: ZeRO on 2 GPUs fits, on 8 does not.
    ok = {"gpus": 2, "zero_stage": 3, "offload_optimizer": True, "worker_class": "res-ds"}
    status, job = create(api, body(train_id, ok))
    assert status == 200, job
    assert job["resources"] == {**DEFAULTS, **ok}
    status, answer = create(
        api, body(train_id, {"gpus": 8, "zero_stage": 2, "worker_class": "res-ds"})
    )
    assert status == 400, answer
    assert answer["error"]["param"] == "resources.zero_stage"


def test_precision_the_class_does_not_offer(api: Api, workers: None, train_id: str) -> None:
    status, answer = create(api, body(train_id, {"precision": "bf16", "worker_class": "res-gpu"}))
    assert status == 400, answer
    assert answer["error"]["param"] == "resources.precision"
    assert "offered: fp32, fp16" in answer["error"]["message"]
    # CPU workers offer fp32 and bf16, not fp16.
    status, answer = create(api, body(train_id, {"precision": "fp16", "worker_class": "res-cpu"}))
    assert status == 400 and answer["error"]["param"] == "resources.precision", answer
    status, job = create(api, body(train_id, {"precision": "bf16", "worker_class": "res-cpu"}))
    assert status == 200, job


def test_unserved_class_is_queued_with_a_substatus_until_a_worker_registers(
    api: Api, workers: None, pg_settings: Settings, train_id: str
) -> None:
    # A stale worker does not count as serving its queue, nor limits what a job may ask.
    status, job = create(api, body(train_id, {"gpus": 16, "worker_class": "res-stale"}))
    assert status == 200, job
    assert job["substatus"] == "no worker serves queue 'res-stale'"

    queue = f"res-nobody-{time.time_ns()}"
    status, job = create(api, body(train_id, {"gpus": 64, "worker_class": queue}))
    assert status == 200, job
    assert job["status"] == "queued"
    assert job["substatus"] == f"no worker serves queue '{queue}'"
    assert job["queue_position"] is None or job["queue_position"] >= 1
    fetched = api.http.get(f"fine_tuning/jobs/{job['id']}").json()
    assert fetched["substatus"] == job["substatus"] and fetched["queue_position"] >= 1

    # A worker serving that queue registers (the real registration code): the note goes.
    services = Services.build(pg_settings)
    try:
        caps = registry.Capabilities("cpu", ["0"], None, ["fp32", "bf16"])
        registry.register(services, f"{queue}@tests", [queue, "res-unrelated"], caps)
    finally:
        services.engine.dispose()
    fetched = api.http.get(f"fine_tuning/jobs/{job['id']}").json()
    assert fetched["status"] == "queued" and fetched["substatus"] is None
    # Now the class is known: 64 GPUs no longer fit it.
    status, answer = create(api, body(train_id, {"gpus": 64, "worker_class": queue}))
    assert status == 400 and answer["error"]["param"] == "resources.gpus", answer


def test_default_queue_unserved_and_resume_notes_it_again(api: Api, train_id: str) -> None:
    status, job = create(api, body(train_id))
    assert status == 200, job
    assert job["substatus"] == f"no worker serves queue '{QUIET_QUEUE}'"
    paused = api.http.post(f"fine_tuning/jobs/{job['id']}/pause").json()
    assert paused["status"] == "paused" and paused["substatus"] is None
    resumed = api.http.post(f"fine_tuning/jobs/{job['id']}/resume").json()
    assert resumed["status"] == "queued"
    assert resumed["substatus"] == f"no worker serves queue '{QUIET_QUEUE}'"


def test_speed_levers_are_echoed_and_refused_where_they_would_change_the_math(
    api: Api, train_id: str
) -> None:
    levers = {"max_tokens_per_batch": 4096, "padding_free": True, "compile": True}
    status, job = create(api, body(train_id, levers))
    assert status == 200, job
    assert job["resources"] == {**DEFAULTS, **levers}
    assert api.http.get(f"fine_tuning/jobs/{job['id']}").json()["resources"] == job["resources"]

    pairs = api.upload(
        json.dumps(
            {
                "input": {"messages": [{"role": "user", "content": "Name one?"}]},
                "preferred_output": [{"role": "assistant", "content": "One."}],
                "non_preferred_output": [{"role": "assistant", "content": "No."}],
            }
        )
        + "\n"
    )
    # KTO's baseline is a mean over a micro-batch of batch_size rows; padding-free is SFT's.
    for method, resources, param in (
        ("kto", {"max_tokens_per_batch": 4096}, "resources.max_tokens_per_batch"),
        ("dpo", {"padding_free": True}, "resources.padding_free"),
    ):
        payload = {
            "model": "tiny",
            "training_file": pairs["id"],
            "method": {"type": method},
            "resources": resources,
        }
        status, answer = create(api, payload)
        assert status == 400, answer
        assert answer["error"]["param"] == param, answer
        assert answer["error"]["code"] == "unsupported_resources", answer
    status, job = create(
        api,
        {
            "model": "tiny",
            "training_file": pairs["id"],
            "method": {"type": "dpo"},
            "resources": {"max_tokens_per_batch": 2048},
        },
    )
    assert status == 200, job


def test_liger_needs_a_cuda_worker_of_the_class(api: Api, workers: None, train_id: str) -> None:
    status, answer = create(api, body(train_id, {"liger": True, "worker_class": "res-cpu"}))
    assert status == 400, answer
    assert answer["error"]["param"] == "resources.liger", answer
    assert "res-cpu" in answer["error"]["message"]
    status, job = create(api, body(train_id, {"liger": True, "worker_class": "res-gpu"}))
    assert status == 200, job
    assert job["resources"]["liger"] is True
