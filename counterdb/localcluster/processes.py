"""
Node and proxy processes: the commands that start them, spawning them in
their own sessions (so they outlive a CLI that started them), their state
read from ``/proc``, stopping them (SIGTERM, then SIGKILL), choosing a free
port and waiting until a node answers HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import counterdb
from counterdb.localcluster.state import (
    NETNS,
    PAUSED,
    RUNNING,
    STOPPED,
    ClusterError,
    ClusterState,
    NodeRecord,
    wait_for,
)

log = logging.getLogger(__name__)

#: The directory holding the ``counterdb`` package (and, in a checkout,
#: ``twisted/plugins``): the nodes' ``PYTHONPATH``.
PACKAGE_PARENT = Path(counterdb.__file__).resolve().parent.parent

#: What runs twistd in an interpreter (``twisted.scripts.twistd`` has no
#: ``__main__`` block).
TWISTD_MAIN = "from twisted.scripts.twistd import run; run()"
#: twistd run by this interpreter.
TWISTD = [sys.executable, "-c", TWISTD_MAIN]
#: The delaying proxy of a netns node (:mod:`counterdb.localcluster.proxy`).
PROXY = [sys.executable, "-c", "from counterdb.localcluster.proxy import main; main()"]

#: Deadline for every node to answer HTTP after start (importing Twisted and
#: Klein takes a second or more on a busy 2-core machine).
START_TIMEOUT = 30.0
#: How long a node gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0
HTTP_TIMEOUT = 5.0

#: First port tried when a loopback cluster picks its port.
FIRST_PORT = 18080
PORT_TRIES = 200
#: Attempts at starting a loopback cluster whose port was picked for it
#: (another process may bind the port between the check and the start).
PORT_ATTEMPTS = 3

#: What a node logs once it listens; only then do its HTTP answers count.
LISTENING = b"counterdb listening on"


class CannotListen(ClusterError):
    """A node exited because its port was taken."""


# -- commands ------------------------------------------------------------------


def node_command(state: ClusterState, node: NodeRecord) -> list[str]:
    """``twistd -n counterdb ...`` for ``node``, with its data dir, in the
    node's own interpreter if it has one (:func:`node_env`)."""
    if state.mode == NETNS:
        where = [
            "--port",
            str(state.listen_port),
            "--interface",
            "127.0.0.1",
            "--advertise",
            f"{node.address}:{state.port}",
        ]
    else:
        where = ["--port", str(state.port), "--interface", node.address]
    twistd = TWISTD if node.python is None else [node.python, "-c", TWISTD_MAIN]
    return [*twistd, "-n", "--pidfile=", "counterdb", *where, "--data-dir", str(node.data_dir), *state.node_args]


def proxy_command(state: ClusterState, node: NodeRecord, delay_file: Path) -> list[str]:
    """The proxy serving ``node``'s address in its namespace."""
    listen, target = f"{node.address}:{state.port}", f"127.0.0.1:{state.listen_port}"
    return [*PROXY, "--listen", listen, "--target", target, "--delay-file", str(delay_file)]


# -- /proc ---------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of a process, or None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def proc_start(pid: int) -> int | None:
    stat = proc_stat(pid)
    return stat[1] if stat else None


def proc_state(pid: int, start: int | None) -> str:
    """RUNNING, PAUSED or STOPPED: a process this process did not start."""
    stat = proc_stat(pid)
    if stat is None or (start is not None and stat[1] != start):
        return STOPPED  # gone, or the pid now belongs to another process
    letter = stat[0]
    if letter in "ZXx":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        return STOPPED
    return PAUSED if letter in "Tt" else RUNNING


# -- the processes started here ----------------------------------------------------


class ProcessTable:
    """The processes this object started, kept to reap them and learn their
    exit status, and where each log file was when they started. Processes
    started by another object (another CLI call) are read from ``/proc``."""

    def __init__(self) -> None:
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        #: Exit status of each child process reaped here, by pid.
        self._exit_status: dict[int, int] = {}
        #: Log file -> its size when its process was last started here.
        self._log_offsets: dict[Path, int] = {}

    def spawn(
        self, command: list[str], workdir: Path, log_name: str, env: dict[str, str] | None = None
    ) -> tuple[int, int | None]:
        """Start ``command`` in ``workdir`` in a session of its own, output
        appended to ``workdir/log_name``, with ``env`` (default: this
        checkout's, :func:`node_env`); return (pid, /proc start time)."""
        workdir.mkdir(parents=True, exist_ok=True)
        with open(workdir / log_name, "ab") as out:
            self._log_offsets[workdir / log_name] = out.tell()
            out.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(command)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                command,
                cwd=workdir,
                env=env if env is not None else node_env(None),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives a CLI that started it
            )
        self._children[proc.pid] = proc
        return proc.pid, proc_start(proc.pid)

    def log_since_start(self, path: Path) -> bytes:
        """What ``path`` got since its process was last started here."""
        try:
            with open(path, "rb") as f:
                f.seek(self._log_offsets.get(path, 0))
                return f.read()
        except OSError:
            return b""

    def state_of(self, pid: int | None, start: int | None) -> str:
        """RUNNING, PAUSED or STOPPED; reaps a child that exited."""
        if pid is None:
            return STOPPED
        child = self._children.get(pid)
        if child is None:
            return proc_state(pid, start)
        if child.poll() is None:
            stat = proc_stat(pid)
            if stat is not None and stat[0] not in "ZXx":
                return PAUSED if stat[0] in "Tt" else RUNNING
            # A zombie: reap it through its Popen, which keeps the status.
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(1.0)
            if child.returncode is None:
                return RUNNING
        self._exit_status[pid] = child.returncode
        del self._children[pid]
        return STOPPED

    def exit_status(self, pid: int) -> int | None:
        """How a child started here ended, once it was reaped."""
        return self._exit_status.get(pid)

    def stop(self, pid: int | None, start: int | None, what: str, timeout: float = STOP_TIMEOUT) -> str | None:
        """SIGCONT, SIGTERM, then SIGKILL after ``timeout``. Returns how the
        process ended if not the normal way (None if it did, or if there
        was never a process)."""
        if self.state_of(pid, start) == STOPPED:
            if pid is None:
                return None
            status = self.exit_status(pid)
            return "had exited by itself" + (f" with status {status}" if status is not None else "")
        assert pid is not None
        for sig in (signal.SIGCONT, signal.SIGTERM):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if wait_for(lambda: self.state_of(pid, start) == STOPPED, timeout):
            status = self.exit_status(pid)
            # twistd shuts down, then re-raises the signal that stopped it,
            # so that its parent sees why it ended: -SIGTERM.
            if status is not None and status not in (0, -signal.SIGTERM):
                return f"exited with status {status} after SIGTERM"
            return None
        log.warning("%s (pid %s) still running %s s after SIGTERM: SIGKILL", what, pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not wait_for(lambda: self.state_of(pid, start) == STOPPED, STOP_TIMEOUT):
            raise ClusterError(f"{what} (pid {pid}) survived SIGKILL")
        return f"was still running {timeout:g} s after SIGTERM: SIGKILLed"


def node_env(python: str | None) -> dict[str, str]:
    """The environment of a node run by ``python``. None (this interpreter):
    this environment with the imported ``counterdb`` first on the path. Another
    interpreter (a virtualenv holding another release): without
    ``PYTHONPATH``, which would put this checkout's ``counterdb`` before
    the one installed there."""
    env = dict(os.environ)
    if python is None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
    else:
        env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- readiness ------------------------------------------------------------------------


def http(
    method: str, url: str, body: bytes | None, timeout: float, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """(status, body) of one request; network failures raise OSError."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def wait_answering(
    url: str,
    deadline: float,
    check: Callable[[], None],
    listening: Callable[[], bool],
    headers: dict[str, str] | None = None,
) -> str | None:
    """Poll ``GET url`` until it answers 200 (then None) or the deadline
    passed (then what went wrong last). Before each try, ``check()`` raises
    if the node can no longer come up; only once ``listening()`` do answers
    count (with a port picked by :func:`free_common_port`, another program
    may have bound it first, and its answers must not pass for the
    node's)."""
    last: object = None
    while True:
        check()
        if not listening():
            last = "no 'counterdb listening on' in its log yet"
        else:
            try:
                code, _ = http("GET", url, None, 1.0, headers)
                if code == 200:
                    return None
                last = f"status {code}"
            except OSError as e:
                last = e
        if time.monotonic() >= deadline:
            return repr(last)
        time.sleep(0.05)


# -- ports -------------------------------------------------------------------------------


def free_common_port(hosts: Sequence[str], first: int = FIRST_PORT, tries: int = PORT_TRIES) -> int:
    """The first TCP port from ``first`` up that can be bound on every one
    of ``hosts`` right now."""
    for port in range(first, min(first + tries, 65536)):
        if all(_can_bind(host, port) for host in hosts):
            return port
    raise ClusterError(f"no port in {first}..{first + tries - 1} is free on all of {list(hosts)}")


def _can_bind(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted does
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
