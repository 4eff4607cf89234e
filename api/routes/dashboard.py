"""The web dashboard: ``/`` and its static assets under ``/dashboard/``.

The assets are plain files in the package (``api/dashboard/``: ES modules, CSS and the vendored
uPlot), so an installed wheel serves them and nothing is fetched at run time. The page itself
holds no data and needs no key: it signs in with an API key and talks to ``/v1`` like any
other client (docs/api.md, "Dashboard").
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.errors import APIError

router = APIRouter(include_in_schema=False)

ROOT = (Path(__file__).resolve().parent.parent / "dashboard").resolve()
# Everything the page loads comes from this origin; no inline script or style, no framing.
# blob: images for charts exported by the browser; connect-src falls back to 'self'.
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate (FileResponse sends an ETag): an upgraded server is seen at the next load.
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


def asset(path: Path) -> FileResponse:
    return FileResponse(
        path,
        media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
        headers=HEADERS,
    )


@router.get("/")
def index() -> FileResponse:
    return asset(ROOT / "index.html")


@router.get("/dashboard/{name:path}")
def dashboard_asset(name: str) -> FileResponse:
    path = (ROOT / name).resolve()
    # resolve() folds any '..': a path that leaves the folder is simply not found.
    if not path.is_relative_to(ROOT) or not path.is_file() or path.suffix not in MEDIA_TYPES:
        raise APIError(404, f"No dashboard asset '{name}'.", code="not_found")
    return asset(path)
