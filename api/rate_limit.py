"""A per-key token bucket, in process.

Each key gets a bucket of ``per_minute`` tokens (the burst) refilled at ``per_minute / 60`` a
second; a request takes one token or is refused with the seconds until one is back. The
buckets live in the API process, so N API replicas behind a load balancer allow N times the
limit (a shared Redis limiter is a follow-up; docs/operations.md).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# Idle buckets are full again after a minute; past this many, full ones are forgotten.
_PRUNE_AT = 10_000


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # Whole tokens left after this request (the ``x-ratelimit-remaining-requests`` header).
    remaining: int
    # When refused: whole seconds, at least 1, until a token is back (the ``retry-after``).
    retry_after_s: int = 0


class RateLimiter:
    def __init__(
        self,
        per_minute: int,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.capacity = float(burst if burst is not None else per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def acquire(self, key: str) -> Decision:
        if not self.enabled:
            return Decision(True, 0)
        with self._lock:
            at = self.clock()
            tokens, last = self._buckets.get(key, (self.capacity, at))
            tokens = min(self.capacity, tokens + (at - last) * self.rate)
            if tokens >= 1.0:
                tokens -= 1.0
                self._store(key, tokens, at)
                return Decision(True, int(tokens))
            self._store(key, tokens, at)
            return Decision(False, 0, max(1, math.ceil((1.0 - tokens) / self.rate)))

    def headers(self, decision: Decision) -> list[tuple[bytes, bytes]]:
        if not self.enabled:
            return []
        return [
            (b"x-ratelimit-limit-requests", str(self.per_minute).encode()),
            (b"x-ratelimit-remaining-requests", str(decision.remaining).encode()),
        ]

    def _store(self, key: str, tokens: float, at: float) -> None:
        self._buckets[key] = (tokens, at)
        if len(self._buckets) > _PRUNE_AT:
            refill_s = self.capacity / self.rate
            self._buckets = {k: (t, a) for k, (t, a) in self._buckets.items() if at - a < refill_s}
