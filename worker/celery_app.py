"""The Celery worker: ``alignd worker`` runs this app; the task takes a job id and runs it.

torch is imported only inside the task (in the pool's child process), so the worker's parent
process stays small and never holds training memory.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Task, signals
from celery.worker.request import Request

from api.queue import RUN_JOB_TASK, make_celery
from api.services import Services
from api.settings import load_settings

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
    from worker.execution import execute

    return execute(services(), job_id, str(self.request.hostname))


@signals.worker_ready.connect
def requeue_pending(**_kwargs: Any) -> None:
    """A broker may lose messages (Redis without persistence, a wiped folder). On start,
    send every job that should be running again; the claim makes duplicates harmless."""
    from worker.execution import pending_jobs

    svc = services()
    for job_id in pending_jobs(svc):
        log.info("re-sending pending job %s", job_id)
        svc.queue.enqueue(job_id)


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
