"""The artifact store in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2, ...), with boto3.

- ``put_file`` computes the file's sha256 here and stores it as the object's metadata, so that
  the API's ETag costs one HEAD, not a read of the whole adapter. The upload is boto3's managed
  transfer: multipart above ``s3_multipart_bytes``, parts in parallel. S3 makes an object
  visible only once its upload completed, and the transfer manager aborts a multipart upload
  that failed, so nobody ever reads half an artifact.
- A transient failure (connection refused or reset, a timeout, a 5xx, throttling) is retried:
  botocore retries each request (its "standard" mode), and tenacity retries the whole transfer
  with backoff for up to ``s3_retry_s``; anything else (no such bucket, access denied) fails at
  once. Either way the caller gets an ``ArtifactStoreError`` that says what and where.
- ``read`` streams one ``get_object`` with an HTTP Range in 1 MiB chunks: a download through
  the API holds one chunk of the adapter in memory at a time.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import botocore.exceptions
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from api.artifacts import CHUNK, ArtifactInfo, ArtifactStoreError, file_sha256

if TYPE_CHECKING:
    from api.settings import Settings

log = logging.getLogger("alignd.artifacts")
T = TypeVar("T")
SHA256_METADATA = "sha256"  # sent as the x-amz-meta-sha256 header
# S3's own "not there" codes: HEAD answers a bare 404, GET names it.
_MISSING = {"404", "NoSuchKey", "NotFound"}
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError"}


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def transient(exc: BaseException) -> bool:
    """Worth trying again: the server or the network failed, not the request."""
    # boto3's upload_file raises S3UploadFailedError while handling the ClientError of a
    # failed part (the ClientError is its context, not its cause).
    if isinstance(exc, S3UploadFailedError):
        inner = exc.__cause__ or exc.__context__
        return inner is not None and transient(inner)
    if isinstance(
        exc, (botocore.exceptions.HTTPClientError, botocore.exceptions.EndpointConnectionError)
    ):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or _error_code(exc) in _THROTTLED
    return False


def missing(exc: BaseException) -> bool:
    return _error_code(exc) in _MISSING


class S3ArtifactStore:
    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str,
        *,
        multipart_bytes: int = 64 * 1024 * 1024,
        retry_s: float = 60.0,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.retry_s = retry_s
        self.transfer = TransferConfig(
            multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, bucket: str, prefix: str) -> S3ArtifactStore:
        secret = settings.s3_secret_access_key
        # Without explicit keys boto3 finds them as every AWS tool does: AWS_ACCESS_KEY_ID /
        # AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, ~/.aws, an instance role.
        session = boto3.session.Session(
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            region_name=settings.s3_region,
        )
        config = Config(
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=60,
            # A custom endpoint (MinIO, Ceph) is one host: the bucket goes in the path.
            s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
        )
        client = session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
        store = cls(
            client,
            bucket,
            prefix,
            multipart_bytes=settings.s3_multipart_bytes,
            retry_s=settings.s3_retry_s,
        )
        if settings.s3_create_bucket:
            store.ensure_bucket()
        return store

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"artifact key escapes the store: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        retrying = Retrying(
            retry=retry_if_exception(transient),
            stop=stop_after_delay(self.retry_s),
            wait=wait_exponential(multiplier=0.2, max=5),
            before_sleep=lambda state: log.warning(
                "%s: %s; trying again", what, state.outcome.exception() if state.outcome else "?"
            ),
            reraise=True,
        )
        try:
            return retrying(call)
        except Exception as exc:
            if missing(exc):
                raise FileNotFoundError(f"{what}: no such artifact") from exc
            # boto3's, botocore's and the transfer manager's own errors; ours pass as they are.
            if type(exc).__module__.split(".")[0] in ("boto3", "botocore", "s3transfer"):
                raise ArtifactStoreError(f"{what} failed: {exc}") from exc
            raise

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (``ALIGND_S3_CREATE_BUCKET``: compose's MinIO)."""

        def create() -> None:
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except botocore.exceptions.ClientError as exc:
                if not missing(exc) and _error_code(exc) != "NoSuchBucket":
                    raise
            region = self.client.meta.region_name
            extra = (
                {"CreateBucketConfiguration": {"LocationConstraint": region}}
                if region and region != "us-east-1"
                else {}
            )
            try:
                self.client.create_bucket(Bucket=self.bucket, **extra)
            except botocore.exceptions.ClientError as exc:
                # The API and the workers start together; one of them creates it.
                if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
            log.info("created bucket %s", self.bucket)

        self._retrying(f"creating bucket {self.bucket}", create)

    def put_file(self, key: str, source: Path) -> None:
        full = self._key(key)
        digest = file_sha256(source)
        self._retrying(
            f"storing {key} in {self.url}",
            lambda: self.client.upload_file(
                str(source),
                self.bucket,
                full,
                ExtraArgs={"Metadata": {SHA256_METADATA: digest}},
                Config=self.transfer,
            ),
        )

    def stat(self, key: str) -> ArtifactInfo | None:
        full = self._key(key)
        try:
            head = self._retrying(
                f"looking up {key} in {self.url}",
                lambda: self.client.head_object(Bucket=self.bucket, Key=full),
            )
        except FileNotFoundError:
            return None
        digest = head.get("Metadata", {}).get(SHA256_METADATA)
        if not digest:  # an object we did not write: hash it once per request (rare)
            digest = self._hash(key, int(head["ContentLength"]))
        return ArtifactInfo(size=int(head["ContentLength"]), sha256=str(digest))

    def _hash(self, key: str, size: int) -> str:
        digest = hashlib.sha256()
        for chunk in self.read(key, 0, size - 1) if size else ():
            digest.update(chunk)
        return digest.hexdigest()

    def read(self, key: str, start: int, end: int) -> Iterator[bytes]:
        full = self._key(key)
        response = self._retrying(
            f"reading {key} from {self.url}",
            lambda: self.client.get_object(
                Bucket=self.bucket, Key=full, Range=f"bytes={start}-{end}"
            ),
        )
        body = response["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def get_file(self, key: str, dest: Path) -> None:
        full = self._key(key)
        started = time.monotonic()
        # The transfer manager writes a temporary file beside dest and renames it when done.
        self._retrying(
            f"fetching {key} from {self.url}",
            lambda: self.client.download_file(self.bucket, full, str(dest), Config=self.transfer),
        )
        log.info("fetched %s (%.1f s)", key, time.monotonic() - started)

    def delete_prefix(self, prefix: str) -> None:
        full = self._key(prefix)

        def delete() -> None:
            keys = [{"Key": full}]
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{full}/"
            )
            for page in pages:
                keys += [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys at most
                self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": keys[start : start + 1000], "Quiet": True},
                )

        self._retrying(f"deleting {prefix} from {self.url}", delete)
