"""A small HTTP client for the CLI and the demo (users with code use the openai SDK)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

import httpx

DEFAULT_API_URL = "http://127.0.0.1:8000/v1"


class APIRequestError(RuntimeError):
    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message") or str(body)
        param = f" (param: {error['param']})" if error.get("param") else ""
        super().__init__(f"HTTP {status}: {message}{param}")
        self.status = status
        self.body = body


def default_api_key() -> str | None:
    """``ALIGND_API_KEY``, else the key the embedded `alignd serve` wrote to <data dir>/api_key."""
    key = os.environ.get("ALIGND_API_KEY", "").strip()
    if key:
        return key
    from api.keys import read_key_file
    from api.settings import load_settings

    return read_key_file(load_settings().api_key_file)


class Client:
    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60
    ) -> None:
        base = base_url or os.environ.get("ALIGND_API_URL", DEFAULT_API_URL)
        key = api_key or default_api_key()
        # Without a key the server answers 401, and the CLI says where a key comes from.
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=base.rstrip("/") + "/", headers=headers, timeout=timeout)

    def _json(self, response: httpx.Response) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise APIRequestError(response.status_code, body)
        return body

    def get(self, path: str, **params: Any) -> Any:
        return self._json(
            self.http.get(path, params={k: v for k, v in params.items() if v is not None})
        )

    def post(self, path: str, body: Any = None) -> Any:
        return self._json(self.http.post(path, json=body))

    def upload(self, path: Path, purpose: str = "fine-tune") -> Any:
        with open(path, "rb") as fh:
            return self._json(
                self.http.post("files", data={"purpose": purpose}, files={"file": (path.name, fh)})
            )

    def download_adapter(self, job_id: str, dest: Path) -> Path:
        """Download a job's adapter tar and unpack it into ``dest``; returns the folder."""
        dest.mkdir(parents=True, exist_ok=True)
        tar_path = dest.with_suffix(".tar")
        with self.http.stream("GET", f"fine_tuning/jobs/{job_id}/adapter") as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            with open(tar_path, "wb") as fh:
                for chunk in response.iter_bytes():
                    fh.write(chunk)
        with tarfile.open(tar_path) as tar:
            tar.extractall(dest, filter="data")  # never trust paths in an archive
        tar_path.unlink()
        return dest
