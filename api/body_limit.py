"""A cap on request bodies that are not file uploads (``ALIGND_MAX_JSON_BODY_BYTES``).

Every JSON body is parsed whole into memory, then stored and echoed: without a cap a 30 MB
job body was parsed and an 8 MB ``integrations`` value stored (issue 13). The two file-upload
routes are exempt (``POST /v1/files`` and ``POST /v1/uploads/{id}/parts``): Starlette streams
their multipart bodies to disk, and they keep their own limits (``ALIGND_MAX_UPLOAD_BYTES``,
64 MB a part). The exemption is by route, not by content type: a JSON route reads any body
whole, so a multipart body sent to one is capped like any other.

A declared ``Content-Length`` over the cap is refused before a byte is read; a chunked body
is counted as it arrives and refused the moment it passes the cap. Either way the answer is a
413 in the error shape, ``code: "request_too_large"``.
"""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError
from api.keys import send_error


class BodyTooLarge(HTTPException):
    """Raised from ``receive``: FastAPI re-raises an HTTPException met while it reads the
    body (any other exception becomes a 400), and ``api.errors`` renders it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=too_large_message(limit))


def too_large_message(limit: int) -> str:
    return (
        f"The request body is larger than this server accepts ({limit} bytes; "
        "ALIGND_MAX_JSON_BODY_BYTES). Upload large data as a file."
    )


UPLOAD_ROUTES = (re.compile(r"^/v1/files/?$"), re.compile(r"^/v1/uploads/[^/]+/parts/?$"))


def _is_upload(scope: Scope) -> bool:
    return scope["method"] == "POST" and any(route.match(scope["path"]) for route in UPLOAD_ROUTES)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_upload(scope):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await send_error(send, _error(limit))
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            # Met outside FastAPI's body reading (idempotency spools a replayed body itself).
            if started:
                raise
            await send_error(send, _error(limit))


def _error(limit: int) -> APIError:
    return APIError(413, too_large_message(limit), code="request_too_large")
