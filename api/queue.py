"""The Celery app, configured from settings, and the API's side of it: enqueue by task name.

The API never imports the worker's tasks (nor torch): it sends ``alignd.run_job`` by name,
after the job's row is committed, so a worker can never see a job id that isn't there yet.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from api.settings import Settings

RUN_JOB_TASK = "alignd.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("alignd", broker=settings.resolved_broker_url)
    transport_options: dict[str, Any] = {}
    if settings.embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            # Producer and consumer share one folder: the API writes, the worker reads.
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "polling_interval": settings.broker_polling_interval_s,
        }
    else:
        # Redis re-delivers an unacked message after the visibility timeout. Jobs run for hours,
        # so set it long on purpose; the job claim makes a second delivery harmless anyway.
        transport_options = {"visibility_timeout": settings.broker_visibility_timeout_s}
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        # Long jobs: ack after the task ends (a crash re-delivers) and take one at a time.
        task_acks_late=True,
        # A lost worker fails its job (worker.celery_app.JobRequest) rather than re-queueing
        # a job that may be what killed it.
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.default_queue,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


class JobQueue:
    """Sends jobs to the workers by task name."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app = make_celery(settings)

    def enqueue(
        self, job_id: str, queue: str | None = None, countdown: float | None = None
    ) -> None:
        """Send the job to ``queue`` (its worker class; the default queue when None), to be
        run no sooner than ``countdown`` seconds from now."""
        self._app.send_task(
            RUN_JOB_TASK,
            args=[job_id],
            queue=queue or self._settings.default_queue,
            countdown=countdown,
        )

    def ping(self) -> None:
        """Raises when the broker cannot be reached (for /readyz)."""
        with self._app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
