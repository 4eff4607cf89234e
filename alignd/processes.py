"""Child processes that must not outlive the process that started them.

Starting ``python -m alignd ...`` in a process group of its own, stopping a whole group
(SIGTERM, then SIGKILL after a grace period), Linux's parent-death signal, a free local port,
and waiting until a started server answers ``/healthz``. Used by ``alignd serve`` (its embedded
worker), ``alignd demo`` (its server), the worker's rank launcher and its ranks, and the tests.

It lives in ``alignd`` rather than ``worker`` because the API image ships ``alignd`` without
``worker`` (and ``alignd serve`` stops its embedded worker with it), while the worker image
ships both. It imports nothing of ours, so the worker loads no CLI code through it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO

import httpx

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux), so that a
    child does not run on after its parent was killed without cleaning up (SIGKILL, a crash).
    Elsewhere there is no such signal, and this does nothing."""
    with contextlib.suppress(OSError):  # no libc.so.6: not Linux
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def _new_session_dying_with_parent() -> None:
    # Runs in the child between fork and exec: a process group of its own (as
    # start_new_session), and SIGTERM (a graceful stop) if the parent dies first.
    os.setsid()
    die_with_parent(signal.SIGTERM)


def start_alignd(
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
    dies_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """``python -m alignd ARGS`` in a new session, so that ``stop_process_group`` stops it and
    every process it starts (a worker's pool, say). ``dies_with_parent``: it also gets SIGTERM
    if this process dies without stopping it."""
    return subprocess.Popen(
        [sys.executable, "-m", "alignd", *args],
        env=env,
        stdout=stdout,
        stderr=stderr,
        start_new_session=not dies_with_parent,
        preexec_fn=_new_session_dying_with_parent if dies_with_parent else None,
    )


def kill_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; a group that is gone already is no error."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Stop ``proc``'s process group (``proc`` leads it): SIGTERM, and SIGKILL if it has not
    exited ``grace_s`` seconds later."""
    if proc.poll() is not None:
        return
    kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Wait until the server ``proc`` started answers ``base``/healthz; raise if it exits or
    does not answer within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer {base}/healthz within {timeout_s:.0f} s")
