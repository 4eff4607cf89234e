"""The compose file and Dockerfiles, checked by structure (no Docker engine runs here) and by
`docker compose config` / `docker-compose config` where a client is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from api.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_services_and_their_wiring() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "redis", "minio", "migrate", "api", "worker"}
    assert "healthcheck" in services["postgres"]
    assert services["migrate"]["command"] == ["alignd", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        assert (
            services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        )
        assert "artifacts:/var/lib/alignd" in services[name]["volumes"]
        env = services[name]["environment"]
        assert env["ALIGND_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["ALIGND_BROKER_URL"].startswith("redis://")
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_compose_stores_artifacts_in_its_minio() -> None:
    services = compose()["services"]
    minio = services["minio"]
    assert "healthcheck" in minio
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["ALIGND_ARTIFACTS_URL"].startswith("s3://")
        assert env["ALIGND_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["ALIGND_S3_CREATE_BUCKET"] == "true"  # a fresh MinIO has no bucket
        # The keys the app sends are MinIO's own.
        assert env["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"]
        assert services[name]["depends_on"]["minio"]["condition"] == "service_healthy"
        # What compose sets is what the app accepts.
        settings = Settings(
            **{
                k.removeprefix("ALIGND_").lower(): v
                for k, v in env.items()
                if k.startswith("ALIGND_")
            }
        )
        assert settings.artifacts_s3 == ("alignd", "artifacts")
        assert settings.s3_create_bucket is True


def test_api_image_has_no_torch_and_worker_image_has_cuda() -> None:
    api = (ROOT / "docker/api.Dockerfile").read_text()
    worker = (ROOT / "docker/worker.Dockerfile").read_text()
    installs = [line for line in api.splitlines() if "pip install" in line]
    assert installs == ["RUN pip install --no-cache-dir -c constraints.txt ."]  # no [train]
    assert "--no-worker" in api
    assert worker.startswith("# ") and "FROM nvidia/cuda" in worker
    assert 'CMD ["alignd", "worker"]' in worker
    assert "'.[train]'" in worker


def _compose_client() -> bool:
    """docker-compose v1, or docker with its compose plugin (a bare docker CLI has neither)."""
    if shutil.which("docker-compose"):
        return True
    if not shutil.which("docker"):
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _compose_client(), reason="no compose client")
def test_compose_config_validates() -> None:
    commands = [["docker", "compose", "config", "--quiet"], ["docker-compose", "config", "--quiet"]]
    results = [
        subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        for cmd in commands
        if shutil.which(cmd[0])
    ]
    assert any(r.returncode == 0 for r in results), [r.stderr for r in results]
