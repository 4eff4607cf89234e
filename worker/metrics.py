"""The worker's own Prometheus metrics, served on ``ALIGND_WORKER_METRICS_PORT`` (0: off).

Jobs run in the pool's child processes, the port is served by the worker's parent, and a
job's series must vanish when it ends; prometheus_client's multiprocess mode cannot remove a
series. So the two sides meet through files instead:

- slots: the parent reads which of its slot lock files are held (``/proc/locks``; the
  children take them with ``flock``, worker/slots.py). Busy means held by any process of this
  machine, i.e. not free to a job: two workers sharing the devices see the same slots busy.
- per job: the child running a job writes its tokens/s (and, on a CUDA worker, the GPU
  memory torch holds) to ``job-<pid>.json`` in the folder named by ``ALIGND_WORKER_STATS_DIR``
  at each metric point, and deletes it when the job ends; the parent reports the files of
  live processes only, at scrape time.

Nothing here imports torch; the parent never initialises CUDA (worker/slots.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("alignd.worker")

STATS_DIR_ENV = "ALIGND_WORKER_STATS_DIR"


def held_inodes(proc_locks: str = "/proc/locks") -> set[int]:
    """Inodes that some process holds an ``flock`` on (Linux; empty elsewhere)."""
    try:
        text = Path(proc_locks).read_text()
    except OSError:
        return set()
    inodes = set()
    for line in text.splitlines():
        parts = [part for part in line.split() if part != "->"]
        # "1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF"
        if len(parts) >= 6 and parts[1] == "FLOCK":
            with contextlib.suppress(ValueError):
                inodes.add(int(parts[5].rsplit(":", 1)[1]))
    return inodes


def busy_slots(folder: Path, devices: list[str]) -> list[str]:
    """The devices whose lock file in ``folder`` is held now."""
    held = held_inodes()
    busy = []
    for device in devices:
        try:
            inode = os.stat(folder / f"{device}.lock").st_ino
        except OSError:
            continue  # never taken yet: free
        if inode in held:
            busy.append(device)
    return busy


class WorkerCollector(Collector):
    """Slots busy/free per worker class, and the running jobs' throughput, at scrape time."""

    def __init__(
        self, hostname: str, queues: list[str], lock_folder: Path, devices: list[str], stats: Path
    ) -> None:
        self.hostname = hostname
        # A worker serving several queues offers its slots to all of them: one label value.
        self.worker_class = ",".join(queues)
        self.lock_folder = lock_folder
        self.devices = devices
        self.stats = stats

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        slots = GaugeMetricFamily(
            "alignd_worker_slots",
            "This worker's slots (GPUs, or CPU slots) by state: busy (held by a job) or free.",
            labels=["worker", "worker_class", "state"],
        )
        busy = len(busy_slots(self.lock_folder, self.devices))
        slots.add_metric([self.hostname, self.worker_class, "busy"], busy)
        slots.add_metric([self.hostname, self.worker_class, "free"], len(self.devices) - busy)
        yield slots
        rate = GaugeMetricFamily(
            "alignd_worker_job_tokens_per_second",
            "Training tokens (non-padding) per second of a running job, since its attempt began.",
            labels=["worker", "job_id", "method"],
        )
        memory = GaugeMetricFamily(
            "alignd_worker_job_gpu_memory_bytes",
            "GPU memory torch has allocated in a running job's process (CUDA workers only).",
            labels=["worker", "job_id", "method"],
        )
        for entry in running_jobs(self.stats):
            labels = [self.hostname, str(entry["job_id"]), str(entry["method"])]
            if entry.get("tokens_per_second") is not None:
                rate.add_metric(labels, float(entry["tokens_per_second"]))
            if entry.get("gpu_memory_bytes") is not None:
                memory.add_metric(labels, float(entry["gpu_memory_bytes"]))
        yield rate
        yield memory


def running_jobs(stats: Path) -> Iterator[dict[str, Any]]:
    """The stats files of live processes; a dead process's file is removed."""
    for path in sorted(stats.glob("job-*.json")):
        pid = int(path.stem.removeprefix("job-"))
        if not _alive(pid):
            path.unlink(missing_ok=True)
            continue
        with contextlib.suppress(OSError, ValueError):
            yield json.loads(path.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(host: str, port: int, collector: WorkerCollector) -> None:
    """Serve the worker's metrics on ``host:port`` from a daemon thread of this process."""
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # a port in use must not stop the worker from training
        log.error("worker metrics: cannot listen on %s:%d (%s); running without", host, port, exc)
        return
    log.info("worker metrics on http://%s:%d/metrics", host, port)


class JobStats:
    """The child's side: one job's throughput, written at each metric point."""

    def __init__(self, job_id: str, method: str) -> None:
        folder = os.environ.get(STATS_DIR_ENV)
        self.path = Path(folder) / f"job-{os.getpid()}.json" if folder else None
        self.job_id = job_id
        self.method = method
        self.started = time.monotonic()
        self.first_tokens: float | None = None

    def update(self, step: int, values: Mapping[str, float]) -> None:
        if self.path is None:
            return
        tokens = values.get("num_tokens")
        rate = None
        if tokens is not None:
            if self.first_tokens is None and step > 1:
                # A resumed attempt: its rate counts from its first point, not from step 0.
                self.first_tokens, self.started = tokens, time.monotonic()
            elif self.first_tokens is None:
                self.first_tokens = 0.0
            elapsed = time.monotonic() - self.started
            rate = (tokens - self.first_tokens) / elapsed if elapsed > 0 else None
        entry = {
            "job_id": self.job_id,
            "method": self.method,
            "tokens_per_second": rate,
            "gpu_memory_bytes": gpu_memory_bytes(),
        }
        tmp = self.path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(entry))
            os.replace(tmp, self.path)


def job_ended() -> None:
    """Drop this process's job series: a pool process outlives its jobs."""
    folder = os.environ.get(STATS_DIR_ENV)
    if folder:
        (Path(folder) / f"job-{os.getpid()}.json").unlink(missing_ok=True)


def gpu_memory_bytes() -> int | None:
    """GPU memory torch has allocated in this process, when it already uses CUDA (else None):
    torch is not imported and CUDA is not initialised for the asking."""
    torch: Any = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.memory_allocated())
