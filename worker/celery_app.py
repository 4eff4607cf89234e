"""The Celery worker: ``alignd worker`` runs this app; the task takes a job id and runs it.

torch is imported only inside the task (in the pool's child process), so the worker's parent
process stays small and never holds training memory.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Task, signals
from celery.worker.request import Request

from api.queue import RUN_JOB_TASK, make_celery
from api.services import Services
from api.settings import load_settings
from worker import slots

log = logging.getLogger("alignd.worker")

settings = load_settings()
app = make_celery(settings)

_services: tuple[int, Services] | None = None


def services() -> Services:
    """This process's services. A database engine must not cross a fork: the pool forks
    children from the parent, which may have built its own (for the start-up sweep)."""
    global _services
    if _services is None or _services[0] != os.getpid():
        if _services is not None:
            _services[1].engine.dispose(close=False)
        _services = (os.getpid(), Services.build(settings))
    return _services[1]


class JobRequest(Request):
    """Runs in the worker's parent: if the child running a job dies, fail the job clearly."""

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        if isinstance(exc_info.exception, WorkerLostError) and self.args:
            from worker.execution import fail_lost

            fail_lost(
                services(), str(self.args[0]), f"The worker process died: {exc_info.exception}"
            )


class JobTask(Task):  # type: ignore[misc]
    Request = JobRequest


@app.task(name=RUN_JOB_TASK, base=JobTask, bind=True)
def run_job(self: Task, job_id: str) -> str | None:
    """Take the job's slots (all or none) and run it on them. Too few free now: say so on
    the job and send it back to its queue for a little later; a pool process never waits."""
    from worker.execution import execute

    svc = services()
    needs = slots.job_gpus(svc, job_id)
    if needs is None:
        log.info("job %s not claimable (already taken, cancelled or finished)", job_id)
        return None
    n, queue = needs
    kind, devices = _devices()
    held = slots.acquire(slots.lock_dir(settings), devices, n)
    if held is None:
        log.info("job %s needs %d free slot(s) of %s; trying again later", job_id, n, devices)
        slots.mark_waiting(svc, job_id, n)
        svc.queue.enqueue(job_id, queue, countdown=settings.slot_retry_s)
        return None
    try:
        return execute(
            svc, job_id, str(self.request.hostname), devices=held.devices, device_kind=kind
        )
    finally:
        held.release()


@functools.cache
def _devices() -> tuple[str, list[str]]:
    """This worker's device kind and slot ids (``alignd worker`` sets them; else detected)."""
    return slots.worker_devices(settings)


def _consumed_queues(sender: Any) -> list[str]:
    """The queues this worker consumes (``-Q``), from the consumer worker_ready sends."""
    try:
        return sorted(sender.app.amqp.queues.consume_from)
    except AttributeError:
        return [settings.default_queue]


@signals.worker_ready.connect
def requeue_pending(**_kwargs: Any) -> None:
    """A broker may lose messages (Redis without persistence, a wiped folder). On start,
    send every job that should be running again, each to its own queue; the claim makes
    duplicates harmless."""
    from api.models import Job
    from api.workers import job_queue
    from worker.execution import pending_jobs

    svc = services()
    for job_id in pending_jobs(svc):
        with svc.sessions() as session:
            job = session.get(Job, job_id)
            queue = job_queue(settings, job.extensions if job else None)
        log.info("re-sending pending job %s to queue %s", job_id, queue)
        svc.queue.enqueue(job_id, queue)


_heartbeat: Any = None


@signals.worker_ready.connect
def register_worker(sender: Any = None, **_kwargs: Any) -> None:
    """Put this worker's queues, slots and capabilities in the registry, and keep its row
    fresh (worker/registry.py)."""
    global _heartbeat
    from worker import registry

    hostname = str(getattr(sender, "hostname", None) or f"celery@{socket.gethostname()}")
    queues = _consumed_queues(sender)
    kind, devices = _devices()
    registry.register(services(), hostname, queues, registry.detect(kind, devices))
    _heartbeat = registry.Heartbeat(services(), hostname, queues).start()


_dispatcher: Any = None


@signals.worker_ready.connect
def start_webhook_dispatcher(**_kwargs: Any) -> None:
    """Webhook deliveries are sent from the worker's main process, beside the pool, so that
    they never wait behind a training job (worker/webhooks.py)."""
    global _dispatcher
    from worker.webhooks import Dispatcher

    _dispatcher = Dispatcher(services()).start()


@signals.worker_shutdown.connect
def stop_webhook_dispatcher(**_kwargs: Any) -> None:
    if _dispatcher is not None:
        _dispatcher.stop()
    if _heartbeat is not None:
        _heartbeat.stop()  # the row stays: known until worker_registry_ttl_s has passed
