"""Log lines that hostile traffic could repeat thousands of times a second."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class RateLimitedLog:
    """At most one line per ``interval`` seconds, with how many events it
    stands for (``{count}`` in the format)."""

    def __init__(self, log: Logger, clock: IReactorTime, interval: float = 60.0) -> None:
        self.log = log
        self.clock = clock
        self.interval = interval
        self._last = -interval
        self._count = 0

    def note(self, format: str, **fields: Any) -> None:
        self._count += 1
        now = self.clock.seconds()
        if now - self._last < self.interval:
            return
        self.log.warn(format, count=self._count, **fields)
        self._last, self._count = now, 0
