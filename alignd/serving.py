"""uvicorn's HTTP protocol (httptools) with ``TCP_NODELAY`` on every connection, for ``serve --workers``.

With ``workers`` > 1 uvicorn binds the listening socket itself with ``socket.socket(family)``,
whose ``proto`` is 0, and asyncio sets ``TCP_NODELAY`` on accepted sockets only when
``proto`` is ``IPPROTO_TCP``. Nagle's algorithm then holds the second write of a response
(uvicorn writes the head and the body apart) until the client's delayed ACK: every request
took 40 ms or more (measured: 48 ms at one client, against 5 ms with one process).
"""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
