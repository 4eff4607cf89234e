"""Where checkpoints and adapters live: a folder (shared volume) or an S3-compatible bucket
(api/s3.py), behind a small Protocol.

Writes are atomic in both: here a file is copied under a temporary name inside the store and
renamed into place; in S3 an object (multipart or not) exists only once its upload completed.
A reader never sees half an artifact, and a crash leaves only a temp file (or an aborted
upload) behind. Callers record an artifact in the database only after ``put_file`` returned.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from api.settings import Settings

CHUNK = 1024 * 1024


class ArtifactStoreError(RuntimeError):
    """The store could not write or read an artifact (after its retries): a job that meets
    it fails with code ``artifact_store_error`` and this message."""


@dataclass(frozen=True)
class ArtifactInfo:
    size: int
    sha256: str  # of the artifact's bytes: the download's ETag


class ArtifactStore(Protocol):
    def put_file(self, key: str, source: Path) -> None: ...

    def stat(self, key: str) -> ArtifactInfo | None: ...

    def read(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start`` to ``end`` (inclusive) in chunks, never the whole artifact at once."""
        ...

    def get_file(self, key: str, dest: Path) -> None: ...

    def delete_prefix(self, prefix: str) -> None: ...


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class LocalArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        # Keys come from our own code, but a key must never name a file outside the store.
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"artifact key escapes the store: {key!r}")
        return path

    def put_file(self, key: str, source: Path) -> None:
        dest = self._path(key)
        tmp_dir = self.root / ".tmp"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp_dir.mkdir(parents=True, exist_ok=True)
            tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
            shutil.copyfile(source, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            raise ArtifactStoreError(f"could not store {key} in {self.root}: {exc}") from exc

    def stat(self, key: str) -> ArtifactInfo | None:
        path = self._path(key)
        if not path.is_file():
            return None
        return ArtifactInfo(size=path.stat().st_size, sha256=self._sha256(path))

    def read(self, key: str, start: int, end: int) -> Iterator[bytes]:
        with open(self._path(key), "rb") as fh:
            fh.seek(start)
            left = end - start + 1
            while left > 0 and (chunk := fh.read(min(CHUNK, left))):
                left -= len(chunk)
                yield chunk

    def get_file(self, key: str, dest: Path) -> None:
        shutil.copyfile(self._path(key), dest)

    @staticmethod
    def _sha256(path: Path) -> str:
        """The artifact's sha256, computed once and kept beside it (artifacts never change)."""
        sidecar = path.with_name(path.name + ".sha256")
        if sidecar.is_file() and sidecar.stat().st_mtime >= path.stat().st_mtime:
            return sidecar.read_text().strip()
        digest = file_sha256(path)
        tmp = sidecar.with_name(f"{sidecar.name}.{uuid.uuid4().hex}.part")
        tmp.write_text(digest)
        os.replace(tmp, sidecar)
        return digest

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def artifact_store(settings: Settings) -> ArtifactStore:
    """The store ``ALIGND_ARTIFACTS_URL`` names: a folder, or ``s3://bucket/prefix``."""
    s3 = settings.artifacts_s3
    if s3 is None:
        return LocalArtifactStore(settings.artifacts_root)
    from api.s3 import S3ArtifactStore  # boto3 only where S3 is configured

    return S3ArtifactStore.from_settings(settings, bucket=s3[0], prefix=s3[1])
