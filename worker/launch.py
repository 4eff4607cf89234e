"""A job in several processes: start its ranks, follow them, stop them, never leave one behind.

Our own launcher rather than torchrun: the worker must stream every rank's output into the
job's log as it comes, name the rank that failed and its error, and stop the whole job on
cancel or pause. It starts ``python -m worker.rank`` once per rank, all in one new process
group (the job's, not the worker's), with the environment torch.distributed reads (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and, on a GPU worker,
``CUDA_VISIBLE_DEVICES`` set to the job's slots. Then, until every rank has exited:

- each rank's lines are logged as ``[rank N] ...`` from the job's thread (so they land in
  the job's log);
- a rank that exits non-zero fails the job with its error (``rank-N.error``, written by the
  rank, or its last lines): the group is stopped at once, so no other rank waits forever in a
  collective;
- a cancel or pause sends SIGTERM to the group: the ranks agree to stop at the next step,
  save a checkpoint (rank 0) and exit; after ``grace_s`` whatever is left gets SIGKILL.

Only rank 0 writes events, metrics and checkpoints (``worker.rank``); its result comes back in
``result.json``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO

from alignd.processes import free_port, kill_group
from trainer_core.seams import RunResult, ShouldStop
from trainer_core.specs import TrainSpec
from worker.lease import Abandoned

log = logging.getLogger("alignd.worker")

POLL_S = 0.2
GRACE_S = 30.0
# Rank 0's exit code when its lease ended (worker/lease.py): the job is left for the sweep,
# not failed. EX_TEMPFAIL of sysexits.h.
ABANDONED_EXIT = 75


class RankFailed(RuntimeError):
    pass


def _pump(rank: int, stream: IO[str], lines: queue.Queue[tuple[int, str]]) -> None:
    for line in stream:
        lines.put((rank, line.rstrip("\n")))


def run_group(
    spec: TrainSpec,
    *,
    job_id: str,
    owner: str,
    attempt: int,
    workdir: Path,
    should_stop: ShouldStop,
    devices: list[str] | None,
    device_kind: str,
    grace_s: float = GRACE_S,
) -> RunResult | None:
    """Run ``spec`` in ``spec.resources.gpus`` processes; returns rank 0's result (None when a
    stop ended the ranks before rank 0 wrote one)."""
    world = spec.resources.gpus
    spec_path = workdir / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    base_env = {
        **os.environ,
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    if device_kind == "cuda" and devices:
        base_env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # slots are nvidia-smi indices
        base_env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[:world])
    else:
        base_env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes (gloo)
    lines: queue.Queue[tuple[int, str]] = queue.Queue()
    procs: list[subprocess.Popen[str]] = []
    pumps: list[threading.Thread] = []
    pgid = 0
    tails = [deque[str](maxlen=20) for _ in range(world)]
    try:
        for rank in range(world):
            command = [
                sys.executable,
                "-m",
                "worker.rank",
                str(spec_path),
                job_id,
                owner,
                str(attempt),
            ]
            env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            # A process group of its own (in the worker's session, so the others can join it).
            group = {"process_group": 0 if rank == 0 else pgid}
            proc = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                **group,  # type: ignore[call-overload]
            )
            if rank == 0:
                pgid = proc.pid
            procs.append(proc)
            assert proc.stdout is not None
            pump = threading.Thread(target=_pump, args=(rank, proc.stdout, lines), daemon=True)
            pump.start()
            pumps.append(pump)
        log.info("started %d ranks (process group %d)", world, pgid)

        stop_sent_at: float | None = None
        while True:
            _drain(lines, tails)
            codes = [proc.poll() for proc in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed and stop_sent_at is not None:
                break  # stopping anyway: a rank that died of the signal is part of the stop
            if failed:
                rank, code = failed[0]
                _reap(pgid, procs, pumps)
                _drain(lines, tails)
                if rank == 0 and code == ABANDONED_EXIT:
                    raise Abandoned(_error_of(workdir, rank, code, tails[rank]))
                raise RankFailed(_error_of(workdir, rank, code, tails[rank]))
            if all(c == 0 for c in codes):
                break
            if stop_sent_at is None and should_stop():
                log.info("stop requested: signalling the job's process group")
                kill_group(pgid, signal.SIGTERM)
                stop_sent_at = time.monotonic()
            if stop_sent_at is not None and time.monotonic() - stop_sent_at > grace_s:
                log.warning("ranks still running %.0f s after the stop: killing them", grace_s)
                break
            time.sleep(POLL_S)
        _reap(pgid, procs, pumps)
        _drain(lines, tails)
        result = _result(workdir)
        if result is None and stop_sent_at is None:
            raise RankFailed("rank 0 exited without a result")
        return result
    finally:
        _reap(pgid, procs, pumps)  # whatever went wrong, no rank outlives the job


def _reap(pgid: int, procs: list[subprocess.Popen[str]], pumps: list[threading.Thread]) -> None:
    """Kill what is left of the group, wait for every rank, and let the readers reach the
    end of each rank's output (so its last lines, often the error, are not lost)."""
    if pgid and any(proc.poll() is None for proc in procs):
        kill_group(pgid, signal.SIGKILL)
    for proc in procs:
        proc.wait()
    for pump in pumps:
        pump.join(timeout=5)


def _drain(lines: queue.Queue[tuple[int, str]], tails: list[deque[str]]) -> None:
    while True:
        try:
            rank, line = lines.get_nowait()
        except queue.Empty:
            return
        tails[rank].append(line)
        log.info("[rank %d] %s", rank, line)


def _error_of(workdir: Path, rank: int, code: int, tail: deque[str]) -> str:
    error_file = workdir / f"rank-{rank}.error"
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    if error_file.is_file():
        return f"rank {rank} failed ({how}): {error_file.read_text().strip()}"
    last = " | ".join(line for line in tail if line.strip())[-1500:]
    return f"rank {rank} failed ({how}): {last or 'no output'}"


def _result(workdir: Path) -> RunResult | None:
    path = workdir / "result.json"
    if not path.is_file():
        return None
    return RunResult(**json.loads(path.read_text()))
