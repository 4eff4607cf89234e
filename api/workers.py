"""The worker registry as the API sees it: which queues are served, and by what.

Each ``alignd worker`` upserts its row in ``workers`` when it is ready and refreshes
``last_seen`` while it runs (worker/registry.py). A worker is *known* while its row was
refreshed within ``worker_registry_ttl_s``. At job creation the job's ``resources`` are
checked against the known workers of its queue: a job none of them could ever run is a 400
now rather than a job that waits forever. A queue no known worker serves is not an error (a
worker may come later); the job is queued with a substatus that says so, and the first
worker that registers for the queue clears it.

Operator data, not a tenant's: no owner column, no ``/v1`` route.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.errors import invalid
from api.models import Job, Worker
from api.settings import Settings
from trainer_core.registry import DISTRIBUTED_METHODS, METHODS
from trainer_core.specs import (
    PADDING_FREE_METHODS,
    PRECISIONS,
    TOKEN_BUDGET_METHODS,
    ResourcesSpec,
)

# Precisions a worker of each kind can offer (a GPU offers bf16 only if it supports it);
# fp16 is GPU-only, since its loss scaling needs CUDA (trainer_core/placement.py).
GPU_PRECISIONS = PRECISIONS
CPU_PRECISIONS = tuple(p for p in PRECISIONS if p != "fp16")


def job_queue(settings: Settings, extensions: dict[str, Any] | None) -> str:
    """The queue a job goes to: its ``resources.worker_class``, else the default queue."""
    resources = (extensions or {}).get("resources") or {}
    return str(resources.get("worker_class") or settings.default_queue)


def unserved_substatus(queue: str) -> str:
    """The substatus of a queued job whose queue no known worker serves."""
    return f"no worker serves queue '{queue}'"


def waiting_for_slots_substatus(n: int) -> str:
    """The substatus of a queued job a worker took but could not start for want of slots."""
    return f"waiting for {n} free GPU{'' if n == 1 else 's'} on one host"


def known_workers(session: Session, settings: Settings, queue: str | None = None) -> list[Worker]:
    """Workers seen within the registry TTL (serving ``queue``, when given), by hostname."""
    since = time.time() - settings.worker_registry_ttl_s
    rows = session.scalars(
        select(Worker).where(Worker.last_seen >= since).order_by(Worker.hostname)
    ).all()
    return [row for row in rows if queue is None or queue in (row.queues or [])]


def check_resources(
    session: Session, settings: Settings, method_type: str, resources: ResourcesSpec
) -> str | None:
    """Refuse (400) what no known worker of the job's queue could run; return the substatus
    the job starts with (None, or that no known worker serves its queue).

    The checks narrow the candidates step by step (enough slots, then DeepSpeed, then the
    precision), so that the error names what is really missing on a worker that would
    otherwise fit.
    """
    if resources.distributed and method_type not in DISTRIBUTED_METHODS:
        param = "resources.gpus" if resources.gpus > 1 else "resources.zero_stage"
        raise invalid(
            f"Method '{method_type}' runs in one process: gpus > 1 and zero_stage > 0 are "
            f"available for {', '.join(DISTRIBUTED_METHODS)}.",
            param=param,
            code="unsupported_resources",
        )
    stages = METHODS[method_type].zero_stages
    if resources.zero_stage not in stages:
        raise invalid(
            f"Method '{method_type}' runs under resources.zero_stage "
            f"{', '.join(map(str, stages))} only, not {resources.zero_stage}.",
            param="resources.zero_stage",
            code="unsupported_resources",
        )
    for field, asked, methods in (
        ("max_tokens_per_batch", resources.max_tokens_per_batch is not None, TOKEN_BUDGET_METHODS),
        ("padding_free", resources.padding_free, PADDING_FREE_METHODS),
    ):
        if asked and method_type not in methods:
            raise invalid(
                f"resources.{field} applies to {', '.join(methods)}, not '{method_type}'.",
                param=f"resources.{field}",
                code="unsupported_resources",
            )
    queue = resources.worker_class or settings.default_queue
    workers = known_workers(session, settings, queue)
    if not workers:
        return unserved_substatus(queue)
    most = max(w.slots for w in workers)
    fit = [w for w in workers if w.slots >= resources.gpus]
    if not fit:
        raise invalid(
            f"This job asks for {resources.gpus} GPUs; the most any worker of class "
            f"'{queue}' has is {most}.",
            param="resources.gpus",
            code="unsupported_resources",
        )
    if resources.zero_stage > 0:
        fit = [w for w in fit if resources.zero_stage in (w.zero_stages or [])]
        if not fit:
            raise invalid(
                f"zero_stage {resources.zero_stage} needs DeepSpeed, which no worker of class "
                f"'{queue}'{_with_slots(resources.gpus)} has.",
                param="resources.zero_stage",
                code="unsupported_resources",
            )
    if not any(resources.precision in (w.precisions or []) for w in fit):
        offered = sorted({p for w in fit for p in (w.precisions or [])}, key=_precision_order)
        raise invalid(
            f"Precision '{resources.precision}' is not offered by any worker of class "
            f"'{queue}'{_with_slots(resources.gpus)} (offered: {', '.join(offered) or 'none'}).",
            param="resources.precision",
            code="unsupported_resources",
        )
    if resources.liger and not any(w.device_kind == "cuda" for w in fit):
        # Whether a GPU worker has liger-kernel installed it does not register: that one the
        # trainer refuses at the job's start (trainer_core.kernels.check_liger).
        raise invalid(
            f"resources.liger needs a CUDA worker; class '{queue}'{_with_slots(resources.gpus)} "
            "has none.",
            param="resources.liger",
            code="unsupported_resources",
        )
    return None


def _with_slots(gpus: int) -> str:
    return f" with {gpus} GPUs" if gpus > 1 else ""


def _precision_order(name: str) -> int:
    return GPU_PRECISIONS.index(name) if name in GPU_PRECISIONS else len(GPU_PRECISIONS)


def clear_unserved(session: Session, queues: Iterable[str]) -> int:
    """A worker serving ``queues`` registered: its queues' waiting jobs are served now."""
    notes = [unserved_substatus(queue) for queue in queues]
    if not notes:
        return 0
    result = session.execute(
        update(Job)
        .where(Job.status == "queued", Job.substatus.in_(notes))
        .values(substatus=None)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
