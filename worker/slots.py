"""GPU slots: which devices this worker hands out, and who holds which right now.

A worker host runs jobs side by side, each on devices of its own. ``alignd worker --gpus
0,1,2,3`` names the devices (default: every CUDA device the machine shows; on a machine
without CUDA, one CPU slot per core, numbered from 0). The pool's processes share them
through file locks, one per device under ``<data dir>/slots/<machine hostname>/``: a job
asking for N devices takes N locks all at once or none (``fcntl.flock``, non-blocking), and a
process that dies drops its locks with it. Two workers on one machine share the same lock
files, so they never put two jobs on one GPU either.

Nothing here imports torch, nor initialises CUDA: devices are found with ``nvidia-smi``
(and ``CUDA_VISIBLE_DEVICES``), which is safe in the Celery parent before its pool forks.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import or_, select, update

from api import workers
from api.models import Job
from api.services import Services
from api.settings import Settings
from worker.execution import claimable

log = logging.getLogger("alignd.worker")


@dataclass(frozen=True)
class Gpu:
    index: str
    name: str
    # "8.0"; None when the driver does not report it.
    compute_capability: str | None


def list_gpus() -> list[Gpu]:
    """The machine's CUDA devices as ``nvidia-smi`` lists them (none without the tool)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    for fields in ("index,name,compute_cap", "index,name"):
        try:
            out = subprocess.run(
                [exe, f"--query-gpu={fields}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        gpus = []
        for line in out.splitlines():
            parts = [part.strip() for part in line.split(",")]
            if len(parts) >= 2 and parts[0].isdigit():
                cap = parts[2] if len(parts) > 2 and parts[2][:1].isdigit() else None
                gpus.append(Gpu(parts[0], parts[1], cap))
        return gpus
    return []


def _visible(gpus: list[Gpu]) -> list[Gpu]:
    """Narrow to ``CUDA_VISIBLE_DEVICES`` when the worker was started with it (indices)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return gpus
    wanted = [part.strip() for part in value.split(",") if part.strip()]
    if not wanted or wanted == ["-1"]:
        return []
    by_index = {gpu.index: gpu for gpu in gpus}
    return [by_index[item] for item in wanted if item in by_index]


def resolve_devices(gpus_arg: str | None) -> tuple[str, list[str]]:
    """(device kind, device ids) for ``--gpus``: named ids, or every device this machine has.

    On a machine with CUDA devices the ids must be among them (``nvidia-smi`` indices). On a
    machine without, they are CPU slots: any distinct ids (``--gpus 0`` is one slot), by
    default one per core.
    """
    gpus = _visible(list_gpus())
    kind = "cuda" if gpus else "cpu"
    if gpus_arg is None:
        if gpus:
            return kind, [gpu.index for gpu in gpus]
        return kind, [str(i) for i in range(os.cpu_count() or 1)]
    ids = [part.strip() for part in gpus_arg.split(",") if part.strip()]
    if not ids:
        raise ValueError("--gpus: name at least one device id, e.g. --gpus 0,1")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus: a device is named twice in {gpus_arg!r}")
    if gpus:
        known = {gpu.index for gpu in gpus}
        missing = [item for item in ids if item not in known]
        if missing:
            raise ValueError(
                f"--gpus: no CUDA device {', '.join(missing)} on this machine "
                f"(it has {', '.join(sorted(known, key=int))})"
            )
    else:
        bad = [item for item in ids if not item.isdigit()]
        if bad:
            raise ValueError(f"--gpus: device ids are numbers (got {', '.join(bad)})")
    return kind, ids


def worker_devices(settings: Settings) -> tuple[str, list[str]]:
    """This worker's (kind, device ids): what ``alignd worker`` set, else detected."""
    if settings.worker_devices:
        ids = [part.strip() for part in settings.worker_devices.split(",") if part.strip()]
        kind = settings.worker_device_kind or ("cuda" if list_gpus() else "cpu")
        return kind, ids
    return resolve_devices(None)


def lock_dir(settings: Settings) -> Path:
    return settings.data_dir / "slots" / socket.gethostname()


class Held:
    """Slots this process holds for one job; ``release`` gives them back."""

    def __init__(self, devices: list[str], handles: list[int]) -> None:
        self.devices = devices
        self._handles = handles

    def release(self) -> None:
        for fd in self._handles:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(fd)
        self._handles = []


def acquire(folder: Path, devices: list[str], n: int) -> Held | None:
    """Take ``n`` of ``devices`` (the first free ones, in order), all or none."""
    if n > len(devices):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    taken: list[str] = []
    handles: list[int] = []
    for device in devices:
        fd = os.open(folder / f"{device}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        taken.append(device)
        handles.append(fd)
        if len(taken) == n:
            return Held(taken, handles)
    Held(taken, handles).release()
    return None


def job_gpus(services: Services, job_id: str) -> tuple[int, str] | None:
    """(devices the job asks for, its queue), or None when no worker may start it now
    (gone, finished, paused, or running): then no slot is taken."""
    with services.sessions() as session:
        row = session.execute(select(Job.extensions).where(Job.id == job_id, claimable())).first()
    if row is None:
        return None
    extensions = row[0] or {}
    gpus = int((extensions.get("resources") or {}).get("gpus", 1))
    return gpus, workers.job_queue(services.settings, extensions)


def mark_waiting(services: Services, job_id: str, n: int) -> None:
    """Say on a still-queued job why it has not started although a worker took it."""
    note = workers.waiting_for_slots_substatus(n)
    with services.sessions() as session, session.begin():
        session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == "queued",
                or_(Job.substatus.is_(None), Job.substatus != note),
            )
            .values(substatus=note)
        )
