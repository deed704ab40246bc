"""
Test helpers for real counterdb nodes (``twistd -n counterdb``).

Not a test module: plain synchronous helpers (``urllib.request``), used by
``test_integration.py``, ``test_crash.py``, ``test_plugin.py`` and
``jepsen.py``. The processes themselves are run by
:class:`counterdb.localcluster.LocalCluster`, the one process manager (loopback mode,
nodes on 127.0.0.2, 127.0.0.3, ... sharing one port); :class:`NodeCluster` and
:class:`NodeProcess` here add what the tests need on top of it: HTTP
helpers that fail with every node's log tail, :func:`wait_until`, and
inspection of a node's data dir (:meth:`NodeProcess.stored_partials`).

Every node runs the checkout's code: ``counterdb.localcluster`` puts the
directory holding the imported ``counterdb`` package (this checkout, see
``pyproject.toml``) on the nodes' ``PYTHONPATH``. Each node gets its own working
directory with its log file ``node.log`` in it.

A node can be restarted (:meth:`NodeProcess.restart`) with the same
arguments and data directory after it was killed or stopped, or with an
empty data directory after :meth:`NodeProcess.wipe_data` (a replaced
machine); :meth:`NodeProcess.stored_partials` reads what a node has made
durable, straight from its SQLite file.

Nothing here sleeps for a fixed time: everything that waits polls a
condition until a deadline (:func:`wait_until`), and every failure message
carries the tail of the nodes' logs so CI output is enough to debug it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from counterdb import localcluster

#: The three loopback hosts the real-process tests run on.
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
#: Fast sync, so faults heal within a second or two.
NODE_ARGS = ["--poll-interval", "0.2", "--peer-timeout", "1", "--backoff-max", "0.5"]
#: Deadline for every node to agree after increments, a restart or a heal.
CONVERGE = 15.0
#: A generous bound on a request that must not wait for peers: a behavioural
#: check that writes and local reads do not wait for them, not a benchmark.
FAST = 1.0

REPO_ROOT = Path(__file__).resolve().parent.parent

#: twistd run by *this* interpreter. ``python -m twisted`` is not usable
#: here: it runs ``twist``, which has neither ``-n`` nor ``--pidfile``, and
#: ``twisted.scripts.twistd`` has no ``__main__`` block.
TWISTD_IN_THIS_PYTHON = localcluster.TWISTD

#: Start-up deadline: importing Twisted and Klein takes ~1 s on an idle
#: machine, much more on a busy CI runner.
START_TIMEOUT = 15.0
#: How long a node gets to exit after SIGTERM before it is SIGKILLed.
STOP_TIMEOUT = localcluster.STOP_TIMEOUT
#: Default client-side timeout of every HTTP call.
HTTP_TIMEOUT = 5.0
#: Lines of each node's log quoted in failure messages.
LOG_TAIL_LINES = 40

T = TypeVar("T")

#: Access log lines of the tests' own polling: noise in failure messages.
_POLLING = re.compile(r'"GET (/config|/counter/[^ ]*/value) HTTP/1\.1" 200 ')


def twistd_command() -> list[str]:
    """The installed ``twistd`` console script of this interpreter.

    Prefers the script next to ``sys.executable`` (or in this interpreter's
    scripts directory) over whatever ``twistd`` comes first on ``PATH``, which
    may belong to another Python; falls back to running twistd in-process
    through ``sys.executable``.
    """
    for directory in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = directory / "twistd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    found = shutil.which("twistd")
    if found:
        return [found]
    return list(TWISTD_IN_THIS_PYTHON)


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment for a node running this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def clean_env() -> dict[str, str]:
    """The environment without ``PYTHONPATH``: only installed code is used."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- waiting -----------------------------------------------------------------


class WaitTimeout(AssertionError):
    """:func:`wait_until` ran out of time."""


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
    details: Callable[[], str] | None = None,
    retry_on: tuple[type[BaseException], ...] = (OSError,),
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns
    something truthy, and return that.

    After ``timeout`` seconds raise :class:`WaitTimeout` saying what was
    awaited (``message``, or its result if it is a callable, evaluated then),
    the last result or error, and then ``details()`` if given (node logs).
    Exceptions of the types in ``retry_on`` count as "not yet" (a node that
    is still starting refuses connections); any other exception propagates.
    """
    deadline = time.monotonic() + timeout
    attempts = 0
    last: Any = None
    last_error: BaseException | None = None
    while True:
        attempts += 1
        try:
            last = predicate()
            last_error = None
        except retry_on as e:
            last, last_error = None, e
        else:
            if last:
                return last
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))  # poll interval, bounded by the deadline
    what = message() if callable(message) else message
    outcome = f"last error: {last_error!r}" if last_error is not None else f"last result: {last!r}"
    text = f"timed out after {timeout:g} s ({attempts} attempts) waiting for {what}; {outcome}"
    if details is not None:
        text += "\n" + details()
    raise WaitTimeout(text)


# -- HTTP ----------------------------------------------------------------------


class Response:
    def __init__(self, status: int, body: bytes, headers: Any, elapsed: float) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self.elapsed = elapsed

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:300]!r} after {self.elapsed:.3f} s>"


def http_request(
    url: str,
    method: str = "GET",
    body: bytes | str | None = None,
    timeout: float = HTTP_TIMEOUT,
    content_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """One HTTP exchange. Any status is returned as a :class:`Response`;
    network failures and timeouts raise (``urllib.error.URLError``,
    ``TimeoutError``: both are ``OSError``)."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    request = urllib.request.Request(url, data=body, method=method)
    if content_type is not None:
        request.add_header("Content-Type", content_type)
    for header, value in (headers or {}).items():
        request.add_header(header, value)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            data = answer.read()
            return Response(answer.status, data, answer.headers, time.monotonic() - started)
    except urllib.error.HTTPError as e:
        with e:
            data = e.read()
        return Response(e.code, data, e.headers, time.monotonic() - started)


def is_timeout(error: BaseException) -> bool:
    """True if ``error`` is urllib's way of saying the client timeout expired."""
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    return isinstance(error, (TimeoutError, socket.timeout))


def is_refused(error: BaseException) -> bool:
    """True if ``error`` says the connection was refused: nothing was sent,
    so the request certainly had no effect."""
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    return isinstance(error, ConnectionRefusedError)


# -- nodes -------------------------------------------------------------------


class NodeProcess:
    """One node of a :class:`NodeCluster`: its process is run by the cluster's
    :class:`counterdb.localcluster.LocalCluster`, its HTTP API is spoken here."""

    def __init__(self, cluster: NodeCluster, name: str) -> None:
        managed = cluster.managed
        self.cluster = cluster
        self.name = name
        self.host = managed.address(name)
        self.port = managed.port
        self.url = managed.url(name)
        self.log_path = managed.log_path(name)
        self.data_dir = managed.data_dir(name)
        #: What failure messages quote: every node's log tail, since a peer
        #: may be the culprit.
        self.logs: Callable[[], str] = cluster.logs

    def __repr__(self) -> str:
        return f"<node {self.name} {self.host}:{self.port}>"

    # -- lifecycle -----------------------------------------------------------

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Start again a node that was killed or stopped (same arguments,
        same data directory) and wait until it answers HTTP. Posts no
        ``/config``: the node uses what it stored."""
        self.cluster.managed.start(self.name, timeout)

    def wipe_data(self) -> None:
        """Delete the data directory of a node that is not running, as if
        the machine had been replaced."""
        self.cluster.managed.wipe_data(self.name)

    def running(self) -> bool:
        """True while the process exists (paused or not)."""
        return self.cluster.managed.state(self.name) != localcluster.STOPPED

    def pause(self) -> None:
        """SIGSTOP: the node keeps its sockets but answers nothing."""
        self.cluster.managed.pause(self.name)

    def resume(self) -> None:
        """SIGCONT, if the node is paused."""
        if self.cluster.managed.state(self.name) == localcluster.PAUSED:
            self.cluster.managed.resume(self.name)

    def kill(self) -> None:
        """SIGKILL, and reap the process."""
        self.cluster.managed.kill(self.name)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; an unclean end is in
        :attr:`shutdown_problem`."""
        self.cluster.managed.stop(self.name, timeout)

    @property
    def shutdown_problem(self) -> str | None:
        """How the node ended, if not the normal way (see
        :attr:`counterdb.localcluster.LocalCluster.shutdown_problems`)."""
        return self.cluster.managed.shutdown_problems.get(self.name)

    # -- the data dir ------------------------------------------------------------

    def stored_replica_id(self) -> str | None:
        """The replica id in the node's data dir (None before it exists)."""
        from counterdb.store import DB_FILE

        path = self.data_dir / DB_FILE
        if not path.exists():
            return None
        try:
            uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'replica_id'").fetchone()
        except sqlite3.Error:
            return None  # still being created
        return row[0] if row else None

    def stored_partials(self, name: str) -> dict[str, int]:
        """The partials of counter ``name`` in the node's SQLite file: what
        survives a crash right now. Read-only; the node may be running."""
        from counterdb.store import DB_FILE  # the tests' own checkout (pyproject.toml pythonpath)

        path = urllib.parse.quote(str(self.data_dir / DB_FILE))
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)) as db:
            rows = db.execute("SELECT replica, count FROM partials WHERE counter = ?", (name,)).fetchall()
        return {replica: count for replica, count in rows}

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the node's log, leaving out the access
        log lines of the tests' own polling (``GET /config``, ``GET .../value``)."""
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError as e:
            return f"--- {self}: no log ({e}) ---"
        kept = [line for line in text.splitlines() if not _POLLING.search(line)]
        tail = kept[-lines:]
        try:
            state = self.cluster.managed.state(self.name)
        except localcluster.ClusterError:
            state = "cluster down"
        problem = self.shutdown_problem
        if problem is not None:
            state += f", {problem}"
        header = f"--- {self} ({state}, {self.log_path}): last {len(tail)} lines, polling requests left out ---"
        return "\n".join([header, *tail])

    # -- HTTP API ------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        timeout: float = HTTP_TIMEOUT,
        content_type: str | None = None,
        raw: bool = False,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """One HTTP exchange with this node, any status returned.

        If the node does not answer (refused, reset, client ``timeout``
        expired) this fails the test with the node logs in the message;
        with ``raw`` the ``OSError`` propagates instead, for tests that
        expect no answer.
        """
        try:
            return http_request(self.url + path, method, body, timeout, content_type, headers)
        except OSError as e:
            if raw:
                raise
            raise AssertionError(
                f"{method} {path} on {self}: no answer within {timeout:g} s: {e!r}\n{self.logs()}"
            ) from e

    def _ok(self, response: Response, what: str) -> Response:
        if response.status != 200:
            raise AssertionError(f"{what} on {self}: expected 200, got {response!r}\n{self.logs()}")
        return response

    def post_config(self, actors: list[str], timeout: float = HTTP_TIMEOUT) -> dict[str, Any]:
        body = json.dumps({"actors": actors})
        response = self.request("POST", "/config", body, timeout, "application/json")
        return self._ok(response, f"POST /config {body}").json()

    def get_config(self, timeout: float = HTTP_TIMEOUT) -> dict[str, Any]:
        return self._ok(self.request("GET", "/config", timeout=timeout), "GET /config").json()

    def increment_response(
        self,
        name: str,
        body: bytes | str | None = None,
        timeout: float = HTTP_TIMEOUT,
        raw: bool = False,
        idempotency_key: str | None = None,
    ) -> Response:
        """POST /counter/<name>: body None or "" adds 1, "5" adds 5, a JSON
        ``{"addValue": n}`` adds n; with ``idempotency_key`` as the
        ``Idempotency-Key`` header."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        body = b"" if body is None else body
        return self.request("POST", f"/counter/{_quote(name)}", body, timeout, raw=raw, headers=headers)

    def increment(self, name: str, body: bytes | str | None = None, timeout: float = HTTP_TIMEOUT) -> int:
        """Increment and return the node's answer (its new local value)."""
        response = self._ok(self.increment_response(name, body, timeout), f"POST /counter/{name} {body!r}")
        return int(response.text)

    def value(self, name: str, timeout: float = HTTP_TIMEOUT) -> int:
        response = self._ok(self.request("GET", f"/counter/{_quote(name)}/value", timeout=timeout), f"GET {name}/value")
        return int(response.text)

    def partials(self, name: str, timeout: float = HTTP_TIMEOUT) -> dict[str, int]:
        """GET /counter/<name>/getsync: this node's copy of every partial."""
        response = self.request("GET", f"/counter/{_quote(name)}/getsync", timeout=timeout)
        return dict(self._ok(response, f"GET {name}/getsync").json()["partials"])

    def consistent_value_response(
        self, name: str, server_timeout: float | None = None, timeout: float = HTTP_TIMEOUT, raw: bool = False
    ) -> Response:
        """GET /counter/<name>/consistent_value[?timeout=server_timeout];
        ``timeout`` is the client's own (urllib) timeout."""
        query = "" if server_timeout is None else f"?timeout={server_timeout:g}"
        return self.request("GET", f"/counter/{_quote(name)}/consistent_value{query}", timeout=timeout, raw=raw)

    def consistent_value(self, name: str, server_timeout: float | None = None, timeout: float = HTTP_TIMEOUT) -> int:
        response = self.consistent_value_response(name, server_timeout, timeout)
        return int(self._ok(response, f"GET {name}/consistent_value").text)


class NodeCluster:
    """The nodes of a :class:`counterdb.localcluster.LocalCluster` (``managed``), as
    :class:`NodeProcess` objects in node order."""

    def __init__(self, managed: localcluster.LocalCluster) -> None:
        self.managed = managed
        self.port = managed.port
        self.nodes = [NodeProcess(self, name) for name in managed.nodes]

    def __iter__(self) -> Iterator[NodeProcess]:
        return iter(self.nodes)

    def __getitem__(self, index: int) -> NodeProcess:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def hosts(self) -> list[str]:
        return [node.host for node in self.nodes]

    def shutdown_problems(self) -> list[str]:
        """What went wrong when nodes were stopped, one line per node."""
        return [f"{node} {node.shutdown_problem}" for node in self.nodes if node.shutdown_problem]

    def logs(self) -> str:
        return "\n".join(node.log_tail() for node in self.nodes)

    def explain(self, what: str) -> str:
        """An assertion message: ``what`` plus every node's log tail."""
        return f"{what}\n{self.logs()}"

    def wait_until(
        self,
        predicate: Callable[[], T],
        timeout: float,
        message: str | Callable[[], str],
        interval: float = 0.05,
    ) -> T:
        """:func:`wait_until`, quoting every node's log tail on failure."""
        return wait_until(predicate, timeout, interval, message, details=self.logs)


@contextlib.contextmanager
def running_cluster(
    base_dir: Path, hosts: Sequence[str], port: int | None = None, args: Sequence[str] = ()
) -> Iterator[NodeCluster]:
    """Start unconfigured nodes on ``hosts`` (the loopback addresses
    :class:`counterdb.localcluster.LocalCluster` uses: 127.0.0.2, 127.0.0.3, ...; all
    on one port) and always stop them, paused ones resumed first.

    When the block ended normally, also fails if a node crashed meanwhile
    or did not shut down cleanly on SIGTERM (the test's own
    :meth:`NodeProcess.kill` is fine).
    """
    managed = localcluster.LocalCluster(base_dir, size=len(hosts), port=port, node_args=args)
    managed.up(START_TIMEOUT, configure=False)
    try:
        if managed.actors != list(hosts):
            raise ValueError(
                f"hosts must be {managed.actors} (the loopback addresses of counterdb.localcluster), got {list(hosts)}"
            )
        cluster = NodeCluster(managed)
        yield cluster
    except BaseException:
        managed.down()
        raise
    managed.down()
    problems = cluster.shutdown_problems()
    if problems:
        raise AssertionError(cluster.explain("unclean node shutdown:\n" + "\n".join(problems)))


@contextlib.contextmanager
def configured_cluster(base_dir: Path, args: Sequence[str] = NODE_ARGS) -> Iterator[NodeCluster]:
    """Three nodes on :data:`HOSTS`, each configured with the seed's bare-IP
    list through ``POST /config`` (the answer checked); stopped, paused ones
    resumed first, however the block ends."""
    with running_cluster(base_dir, HOSTS, args=args) as nodes:
        for index, node in enumerate(nodes):
            answer = node.post_config(HOSTS)
            assert without_version(answer) == {"index": index, "self": node.host, "actors": HOSTS}, nodes.explain(
                f"POST /config to {node} answered {answer!r}"
            )
        yield nodes


# -- what a node runs -------------------------------------------------------------

#: Prints the version and the file of the ``counterdb`` an interpreter imports.
_COUNTERDB_PROBE = "import counterdb; print(counterdb.__version__, counterdb.__file__)"


def imported_counterdb(pid: int) -> str:
    """``"<version> <path of __init__.py>"`` of the ``counterdb`` the running
    node ``pid`` imported.

    Its own interpreter (``argv[0]`` from ``/proc``) is run again with the
    process's own environment and working directory: the same ``sys.path``,
    so the same package (a ``PYTHONPATH`` left pointing at this checkout
    would show here). Only for node processes, whose command is
    ``<python> -c <twistd main>``."""
    proc = Path(f"/proc/{pid}")
    argv = proc.joinpath("cmdline").read_bytes().split(b"\0")
    if argv[1:3] != [b"-c", localcluster.TWISTD[-1].encode()]:
        raise ValueError(f"pid {pid} is not a node run as <python> -c <twistd main>: {argv!r}")
    environ = proc.joinpath("environ").read_bytes().split(b"\0")
    env = dict(entry.split(b"=", 1) for entry in environ if b"=" in entry)
    probe = [argv[0], b"-c", _COUNTERDB_PROBE.encode()]
    done = subprocess.run(probe, env=env, cwd=os.readlink(proc / "cwd"), capture_output=True, timeout=30, check=True)
    return done.stdout.decode().strip()


def schema_version(data_dir: Path) -> int | None:
    """The store schema (``PRAGMA user_version``) in a data dir; None if it
    has no database."""
    from counterdb.store import DB_FILE

    path = data_dir / DB_FILE
    if not path.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True)) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def without_version(config: dict[str, Any]) -> dict[str, Any]:
    """A /config answer without its version (which depends on the order
    the nodes heard of the list)."""
    return {key: value for key, value in config.items() if key != "version"}


def _quote(name: str) -> str:
    """A counter name as one URL path segment."""
    return urllib.parse.quote(name, safe="")
