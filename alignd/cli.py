"""``alignd``: run the service and talk to it.

Server side: ``serve`` (the API, plus an embedded worker when no external broker is set),
``worker``, ``migrate``, ``models create-tiny``, ``keys``. Client side: ``files``, ``jobs``,
``demo``.
Every module here imports torch only inside the command that needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from alignd.processes import start_alignd, stop_process_group


def _settings() -> Any:
    from api.settings import load_settings

    return load_settings()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from api.migration import upgrade

    settings = _settings()
    upgrade(settings)
    if settings.embedded_database:
        from api.db import make_engine, make_sessionmaker
        from api.keys import ensure_local_key

        engine = make_engine(settings)
        ensure_local_key(settings, make_sessionmaker(engine))
        engine.dispose()
        print(f"API key for owner 'local': {settings.api_key_file}", file=sys.stderr)
    print(
        f"dashboard: http://{args.host or settings.host}:{args.port or settings.port}/ "
        "(sign in with an API key)",
        file=sys.stderr,
    )
    worker: subprocess.Popen[bytes] | None = None
    if settings.embedded_broker and not args.no_worker:
        worker = start_worker_process(settings.data_dir)
    # uvicorn restores the previous handlers after its graceful shutdown and re-raises the
    # signal; with Python's default SIGTERM handler that kills us before `finally` stops the
    # worker. Our handler turns the re-raised signal into a normal exit instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    workers = args.workers or settings.api_workers
    metrics_dir: str | None = None
    shares_file: str | None = None
    try:
        if workers > 1:
            # Each process counts its own requests; /metrics sums them all through
            # prometheus_client's multiprocess mode (api/metrics.py). A fresh folder per
            # start: counters from an earlier run must not add up.
            if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                metrics_dir = tempfile.mkdtemp(prefix="alignd-api-metrics-")
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            # Each process builds its app (and its pool, threads and admission limit) from the
            # same environment; the Python code of a request runs under one process's GIL, so
            # more processes are how one machine serves more requests (docs/operations.md).
            # They count their connections in one file, to keep them balanced (serving.py).
            from alignd import serving

            if workers > serving.SLOTS:
                print(f"--workers: at most {serving.SLOTS} API processes", file=sys.stderr)
                return 2
            shares_fd, shares_file = tempfile.mkstemp(prefix="alignd-api-connections-")
            os.close(shares_fd)
            serving.create_shares_file(shares_file)
            os.environ[serving.SHARES_FILE] = shares_file
            os.environ[serving.SHARES_WORKERS] = str(workers)
            uvicorn.run(
                "api.app:create_app",
                factory=True,
                workers=workers,
                http=serving.BalancedHttpToolsProtocol,
                host=args.host or settings.host,
                port=args.port or settings.port,
                log_level=args.log_level,
            )
        else:
            uvicorn.run(
                create_app(settings),
                host=args.host or settings.host,
                port=args.port or settings.port,
                log_level=args.log_level,
            )
    finally:
        if worker is not None:
            stop_process_group(worker)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if shares_file is not None:
            os.unlink(shares_file)
    return 0


def start_worker_process(data_dir: Path) -> subprocess.Popen[bytes]:
    """The embedded worker: a child process (the API process must never import torch),
    in its own process group so that stopping it also stops its pool children, and told to
    stop if `serve` dies without stopping it."""
    env = {**os.environ, "ALIGND_DATA_DIR": str(data_dir)}
    return start_alignd(["worker"], env=env, dies_with_parent=True)


def _exit_cleanly(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.slots import resolve_devices

    try:
        kind, devices = resolve_devices(args.gpus)
    except ValueError as exc:
        print(f"alignd worker: {exc}", file=sys.stderr)
        return 2
    # Before the worker's settings are read: the pool's processes take their slots from these.
    os.environ["ALIGND_WORKER_DEVICES"] = ",".join(devices)
    os.environ["ALIGND_WORKER_DEVICE_KIND"] = kind

    from worker.celery_app import app, settings

    queues = ",".join(
        q.strip() for q in (args.queues or settings.default_queue).split(",") if q.strip()
    )
    argv = [
        "worker",
        f"--loglevel={args.log_level.upper()}",
        # One pool process per slot by default: a job of one device each, side by side.
        f"--concurrency={args.concurrency or len(devices)}",
        "-Q",
        queues or settings.default_queue,
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    app.worker_main(argv)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from api.migration import downgrade, upgrade

    settings = _settings()
    if args.downgrade:
        downgrade(settings, args.downgrade)
    else:
        upgrade(settings, args.revision)
    print(f"database at {args.downgrade or args.revision}: {settings.resolved_database_url}")
    return 0


def cmd_create_tiny(args: argparse.Namespace) -> int:
    from trainer_core.tiny_models import create_tiny_model

    dest = _settings().resolved_models_dir / args.name
    if dest.exists() and not args.force:
        print(f"{dest} exists (use --force to rebuild)")
        return 0
    create_tiny_model(dest, size=args.size, seed=args.seed)
    print(dest)
    return 0


@contextlib.contextmanager
def _operator_session() -> Any:
    """A session on the service's database, for operator commands (no HTTP, no key needed).

    The embedded default is migrated first, as `serve` does; a configured database must have
    been migrated with `alignd migrate`.
    """
    from api.db import make_engine, make_sessionmaker
    from api.migration import upgrade

    settings = _settings()
    if settings.embedded_database:
        upgrade(settings)
    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as session, session.begin():
            yield session
    finally:
        engine.dispose()


def _when(timestamp: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def cmd_keys_create(args: argparse.Namespace) -> int:
    from api.keys import create_key

    with _operator_session() as session:
        row, key = create_key(session, args.owner, args.name)
    label = f" ({row.name})" if row.name else ""
    print(f"created API key {row.id}{label} for owner '{row.owner}'")
    print("It is shown only this once (only its hash is stored); keep it secret:")
    print(key)  # the last line, so that scripts can take it with `tail -n 1`
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from api.keys import list_keys

    with _operator_session() as session:
        rows = list_keys(session, args.owner)
    print("id\towner\tname\tkey\tcreated\tlast used\tstatus")
    for row in rows:
        status = f"revoked {_when(row.revoked_at)}" if row.revoked_at else "active"
        print(
            f"{row.id}\t{row.owner}\t{row.name or '-'}\t{row.hint}\t{_when(row.created_at)}\t"
            f"{_when(row.last_used_at)}\t{status}"
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from api.keys import revoke_key

    with _operator_session() as session:
        row = revoke_key(session, args.key_id)
        if row is None:
            print(f"error: no API key {args.key_id}", file=sys.stderr)
            return 1
        print(f"revoked API key {row.id} of owner '{row.owner}'")
    return 0


def cmd_models_list(_args: argparse.Namespace) -> int:
    from alignd.client import Client

    for model in Client().get("models")["data"]:
        print(f"{model['id']}\t{model['owned_by']}")
    return 0


def cmd_files_upload(args: argparse.Namespace) -> int:
    from alignd.client import Client

    _print(Client().upload(Path(args.path), args.purpose))
    return 0


def cmd_files_list(_args: argparse.Namespace) -> int:
    from alignd.client import Client

    for row in Client().get("files")["data"]:
        print(f"{row['id']}\t{row['status']}\t{row['num_examples']}\t{row['filename']}")
    return 0


def cmd_jobs_create(args: argparse.Namespace) -> int:
    from alignd.client import Client

    hyperparameters = {
        key: value
        for key, value in (
            ("n_epochs", args.n_epochs),
            ("batch_size", args.batch_size),
            ("learning_rate_multiplier", args.learning_rate_multiplier),
        )
        if value is not None
    }
    body: dict[str, Any] = {
        "model": args.model,
        "training_file": args.training_file,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "adapter": {"type": args.adapter},
    }
    if args.validation_file:
        body["validation_file"] = args.validation_file
    if args.suffix:
        body["suffix"] = args.suffix
    if args.seed is not None:
        body["seed"] = args.seed
    _print(Client().post("fine_tuning/jobs", body))
    return 0


def cmd_jobs_list(_args: argparse.Namespace) -> int:
    from alignd.client import Client

    for job in Client().get("fine_tuning/jobs")["data"]:
        print(f"{job['id']}\t{job['status']}\t{job['model']}\t{job['fine_tuned_model'] or ''}")
    return 0


def cmd_jobs_get(args: argparse.Namespace) -> int:
    from alignd.client import Client

    _print(Client().get(f"fine_tuning/jobs/{args.job_id}"))
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    from alignd.client import Client

    _print(Client().post(f"fine_tuning/jobs/{args.job_id}/cancel"))
    return 0


def cmd_jobs_events(args: argparse.Namespace) -> int:
    from alignd.client import Client

    events = Client().get(f"fine_tuning/jobs/{args.job_id}/events", limit=args.limit)["data"]
    for event in reversed(events):
        print(
            f"{time.strftime('%H:%M:%S', time.localtime(event['created_at']))} [{event['level']}] {event['message']}"
        )
    return 0


def cmd_jobs_follow(args: argparse.Namespace) -> int:
    from alignd.client import Client
    from alignd.demo import follow

    job = follow(Client(), args.job_id)
    return 0 if job["status"] == "succeeded" else 1


def cmd_jobs_adapter(args: argparse.Namespace) -> int:
    from alignd.client import Client

    print(Client().download_adapter(args.job_id, Path(args.out)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from alignd.demo import run_demo

    return run_demo(port=args.port, model=args.model)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve", help="run the API (and an embedded worker without an external broker)"
    )
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--no-worker", action="store_true", help="do not start the embedded worker")
    s.add_argument("--workers", type=int, help="API processes (default ALIGND_API_WORKERS, 1)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="run a training worker")
    w.add_argument(
        "--queues",
        help="comma-separated queues, i.e. the worker classes it serves, e.g. gpu-h100 "
        "(default: ALIGND_DEFAULT_QUEUE)",
    )
    w.add_argument(
        "--gpus",
        help="comma-separated device ids it may use, e.g. 0,1,2,3 (default: every CUDA device "
        "it sees; without CUDA, one CPU slot per core)",
    )
    w.add_argument(
        "--concurrency",
        type=int,
        help="pool processes, i.e. jobs at a time (default: one per slot)",
    )
    w.add_argument("--hostname", help="Celery node name")
    w.add_argument("--log-level", default="info")
    w.set_defaults(func=cmd_worker)

    m = sub.add_parser("migrate", help="upgrade the database schema (to head by default)")
    m.add_argument("--revision", default="head")
    m.add_argument("--downgrade", metavar="REV", help="downgrade to REV instead")
    m.set_defaults(func=cmd_migrate)

    keys = sub.add_parser(
        "keys", help="API keys (operator: talks to the database directly)"
    ).add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("create", help="create a key; prints it once, as the last line")
    k.add_argument("--owner", required=True, help="the tenant the key acts for")
    k.add_argument("--name", help="a label to tell keys apart")
    k.set_defaults(func=cmd_keys_create)
    k = keys.add_parser("list", help="list keys (never the keys themselves)")
    k.add_argument("--owner", help="only this owner's keys")
    k.set_defaults(func=cmd_keys_list)
    k = keys.add_parser("revoke", help="revoke a key: requests with it get 401 at once")
    k.add_argument("key_id")
    k.set_defaults(func=cmd_keys_revoke)

    models = sub.add_parser("models", help="base models").add_subparsers(
        dest="models_command", required=True
    )
    t = models.add_parser("create-tiny", help="build a tiny random Llama-style model locally")
    t.add_argument("name")
    t.add_argument("--size", default="tiny", choices=["tiny", "1m", "30m"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true")
    t.set_defaults(func=cmd_create_tiny)
    models.add_parser("list", help="list models (client)").set_defaults(func=cmd_models_list)

    files = sub.add_parser("files", help="dataset files (client)").add_subparsers(
        dest="files_command", required=True
    )
    u = files.add_parser("upload")
    u.add_argument("path")
    u.add_argument("--purpose", default="fine-tune")
    u.set_defaults(func=cmd_files_upload)
    files.add_parser("list").set_defaults(func=cmd_files_list)

    jobs = sub.add_parser("jobs", help="fine-tuning jobs (client)").add_subparsers(
        dest="jobs_command", required=True
    )
    c = jobs.add_parser("create")
    c.add_argument("--model", required=True)
    c.add_argument("--training-file", required=True)
    c.add_argument("--validation-file")
    c.add_argument("--suffix")
    c.add_argument("--seed", type=int)
    c.add_argument("--n-epochs", type=int)
    c.add_argument("--batch-size", type=int)
    c.add_argument("--learning-rate-multiplier", type=float)
    c.add_argument("--adapter", default="lora", choices=["lora", "full"])
    c.set_defaults(func=cmd_jobs_create)
    jobs.add_parser("list").set_defaults(func=cmd_jobs_list)
    for name, func in (
        ("get", cmd_jobs_get),
        ("cancel", cmd_jobs_cancel),
        ("follow", cmd_jobs_follow),
    ):
        j = jobs.add_parser(name)
        j.add_argument("job_id")
        j.set_defaults(func=func)
    e = jobs.add_parser("events")
    e.add_argument("job_id")
    e.add_argument("--limit", type=int, default=50)
    e.set_defaults(func=cmd_jobs_events)
    a = jobs.add_parser("adapter", help="download and unpack a job's adapter")
    a.add_argument("job_id")
    a.add_argument("--out", required=True)
    a.set_defaults(func=cmd_jobs_adapter)

    d = sub.add_parser("demo", help="run a real LoRA fine-tune end to end on the embedded default")
    d.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    d.add_argument("--model", default="tiny-chat")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from alignd.client import APIRequestError
        from api.errors import APIError

        if isinstance(exc, APIRequestError):
            print(f"error: {exc}", file=sys.stderr)
            if exc.status == 401:
                print(
                    "hint: set ALIGND_API_KEY (`alignd keys create --owner NAME` makes one); "
                    "the embedded `alignd serve` writes one to <data dir>/api_key",
                    file=sys.stderr,
                )
            return 1
        if isinstance(exc, APIError):
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
        raise
