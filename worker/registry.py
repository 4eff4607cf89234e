"""This worker's row in the ``workers`` registry: its queues, slots and capabilities.

Upserted when the worker is ready (the Celery parent, after the pool has forked), then
``last_seen`` is refreshed every ``worker_registry_refresh_s`` from a daemon thread. On
shutdown the row stays: a stale row is harmless, and the API counts a worker as known only
while ``last_seen`` is within ``worker_registry_ttl_s`` (api/workers.py).

Capabilities are found without importing torch or initialising CUDA in the parent: CUDA
devices through ``nvidia-smi`` (worker/slots.py), DeepSpeed by whether it is importable.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from functools import partial

from api import workers
from api.models import Worker
from api.services import Services
from worker import slots
from worker.periodic import Periodic

log = logging.getLogger("alignd.worker")


@dataclass
class Capabilities:
    device_kind: str
    devices: list[str]
    device_name: str | None
    precisions: list[str]
    zero_stages: list[int] = field(default_factory=lambda: [0])


def has_deepspeed() -> bool:
    try:
        return importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        return False


def detect(device_kind: str, devices: list[str]) -> Capabilities:
    zero_stages = [0, 1, 2, 3] if has_deepspeed() else [0]
    if device_kind != "cuda":
        return Capabilities(
            "cpu", devices, None, list(workers.CPU_PRECISIONS), zero_stages=zero_stages
        )
    gpus = [gpu for gpu in slots.list_gpus() if gpu.index in devices]
    names = sorted({gpu.name for gpu in gpus})
    # bf16 needs compute capability 8.0 (Ampere) or later; every GPU of the worker must have
    # it. A driver that does not report the capability is given the benefit of the doubt.
    bf16 = all(_major(gpu.compute_capability) >= 8 for gpu in gpus)
    precisions = [p for p in workers.GPU_PRECISIONS if p != "bf16" or bf16]
    return Capabilities(
        "cuda", devices, ", ".join(names) or None, precisions, zero_stages=zero_stages
    )


def _major(capability: str | None) -> int:
    if not capability:
        return 99
    try:
        return int(capability.split(".")[0])
    except ValueError:
        return 99


def register(services: Services, hostname: str, queues: list[str], caps: Capabilities) -> None:
    """Upsert this worker's row, and clear the "no worker serves queue" note of its queues'
    waiting jobs."""
    clock = time.time()
    with services.sessions() as session, session.begin():
        row = session.get(Worker, hostname)
        if row is None:
            row = Worker(hostname=hostname)
            session.add(row)
        row.queues = list(queues)
        row.device_kind = caps.device_kind
        row.slots = len(caps.devices)
        row.device_name = caps.device_name
        row.precisions = list(caps.precisions)
        row.zero_stages = list(caps.zero_stages)
        row.started_at = clock
        row.last_seen = clock
        # The row first, in this transaction: a job created from now on sees the worker.
        session.flush()
        cleared = workers.clear_unserved(session, queues)
    log.info(
        "registered %s: queues %s, %d %s slot(s) %s, precisions %s, zero stages %s%s",
        hostname,
        ",".join(queues),
        len(caps.devices),
        caps.device_kind,
        ",".join(caps.devices),
        ",".join(caps.precisions),
        ",".join(map(str, caps.zero_stages)),
        f"; {cleared} waiting job(s) now served" if cleared else "",
    )


def touch(services: Services, hostname: str, queues: list[str]) -> None:
    with services.sessions() as session, session.begin():
        row = session.get(Worker, hostname)
        if row is not None:
            row.last_seen = time.time()
        # A job created while this worker registered may have missed it: clear its note.
        workers.clear_unserved(session, queues)


def heartbeat(services: Services, hostname: str, queues: list[str]) -> Periodic:
    """Refresh this worker's ``last_seen`` every ``worker_registry_refresh_s``, on a daemon
    thread of the worker's parent process."""
    every_s = services.settings.worker_registry_refresh_s
    return Periodic(
        "registry", partial(touch, services, hostname, queues), lambda: every_s, at_once=False
    )
