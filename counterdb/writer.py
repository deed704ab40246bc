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

Writers are forked by a small *spawner* process, itself forked with the
first writer's settings before the node opens or loads anything. Forked
from the node after it loaded its counters, a writer would keep a private
copy of every page the node changes afterwards (half the node's memory
within minutes at a million counters); forked from the spawner, every
writer stays as small as the first. If the spawner is gone, a writer is
forked from the node itself (logged).

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
import struct
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

    ``before_fork`` is called before the node forks a writer itself (only
    once the spawner is gone): the store closes its own SQLite connection
    there, as a connection must not cross a fork (it reopens one when it
    needs it)."""

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
        self._direct = False  # the writer is this process's child (forked without the spawner)
        self._spawner: _Spawner | None = _Spawner(self._settings)
        try:
            self._start_child()
        except BaseException:
            self._close_spawner()
            raise

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
            self._close_spawner()
            return succeed(None)
        d = self._reap(self.pid, time.monotonic() + STOP_TIMEOUT)
        d.addCallback(lambda _: self._fail_outstanding("the store's writer stopped before answering"))
        d.addCallback(lambda _: self._close_spawner())
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
            _wait_blocking(self.pid, self._direct, time.monotonic() + STOP_TIMEOUT)
        self._fail_outstanding("the store was closed before the writer answered")
        self._close_spawner()

    @property
    def spawner_pid(self) -> int | None:
        return self._spawner.pid if self._spawner is not None else None

    def _close_spawner(self) -> None:
        spawner, self._spawner = self._spawner, None
        if spawner is not None:
            spawner.close()

    # -- the child -----------------------------------------------------------------

    def _start_child(self) -> None:
        self.pid, parent_end, self._direct = self._new_writer()
        try:
            parent_end.setblocking(False)
            self._channel = _Channel(self)
            factory = Factory.forProtocol(lambda: self._channel)
            self.reactor.adoptStreamConnection(parent_end.fileno(), socket.AF_UNIX, factory)
        finally:
            parent_end.close()  # the reactor holds its own duplicate

    def _new_writer(self) -> tuple[int, socket.socket, bool]:
        """A new writer: its pid, this end of its socket, and whether it is
        this process's own child."""
        if self._spawner is not None:
            try:
                return (*self._spawner.spawn(), False)
            except WriterError as e:
                log.warn(
                    "{problem}; forking the store's writer from the node itself (it will keep copies of the "
                    "pages the node changes: restart the node at a quiet moment to give them back)",
                    problem=e,
                )
                self._close_spawner()
        self._before_fork()
        parent_end, child_end = _socketpair()
        try:
            return _fork(lambda: _become_writer(child_end, self._settings)), parent_end, True
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()

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
        self._close_spawner()

    def _fail_outstanding(self, message: str) -> None:
        outstanding, self._outstanding = self._outstanding, deque()
        for _, d in outstanding:
            d.errback(WriterError(message))

    def _reap(self, pid: int, deadline: float) -> Deferred[int]:
        """Fires with the exit status once ``pid`` exited, polling without
        blocking the reactor; kills it at ``deadline``."""
        done: Deferred[int] = Deferred()

        direct = self._direct

        def poll() -> None:
            status = _exit_status(pid, direct)
            if status is not None:
                done.callback(status)
            elif time.monotonic() >= deadline:
                log.warn("the store's writer process {pid} did not exit; killing it", pid=pid)
                done.callback(_kill(pid, direct))
            else:
                self.reactor.callLater(_REAP_INTERVAL, poll)

        poll()
        return done


class _Spawner:
    """This process's end of the spawner: asks it for a writer, and gets
    back the writer's pid and this end of the writer's socket."""

    def __init__(self, settings: tuple[str, str, float, int]) -> None:
        self.control, spawner_end = _socketpair()
        try:
            self.pid = _fork(lambda: _become_spawner(spawner_end, settings))
        except BaseException:
            self.control.close()
            raise
        finally:
            spawner_end.close()
        # It answers within milliseconds; a spawner that does not is as good as gone.
        self.control.settimeout(STOP_TIMEOUT)

    def spawn(self) -> tuple[int, socket.socket]:
        try:
            self.control.sendall(b"w")
            message, fds, _, _ = socket.recv_fds(self.control, 1024, 1)
        except OSError as e:
            raise WriterError(f"the store's spawner process is gone ({e})") from None
        if len(message) < 4:
            raise WriterError("the store's spawner process is gone")
        (pid,) = struct.unpack(">i", message[:4])
        if pid < 0 or not fds:
            for fd in fds:
                os.close(fd)
            reason = message[4:].decode("utf-8", "replace")
            raise WriterError(f"cannot start the store's writer process: {reason}")
        return pid, socket.socket(fileno=fds[0])

    def close(self) -> None:
        """Close the control socket: the spawner exits at once."""
        self.control.close()
        _wait_blocking(self.pid, True, time.monotonic() + STOP_TIMEOUT)


def _socketpair() -> tuple[socket.socket, socket.socket]:
    try:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as e:  # out of descriptors
        raise WriterError(f"cannot start the store's writer process: {e}") from None


def _fork(become: Any) -> int:
    """Fork; the child runs ``become()``, which never returns."""
    with warnings.catch_warnings():
        # Python 3.12+ warns of forking a multi-threaded process: the child
        # touches no lock another thread might hold (no logging, no import).
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            pid = os.fork()
        except OSError as e:  # out of processes or memory
            raise WriterError(f"cannot start the store's writer process: {e}") from None
    if pid == 0:
        become()
    return pid


def _become_spawner(control: socket.socket, settings: tuple[str, str, float, int]) -> None:
    """The spawner: forks a writer for each byte it reads, sends back its
    pid and the other end of its socket, and exits when the node closes
    the control socket (or dies)."""

    def serve() -> None:
        _leave_the_node(control, "counterdb-spawn")
        writes.leave_the_nodes_signals_to_the_node()
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the writers
        while control.recv(1):
            try:
                parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                pid = os.fork()
            except OSError as e:
                socket.send_fds(control, [struct.pack(">i", -1) + str(e).encode()], [])
                continue
            if pid == 0:
                control.close()
                parent_end.close()
                _become_writer(child_end, settings)
            child_end.close()
            socket.send_fds(control, [struct.pack(">i", pid)], [parent_end.fileno()])
            parent_end.close()

    _run_and_exit(serve)


def _become_writer(child_end: socket.socket, settings: tuple[str, str, float, int]) -> None:
    def serve() -> None:
        _leave_the_node(child_end, "counterdb-store")
        writes.main(child_end, *settings)

    _run_and_exit(serve)


def _run_and_exit(body: Any) -> None:
    """A forked child's whole life: ``body()``, then exit (status 1, with
    the traceback on stderr, if it raised) without returning into the
    node's code."""
    status = 1
    try:
        body()
        status = 0
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        os._exit(status)


def _leave_the_node(keep: socket.socket, name: str) -> None:
    """In a forked child: leave the node's objects alone (no collection
    would free them anyway, and one would copy every page they share),
    take ``name`` (what ps -o comm and top show; 15 characters at most),
    and close every descriptor but ``keep`` and the standard ones."""
    gc.disable()
    with contextlib.suppress(OSError):  # Linux only
        Path("/proc/self/comm").write_text(name)
    fd = keep.fileno()
    os.closerange(3, fd)
    os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))


def _exit_status(pid: int, direct: bool) -> int | None:
    """``pid``'s exit status if it has exited (reaping it if it is this
    process's child), else None; -1 when the status is not ours to read."""
    if not direct:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return -1  # the spawner's child, reaped by the kernel
        return None
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1  # reaped elsewhere: gone all the same
    return os.waitstatus_to_exitcode(status) if done else None


def _kill(pid: int, direct: bool) -> int:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not direct:
        return -1
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except ChildProcessError:
        return -1


def _wait_blocking(pid: int, direct: bool, deadline: float) -> int:
    while time.monotonic() < deadline:
        status = _exit_status(pid, direct)
        if status is not None:
            return status
        time.sleep(_REAP_INTERVAL / 10)
    return _kill(pid, direct)


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
