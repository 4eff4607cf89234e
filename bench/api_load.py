"""Load on the API (issue 13, item 5): read endpoints at 1-256 concurrent clients, and one
large upload, against a real ``alignd serve`` on 127.0.0.1 over Postgres.

    python -m bench.api_load [--warmup 1] [--duration 8] [--levels 1,4,16,64,128,256]
                             [--upload-mb 200]

What it does, all bounded (every level runs ``--warmup`` then ``--duration`` seconds, or
``--max-requests``, whichever comes first; every request has a client timeout; the whole run
stops itself):

1. makes a Postgres database of its own (dropped at the end) and a Redis database index,
   migrates, starts ``alignd serve --no-worker`` on a free 127.0.0.1 port with the rate limit
   off (``ALIGND_RATE_LIMIT_PER_MINUTE=0``, as the issue measured), and creates an API key;
2. seeds one file and ``--jobs`` queued jobs (no worker runs them);
3. for each concurrency level, that many clients (asyncio tasks on one keep-alive
   HTTP/1.1 connection each, a minimal client: see ``Connection``) loop over list jobs / get
   job / list events; it reports requests per second and p50/p99/max latency of the requests
   sent after the warm-up, and of every request the answers by status and how many came
   back within 5 s;
4. uploads a generated ``--upload-mb`` MB JSONL file (valid chat rows, so validation runs as
   in real use) with ``POST /v1/files``, streamed from disk, twice: rows of about 600 bytes
   and of about 50 KB, and reports MB/s and the API processes' RSS before, at its peak
   during, and after each upload.

The load generator shares the machine with the server (on 2 cores it takes a real share of
the CPU), and its numbers are only comparable on the same machine: docs/benchmarks.md keeps
each run with its machine, date and command. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from alignd.processes import free_port, start_alignd, stop_process_group, wait_healthy

PG_ADMIN = os.environ.get("ALIGND_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("ALIGND_TEST_REDIS", "redis://127.0.0.1:6379")
CLIENT_TIMEOUT_S = 30.0
ANSWER_WITHIN_S = 5.0


@dataclass
class Level:
    clients: int
    seconds: float = 0.0
    # Of the requests sent after the warm-up: what req/s and the percentiles are made of.
    latencies: list[float] = field(default_factory=list)
    # Of every request, the warm-up's included: what was answered, and how fast.
    statuses: Counter[str] = field(default_factory=Counter)
    within: int = 0
    answered: int = 0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0

    def row(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        n = len(ordered)

        def pct(q: float) -> float:
            return ordered[min(n - 1, int(q * n))] * 1000 if n else float("nan")

        return {
            "clients": self.clients,
            "requests": n,
            "req_per_s": round(n / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(pct(0.50), 1),
            "p99_ms": round(pct(0.99), 1),
            "max_ms": round(ordered[-1] * 1000, 1) if n else float("nan"),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 1) if n else float("nan"),
            "statuses": dict(sorted(self.statuses.items())),
            "within_5s": f"{self.within}/{self.answered}",
            # Cores each side kept busy: on 2 cores the load generator's share is not free.
            "server_cores": round(self.server_cpu_s / self.seconds, 2) if self.seconds else 0.0,
            "client_cores": round(self.client_cpu_s / self.seconds, 2) if self.seconds else 0.0,
        }


def group_pids(pgid: int) -> list[int]:
    """The processes of process group ``pgid``: ``alignd serve`` and its API workers."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def cpu_s(pgid: int) -> float:
    """User + system CPU seconds of the live processes of group ``pgid`` so far."""
    total = 0.0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mib(pgid: int) -> float:
    """Resident memory of group ``pgid``, all its processes together."""
    total = 0.0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    return total


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for GETs.

    httpx's async pool cost about 6 ms of client CPU a request at 64 connections, more than
    the server spent, so on 2 cores it measured itself; this costs a fraction of that.
    """

    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.auth = f"Authorization: Bearer {key}\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{self.auth}\r\n"
        self.writer.write(request.encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        await self.reader.readexactly(length)
        if close:
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def run_level(
    port: int,
    key: str,
    paths: list[str],
    clients: int,
    duration: float,
    max_requests: int,
    server_pid: int,
    warmup: float = 0.0,
) -> Level:
    level = Level(clients)
    measure_from = time.monotonic() + warmup
    stop_at = measure_from + duration
    sent = 0

    async def client(index: int) -> None:
        nonlocal sent
        connection = Connection(port, key)
        i = index
        while time.monotonic() < stop_at and sent < max_requests:
            sent += 1
            path = paths[i % len(paths)]
            i += 1
            started = time.monotonic()
            try:
                async with asyncio.timeout(CLIENT_TIMEOUT_S):
                    status = str(await connection.get(path))
            except TimeoutError:
                status = "timeout"
                await connection.close()
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                status = type(exc).__name__
                await connection.close()
            took = time.monotonic() - started
            if started >= measure_from:
                level.latencies.append(took)
            level.answered += 1
            level.statuses[status] += 1
            level.within += took <= ANSWER_WITHIN_S
            if status not in ("200", "429", "503"):
                await asyncio.sleep(0.05)  # a broken connection must not spin
        await connection.close()

    marks: dict[str, float] = {}

    async def mark_warm() -> None:
        # Counting starts once every client has connected and its key is known: the first
        # requests of a level all arrive at once and wait on each other (and, the first time,
        # on key lookups); they are answered, and counted in statuses and within_5s, but
        # they are no sample of the steady state. The answers all still count.
        await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
        marks.update(began=time.monotonic(), server=cpu_s(server_pid), client=own_cpu_s())

    await asyncio.gather(mark_warm(), *(client(i) for i in range(clients)))
    level.seconds = time.monotonic() - marks["began"]
    level.server_cpu_s = cpu_s(server_pid) - marks["server"]
    level.client_cpu_s = own_cpu_s() - marks["client"]
    return level


def write_upload_file(path: Path, megabytes: int, repeat: int) -> int:
    """Chat rows of about 600 bytes (``repeat`` 8) or 50 KB (700): the same bytes are many
    rows to validate, or few, which tells the validator's cost from the transport's."""
    row = {
        "messages": [
            {"role": "user", "content": "Summarise the report in one line. " * repeat},
            {"role": "assistant", "content": "The report says the numbers went up. " * repeat},
        ]
    }
    line = (json.dumps(row) + "\n").encode()
    target = megabytes * 1_000_000
    with path.open("wb") as fh:
        block = line * max(1, 1_000_000 // len(line))
        written = 0
        while written < target:
            fh.write(block)
            written += len(block)
    return path.stat().st_size


def measure_upload(base: str, key: str, pid: int, path: Path) -> dict[str, Any]:
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(rss_mib(pid))
            time.sleep(0.1)

    before = rss_mib(pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    with path.open("rb") as fh:
        response = httpx.post(
            f"{base}/v1/files",
            headers={"Authorization": f"Bearer {key}"},
            data={"purpose": "fine-tune"},
            files={"file": (path.name, fh, "application/jsonl")},
            timeout=600,
        )
    took = time.monotonic() - started
    done.set()
    sampler.join()
    size = path.stat().st_size
    body = response.json()
    return {
        "bytes": size,
        "status": response.status_code,
        "file_status": body.get("status"),
        "seconds": round(took, 2),
        "mb_per_s": round(size / 1e6 / took, 1),
        "rss_mib_before": round(before, 1),
        "rss_mib_peak": round(max(samples, default=before), 1),
        "rss_mib_after": round(rss_mib(pid), 1),
    }


def seed(base: str, key: str, jobs: int) -> list[str]:
    http = httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"})
    rows = "".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i}"},
                ]
            }
        )
        + "\n"
        for i in range(16)
    )
    file = http.post("/files", data={"purpose": "fine-tune"}, files={"file": ("s.jsonl", rows)})
    file.raise_for_status()
    ids = []
    for i in range(jobs):
        body = {"model": "tiny", "training_file": file.json()["id"], "metadata": {"n": str(i)}}
        created = http.post("/fine_tuning/jobs", json=body)
        created.raise_for_status()
        ids.append(created.json()["id"])
    http.close()
    return ids


def start_server(workdir: Path, env: dict[str, str], port: int, workers: int) -> Any:
    log = (workdir / f"serve-{workers}.log").open("wb")
    server = start_alignd(
        [
            "serve",
            "--no-worker",
            "--log-level",
            "warning",
            *("--port", str(port)),
            "--workers",
            str(workers),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_healthy(f"http://127.0.0.1:{port}", server)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,4,16,64,128,256")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per level")
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds per level before counting starts (answers still checked)",
    )
    parser.add_argument("--max-requests", type=int, default=20_000, help="per level")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument(
        "--workers", default="1", help="API processes (alignd serve --workers); '1,2': both"
    )
    parser.add_argument("--upload-mb", type=int, default=200, help="0: no upload")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="alignd-api-load-"))
    name = f"alignd_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    env = {
        **os.environ,
        "ALIGND_DATA_DIR": str(workdir / "data"),
        "ALIGND_DATABASE_URL": f"{db_url}/{name}",
        "ALIGND_BROKER_URL": f"{REDIS}/{1 + secrets.randbelow(15)}",
        "ALIGND_RATE_LIMIT_PER_MINUTE": "0",
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server: subprocess.Popen[bytes] | None = None
    results: dict[str, Any] = {"load_before": os.getloadavg(), "runs": []}
    try:
        for command in (["migrate"], ["models", "create-tiny", "tiny"]):
            subprocess.run(
                [sys.executable, "-m", "alignd", *command], env=env, check=True, capture_output=True
            )
        key_out = subprocess.run(
            [sys.executable, "-m", "alignd", "keys", "create", "--owner", "bench"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        key = key_out.stdout.strip().splitlines()[-1]
        for n, workers in enumerate(int(x) for x in args.workers.split(",")):
            server = start_server(workdir, env, port, workers)
            if n == 0:
                job_ids = seed(base, key, args.jobs)
            paths = [
                "/v1/fine_tuning/jobs",
                *(f"/v1/fine_tuning/jobs/{job_id}" for job_id in job_ids[:5]),
                *(f"/v1/fine_tuning/jobs/{job_id}/events" for job_id in job_ids[:5]),
            ]
            run: dict[str, Any] = {"workers": workers, "levels": []}
            run["rss_mib_start"] = round(rss_mib(server.pid), 1)
            for clients in (int(x) for x in args.levels.split(",")):
                level = asyncio.run(
                    run_level(
                        port,
                        key,
                        paths,
                        clients,
                        args.duration,
                        args.max_requests,
                        server.pid,
                        args.warmup,
                    )
                )
                run["levels"].append(level.row())
                print(json.dumps({"workers": workers, **level.row()}), flush=True)
            run["rss_mib_after_load"] = round(rss_mib(server.pid), 1)
            if args.upload_mb and n == 0:
                run["upload"] = {}
                for rows, repeat in (("600_byte_rows", 8), ("50_kb_rows", 700)):
                    path = workdir / f"upload-{rows}.jsonl"
                    write_upload_file(path, args.upload_mb, repeat)
                    run["upload"][rows] = measure_upload(base, key, server.pid, path)
                    path.unlink()
                    print(json.dumps({rows: run["upload"][rows]}), flush=True)
            results["runs"].append(run)
            stop_process_group(server)
            server = None
    finally:
        if server is not None:
            stop_process_group(server)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    results["load_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
