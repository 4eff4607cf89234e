"""Artifact downloads over HTTP: Content-Length, a sha256 ETag, Range and If-None-Match.

Adapters can be gigabytes (a full fine-tune of a real model), so a broken download must be
resumable (``Range: bytes=N-``) and a client must be able to check what it got (the ETag is
the tar's sha256). Only single ranges are served; a multi-range request gets the whole file,
which RFC 9110 allows.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from api.artifacts import ArtifactStore
from api.errors import APIError, not_found

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# What the ASCII fallback keeps; anything else (quotes, ';', '\\', controls) becomes '_'.
_UNSAFE_FALLBACK = re.compile(r"[^A-Za-z0-9 ._()+-]")


def content_disposition(filename: str) -> str:
    """``attachment`` naming ``filename`` twice, as RFC 6266 section 4.3 advises.

    ``filename*=UTF-8''...`` (RFC 5987/8187) carries the exact name, percent-encoded, so any
    character is safe in the header, and clients that read it (every current browser) get
    the name back whole. ``filename="..."`` is an ASCII fallback for those that do not:
    accents dropped (NFKD), every other character outside a safe ASCII set replaced by '_', so that no
    quote, ';', CR or LF can end the parameter or the header. A user-chosen name (uploads take
    any string) once broke out of the header, and a non-Latin-1 one made the download a 500.
    """
    decomposed = unicodedata.normalize("NFKD", filename)
    unaccented = "".join(char for char in decomposed if not unicodedata.combining(char))
    fallback = _UNSAFE_FALLBACK.sub("_", unaccented).strip(" .") or "download"
    # quote() with safe="" leaves only letters, digits and "_.-~": all RFC 5987 attr-chars.
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for a single satisfiable range; None for the whole file."""
    if not header or "," in header:
        return None
    match = _RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # a suffix: the last N bytes
        start, end = max(0, size - int(last)), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise APIError(
            416,
            f"Range not satisfiable for a file of {size} bytes.",
            param="range",
            code="range_not_satisfiable",
        )
    return start, end


def artifact_response(request: Request, store: ArtifactStore, key: str, filename: str) -> Response:
    info = store.stat(key)
    if info is None:
        raise not_found("artifact", key)
    size = info.size
    etag = f'"{info.sha256}"'
    headers = {
        "accept-ranges": "bytes",
        "etag": etag,
        "content-disposition": content_disposition(filename),
    }
    if request.headers.get("if-none-match") in (etag, "*"):
        return Response(status_code=304, headers=headers)
    span = _byte_range(request.headers.get("range"), size)
    start, end = span if span else (0, size - 1)
    headers["content-length"] = str(end - start + 1)
    if span:
        headers["content-range"] = f"bytes {start}-{end}/{size}"
    # The store streams the span (an S3 ranged GET, or a file read) in chunks.
    body: Iterator[bytes] = store.read(key, start, end) if size else iter(())
    return StreamingResponse(
        body, status_code=206 if span else 200, media_type="application/x-tar", headers=headers
    )
