"""A job's log: the lines logged while it runs, by the thread running it, into ``job_logs``.

``capture(services, job)`` attaches a handler to the root logger (and to the library loggers
that do not propagate to it, such as ``transformers``) and routes Python warnings into logging
for the duration of the job. The handler keeps records from the job's thread only: a worker's
other threads (its webhook dispatcher, Celery's own) are not the job's. Lines are redacted of
anything that looks like a secret, buffered, and written in batches by a flusher thread, so
logging never waits on the database. ``GET /v1/fine_tuning/jobs/{id}/logs`` serves them.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from api.models import Job, JobLog
from api.services import Services

FLUSH_S = 0.25
MAX_LINE_CHARS = 16_000
# Library loggers that keep their records to themselves (propagate = False) once imported.
NON_PROPAGATING = ("transformers",)

_SECRETS = (
    # Our API keys and OpenAI-style keys, webhook secrets, bearer tokens.
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), "sk-[REDACTED]"),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]{8,}"), "whsec_[REDACTED]"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]{8,}"), r"\1 [REDACTED]"),
    # Hugging Face and AWS style tokens.
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), "hf_[REDACTED]"),
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"), "[REDACTED]"),
    # Credentials in URLs: scheme://user:password@host.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s:@]+:[^/\s@]+@"), r"\1[REDACTED]@"),
    # key=value / key: value where the key says it is a secret.
    (
        re.compile(
            r"(?i)\b([A-Za-z0-9_\-]*(?:password|passwd|secret|token|api[_\-]?key|access[_\-]?key)"
            r"[A-Za-z0-9_\-]*[\"']?\s*[=:]\s*)[\"']?[^\s\"',;]+"
        ),
        r"\1[REDACTED]",
    ),
)


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class JobLogHandler(logging.Handler):
    def __init__(
        self, sessions: sessionmaker[Session], job: Job, level: int, max_lines: int
    ) -> None:
        super().__init__(level)
        self.sessions = sessions
        self.job_id = job.id
        self.owner = job.owner
        self.thread = threading.get_ident()
        self.max_lines = max_lines
        self.kept = 0
        self.truncated = False
        self.buffer: list[dict[str, Any]] = []
        self.buffer_lock = threading.Lock()
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._run, name=f"alignd-joblog-{job.id}", daemon=True
        )
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        try:
            line = redact(self.format(record))[:MAX_LINE_CHARS]
        except Exception:
            self.handleError(record)
            return
        level = {"WARNING": "warn", "CRITICAL": "error"}.get(
            record.levelname, record.levelname.lower()
        )
        with self.buffer_lock:
            if self.kept >= self.max_lines:
                if not self.truncated:
                    self.truncated = True
                    self._add(record.created, "warn", "(log truncated: too many lines)")
                return
            self.kept += 1
            self._add(record.created, level, line)

    def _add(self, created: float, level: str, line: str) -> None:
        self.buffer.append(
            {
                "job_id": self.job_id,
                "owner": self.owner,
                "created_at": created,
                "level": level,
                "line": line,
            }
        )

    def flush(self) -> None:
        with self.buffer_lock:
            rows, self.buffer = self.buffer, []
        if not rows:
            return
        try:
            with self.sessions() as session, session.begin():
                session.execute(insert(JobLog), rows)
        except Exception as exc:  # the log must never break the job
            # Not through logging: this thread's records are not captured, but a handler on
            # the root logger would see them and the worker's console is enough.
            print(f"alignd: could not store log lines of {self.job_id}: {exc}", flush=True)

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._flusher.is_alive() and self._flusher is not threading.current_thread():
            self._flusher.join(timeout=10)
        self.flush()
        super().close()


class Capture:
    """Attached for one job's run; ``close()`` detaches and writes what is left."""

    def __init__(self, services: Services, job: Job) -> None:
        settings = services.settings
        level = logging.getLevelName(settings.job_log_level.upper())
        self.handler = JobLogHandler(
            services.sessions,
            job,
            level if isinstance(level, int) else logging.INFO,
            settings.job_log_max_lines,
        )
        self.loggers = [logging.getLogger()]
        self.loggers += [logging.getLogger(name) for name in NON_PROPAGATING]
        self.loggers += [
            logger
            for logger in list(logging.Logger.manager.loggerDict.values())
            if isinstance(logger, logging.Logger) and not logger.propagate
        ]
        self.loggers = list({id(logger): logger for logger in self.loggers}.values())
        for logger in self.loggers:
            logger.addHandler(self.handler)
        # Python warnings (the trainer's libraries warn this way) go to logging meanwhile.
        self.captured_warnings = getattr(logging, "_warnings_showwarning", None) is not None
        if not self.captured_warnings:
            logging.captureWarnings(True)

    def close(self) -> None:
        for logger in self.loggers:
            logger.removeHandler(self.handler)
        if not self.captured_warnings:
            logging.captureWarnings(False)
        self.handler.close()


def capture(services: Services, job: Job) -> Capture:
    return Capture(services, job)
