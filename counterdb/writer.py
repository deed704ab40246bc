"""
The store's writer process, seen from the reactor.

:class:`WriterProcess` forks a child that runs :func:`counterdb.writes.serve`
and hands it one operation after another over a Unix socket pair. The child
answers in order; each answer fires the oldest outstanding Deferred. A
commit thus costs the reactor a pickle, a ``send`` and a readable
descriptor, and never waits for the GIL (docs/design.md).

The child is forked, not executed: it needs no interpreter path, no
``sys.path`` and no file permissions the node itself may have given up
(``twistd --uid``), and it starts in a millisecond. It is forked before the
parent opens the database (SQLite connections must not cross a fork), closes
every descriptor but its socket, and leaves the parent's objects alone.

If the child dies with operations outstanding (killed, out of memory), a new
one starts and is sent them again: every operation is idempotent. After
:data:`MAX_RESTARTS` deaths in a row without a single answer, the writer
gives up and fails every operation, and the node answers 503 to increments.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import sqlite3
import time
import traceback
import warnings
from collections import deque
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from counterdb import writes

log = Logger()

#: Deaths in a row, each before any answer, after which the writer gives up.
MAX_RESTARTS = 3
#: How long a stop waits for the child to finish and exit before killing it.
STOP_TIMEOUT = 10.0
_REAP_INTERVAL = 0.01


class WriterError(Exception):
    """An operation failed in the writer; the message is the database's."""


class WriterProcess:
    """One writer child at a time, restarted when it dies unasked.

    ``before_fork`` is called before every fork after the first: the store
    closes its own SQLite connection there (it reopens one when it needs it)."""

    def __init__(
        self,
        reactor: Any,
        db_path: Path,
        synchronous: str,
        key_window: float,
        max_keys: int,
        before_fork: Any = lambda: None,
    ) -> None:
        self.reactor = reactor
        self._settings = (str(db_path), synchronous, key_window, max_keys)
        self._before_fork = before_fork
        self._outstanding: deque[tuple[bytes, Deferred[Any]]] = deque()
        self._channel: _Channel | None = None
        self.pid: int | None = None
        self._deaths_in_a_row = 0
        self._broken: str | None = None
        self._stopping = False
        self.restarts = 0  # writers that died and were replaced
        self._start_child()

    @property
    def problem(self) -> str | None:
        """Why nothing more can be written (the writer gave up), or None."""
        return self._broken

    def call(self, operation: str, *args: Any) -> Deferred[Any]:
        """Run ``operation`` in the child; fires with its result, or fails
        with the sqlite3 exception it raised there, or :class:`WriterError`."""
        if self._broken is not None:
            return fail(WriterError(self._broken))
        if self._stopping:
            return fail(WriterError("the store's writer is stopping"))
        data = writes.frame((operation, args))
        d: Deferred[Any] = Deferred()
        self._outstanding.append((data, d))
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.write(data)
        # else a new child is starting and will be sent everything outstanding
        return d

    def stop(self) -> Deferred[None]:
        """Let the child finish what it was sent, then wait for it to exit."""
        self._stopping = True
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.loseConnection()  # after the buffer is sent
        if self.pid is None:
            return succeed(None)
        d = self._reap(self.pid, time.monotonic() + STOP_TIMEOUT)
        d.addCallback(lambda _: self._fail_outstanding("the store's writer stopped before answering"))
        return d

    def stop_now(self) -> None:
        """Blocking stop, for when no reactor runs: close the socket (what
        was not yet acknowledged no longer matters) and wait for the child."""
        self._stopping = True
        transport = self._channel.transport if self._channel is not None else None
        if transport is not None:
            # Shut the socket itself: closing the transport would wait for
            # a reactor turn that may never come, and the child for its EOF.
            with contextlib.suppress(OSError):
                transport.getHandle().shutdown(socket.SHUT_RDWR)
            transport.abortConnection()
        if self.pid is not None:
            _wait_blocking(self.pid, time.monotonic() + STOP_TIMEOUT)
        self._fail_outstanding("the store was closed before the writer answered")

    # -- the child -----------------------------------------------------------------

    def _start_child(self) -> None:
        try:
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:
            raise WriterError(f"cannot start the store's writer process: {e}") from None
        try:
            self.pid = _fork_writer(child_end, self._settings)
            parent_end.setblocking(False)
            self._channel = _Channel(self)
            factory = Factory.forProtocol(lambda: self._channel)
            self.reactor.adoptStreamConnection(parent_end.fileno(), socket.AF_UNIX, factory)
        finally:
            child_end.close()
            parent_end.close()  # the reactor holds its own duplicate

    def _answered(self, answer: tuple[Any, Any, list[str]]) -> None:
        self._deaths_in_a_row = 0
        error, result, warnings_ = answer
        for warning in warnings_:
            log.warn("store: {warning}", warning=warning)
        _, d = self._outstanding.popleft()
        if error is None:
            d.callback(result)
        else:
            d.errback(_exception(*error))

    def _lost(self, channel: _Channel) -> None:
        if channel is not self._channel or self._stopping:
            return
        self._channel = None
        if self.pid is not None:
            pid = self.pid
            self._reap(pid, time.monotonic() + STOP_TIMEOUT).addCallback(self._child_ended, pid)

    def _child_ended(self, status: int, pid: int) -> None:
        if self._stopping or pid != self.pid:
            return
        self._deaths_in_a_row += 1
        if self._deaths_in_a_row > MAX_RESTARTS:
            self._give_up(status, f"it exited {self._deaths_in_a_row} times in a row without answering")
            return
        log.error(
            "the store's writer process {pid} exited with status {status}; starting a new one and sending it "
            "the {count} operations it had not answered",
            pid=pid,
            status=status,
            count=len(self._outstanding),
        )
        self._before_fork()
        try:
            self._start_child()
        except WriterError as e:
            self._give_up(status, str(e))
            return
        self.restarts += 1
        assert self._channel is not None and self._channel.transport is not None
        for data, _ in self._outstanding:
            self._channel.transport.write(data)

    def _give_up(self, status: int, why: str) -> None:
        self._broken = (
            f"the store's writer process is gone: {why} (last exit status {status}); "
            "nothing more can be written until the node restarts"
        )
        log.critical("{message}", message=self._broken)
        self.pid = None
        self._fail_outstanding(self._broken)

    def _fail_outstanding(self, message: str) -> None:
        outstanding, self._outstanding = self._outstanding, deque()
        for _, d in outstanding:
            d.errback(WriterError(message))

    def _reap(self, pid: int, deadline: float) -> Deferred[int]:
        """Fires with the exit status once ``pid`` exited, polling without
        blocking the reactor; kills it at ``deadline``."""
        done: Deferred[int] = Deferred()

        def poll() -> None:
            status = _exit_status(pid)
            if status is not None:
                done.callback(status)
            elif time.monotonic() >= deadline:
                log.warn("the store's writer process {pid} did not exit; killing it", pid=pid)
                done.callback(_kill(pid))
            else:
                self.reactor.callLater(_REAP_INTERVAL, poll)

        poll()
        return done


def _fork_writer(child_end: socket.socket, settings: tuple[str, str, float, int]) -> int:
    """Fork the writer; returns its pid. The child never returns."""
    with warnings.catch_warnings():
        # Python 3.12+ warns of forking a multi-threaded process: the child
        # touches no lock another thread might hold (no logging, no import).
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            pid = os.fork()
        except OSError as e:  # out of processes or memory
            raise WriterError(f"cannot start the store's writer process: {e}") from None
    if pid == 0:
        _become_writer(child_end, settings)
    return pid


def _become_writer(child_end: socket.socket, settings: tuple[str, str, float, int]) -> None:
    status = 1
    try:
        # The parent's objects are left alone: no collection would free
        # them anyway, and one would copy every page they share.
        gc.disable()
        with contextlib.suppress(OSError):  # Linux: what ps -o comm and top show
            Path("/proc/self/comm").write_text("counterdb-store")  # 15 characters at most
        fd = child_end.fileno()
        os.closerange(3, fd)
        os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
        writes.main(child_end, *settings)
        status = 0
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        os._exit(status)


def _exit_status(pid: int) -> int | None:
    """``pid``'s exit status if it has exited (reaping it), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1  # reaped elsewhere: gone all the same
    return os.waitstatus_to_exitcode(status) if done else None


def _kill(pid: int) -> int:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except ChildProcessError:
        return -1


def _wait_blocking(pid: int, deadline: float) -> int:
    while time.monotonic() < deadline:
        status = _exit_status(pid)
        if status is not None:
            return status
        time.sleep(_REAP_INTERVAL / 10)
    return _kill(pid)


def _exception(kind: str, message: str) -> Exception:
    """The writer's error as the caller would have seen it in-process: the
    same sqlite3 exception class (a full disk stays an OperationalError)."""
    cls = getattr(sqlite3, kind, None)
    if isinstance(cls, type) and issubclass(cls, sqlite3.Error):
        return cls(message)
    return WriterError(f"{message} ({kind})")


class _Channel(Protocol):
    """The parent's end of the socket: frames in, answers to the writer."""

    def __init__(self, writer: WriterProcess) -> None:
        self.writer = writer
        self.buffer = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        for answer in writes.split_frames(self.buffer):
            self.writer._answered(answer)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.writer._lost(self)
