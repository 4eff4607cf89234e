"""How many ``/v1`` requests one API process serves at once, sized with its database pool.

Sync routes run in a thread pool and take a pooled connection; under load (issue 13: 128
clients, 40 threads, 10 + 10 connections) threads waited 30 s for connections while the
requests holding connections waited for threads, and clients got 500s and timeouts. Here a
request first takes one of ``api_concurrency`` places (never more than
``db_pool_size + db_max_overflow``; 4 by default, because the requests' Python shares one GIL
and more threads only queue for it), or an upload one of ``api_upload_concurrency`` places
of its own, waiting in the event loop, in arrival order (where waiting costs no thread and
no connection) for at most ``api_queue_timeout_s``;
a request holds at most one connection at a time (auth, then idempotency, then the route,
whose session closes before the response is sent: ``api.deps.get_session``), so an admitted
request always finds a free connection. One that finds no place in time is answered 503
``server_busy`` with ``Retry-After``, in the error shape (the openai SDK retries it).

The place is given back when the response starts: what streams after that (file content,
adapters, SSE) takes short sessions of its own and must not keep others out for minutes.
If the pool still runs dry (streams, health checks), the checkout waits ``db_pool_timeout_s``
and the request gets the same 503 (``api.errors``).
"""

from __future__ import annotations

import math
import re

import anyio
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import retry_after, server_busy
from api.keys import is_api_path, send_error

# Requests that carry a file's bytes: they hold a place while the client sends them, for as
# long as its connection takes (minutes for a slow one), and store and validate hundreds of
# MB. They take places of their own, so that uploads never keep reads out, nor reads uploads.
_UPLOAD = re.compile(r"^/v1/(files|uploads/[^/]+/(parts|complete))$")


def is_upload(scope: Scope) -> bool:
    return scope["method"] == "POST" and _UPLOAD.match(scope["path"]) is not None


class AdmissionMiddleware:
    def __init__(
        self, app: ASGIApp, capacity: int, upload_capacity: int, queue_timeout_s: float
    ) -> None:
        self.app = app
        self.capacity = capacity
        self.upload_capacity = upload_capacity
        self.queue_timeout_s = queue_timeout_s
        # Made in the event loop on first use: anyio primitives belong to a running loop.
        self._places: anyio.Semaphore | None = None
        self._upload_places: anyio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_api_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self._places is None or self._upload_places is None:
            self._places = anyio.Semaphore(self.capacity)
            self._upload_places = anyio.Semaphore(self.upload_capacity)
        places = self._upload_places if is_upload(scope) else self._places
        with anyio.move_on_after(self.queue_timeout_s) as waited:
            await places.acquire()
        if waited.cancelled_caught:
            seconds = math.ceil(self.queue_timeout_s)
            await send_error(send, server_busy(f"no place within {seconds} s"), retry_after())
            return
        held = True
        started = False

        def give_back() -> None:
            nonlocal held
            if held:
                held = False
                places.release()

        async def send_and_release(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                give_back()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        except PoolTimeout:
            # Auth and idempotency take connections outside the routes' handlers.
            if started:
                raise
            await send_error(send, server_busy("no database connection free"), retry_after())
        finally:
            give_back()
