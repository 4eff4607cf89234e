"""The Celery worker: ``alignd worker`` runs this app; the task takes a job id and runs it.

torch is imported only inside the task (in the pool's child process), so the worker's parent
process stays small and never holds training memory.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import Task, signals
from celery.worker.request import Request

from api.queue import RUN_JOB_TASK, make_celery
from api.services import Services
from api.settings import load_settings
from worker import metrics, recovery, slots

log = logging.getLogger("alignd.worker")

settings = load_settings()
app = make_celery(settings)

_stats_dir: str | None = None
if settings.worker_metrics_port and not os.environ.get(metrics.STATS_DIR_ENV):
    # Before the pool forks: its processes write their jobs' stats here (worker/metrics.py).
    _stats_dir = os.environ[metrics.STATS_DIR_ENV] = tempfile.mkdtemp(prefix="alignd-worker-stats-")

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


def lost_child(exc_info: Any) -> BaseException | None:
    """The error when the pool child running a task died (else None). Celery hands the
    parent an ``ExceptionInfo`` whose ``exception`` is the ``WorkerLostError`` wrapped in an
    ``ExceptionWithTraceback`` (celery/worker/request.py unwraps it the same way); with
    billiard >= 4.3 the child's exit may also arrive as ``SystemExit``."""
    exc = getattr(exc_info, "exception", None)
    if isinstance(exc, ExceptionWithTraceback):
        exc = exc.exc
    if isinstance(exc, WorkerLostError | SystemExit | KeyboardInterrupt):
        return exc
    return None


class JobRequest(Request):
    """Runs in the worker's parent: if the child running a job dies, requeue the job at once
    to resume from its last checkpoint (worker/recovery.py), or fail it with ``worker_lost``
    once its attempts are used up."""

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        lost = lost_child(exc_info)
        # A child killed by our own revoke or cancel is not a lost worker.
        stopped = self._already_revoked or getattr(self, "_already_cancelled", False)
        if lost is None or not self.args or stopped:
            return
        from worker.recovery import requeue_lost

        job_id = str(self.args[0])
        try:
            requeue_lost(
                services(), job_id, f"the worker process died: {lost}", worker=self.hostname
            )
        except Exception:  # the sweep requeues it once its heartbeat is stale
            log.exception("job %s: could not requeue it after its process died", job_id)


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
        recovery.touch_queued(svc, job_id)  # its message lives on: nothing for the sweep to do
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


_sweeper: Any = None


@signals.worker_ready.connect
def start_sweeper(sender: Any = None, **_kwargs: Any) -> None:
    """Every live worker sweeps for jobs that lost their worker or their broker message
    (worker/recovery.py), from its parent process, beside the pool: recovery never waits for
    a worker to restart, nor for a free pool process."""
    global _sweeper
    _sweeper = recovery.sweeper(services(), _consumed_queues(sender)).start()


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
    _heartbeat = registry.heartbeat(services(), hostname, queues).start()
    if settings.worker_metrics_port:
        stats = Path(os.environ[metrics.STATS_DIR_ENV])
        collector = metrics.WorkerCollector(
            hostname, queues, slots.lock_dir(settings), devices, stats
        )
        metrics.serve(settings.worker_metrics_host, settings.worker_metrics_port, collector)


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
    if _sweeper is not None:
        _sweeper.stop()


@signals.worker_shutdown.connect
def remove_stats_dir(**_kwargs: Any) -> None:
    if _stats_dir is not None:
        shutil.rmtree(_stats_dir, ignore_errors=True)
