"""``Idempotency-Key`` on POSTs: a retried request gets the stored response instead of running
again.

The key is scoped to the owner. Its first request inserts an "in progress" row (the primary
key is owner + key, so of two concurrent duplicates exactly one inserts), runs, and on a 2xx
stores the status and body; any other outcome deletes the row, so the request may be retried
with the same key. A later request with the same key and the same method, path and body, within
24 h, gets the stored response with ``idempotent-replayed: true``; with another path or body it
gets 400 ``idempotency_key_reused``. A duplicate that arrives while the first still runs waits
up to ``WAIT_S`` for it, then gets 400 ``idempotency_key_in_use``.

The body is hashed as it streams through (an upload is never held in memory); for multipart
bodies the boundary is hashed as a constant, because a client draws a new random boundary on
every attempt (httpx, and so the openai SDK, do). A middleware rather than a dependency: it
must see the raw body and the response, for JSON and multipart alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import tempfile
from dataclasses import dataclass
from typing import IO, Any

import anyio
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError
from api.keys import Principal, is_api_path, send_error
from api.models import IdempotencyRecord, now

log = logging.getLogger("alignd.api")

TTL_S = 24 * 3600
# How long a duplicate waits for the first request with its key to finish.
WAIT_S = 10.0
POLL_S = 0.05
# An "in progress" row older than this was left by a process that died mid-request.
ABANDONED_S = 3600
MAX_KEY_LENGTH = 255
PURGE_EVERY_S = 600
_SPOOL_MEMORY = 1024 * 1024
_REPLAY_CHUNK = 64 * 1024
_MAX_REQUEST = 2048  # the column's length
_BOUNDARY = re.compile(r"""boundary=(?:"([^"]+)"|([^\s;]+))""", re.IGNORECASE)


class BodyHasher:
    """SHA-256 of a request's media type and body, with a multipart boundary made constant."""

    PLACEHOLDER = b"--<boundary>"

    def __init__(self, content_type: str | None) -> None:
        self._sha = hashlib.sha256()
        media_type = (content_type or "").split(";", 1)[0].strip().lower()
        self._sha.update(media_type.encode("latin-1") + b"\n")
        match = (
            _BOUNDARY.search(content_type or "") if media_type.startswith("multipart/") else None
        )
        boundary = (match.group(1) or match.group(2)) if match else None
        self._delimiter = b"--" + boundary.encode("latin-1") if boundary else None
        self._carry = b""

    def update(self, chunk: bytes) -> None:
        if self._delimiter is None:
            self._sha.update(chunk)
            return
        data = self._carry + chunk
        delimiter, start = self._delimiter, 0
        while (found := data.find(delimiter, start)) >= 0:
            self._sha.update(data[start:found])
            self._sha.update(self.PLACEHOLDER)
            start = found + len(delimiter)
        rest = data[start:]
        # A delimiter may begin in the last len-1 bytes and end in the next chunk: hold them.
        keep = len(delimiter) - 1
        if len(rest) > keep:
            self._sha.update(rest[: len(rest) - keep])
            rest = rest[len(rest) - keep :]
        self._carry = rest

    def hexdigest(self) -> str:
        self._sha.update(self._carry)
        self._carry = b""
        return self._sha.hexdigest()


@dataclass(frozen=True)
class Stored:
    request: str
    body_sha256: str | None
    status_code: int | None
    content_type: str | None
    response_body: bytes | None


def _expired(current: int) -> Any:
    return or_(
        IdempotencyRecord.created_at < current - TTL_S,
        and_(
            IdempotencyRecord.status_code.is_(None),
            IdempotencyRecord.created_at < current - ABANDONED_S,
        ),
    )


def claim(
    sessions: sessionmaker[Session], owner: str, key: str, request: str
) -> tuple[bool, Stored | None]:
    """Insert the in-progress row. (True, None): this request owns the key. (False, stored):
    another request has it. (False, None): it had it and let it go; try again."""
    current = now()
    with sessions() as session:
        try:
            with session.begin():
                session.execute(
                    delete(IdempotencyRecord).where(
                        IdempotencyRecord.owner == owner,
                        IdempotencyRecord.idempotency_key == key,
                        _expired(current),
                    )
                )
                session.add(
                    IdempotencyRecord(
                        owner=owner, idempotency_key=key, request=request, created_at=current
                    )
                )
            return True, None
        except IntegrityError:
            pass
    with sessions() as session:
        row = session.scalar(
            select(IdempotencyRecord).where(
                IdempotencyRecord.owner == owner, IdempotencyRecord.idempotency_key == key
            )
        )
        if row is None:
            return False, None
        return False, Stored(
            request=row.request,
            body_sha256=row.body_sha256,
            status_code=row.status_code,
            content_type=row.content_type,
            response_body=row.response_body,
        )


def complete(
    sessions: sessionmaker[Session],
    owner: str,
    key: str,
    *,
    body_sha256: str,
    status_code: int,
    content_type: str | None,
    response_body: bytes,
) -> None:
    with sessions() as session, session.begin():
        session.execute(
            update(IdempotencyRecord)
            .where(
                IdempotencyRecord.owner == owner,
                IdempotencyRecord.idempotency_key == key,
                IdempotencyRecord.status_code.is_(None),
            )
            .values(
                body_sha256=body_sha256,
                status_code=status_code,
                content_type=content_type,
                response_body=response_body,
            )
        )


def release(sessions: sessionmaker[Session], owner: str, key: str) -> None:
    with sessions() as session, session.begin():
        session.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.owner == owner,
                IdempotencyRecord.idempotency_key == key,
                IdempotencyRecord.status_code.is_(None),
            )
        )


def purge(sessions: sessionmaker[Session]) -> int:
    """Delete every expired or abandoned row; returns how many."""
    with sessions() as session, session.begin():
        result = session.execute(delete(IdempotencyRecord).where(_expired(now())))
        return int(result.rowcount)  # type: ignore[attr-defined]


class SpooledBody:
    """A request body read whole (memory up to 1 MiB, then a temp file), hashed, replayable."""

    def __init__(self, file: IO[bytes], size: int, digest: str, receive: Receive) -> None:
        self.file = file
        self.size = size
        self.digest = digest
        self._receive = receive
        self._done = False

    @classmethod
    async def read(cls, receive: Receive, content_type: str | None) -> SpooledBody | None:
        """None when the client went away before sending its whole body."""
        hasher = BodyHasher(content_type)
        file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY)  # noqa: SIM115
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                file.close()
                return None
            chunk = message.get("body", b"")
            hasher.update(chunk)
            file.write(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                break
        file.seek(0)
        return cls(file, size, hasher.hexdigest(), receive)

    async def receive(self) -> Message:
        if self._done:
            return await self._receive()  # the body is over: what follows is the disconnect
        chunk = self.file.read(_REPLAY_CHUNK)
        more = self.file.tell() < self.size
        self._done = not more
        return {"type": "http.request", "body": chunk, "more_body": more}

    def close(self) -> None:
        self.file.close()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _invalid(message: str, code: str) -> APIError:
    return APIError(400, message, param="Idempotency-Key", code=code)


def _in_use() -> APIError:
    return _invalid(
        "A request with this Idempotency-Key is still in progress; retry after it has finished.",
        "idempotency_key_in_use",
    )


class IdempotencyMiddleware:
    """Runs inside ``api.keys.AuthMiddleware``, which leaves the principal in the scope."""

    def __init__(self, app: ASGIApp, sessions: sessionmaker[Session]) -> None:
        self.app = app
        self.sessions = sessions
        self._last_purge = float("-inf")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = None
        if scope["type"] == "http" and scope["method"] == "POST" and is_api_path(scope["path"]):
            key = _header(scope, b"idempotency-key")
        principal = scope.get("state", {}).get("principal")
        if key is None or not isinstance(principal, Principal):
            await self.app(scope, receive, send)
            return
        key = key.strip()
        if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
            await send_error(
                send,
                _invalid(
                    f"An Idempotency-Key is 1-{MAX_KEY_LENGTH} printable characters.",
                    "invalid_idempotency_key",
                ),
            )
            return
        await self._maybe_purge()
        query = scope.get("query_string", b"").decode("latin-1")
        request = f"POST {scope['path']}" + (f"?{query}" if query else "")
        if len(request) > _MAX_REQUEST:  # kept whole in the row: shorten it, keep it exact
            digest = hashlib.sha256(request.encode()).hexdigest()
            request = f"{request[: _MAX_REQUEST - 80]}...sha256:{digest}"
        content_type = _header(scope, b"content-type")
        owner = principal.owner

        spool: SpooledBody | None = None
        try:
            deadline = anyio.current_time() + WAIT_S
            while True:
                claimed, stored = await run_in_threadpool(claim, self.sessions, owner, key, request)
                if claimed:
                    break
                if stored is None and anyio.current_time() <= deadline:
                    continue  # the first request failed and let the key go: take it
                if stored is None:
                    await send_error(send, _in_use())
                    return
                if stored.request != request:
                    await send_error(
                        send,
                        _invalid(
                            f"This Idempotency-Key was first used for {stored.request}; use a "
                            "new key for a new request.",
                            "idempotency_key_reused",
                        ),
                    )
                    return
                if spool is None:
                    spool = await SpooledBody.read(receive, content_type)
                    if spool is None:
                        return  # the client is gone
                if stored.body_sha256 is not None and stored.body_sha256 != spool.digest:
                    await send_error(
                        send,
                        _invalid(
                            "This Idempotency-Key was already used with a different request "
                            "body; use a new key for a new request.",
                            "idempotency_key_reused",
                        ),
                    )
                    return
                if stored.status_code is not None:
                    await self._replay(send, stored)
                    return
                if anyio.current_time() > deadline:
                    await send_error(send, _in_use())
                    return
                await asyncio.sleep(POLL_S)
            await self._run(scope, receive, send, owner, key, content_type, spool)
        finally:
            if spool is not None:
                spool.close()

    async def _run(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        owner: str,
        key: str,
        content_type: str | None,
        spool: SpooledBody | None,
    ) -> None:
        hasher = BodyHasher(content_type)
        body_done = spool is not None

        async def hashing_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.request" and not body_done:
                hasher.update(message.get("body", b""))
                body_done = not message.get("more_body", False)
            return message

        messages: list[Message] = []

        async def buffering_send(message: Message) -> None:
            messages.append(message)

        try:
            await self.app(
                scope, spool.receive if spool is not None else hashing_receive, buffering_send
            )
            # A route that ignores its body (cancel) has not read it; hash what is left.
            while not body_done:
                if (await hashing_receive())["type"] == "http.disconnect":
                    break
        except BaseException:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(release, self.sessions, owner, key)
            raise
        start = next((m for m in messages if m["type"] == "http.response.start"), None)
        status = int(start["status"]) if start is not None else 500
        with anyio.CancelScope(shield=True):
            try:
                if 200 <= status < 300 and body_done and start is not None:
                    await run_in_threadpool(
                        complete,
                        self.sessions,
                        owner,
                        key,
                        body_sha256=spool.digest if spool is not None else hasher.hexdigest(),
                        status_code=status,
                        content_type=_response_header(start, b"content-type"),
                        response_body=b"".join(
                            m.get("body", b"")
                            for m in messages
                            if m["type"] == "http.response.body"
                        ),
                    )
                else:
                    await run_in_threadpool(release, self.sessions, owner, key)
            except Exception:
                log.exception("could not record Idempotency-Key %r of %s", key, owner)
                await run_in_threadpool(release, self.sessions, owner, key)
        for message in messages:
            await send(message)

    async def _replay(self, send: Send, stored: Stored) -> None:
        body = stored.response_body or b""
        headers = [
            (b"content-length", str(len(body)).encode()),
            (b"idempotent-replayed", b"true"),
        ]
        if stored.content_type:
            headers.insert(0, (b"content-type", stored.content_type.encode("latin-1")))
        await send(
            {"type": "http.response.start", "status": stored.status_code, "headers": headers}
        )
        await send({"type": "http.response.body", "body": body})

    async def _maybe_purge(self) -> None:
        current = anyio.current_time()
        if current - self._last_purge < PURGE_EVERY_S:
            return
        self._last_purge = current
        try:
            await run_in_threadpool(purge, self.sessions)
        except Exception:
            log.exception("could not purge expired idempotency keys")


def _response_header(start: Message, name: bytes) -> str | None:
    for key, value in start.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None
