"""Measuring on a shared machine: run a configuration only when the CPUs are quiet, count
how busy other processes kept them meanwhile, and keep only the clean runs.

On a 2-core machine one other busy process halves a run's speed, so a speed figure is only
a result when nothing else ran beside it. Each run is a subprocess; ``others`` in its result
is how many cores other processes kept busy during it (whole-machine busy CPU seconds minus
the run's own, over the run's wall time). A run with ``others`` > ``CONTENDED`` is tried
again, up to ``tries`` runs per configuration.

Niced work counts too. Measured here (2026-11-21): with a ``nice -n 19`` test run beside it,
a benchmark at nice 0 still ran at half its idle speed: its Python parts keep one core, the
niced process takes the other, and torch's 2-thread regions wait for it to be preempted.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

# Other processes' CPU use (in cores) above which a run counts as disturbed.
CONTENDED = 0.2

C = TypeVar("C")


def busy_fraction(seconds: float = 2.0) -> float:
    """How busy the machine's CPUs were over the next ``seconds`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(limit: float = 180.0) -> float:
    """Wait (up to ``limit`` s) until other processes leave the CPUs idle. Returns the busy
    fraction last seen."""
    deadline = time.monotonic() + limit
    busy = busy_fraction()
    while busy > 0.1 and time.monotonic() < deadline:
        busy = busy_fraction()
    return busy


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of our finished children)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy / os.sysconf("SC_CLK_TCK"), children.ru_utime + children.ru_stime


def launch(command: Sequence[str], *, threads: int, name: str) -> dict[str, float] | None:
    """Run ``command`` (which prints its result as JSON on its last line); the result gets
    ``others``, the cores other processes kept busy meanwhile. None when it failed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    busy0, ours0 = _cpu_seconds()
    began = time.monotonic()
    done = subprocess.run(list(command), capture_output=True, text=True, env=env, check=False)
    wall = time.monotonic() - began
    busy1, ours1 = _cpu_seconds()
    if done.returncode != 0:
        print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    result["others"] = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / wall
    result["wall_s"] = wall
    return result


def measure_pairs(
    pairs: Sequence[Sequence[C]],
    run: Callable[[C], dict[str, float] | None],
    *,
    repeats: int,
    tries: int,
    name: Callable[[C], str],
) -> dict[C, dict[str, float] | None]:
    """Each pair's configurations (TRL, then ours) alternate, each after the machine is
    quiet, until every one has ``repeats`` clean runs or ``tries`` runs; then ``summary``."""
    runs: dict[C, list[dict[str, float]]] = {}
    clean: dict[C, int] = {}
    for pair in pairs:
        for _ in range(tries):
            for config in pair:
                if clean.get(config, 0) >= repeats:
                    continue
                busy = wait_for_quiet()
                result = run(config)
                print(f"-- {name(config)} (busy {busy:.0%}): {result}", file=sys.stderr)
                runs.setdefault(config, [])
                if result is not None:
                    runs[config].append(result)
                    clean[config] = clean.get(config, 0) + (result["others"] <= CONTENDED)
            if all(clean.get(config, 0) >= repeats for config in pair):
                break
    return {config: summary(config_runs) for config, config_runs in runs.items()}


def summary(config_runs: list[dict[str, float]]) -> dict[str, float] | None:
    """The clean runs (all runs if none was clean): the best tokens/s (other jobs only ever
    slow a run down) and the mean peak RSS (which varies ±5% from run to run)."""
    if not config_runs:
        return None
    clean = [r for r in config_runs if r["others"] <= CONTENDED] or config_runs
    best = max(clean, key=lambda r: r["tokens_per_second"])
    return {
        **best,
        "peak_rss_mib": sum(r["peak_rss_mib"] for r in clean) / len(clean),
        "runs": len(clean),
    }


def mark(result: dict[str, float]) -> str:
    """ " †" after a figure no clean run stands behind."""
    return " †" if result["others"] > CONTENDED else ""


CONTENDED_NOTE = "† other processes kept the CPUs busy during every run of this one."
