"""uvicorn's HTTP protocol (httptools) for ``serve --workers N``: ``TCP_NODELAY`` on every
connection, and keep-alive connections balanced between the API processes.

``TCP_NODELAY``: with ``workers`` > 1 uvicorn binds the listening socket itself with
``socket.socket(family)``, whose ``proto`` is 0, and asyncio sets ``TCP_NODELAY`` on accepted
sockets only when ``proto`` is ``IPPROTO_TCP``. Nagle's algorithm then holds the second write
of a response (uvicorn writes the head and the body apart) until the client's delayed ACK:
every request took 40 ms or more (measured: 48 ms at one client, against 5 ms with one
process).

Balance: the processes share one listening socket, and whichever is awake first accepts a
whole burst of new connections: 64 clients connecting at once were split 13/51, 20/44,
26/38 between two processes (docs/benchmarks.md, "API under load"). A keep-alive connection
stays where it landed, and each process has one GIL, so the clients of the crowded process
waited up to twice as long for the same work. Each process
now publishes how many connections it holds (:class:`ConnectionShares`); one that holds more
than its share by two or more answers its next request with ``Connection: close``, and the
client reconnects, landing on either process. Envoy's ``exact_balance`` and Node's cluster
module solve the same problem by handing connections over; closing one at a response
boundary needs no fd passing, and every HTTP/1.1 client reconnects on its own.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import mmap
import os
import socket
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Set by ``alignd serve`` for its API processes: the file of connection counts, and how many
# processes share it.
SHARES_FILE = "ALIGND_SERVE_SHARES_FILE"
SHARES_WORKERS = "ALIGND_SERVE_WORKERS"
SLOTS = 64  # processes one file can count; `serve --workers` takes at most this many


def create_shares_file(path: str) -> None:
    with open(path, "wb") as fh:
        fh.write(bytes(SLOTS * 8))


class ConnectionShares:
    """The open connections of each API process of one ``serve``: an int64 slot per process in
    a file every process maps. A process claims its slot with a byte-range lock, held for its
    life: the lock dies with the process, and the process started in its place takes the slot
    over and starts it at zero."""

    def __init__(self, path: str, workers: int) -> None:
        self.workers = workers
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, SLOTS * 8)
        self._counts = memoryview(self._map).cast("q")
        self.slot = self._claim()
        self._counts[self.slot] = 0

    def _claim(self) -> int:
        for slot in range(SLOTS):
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 8, slot * 8)
            except OSError:
                continue  # another live process holds it
            return slot
        raise RuntimeError(f"more than {SLOTS} API processes share {SHARES_FILE}")

    def publish(self, count: int) -> None:
        self._counts[self.slot] = count

    def crowded(self, mine: int) -> bool:
        """Whether ``mine`` connections exceed this process's share of all by two or more:
        one more than the share is what an odd total leaves somewhere."""
        return (mine - 1) * self.workers > sum(self._counts)


@functools.cache
def shares() -> ConnectionShares | None:
    """This process's shares, made on first use (in the API process, not in ``serve``)."""
    path, workers = os.environ.get(SHARES_FILE), os.environ.get(SHARES_WORKERS)
    if path and workers and int(workers) > 1:
        return ConnectionShares(path, int(workers))
    return None


class BalancedHttpToolsProtocol(HttpToolsProtocol):
    # This process's connections that were told to close and have not yet: they are on their
    # way to another process (or out), so they no longer count as held here.
    leaving: ClassVar[set[BalancedHttpToolsProtocol]] = set()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._publish()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.leaving.discard(self)
        self._publish()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        counted = shares()
        cycle: Any = self.cycle
        if counted is None or cycle is None or not cycle.keep_alive or self in self.leaving:
            return
        if counted.crowded(self._held()):
            cycle.keep_alive = False  # answered in full, then closed (uvicorn's shutdown path)
            self.leaving.add(self)
            self._publish()

    def _held(self) -> int:
        return len(self.connections) - len(self.leaving)

    def _publish(self) -> None:
        counted = shares()
        if counted is not None:
            counted.publish(self._held())
