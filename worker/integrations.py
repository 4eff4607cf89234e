"""A job's ``integrations``, acted on: W&B (``{"type": "wandb", "wandb": {project, name,
entity, tags}}``, OpenAI's shape) gets the job's config and every metric point.

``reporting`` wraps the job's ``DatabaseSink`` in a ``TeeSink`` that also sends to each
integration. Only rank 0 reports, so only rank 0 makes a W&B run. An integration is a
courtesy, never a reason to fail a job: whatever it raises (the ``wandb`` package missing,
``wandb.init`` refusing a setting, a log call failing) becomes one warning event on the job,
and the integration is off for the rest of that run while training goes on.

The operator chooses how W&B is reached through wandb's own environment (``WANDB_API_KEY``,
``WANDB_MODE``, ``WANDB_DIR``, ``WANDB_BASE_URL``; docs/operations.md); nothing of it passes
through the job spec, so a tenant can neither read the key nor point the run elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from trainer_core.seams import MetricSink

log = logging.getLogger("alignd.worker")


class WandbSink:
    """MetricSink: a W&B run for the job, made at ``start`` (its config: the job's resolved
    spec, the job id and its total steps), one ``log`` per metric point at its step, finished
    by ``close``. The run's id is the job id, so that a resumed job continues its run where
    W&B can (online); steps it has already seen are dropped by W&B, not duplicated."""

    def __init__(
        self,
        options: Mapping[str, Any],
        *,
        job_id: str,
        config: Mapping[str, Any],
        warn: MetricSink,
    ) -> None:
        self.options = dict(options)
        self.job_id = job_id
        self.config = dict(config)
        self.warn = warn  # where the one warning goes: the job's own events
        self.run: Any = None
        self.failed = False

    def _guard(self, what: str, exc: Exception) -> None:
        self.failed = True
        log.warning("job %s: wandb %s failed: %s", self.job_id, what, exc)
        message = f"The wandb integration failed ({what}: {exc}); the job goes on without it"
        self.warn.event(message[:2000], level="warning", data={"integration": "wandb"})
        self._finish(exit_code=1)

    def start(self, total_steps: int) -> None:
        if self.failed or self.run is not None:
            return
        try:
            import wandb

            self.run = wandb.init(
                project=self.options.get("project"),
                name=self.options.get("name") or self.job_id,
                entity=self.options.get("entity"),
                tags=list(self.options.get("tags") or []) or None,
                config={**self.config, "job_id": self.job_id, "total_steps": total_steps},
                id=self.job_id,
                resume="allow",
                # Several jobs may run in one worker process: each its own run.
                reinit="create_new",
                # Not the worker's console (the job's log has it), code or git state.
                settings=wandb.Settings(console="off", save_code=False, disable_git=True),
            )
        except Exception as exc:
            self._guard("init", exc)

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        if self.failed or self.run is None:
            return
        try:
            self.run.log(dict(values), step=step)
        except Exception as exc:
            self._guard("log", exc)

    def event(
        self, message: str, *, level: str = "info", data: Mapping[str, Any] | None = None
    ) -> None:
        pass  # W&B has no events; the job's own list has them

    def close(self, *, failed: bool) -> None:
        self._finish(exit_code=1 if failed else 0)

    def _finish(self, *, exit_code: int) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:  # the metrics are logged; a finish that fails loses no job
            log.warning("job %s: wandb finish failed: %s", self.job_id, exc)


class TeeSink:
    """MetricSink: everything to ``primary`` (the database, which may raise and so stop the
    job), then to each extra sink (which never raise: see ``WandbSink``)."""

    def __init__(self, primary: MetricSink, extras: list[WandbSink]) -> None:
        self.primary = primary
        self.extras = extras

    def start(self, total_steps: int) -> None:
        self.primary.start(total_steps)
        for extra in self.extras:
            extra.start(total_steps)

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        self.primary.metrics(step, values)
        for extra in self.extras:
            extra.metrics(step, values)

    def event(
        self, message: str, *, level: str = "info", data: Mapping[str, Any] | None = None
    ) -> None:
        self.primary.event(message, level=level, data=data)


def wandb_options(integrations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``wandb`` blocks of a job's integrations (other types are stored, not acted on)."""
    return [
        dict(item.get("wandb") or {})
        for item in integrations
        if isinstance(item, dict) and item.get("type") == "wandb"
    ]


@contextmanager
def reporting(
    sink: MetricSink, *, job_id: str, integrations: list[dict[str, Any]], config: dict[str, Any]
) -> Iterator[MetricSink]:
    """``sink``, teed to the job's integrations for the duration (their runs finished on the
    way out, marked failed when the block raised); ``sink`` itself when there are none."""
    extras = [
        WandbSink(options, job_id=job_id, config=config, warn=sink)
        for options in wandb_options(integrations)
    ]
    if not extras:
        yield sink
        return
    failed = True
    try:
        yield TeeSink(sink, extras)
        failed = False
    finally:
        for extra in extras:
            extra.close(failed=failed)
