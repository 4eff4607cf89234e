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

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Other processes' CPU use (in cores) above which a run counts as disturbed.
CONTENDED = 0.2


@dataclass(frozen=True)
class Config:
    """One benchmark run: a model size, a method, an adapter and whose trainer."""

    size: str
    method: str
    adapter: str
    trainer: str  # "ours" or "trl"

    @property
    def name(self) -> str:
        return f"{self.method} {self.adapter} {self.size} {self.trainer}"


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


def measure(
    module: str,
    *,
    sizes: Sequence[str],
    methods: Sequence[str],
    adapters: Sequence[str],
    threads: int,
    repeats: int,
    tries: int,
) -> dict[Config, dict[str, float] | None]:
    """Every size × method × adapter, TRL then ours, each run as ``python -m module --worker
    CONFIG`` after the machine is quiet, until each has ``repeats`` clean runs or ``tries``
    runs; then ``summary`` of each."""
    runs: dict[Config, list[dict[str, float]]] = {}
    clean: dict[Config, int] = {}
    for size in sizes:
        for method in methods:
            for adapter in adapters:
                pair = [Config(size, method, adapter, t) for t in ("trl", "ours")]
                for _ in range(tries):
                    for config in pair:
                        if clean.get(config, 0) >= repeats:
                            continue
                        busy = wait_for_quiet()
                        command = [sys.executable, "-m", module, "--worker"]
                        result = launch(
                            [*command, json.dumps(config.__dict__)],
                            threads=threads,
                            name=config.name,
                        )
                        print(f"-- {config.name} (busy {busy:.0%}): {result}", file=sys.stderr)
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


def table(results: dict[Config, dict[str, float] | None]) -> str:
    """Ours beside TRL, a row per size × method × adapter; "†" marks a figure no clean run
    stands behind (explained under the table)."""
    lines = [
        "| method | adapter | model | ours tok/s | TRL tok/s | speed-up | ours peak RSS | "
        "TRL peak RSS | RSS ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, adapter, size in sorted({(c.method, c.adapter, c.size) for c in results}):
        ours = results.get(Config(size, method, adapter, "ours"))
        trl = results.get(Config(size, method, adapter, "trl"))
        if ours is None or trl is None:
            lines.append(f"| {method} | {adapter} | {size} | failed | | | | | |")
            continue
        lines.append(
            f"| {method} | {adapter} | {size} | {ours['tokens_per_second']:,.0f}{_mark(ours)} | "
            f"{trl['tokens_per_second']:,.0f}{_mark(trl)} | "
            f"{ours['tokens_per_second'] / trl['tokens_per_second']:.2f}× | "
            f"{ours['peak_rss_mib']:,.0f} MiB | {trl['peak_rss_mib']:,.0f} MiB | "
            f"{ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f} |"
        )
    if any(r is not None and r["others"] > CONTENDED for r in results.values()):
        lines.append("\n† other processes kept the CPUs busy during every run of this one.")
    return "\n".join(lines)


def _mark(result: dict[str, float]) -> str:
    return " †" if result["others"] > CONTENDED else ""


def speed_parser(
    description: str,
    *,
    sizes: list[str],
    methods: list[str],
    method_choices: list[str] | None = None,
) -> argparse.ArgumentParser:
    """The command line of a speed benchmark (bench.speed, bench.online_speed): which
    configurations to measure, how many clean runs of each, where to write the table.
    ``--worker`` is how ``measure`` has a subprocess run one configuration."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", nargs="+", default=["1m", "30m"], choices=sizes)
    parser.add_argument("--methods", nargs="+", default=methods, choices=method_choices)
    parser.add_argument("--adapters", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--repeats", type=int, default=1, help="clean runs per configuration")
    parser.add_argument("--tries", type=int, default=4, help="runs at most per configuration")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser
