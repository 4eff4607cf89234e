"""API keys: creation, lookup, revocation, the embedded default's local key, and the
middleware that puts bearer auth and the per-key rate limit in front of every ``/v1`` route.

A key is ``sk-alignd-`` and 43 characters of ``secrets.token_urlsafe(32)`` (256 random bits).
Only its SHA-256 is stored: a fast hash is right for a long random secret (there is nothing to
brute-force, unlike a password), and it lets a request be resolved with one indexed lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError, database_unavailable, invalid, retry_after
from api.key_cache import CHANNEL, KeyCache
from api.models import ApiKey, new_id, now
from api.rate_limit import RateLimiter
from api.settings import LOCAL_OWNER, Settings

KEY_PREFIX = "sk-alignd-"
# last_used_at is written at most this often per key, so a busy key costs no write per request.
LAST_USED_GRANULARITY_S = 60
# Owners appear in fine-tuned model names ("ft:<base>:<owner>:<suffix>:<job>"), split on ':'.
OWNER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BEARER = re.compile(r"^Bearer[ \t]+(\S+)[ \t]*$", re.IGNORECASE)


@dataclass(frozen=True)
class Principal:
    """Who a request is: the key it came with and the owner (tenant) that key belongs to."""

    key_id: str
    owner: str


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_owner(owner: str) -> str:
    if not OWNER_NAME.match(owner):
        raise invalid(
            "An owner is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
            param="owner",
        )
    return owner


def create_key(session: Session, owner: str, name: str | None = None) -> tuple[ApiKey, str]:
    """Store a new key for ``owner``; returns the row and the key, which exists nowhere else."""
    key = generate_key()
    row = ApiKey(
        id=new_id("key"),
        owner=check_owner(owner),
        name=name[:128] if name else None,
        key_hash=hash_key(key),
        hint=f"{KEY_PREFIX}...{key[-4:]}",
        created_at=now(),
    )
    session.add(row)
    session.flush()
    return row, key


def list_keys(session: Session, owner: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.owner, ApiKey.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    return list(session.scalars(query))


def revoke_key(session: Session, key_id: str) -> ApiKey | None:
    """Revoke a key (idempotent); None when there is no such key. Rows are kept for audit.

    On Postgres the revocation also tells every API process to forget the keys it holds
    valid (api/key_cache.py); a NOTIFY is sent when the caller commits, never before."""
    row = session.get(ApiKey, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = now()
        if session.get_bind().dialect.name == "postgresql":
            session.execute(select(func.pg_notify(CHANNEL, row.id)))
    return row


def lookup(session: Session, key: str) -> ApiKey | None:
    """The key's row, or None when the key is unknown. Revoked rows are returned (check them)."""
    if not key.startswith(KEY_PREFIX) or len(key) > 256:
        return None
    digest = hash_key(key)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    # The lookup is by an index on the hash; the comparison is in constant time regardless.
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return row


def bearer_token(authorization: str | None) -> str | None:
    match = _BEARER.match(authorization or "")
    return match.group(1) if match else None


def cached_principal(
    cache: KeyCache[Principal] | None, authorization: str | None
) -> Principal | None:
    """The principal of a key found valid moments ago (api/key_cache.py), or None: look it up."""
    if cache is None or not cache.enabled:
        return None
    token = bearer_token(authorization)
    return cache.get(hash_key(token)) if token is not None else None


def authenticate(
    sessions: sessionmaker[Session],
    authorization: str | None,
    cache: KeyCache[Principal] | None = None,
) -> Principal:
    """Resolve an ``Authorization`` header to its principal, or raise the 401. A valid key is
    remembered in ``cache``; a cached key was last looked up at most ``ttl_s`` ago, which
    is also how stale its ``last_used_at`` may be beyond LAST_USED_GRANULARITY_S."""
    token = bearer_token(authorization)
    if token is None:
        raise unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer sk-alignd-...'."
            if not authorization
            else "Malformed Authorization header; expected 'Bearer <API key>'."
        )
    generation = cache.generation() if cache is not None else 0
    with sessions() as session:
        row = lookup(session, token)
        if row is None:
            raise unauthorized("Incorrect API key provided.")
        if row.revoked_at is not None:
            raise unauthorized("This API key has been revoked.")
        principal = Principal(key_id=row.id, owner=row.owner)
        current = now()
        if row.last_used_at is None or current - row.last_used_at >= LAST_USED_GRANULARITY_S:
            # Conditional, so that N API replicas seeing the same key write it once a minute.
            stale = current - LAST_USED_GRANULARITY_S
            session.execute(
                update(ApiKey)
                .where(ApiKey.id == row.id)
                .where(or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= stale))
                .values(last_used_at=current)
            )
            session.commit()
    if cache is not None and cache.enabled:
        cache.put(hash_key(token), principal, generation)
    return principal


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key")


# --- the embedded default's key ---------------------------------------------------------------


def read_key_file(path: Path) -> str | None:
    try:
        key = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return key or None


def write_key_file(path: Path, key: str) -> None:
    """Write ``key`` with mode 0600 from the first byte (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
        os.chmod(tmp, 0o600)  # whatever the umask was
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_local_key(settings: Settings, sessions: sessionmaker[Session]) -> str:
    """The embedded default's key for owner ``local``, kept in ``<data dir>/api_key``.

    The key in the file is reused while it is valid; a missing file, or a key that is unknown
    or revoked (``alignd keys revoke`` to rotate it), gets a new key and a rewritten file.
    """
    path = settings.api_key_file
    existing = read_key_file(path)
    with sessions() as session, session.begin():
        if existing is not None:
            row = lookup(session, existing)
            if row is not None and row.revoked_at is None and row.owner == LOCAL_OWNER:
                return existing
        _row, key = create_key(session, LOCAL_OWNER, "embedded default")
        write_key_file(path, key)
    return key


# --- the middleware ---------------------------------------------------------------------------


def is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


async def send_error(
    send: Send, error: APIError, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """Bearer auth and the per-key rate limit for every ``/v1`` request, before any route runs.

    A middleware rather than only a dependency so that no ``/v1`` path can be reached without
    a key (unknown routes included: 401, not a 404 that would map the API for strangers). The
    principal is left in ``scope["state"]`` for ``api.deps.current_owner`` and idempotency.
    ``/healthz``, ``/readyz``, ``/metrics`` and the dashboard are outside ``/v1``: open.
    """

    def __init__(
        self,
        app: ASGIApp,
        sessions: sessionmaker[Session],
        settings: Settings,
        cache: KeyCache[Principal] | None = None,
    ) -> None:
        self.app = app
        self.sessions = sessions
        self.limiter = RateLimiter(settings.rate_limit_per_minute)
        self.cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_api_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            # A key found valid moments ago is known in the event loop: no thread, no query.
            principal = cached_principal(self.cache, authorization)
            if principal is None:
                principal = await run_in_threadpool(
                    authenticate, self.sessions, authorization, self.cache
                )
        except APIError as exc:
            await send_error(send, exc, [(b"www-authenticate", b"Bearer")])
            return
        except DBAPIError as exc:  # outside the routes' exception handlers (api/errors.py)
            unavailable = database_unavailable(exc)
            if unavailable is None:
                raise
            await send_error(send, unavailable, retry_after())
            return
        decision = self.limiter.acquire(principal.key_id)
        if not decision.allowed:
            error = APIError(
                429,
                f"Rate limit reached for this API key ({self.limiter.per_minute} requests per "
                f"minute). Try again in {decision.retry_after_s} s.",
                code="rate_limit_exceeded",
            )
            await send_error(send, error, [(b"retry-after", str(decision.retry_after_s).encode())])
            return
        scope.setdefault("state", {})["principal"] = principal
        limit_headers = self.limiter.headers(decision)

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start" and limit_headers:
                message["headers"] = [*message.get("headers", []), *limit_headers]
            await send(message)

        await self.app(scope, receive, send_with_limits)
