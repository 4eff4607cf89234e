"""Where checkpoints and adapters live: a folder (shared volume) behind a small Protocol.

Writes are atomic: a file is copied under a temporary name inside the store and renamed into
place, so a reader never sees half an artifact, and a crash leaves only a temp file behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Protocol


class ArtifactStore(Protocol):
    def put_file(self, key: str, source: Path) -> None: ...

    def open(self, key: str) -> BinaryIO: ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def get_file(self, key: str, dest: Path) -> None: ...

    def sha256(self, key: str) -> str: ...

    def delete_prefix(self, prefix: str) -> None: ...


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
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = self.root / ".tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
        shutil.copyfile(source, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get_file(self, key: str, dest: Path) -> None:
        shutil.copyfile(self._path(key), dest)

    def sha256(self, key: str) -> str:
        """The artifact's sha256, computed once and kept beside it (artifacts never change)."""
        path = self._path(key)
        sidecar = path.with_name(path.name + ".sha256")
        if sidecar.is_file() and sidecar.stat().st_mtime >= path.stat().st_mtime:
            return sidecar.read_text().strip()
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1024 * 1024):
                digest.update(chunk)
        tmp = sidecar.with_name(f"{sidecar.name}.{uuid.uuid4().hex}.part")
        tmp.write_text(digest.hexdigest())
        os.replace(tmp, sidecar)
        return digest.hexdigest()

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def artifact_store(root: Path) -> ArtifactStore:
    return LocalArtifactStore(root)
