"""API keys found valid, remembered in each API process so that a request costs no lookup.

A key lookup was a thread-pool hop, a pooled connection and a query on every ``/v1`` request:
more than a third of the API's CPU under load (issue 13; docs/benchmarks.md, "API under
load"). Here a key found valid is kept for ``api_key_cache_s`` (by its SHA-256, never the key
itself), and a revocation reaches every API process at once: ``api.keys.revoke_key`` sends a
Postgres ``NOTIFY`` on :data:`CHANNEL` in the revoking transaction, and each process's
listener (a thread on a connection of its own) forgets every key when one arrives. While the
listener is not listening (starting, or its connection lost and being made again) nothing is
served from memory, so no revocation can be missed: every request looks its key up, as it
did without a cache. ``api_key_cache_s`` bounds the staleness only if a connection dies
without the listener seeing it (a silent network partition) until its next health check.

A lookup that began before a reset must not put back what the reset cleared: each put names
the generation it read under, and a put from an older generation is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

CHANNEL = "alignd_api_keys"
# The listener's application_name in pg_stat_activity (tests find it there to kill it).
LISTENER_NAME = "alignd-api-key-listener"
# How often the listener proves its connection with a query when no notice came.
HEALTH_CHECK_S = 5.0
# A bound on memory: past this many keys the cache starts over.
MAX_ENTRIES = 10_000

Value = TypeVar("Value")


class KeyCache(Generic[Value]):
    """``connect``: opens a new DBAPI (psycopg) connection; None turns the cache off."""

    def __init__(self, connect: Callable[[], Any] | None, ttl_s: float) -> None:
        self._connect = connect
        self.ttl_s = ttl_s
        self.enabled = connect is not None and ttl_s > 0
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Value, float]] = {}
        self._generation = 0
        self._listening = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def listening(self) -> bool:
        return self._listening

    def get(self, digest: str) -> Value | None:
        if not self._listening:
            return None
        entry = self._entries.get(digest)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def generation(self) -> int:
        """Read before a lookup; hand it to :meth:`put` with what the lookup found."""
        return self._generation

    def put(self, digest: str, value: Value, generation: int) -> None:
        with self._lock:
            if not self._listening or generation != self._generation:
                return  # a reset came in between: what was read may be revoked since
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = (value, time.monotonic() + self.ttl_s)

    def _reset(self, listening: bool) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()
            self._listening = listening

    # --- the listener -------------------------------------------------------------------

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._listen, name=LISTENER_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._reset(listening=False)
        if self._thread is not None:
            # It wakes within HEALTH_CHECK_S; a daemon thread does not hold up the exit.
            self._thread.join(timeout=0.5)
            self._thread = None

    def _listen(self) -> None:
        assert self._connect is not None
        backoff_s = 0.2
        while not self._stopping.is_set():
            try:
                connection = self._connect()
                try:
                    connection.autocommit = True
                    connection.execute(f"LISTEN {CHANNEL}")
                    # Listening from here on: what was kept before may have been revoked
                    # while nobody listened, so it starts empty.
                    self._reset(listening=True)
                    backoff_s = 0.2
                    while not self._stopping.is_set():
                        for _notice in connection.notifies(timeout=HEALTH_CHECK_S):
                            self._reset(listening=True)
                        connection.execute("SELECT 1")
                finally:
                    connection.close()
            except Exception as error:  # any failure: look every key up until listening again
                self._reset(listening=False)
                if self._stopping.is_set():
                    return
                log.warning("API key cache off, its listener reconnects: %s", error)
                self._stopping.wait(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
