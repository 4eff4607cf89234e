"""Service settings, read from ``ALIGND_*`` environment variables.

The defaults are the embedded single-machine setup: SQLite and a filesystem broker under the
data dir, artifacts in a folder. Setting ``ALIGND_DATABASE_URL`` and ``ALIGND_BROKER_URL`` runs
the same code distributed.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from trainer_core import outbound

LOCAL_OWNER = "local"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGND_", extra="ignore")

    data_dir: Path = Field(Path("./var"), description="Root of everything the service writes.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default SQLite in data_dir."
    )
    broker_url: str | None = Field(
        None, description="Celery broker; default filesystem in data_dir."
    )
    artifacts_url: str | None = Field(
        None, description="Folder path, file:// URL, or s3://bucket/prefix for artifacts."
    )
    models_dir: Path | None = Field(None, description="Base models, one folder each.")

    host: str = "127.0.0.1"
    port: int = 8000
    # API processes `alignd serve` runs on that port (uvicorn's workers). Each has its own
    # pool, threads, admission limit and rate-limit buckets.
    api_workers: int = Field(1, ge=1, le=64)

    # Operator-only switches: a request can never turn these on.
    allow_hub: bool = False
    trust_remote_code: bool = False

    # Celery queue the API sends jobs to and the worker listens on.
    default_queue: str = "default"
    # Redis re-delivers an unacked message after this long. Recovery never waits for it (the
    # sweep below re-sends lost jobs within a minute); a re-delivery is a duplicate the claim
    # refuses. It must exceed slot_retry_s (a countdown message is held unacked until due), and
    # longer than most jobs keeps those duplicates rare (docs/operations.md, "Jobs survive
    # faults").
    broker_visibility_timeout_s: int = Field(12 * 3600, gt=0)
    # The filesystem broker polls its folder; 1 s (kombu's default) adds a second to every hand-off.
    broker_polling_interval_s: float = 0.05
    # Jobs survive faults (docs/operations.md). The process training a job beats every
    # heartbeat_s; a running job whose beat is older than stale_heartbeat_s has lost its
    # worker, and a queued one not handed to the broker (nor seen by a worker) for that long
    # has lost its message. Every worker sweeps for both every sweep_interval_s (times a
    # random 0.75-1.25, so that workers do not sweep in step). A lost job is queued again
    # to resume from its last checkpoint, until max_attempts workers have started it; then
    # it fails with worker_lost. The worker's writes (metrics, events, heartbeats) retry for
    # db_retry_s, then the training process stops itself: that must happen before anyone may
    # resume the job, hence db_retry_s + heartbeat_s < stale_heartbeat_s.
    heartbeat_s: float = Field(5.0, gt=0)
    stale_heartbeat_s: float = Field(60.0, gt=0)
    sweep_interval_s: float = Field(15.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    db_retry_s: float = Field(30.0, gt=0)

    # Worker registry (the ``workers`` table). A worker counts as known to the API (its
    # capabilities are checked at job creation, its queues count as served) while its row was
    # refreshed within this many seconds; each worker refreshes its row every
    # ``worker_registry_refresh_s``.
    worker_registry_ttl_s: float = Field(86_400.0, gt=0)
    worker_registry_refresh_s: float = Field(30.0, gt=0)
    # The devices this worker hands out as slots, comma-separated ids ("0,1,2,3"), and their
    # kind ("cuda" or "cpu"). `alignd worker` sets both (from --gpus, or what it detects) for
    # its pool's processes; None: detect.
    worker_devices: str | None = None
    worker_device_kind: Literal["cuda", "cpu"] | None = None
    # The worker's Prometheus port (worker/metrics.py); 0 = off, since the default would
    # collide between two workers on one host. One port per `alignd worker` process.
    worker_metrics_port: int = Field(0, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    # A job that finds too few free slots on its worker is sent back to its queue after this
    # many seconds (the pool process never waits for slots).
    slot_retry_s: float = Field(5.0, ge=0)

    # Throughput assumed by POST /v1/fine_tuning/jobs/estimate until this server has finished
    # a job on the same model (then the measured rate is used).
    estimate_tokens_per_s: float = 2000.0

    # Requests per minute per API key (a token bucket whose burst is the same number), counted
    # in each API process. 0 turns the limit off.
    rate_limit_per_minute: int = Field(600, ge=0)

    # Server-sent event streams (events, logs, metrics): how often a stream looks for new rows,
    # and how long it may stay silent before it sends a `: keep-alive` comment.
    sse_poll_s: float = Field(0.2, gt=0)
    sse_keepalive_s: float = Field(15.0, gt=0)
    # A job's captured log lines below this level are not kept; above job_log_max_lines a job
    # keeps its first lines and a note that the rest were dropped.
    job_log_level: str = "INFO"
    job_log_max_lines: int = Field(100_000, ge=1)

    # Webhooks. Hosts (host, host:port, or CIDR networks), comma-separated, that webhook URLs
    # may name even when they resolve to private, loopback or link-local addresses, which are
    # refused otherwise (no server-side request forgery into the private net). The rules are
    # trainer_core/outbound.py's, shared with http reward functions (docs/operations.md,
    # "Outbound requests").
    webhook_allowed_hosts: str = ""
    # False: only the hosts listed above may receive webhooks at all.
    webhook_allow_public_hosts: bool = True
    webhook_timeout_s: float = Field(10.0, gt=0)
    # Attempts per delivery; the waits between them are this base times 1, 5, 30, 120, 600
    # (1 s, 5 s, 30 s, 2 min, 10 min by default), the last one repeated if there are more.
    webhook_max_attempts: int = Field(6, ge=1)
    webhook_retry_base_s: float = Field(1.0, ge=0)
    # How often each worker's webhook dispatcher looks for due deliveries, and how many it
    # sends at once.
    webhook_poll_s: float = Field(0.5, gt=0)
    webhook_concurrency: int = Field(4, ge=1)

    # "http" reward functions (docs/methods.md, "Reward functions") may POST only to these
    # hosts: "host" (any port), "host:port" or a CIDR network, comma-separated in the
    # environment; no other host, public or not. Empty refuses every http reward function.
    # Same rules as webhooks (docs/operations.md, "Outbound requests"). The timeout is the
    # default and the maximum a function may ask for.
    reward_http_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    reward_http_timeout_s: float = Field(10.0, gt=0, le=600)

    # The database connection pool of each API process, and how many requests it serves at
    # once. A /v1 request holds at most one connection at a time, so the API admits at most
    # db_pool_size + db_max_overflow of them together (api/admission.py); the others wait for
    # a place up to api_queue_timeout_s and then get 503 with Retry-After, never a 30 s hang.
    # Postgres serves max_connections (100 by default) to every API process and worker.
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(10, ge=0)
    # In the API, a connection not free within this long is a 503 too (work outside the
    # admission limit: streams, health checks). Workers keep SQLAlchemy's 30 s.
    db_pool_timeout_s: float = Field(3.0, gt=0)
    api_queue_timeout_s: float = Field(3.0, gt=0)
    # How many /v1 requests but uploads one API process runs at once (at most the pool's
    # capacity). Their Python shares one GIL: past a few, more threads only queue for it, and
    # the event loop that reads and answers requests queues with them. The others wait in the
    # event loop, in arrival order. Measured (docs/benchmarks.md, "API under load"), 64
    # clients on 2 cores: 20 places gave p99 291 ms where 4 gave 133 (before the other
    # changes of that section); after them 1, 2 and 4 places were alike within the runs'
    # noise (p99 80-104 ms at ~1,050 req/s, 2 processes). 4: a slow request (a list of
    # 10,000 jobs) then takes a quarter of a process's reads, not all of them.
    api_concurrency: int = Field(4, ge=1)
    # Uploads (POST /v1/files, an Upload's parts and completion) take places of their own:
    # each holds one while its client sends the bytes, however slowly (api/admission.py).
    api_upload_concurrency: int = Field(2, ge=1)
    # A pooled connection idle this long is pinged before use; one in steady use is not
    # (api/db.py). 0 pings on every checkout.
    db_ping_idle_s: float = Field(1.0, ge=0)
    # API keys found valid are remembered this long in each API process, so that a request
    # costs no key lookup (api/key_cache.py). A revocation clears every process's memory at
    # once through a Postgres NOTIFY; this is the bound if that notice could not arrive.
    # 0: look every key up. SQLite (the embedded default) always looks up.
    api_key_cache_s: float = Field(10.0, ge=0)

    max_upload_bytes: int = 8 * 1024 * 1024 * 1024
    # Any request body but a file upload's (JSON above all) is refused with 413 past this
    # size: such bodies are read whole into memory (api/body_limit.py). A job body is a few
    # KB; 1 MiB leaves room for long grader prompts.
    max_json_body_bytes: int = Field(1024 * 1024, ge=1024)
    upload_chunk_bytes: int = 1024 * 1024
    torch_threads: int | None = None

    # The S3 artifact store (ALIGND_ARTIFACTS_URL=s3://bucket/prefix; docs/operations.md,
    # "Artifact store"). The endpoint names an S3-compatible server (MinIO, Ceph); unset is
    # AWS. Keys unset: boto3's own chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
    # AWS_SESSION_TOKEN, AWS_PROFILE, an instance role), which operators of AWS already use.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    # Create the bucket at start when it is missing (compose's fresh MinIO). Off by default:
    # in production a missing bucket is a misconfiguration to report, not to paper over.
    s3_create_bucket: bool = False
    # Objects above this size are uploaded in parts of this size (S3's minimum part is 5 MiB).
    s3_multipart_bytes: int = Field(64 * 1024 * 1024, ge=5 * 1024 * 1024)
    # How long a transfer that meets a transient failure (connection, 5xx, throttling) is
    # tried again before the job fails with artifact_store_error.
    s3_retry_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _stale_after_retries(self) -> Settings:
        if self.db_retry_s + self.heartbeat_s >= self.stale_heartbeat_s:
            raise ValueError(
                "ALIGND_STALE_HEARTBEAT_S must exceed ALIGND_DB_RETRY_S + ALIGND_HEARTBEAT_S: a "
                "worker that cannot reach the database must have stopped its job before "
                "another worker may resume it"
            )
        return self

    @field_validator("artifacts_url", mode="after")
    @classmethod
    def _artifacts_url(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("s3://") and not value[5:].split("/")[0]:
            raise ValueError("ALIGND_ARTIFACTS_URL: s3:// needs a bucket (s3://bucket/prefix)")
        return value

    @field_validator("webhook_allowed_hosts", mode="after")
    @classmethod
    def _allowed_hosts(cls, value: str) -> str:
        for entry in filter(None, (part.strip() for part in value.split(","))):
            outbound.parse_entry(entry)  # a malformed entry fails at start, not at a request
        return value

    @field_validator("reward_http_allowed_hosts", mode="before")
    @classmethod
    def _reward_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("reward_http_allowed_hosts", mode="after")
    @classmethod
    def _reward_hosts_parse(cls, value: list[str]) -> list[str]:
        for entry in value:
            outbound.parse_entry(entry)  # as above
        return value

    @field_validator("data_dir", "models_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @property
    def db_pool_capacity(self) -> int:
        """Connections one process's pool may open."""
        return self.db_pool_size + self.db_max_overflow

    @property
    def api_places(self) -> int:
        """The most /v1 requests but uploads one API process serves at once: each holds at
        most one connection at a time, so no more than the pool can open (api/admission.py)."""
        return min(self.api_concurrency, self.db_pool_capacity)

    @property
    def api_upload_places(self) -> int:
        """The most uploads one API process takes in at once (api/admission.py)."""
        return min(self.api_upload_concurrency, self.db_pool_capacity)

    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'alignd.db'}"

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None or self.broker_url.startswith("filesystem://")

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def artifacts_root(self) -> Path:
        url = self.artifacts_url
        if url is None:
            return self.data_dir / "artifacts"
        if url.startswith("s3://"):
            raise ValueError("ALIGND_ARTIFACTS_URL names S3, not a folder (see artifacts_s3)")
        return Path(url.removeprefix("file://")).expanduser().resolve()

    @property
    def artifacts_s3(self) -> tuple[str, str] | None:
        """(bucket, prefix) when ``ALIGND_ARTIFACTS_URL`` is ``s3://bucket/prefix``."""
        url = self.artifacts_url
        if url is None or not url.startswith("s3://"):
            return None
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return bucket, prefix.strip("/")

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"

    @property
    def embedded_database(self) -> bool:
        """No database configured: SQLite in the data dir, where `serve` makes the local key."""
        return self.database_url is None

    @property
    def api_key_file(self) -> Path:
        """The embedded default's key for owner ``local`` (mode 0600), read by the CLI."""
        return self.data_dir / "api_key"


def load_settings() -> Settings:
    return Settings()
