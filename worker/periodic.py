"""A function run every few seconds on a daemon thread of the worker's parent process, until
the worker shuts down: the registry heartbeat (``registry.heartbeat``) and the sweep
(``recovery.sweeper``). A failed run is logged and tried again at the next tick: the database
or the broker being away for a while must not end the thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("alignd.worker")


class Periodic:
    """``run()`` every ``interval()`` seconds (asked again each time, so it may vary), at once
    on start when ``at_once``; ``what`` names it in the log."""

    def __init__(
        self,
        what: str,
        run: Callable[[], None],
        interval: Callable[[], float],
        *,
        at_once: bool,
    ) -> None:
        self.what = what
        self.run = run
        self.interval = interval
        self.at_once = at_once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"alignd-{what}", daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        if not self.at_once and self._stop.wait(self.interval()):
            return
        while True:
            try:
                self.run()
            except Exception:
                log.exception("%s failed; trying again at the next tick", self.what)
            if self._stop.wait(self.interval()):
                return
