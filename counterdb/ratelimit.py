"""Log lines that hostile traffic could repeat thousands of times a second."""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


@attrs.define
class _Window:
    suppressed: int
    call: IDelayedCall


class RateLimitedLog:
    """At most one line per kind per ``interval``: the first event of a
    quiet kind is logged at once, the others are counted and summed up in
    one line when the interval ends. A flood must not become a log flood."""

    def __init__(self, clock: IReactorTime, interval: float, logger: Logger = log) -> None:
        self._clock = clock
        self._interval = interval
        self._log = logger
        self._windows: dict[str, _Window] = {}

    def event(self, kind: str, message: str, peer: str) -> None:
        window = self._windows.get(kind)
        if window is not None:
            window.suppressed += 1
            return
        self._log.warn("refused ({kind}): {message} [{peer}]", kind=kind, message=message, peer=peer)
        self._open(kind)

    def _open(self, kind: str) -> None:
        self._windows[kind] = _Window(0, self._clock.callLater(self._interval, self._close, kind))

    def _close(self, kind: str) -> None:
        window = self._windows.pop(kind)
        if window.suppressed:
            self._log.warn(
                "refused ({kind}): {count} more in the last {interval:.0f} s",
                kind=kind,
                count=window.suppressed,
                interval=self._interval,
            )
            self._open(kind)  # keep lines at least an interval apart

    def stop(self) -> None:
        for window in self._windows.values():
            if window.call.active():
                window.call.cancel()
        self._windows.clear()
