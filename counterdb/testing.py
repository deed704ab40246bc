"""
A local counterdb cluster for fault tests and experiments.

:class:`Cluster` runs N real counterdb nodes (``twistd -n counterdb``) as
separate processes, using the code of the ``counterdb`` package this module
was imported from (``PYTHONPATH`` is set to the package's parent directory).
Each node gets a directory ``<base_dir>/<name>`` holding its data dir
(``data``) and its log (``node.log``).

Two modes:

- **loopback** (default): nodes listen on 127.0.0.2, 127.0.0.3, ... all on
  one port, and get the bare-IP actors list ``["127.0.0.2", ...]``.
- **netns** (``netns=True``, root only, needs ``ip`` and, for faults,
  ``iptables``): each node runs in its own network namespace, joined to a
  Linux bridge in the root namespace by a veth pair. The bridge takes the
  first address of a small private subnet (default 10.213.0.0/24, or the next
  free 10.213.N.0/24), the nodes the following ones. Inside its namespace a
  node listens on 127.0.0.1:<port+1> with ``--advertise <address>:<port>``,
  and a small delaying TCP proxy (:func:`proxy_main`) listens on
  ``<address>:<port>`` and forwards to it. Faults are applied inside the
  namespaces only: iptables ``DROP`` rules for partitions and packet loss,
  and the proxy's delay for slowness. The controlling process, in the root
  namespace, reaches every node whatever the partitions.

The cluster's state (mode, addresses, pids, namespace and link names,
faults) is kept in ``<base_dir>/cluster.json``, so another process can
:meth:`Cluster.load` it and act on the same cluster; every operation takes
an ``flock`` on ``<base_dir>/cluster.lock`` and re-reads that file first.

Nodes are started in their own sessions, so they outlive the process that
started them until :meth:`Cluster.down`. Every wait in here polls a condition
until a deadline; nothing waits without a bound.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import attrs

import counterdb

log = logging.getLogger(__name__)

#: The directory holding the ``counterdb`` package (and, in a checkout,
#: ``twisted/plugins``): the nodes' ``PYTHONPATH``.
PACKAGE_PARENT = Path(counterdb.__file__).resolve().parent.parent

#: twistd run by this interpreter (``twisted.scripts.twistd`` has no
#: ``__main__`` block).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
PROXY = [sys.executable, "-c", "from counterdb.testing import proxy_main; proxy_main()"]

STATE_FILE = "cluster.json"
LOCK_FILE = "cluster.lock"
STATE_VERSION = 1

LOOPBACK = "loopback"
NETNS = "netns"

#: First port tried when a loopback cluster picks its port.
FIRST_PORT = 18080
PORT_TRIES = 200
DEFAULT_NETNS_PORT = 8080
#: Subnets tried, in order, when a netns cluster is not given one.
DEFAULT_SUBNETS = tuple(f"10.213.{i}.0/24" for i in range(256))
#: The interface name of the veth end inside each namespace.
NS_IFACE = "eth0"

#: Deadline for every node to answer HTTP after start (importing Twisted and
#: Klein takes a second or more on a busy 2-core machine).
START_TIMEOUT = 30.0
#: How long a node gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0
HTTP_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0
#: Attempts at starting a loopback cluster whose port was picked for it
#: (another process may bind the port between the check and the start).
PORT_ATTEMPTS = 3

RUNNING = "running"
PAUSED = "paused"
STOPPED = "stopped"


class ClusterError(Exception):
    """Something the user asked for cannot be done; the message says why."""


# -- value types ----------------------------------------------------------------


@attrs.frozen
class NodeStatus:
    """One node as :meth:`Cluster.status` found it."""

    name: str
    state: str  #: "running", "paused" or "stopped"
    pid: int | None  #: the twistd process, while it exists
    address: str
    url: str
    replica: str | None  #: GET /config's "replica"; None if it did not answer
    netns: str | None = None


@attrs.frozen
class Faults:
    """The network faults in force (netns mode)."""

    #: (src, dst) node names: packets from src to dst are dropped.
    blocked: tuple[tuple[str, str], ...] = ()
    #: node name -> seconds added to data in each direction by its proxy.
    delay: dict[str, float] = attrs.field(factory=dict, hash=False)
    #: node name -> probability that a packet arriving at it is dropped.
    loss: dict[str, float] = attrs.field(factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        return {"blocked": [list(pair) for pair in self.blocked], "delay": dict(self.delay), "loss": dict(self.loss)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Faults:
        return cls(
            blocked=tuple((str(a), str(b)) for a, b in data.get("blocked", ())),
            delay={str(k): float(v) for k, v in data.get("delay", {}).items()},
            loss={str(k): float(v) for k, v in data.get("loss", {}).items()},
        )

    def __bool__(self) -> bool:
        return bool(self.blocked or self.delay or self.loss)


@attrs.define
class _Node:
    """What cluster.json records about one node."""

    name: str
    address: str
    workdir: str
    netns: str | None = None
    veth: str | None = None  # host-side end
    pid: int | None = None
    pid_start: int | None = None  # /proc start time: a reused pid is not ours
    proxy_pid: int | None = None
    proxy_start: int | None = None


@attrs.define
class _State:
    mode: str
    id: str
    port: int  # where clients and peers reach every node
    listen_port: int  # where twistd binds (port+1 on 127.0.0.1 in netns mode)
    node_args: list[str]
    nodes: list[_Node]
    subnet: str | None = None
    bridge: str | None = None
    bridge_address: str | None = None
    forward_rule: bool = False  # root-namespace FORWARD accept for bridged traffic
    faults: dict[str, Any] = attrs.field(factory=dict)
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _State:
        if data.get("version") != STATE_VERSION:
            raise ClusterError(f"cluster.json has version {data.get('version')!r}, expected {STATE_VERSION}")
        fields = dict(data)
        fields["nodes"] = [_Node(**node) for node in data["nodes"]]
        return cls(**fields)


# -- the cluster ------------------------------------------------------------------


class Cluster:
    """N real counterdb nodes on this machine; see the module docstring.

    ``with Cluster(base_dir, 3) as c:`` brings the cluster up and always
    takes it down again.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        size: int = 3,
        netns: bool = False,
        port: int | None = None,
        node_args: Sequence[str] = (),
        subnet: str | None = None,
    ) -> None:
        if not 1 <= size <= 250:
            raise ClusterError(f"size must be from 1 to 250, got {size}")
        if port is not None and not 1 <= port <= 65535:
            raise ClusterError(f"port must be from 1 to 65535, got {port}")
        if subnet is not None and not netns:
            raise ClusterError("a subnet is only used in netns mode")
        self.base_dir = Path(base_dir).resolve()
        self.size = size
        self.netns = netns
        self._port = port
        self._subnet = subnet
        self.node_args = [str(arg) for arg in node_args]
        self._state: _State | None = None
        #: The cluster's random id, part of every namespace and link name;
        #: kept after :meth:`down` so callers can check nothing is left.
        self.id: str | None = None
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        #: Where each node's log was when it was last started from here.
        self._log_offsets: dict[str, int] = {}
        #: Exit status of each child process reaped here, by pid.
        self._exit_status: dict[int, int] = {}
        #: Node name -> how the node ended when it did not end the normal
        #: way: it had exited by itself (not by :meth:`kill`), was still
        #: running :data:`STOP_TIMEOUT` s after SIGTERM, or exited with a
        #: status other than 0 or -SIGTERM after it (exit statuses are only
        #: known for nodes started by this object). Filled by :meth:`stop`
        #: and :meth:`down`; entries are never removed.
        self.shutdown_problems: dict[str, str] = {}
        self._lock_depth = 0
        self._lock_fd: int | None = None
        # The flock serialises processes; this serialises threads of one
        # process (a nemesis thread beside the test's own calls).
        self._thread_lock = threading.RLock()

    # -- loading and saving -----------------------------------------------------

    @classmethod
    def load(cls, base_dir: str | os.PathLike[str]) -> Cluster:
        """The cluster recorded in ``base_dir/cluster.json`` by another
        :class:`Cluster` (maybe in another process)."""
        path = Path(base_dir).resolve()
        state = _read_state(path)
        if state is None:
            raise ClusterError(f"no cluster in {path} (no {STATE_FILE}); start one with `counterdb-cluster up`")
        cluster = cls(path, len(state.nodes), state.mode == NETNS, state.port, state.node_args, state.subnet)
        cluster._state = state
        cluster.id = state.id
        return cluster

    @property
    def state_path(self) -> Path:
        return self.base_dir / STATE_FILE

    def _save(self) -> None:
        assert self._state is not None
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._state.to_json(), indent=2) + "\n", "utf-8")
        os.replace(tmp, self.state_path)

    @contextlib.contextmanager
    def _locked(self, reload: bool = True) -> Iterator[None]:
        """Hold the cluster's flock, with the state re-read from disk."""
        with self._thread_lock:
            with self._flocked(reload):
                yield

    @contextlib.contextmanager
    def _flocked(self, reload: bool) -> Iterator[None]:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._lock_depth == 0:
            fd = os.open(self.base_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            _flock(fd, f"{self.base_dir / LOCK_FILE}")
            self._lock_fd = fd
        self._lock_depth += 1
        try:
            if reload:
                state = _read_state(self.base_dir)
                if state is None:
                    self._state = None
                    raise ClusterError(f"no cluster in {self.base_dir} (no {STATE_FILE}): it is down")
                self._state = state
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    # -- context manager ----------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # -- bringing it up and down ------------------------------------------------------

    def up(self, timeout: float = START_TIMEOUT, configure: bool = True) -> None:
        """Start every node, wait until each answers HTTP, and post the
        actors list to each (with ``configure=False`` the nodes stay
        unconfigured, for callers that post ``/config`` themselves). On any
        failure, tears down whatever it made."""
        if self.netns:
            _require_netns_tools()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with self._locked(reload=False):
            if self.state_path.exists():
                raise ClusterError(
                    f"{self.base_dir} already has a cluster ({STATE_FILE}); "
                    f"take it down first (counterdb-cluster --dir {self.base_dir} down)"
                )
            try:
                self._up(timeout, configure)
            except BaseException:
                log.warning("cluster in %s did not come up; taking down what was started", self.base_dir)
                with contextlib.suppress(Exception):
                    self._down()
                raise

    def _up(self, timeout: float, configure: bool) -> None:
        cluster_id = _new_id() if self.netns else secrets.token_hex(3)
        self.id = cluster_id
        if self.netns:
            port = self._port or DEFAULT_NETNS_PORT
            listen_port = port + 1 if port < 65535 else port - 1
            nodes = [
                _Node(
                    name=f"n{i}",
                    address="",  # set once the subnet is chosen
                    workdir=str(self.base_dir / f"n{i}"),
                    netns=f"cdb-{cluster_id}-n{i}",
                    veth=f"cdb{cluster_id}h{i}",
                )
                for i in range(1, self.size + 1)
            ]
            self._state = _State(NETNS, cluster_id, port, listen_port, self.node_args, nodes, bridge=f"cdb{cluster_id}br")
        else:
            addresses = [f"127.0.0.{i + 1}" for i in range(1, self.size + 1)]
            port = self._port if self._port is not None else free_common_port(addresses)
            nodes = [
                _Node(name=f"n{i}", address=addresses[i - 1], workdir=str(self.base_dir / f"n{i}"))
                for i in range(1, self.size + 1)
            ]
            self._state = _State(LOOPBACK, cluster_id, port, port, self.node_args, nodes)
        for node in self._state.nodes:
            Path(node.workdir).mkdir(parents=True, exist_ok=True)
        # Recorded before anything is created, so a `down` from another
        # process can clean up after a controlling process that died midway.
        self._save()

        if self.netns:
            self._create_network()
            self._save()
            for node in self._state.nodes:
                _write_delay(node, 0.0)
                self._start_proxy(node)
            self._apply_faults()

        attempts = PORT_ATTEMPTS if (not self.netns and self._port is None) else 1
        for attempt in range(1, attempts + 1):
            for node in self._state.nodes:
                self._start_node(node)
            self._save()
            try:
                self._wait_ready(self._state.nodes, timeout)
                break
            except _CannotListen as e:
                if attempt == attempts:
                    raise
                log.info("%s; trying another port", e)
                for node in self._state.nodes:
                    self._stop_process(node, proxy=False, record=False)
                addresses = [node.address for node in self._state.nodes]
                self._state.port = self._state.listen_port = free_common_port(addresses, self._state.port + 1)
                self._save()

        actors = self.actors
        for node in self._state.nodes if configure else ():
            answer = _http("POST", self._url(node) + "/config", json.dumps({"actors": actors}).encode(), HTTP_TIMEOUT)
            if answer[0] != 200:
                raise ClusterError(f"POST /config to {node.name} answered {answer[0]}: {answer[1][:300]!r}")
        self._save()
        log.info("cluster %s up in %s: %s", self._state.id, self.base_dir, ", ".join(self.nodes))

    def down(self) -> None:
        """Stop every process; in netns mode delete every namespace, veth,
        bridge and rule this cluster made. Safe to call again."""
        try:
            with self._locked():
                self._down()
        except ClusterError:
            if self.state_path.exists():
                raise
            # Already down (no cluster.json): nothing to do.

    def _down(self) -> None:
        state = self._state
        if state is None:
            return
        problems: list[str] = []
        # Resume paused nodes first: a node shutting down must not wait on
        # a paused peer.
        for node in state.nodes:
            if node.pid is not None and self._state_of(node.pid, node.pid_start) == PAUSED:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGCONT)
        for node in state.nodes:
            for proxy in (False, True):
                try:
                    self._stop_process(node, proxy)
                except Exception as e:  # noqa: BLE001 - stop the others anyway
                    problems.append(f"{node.name}: {e}")
        self._save_if_present()
        if state.mode == NETNS:
            problems += self._delete_network()
        if problems:
            self._save_if_present()
            raise ClusterError("could not take everything down:\n  " + "\n  ".join(problems))
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        log.info("cluster %s in %s is down", state.id, self.base_dir)
        self._state = None

    def _save_if_present(self) -> None:
        if self._state is not None and self.state_path.exists():
            self._save()

    # -- nodes -------------------------------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        """The node names, n1 .. nN."""
        return [node.name for node in self._require_state().nodes]

    @property
    def mode(self) -> str:
        return self._require_state().mode

    @property
    def port(self) -> int:
        return self._require_state().port

    @property
    def subnet(self) -> str | None:
        """The netns subnet (None on loopback)."""
        return self._require_state().subnet

    @property
    def actors(self) -> list[str]:
        """The actors list posted to every node."""
        state = self._require_state()
        if state.mode == NETNS:
            return [f"{node.address}:{state.port}" for node in state.nodes]
        return [node.address for node in state.nodes]

    def node_name(self, ref: str) -> str:
        """The name of the node ``ref`` names: a name (``n1``), an address,
        ``address:port`` or a URL."""
        return self._node(ref).name

    def address(self, node: str) -> str:
        return self._node(node).address

    def url(self, node: str) -> str:
        return self._url(self._node(node))

    def namespace(self, node: str) -> str:
        """The network namespace of ``node`` (netns mode)."""
        self._require_netns("namespace")
        return self._node(node).netns  # type: ignore[return-value]

    def log_path(self, node: str) -> Path:
        return Path(self._node(node).workdir) / "node.log"

    def data_dir(self, node: str) -> Path:
        return Path(self._node(node).workdir) / "data"

    def log_tail(self, node: str, lines: int = 30) -> str:
        path = self.log_path(node)
        try:
            text = path.read_text("utf-8", "replace").splitlines()[-lines:]
        except OSError as e:
            return f"--- {node}: no log ({e}) ---"
        return "\n".join([f"--- {node} ({path}), last {len(text)} lines ---", *text])

    def _listening(self, node: _Node) -> bool:
        """Whether the node's log says it listens, since its last start."""
        try:
            with open(Path(node.workdir) / "node.log", "rb") as f:
                f.seek(self._log_offsets.get(f"{node.name}/node.log", 0))
                return b"counterdb listening on" in f.read()
        except OSError:
            return False

    def _proxy_log_tail(self, node: _Node, lines: int = 30) -> str:
        path = Path(node.workdir) / "proxy.log"
        try:
            return "\n".join(path.read_text("utf-8", "replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no proxy log: {e})"

    def kill(self, node: str) -> None:
        """SIGKILL the node's process (in netns mode, and its proxy)."""
        with self._locked():
            record = self._node(node)
            if self._state_of(record.pid, record.pid_start) == STOPPED:
                raise ClusterError(f"{record.name} is not running")
            os.kill(record.pid, signal.SIGKILL)  # type: ignore[arg-type]
            _wait_for(lambda: self._state_of(record.pid, record.pid_start) == STOPPED, STOP_TIMEOUT)
            record.pid = record.pid_start = None
            if record.netns:
                # As on a real host whose process died, connections to its
                # address are refused (the proxy would accept, then drop them).
                self._stop_process(record, proxy=True)
            self._save()

    def start(self, node: str, timeout: float = START_TIMEOUT) -> None:
        """Start a stopped node again, same data dir and arguments, and wait
        until it answers. It uses the actors list it stored."""
        with self._locked():
            record = self._node(node)
            if self._state_of(record.pid, record.pid_start) != STOPPED:
                raise ClusterError(f"{record.name} is already running (pid {record.pid})")
            if record.netns and self._state_of(record.proxy_pid, record.proxy_start) == STOPPED:
                self._start_proxy(record)
            self._start_node(record)
            self._save()
            self._wait_ready([record], timeout)

    def stop(self, node: str, timeout: float = STOP_TIMEOUT) -> None:
        """Stop a running node the clean way: SIGTERM (after SIGCONT, in
        case it is paused), SIGKILL if it is still running ``timeout`` s
        later; an unclean end is recorded in :attr:`shutdown_problems`. In
        netns mode its proxy stops too. :meth:`start` starts it again."""
        with self._locked():
            record = self._node(node)
            if self._state_of(record.pid, record.pid_start) == STOPPED:
                raise ClusterError(f"{record.name} is not running")
            self._stop_process(record, proxy=False, timeout=timeout)
            if record.netns:
                self._stop_process(record, proxy=True)
            self._save()

    def wipe_data(self, node: str) -> None:
        """Delete the data dir of a stopped node, as if its machine had been
        replaced: :meth:`start` then brings it up unconfigured, with a new
        replica id."""
        with self._locked():
            record = self._node(node)
            if self._state_of(record.pid, record.pid_start) != STOPPED:
                raise ClusterError(f"{record.name} is running: stop it before wiping its data")
            path = Path(record.workdir) / "data"
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                raise ClusterError(f"could not delete {path}")

    def state(self, node: str) -> str:
        """The node's process state, "running", "paused" or "stopped",
        without asking the node anything."""
        with self._locked():
            record = self._node(node)
            return self._state_of(record.pid, record.pid_start)

    def pause(self, node: str) -> None:
        """SIGSTOP: the node keeps its sockets but answers nothing."""
        self._signal_node(node, signal.SIGSTOP, PAUSED)

    def resume(self, node: str) -> None:
        """SIGCONT a paused node."""
        self._signal_node(node, signal.SIGCONT, RUNNING)

    def _signal_node(self, node: str, sig: signal.Signals, want: str) -> None:
        with self._locked():
            record = self._node(node)
            if self._state_of(record.pid, record.pid_start) == STOPPED:
                raise ClusterError(f"{record.name} is not running")
            os.kill(record.pid, sig)  # type: ignore[arg-type]
            if not _wait_for(lambda: self._state_of(record.pid, record.pid_start) in (want, STOPPED), 2.0):
                raise ClusterError(f"{record.name} (pid {record.pid}) is not {want} after {sig.name}")

    def status(self, http_timeout: float = 1.0) -> list[NodeStatus]:
        """Every node's state, pid, address and replica id (asked over
        HTTP from running nodes)."""
        with self._locked():
            result = []
            for node in self._require_state().nodes:
                run_state = self._state_of(node.pid, node.pid_start)
                replica = None
                if run_state == RUNNING:
                    with contextlib.suppress(OSError, ValueError, KeyError):
                        code, body = _http("GET", self._url(node) + "/config", None, http_timeout)
                        if code == 200:
                            replica = json.loads(body)["replica"]
                result.append(
                    NodeStatus(
                        name=node.name,
                        state=run_state,
                        pid=node.pid if run_state != STOPPED else None,
                        address=node.address,
                        url=self._url(node),
                        replica=replica,
                        netns=node.netns,
                    )
                )
            return result

    # -- faults (netns mode) -------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return Faults.from_json(self._require_state().faults)

    def partition(self, groups: Sequence[Sequence[str]]) -> None:
        """Drop all traffic between nodes of different groups, both ways,
        silently. Nodes in no group keep talking to everyone. Adds to the
        partitions already in force; :meth:`heal` removes them all."""
        self._require_netns("partition")
        with self._locked():
            names = [[self.node_name(ref) for ref in group] for group in groups]
            if len(names) < 2 or any(not group for group in names):
                raise ClusterError("a partition needs at least two non-empty groups")
            flat = [name for group in names for name in group]
            if len(set(flat)) != len(flat):
                raise ClusterError(f"a node is in more than one group: {names}")
            pairs = {
                (a, b)
                for i, group in enumerate(names)
                for j, other in enumerate(names)
                if i != j
                for a in group
                for b in other
            }
            self._update_faults(lambda f: attrs.evolve(f, blocked=tuple(sorted(set(f.blocked) | pairs))))

    def partition_oneway(self, src: str, dst: str) -> None:
        """Drop packets from ``src`` to ``dst`` (TCP then fails both ways,
        but ``dst`` can still send to ``src``)."""
        self._require_netns("partition")
        with self._locked():
            a, b = self.node_name(src), self.node_name(dst)
            if a == b:
                raise ClusterError(f"{a} cannot be partitioned from itself")
            self._update_faults(lambda f: attrs.evolve(f, blocked=tuple(sorted(set(f.blocked) | {(a, b)}))))

    def heal(self) -> None:
        """Remove every partition, delay and packet loss."""
        self._require_netns("heal")
        with self._locked():
            self._update_faults(lambda f: Faults())

    def slow(self, node: str, seconds: float) -> None:
        """Delay all data to and from ``node`` by ``seconds`` in each
        direction (0 removes the delay). Takes effect for data arriving
        from now on, on open connections too."""
        self._require_netns("slow")
        if not 0 <= seconds <= 3600:
            raise ClusterError(f"the delay must be from 0 to 3600 seconds, got {seconds}")
        with self._locked():
            name = self.node_name(node)

            def change(f: Faults) -> Faults:
                delay = {k: v for k, v in f.delay.items() if k != name}
                if seconds > 0:
                    delay[name] = seconds
                return attrs.evolve(f, delay=delay)

            self._update_faults(change)

    def flaky(self, node: str, loss: float) -> None:
        """Drop each packet arriving at ``node`` with probability ``loss``
        (0 to 1; 0 removes the loss)."""
        self._require_netns("flaky")
        if not 0 <= loss <= 1:
            raise ClusterError(f"the loss must be a probability from 0 to 1, got {loss}")
        with self._locked():
            name = self.node_name(node)

            def change(f: Faults) -> Faults:
                losses = {k: v for k, v in f.loss.items() if k != name}
                if loss > 0:
                    losses[name] = loss
                return attrs.evolve(f, loss=losses)

            self._update_faults(change)

    def _update_faults(self, change: Callable[[Faults], Faults]) -> None:
        state = self._require_state()
        faults = change(Faults.from_json(state.faults))
        state.faults = faults.to_json()
        self._save()
        self._apply_faults()
        log.info("faults now %s", state.faults)

    def _apply_faults(self) -> None:
        """Make every namespace's firewall and proxy delay match the
        recorded faults (whole tables replaced: idempotent)."""
        state = self._require_state()
        faults = Faults.from_json(state.faults)
        by_name = {node.name: node for node in state.nodes}
        restore = _find_tool("iptables-restore")
        if restore is None and (faults.blocked or faults.loss):
            restore = _tool("iptables-restore")  # raises: says what to install
        for node in state.nodes:
            _write_delay(node, faults.delay.get(node.name, 0.0))
            rules = [f"-A INPUT -s {by_name[src].address}/32 -j DROP" for src, dst in faults.blocked if dst == node.name]
            if node.name in faults.loss:
                rules.append(
                    f"-A INPUT -i {NS_IFACE} -m statistic --mode random --probability {faults.loss[node.name]:.6f} -j DROP"
                )
            table = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", *rules, "COMMIT", ""])
            if restore is None:  # no iptables, and nothing to drop: nothing to undo either
                continue
            _run([_tool("ip"), "netns", "exec", node.netns, restore], input=table)  # type: ignore[list-item]

    # -- internals: processes ----------------------------------------------------------------

    def _require_state(self) -> _State:
        if self._state is None:
            state = _read_state(self.base_dir)
            if state is None:
                raise ClusterError(f"no cluster in {self.base_dir}: it is not up")
            self._state = state
        return self._state

    def _require_netns(self, what: str) -> None:
        if self._require_state().mode != NETNS:
            raise ClusterError(
                f"{what} needs a netns cluster (`counterdb-cluster up --netns`, or Cluster(..., netns=True)); "
                f"the cluster in {self.base_dir} runs on loopback"
            )

    def _node(self, ref: str) -> _Node:
        state = self._require_state()
        text = str(ref).strip()
        for prefix in ("http://", "https://"):
            if text.startswith(prefix):
                text = text[len(prefix) :].rstrip("/")
        for node in state.nodes:
            if text in (node.name, node.address, f"{node.address}:{state.port}"):
                return node
        known = ", ".join(f"{node.name} ({node.address})" for node in state.nodes)
        raise ClusterError(f"unknown node {ref!r}; the nodes are {known}")

    def _url(self, node: _Node) -> str:
        return f"http://{node.address}:{self._require_state().port}"

    def _in_netns(self, node: _Node, command: list[str]) -> list[str]:
        if node.netns is None:
            return command
        return [_tool("ip"), "netns", "exec", node.netns, *command]

    def _spawn(self, node: _Node, command: list[str], log_name: str) -> tuple[int, int | None]:
        workdir = Path(node.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        full = self._in_netns(node, command)
        with open(workdir / log_name, "ab") as out:
            self._log_offsets[f"{node.name}/{log_name}"] = out.tell()
            out.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(full)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                full,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives a CLI that started it
            )
        self._children[proc.pid] = proc
        return proc.pid, _proc_start(proc.pid)

    def _start_node(self, node: _Node) -> None:
        state = self._require_state()
        data = str(Path(node.workdir) / "data")
        if state.mode == NETNS:
            where = ["--port", str(state.listen_port), "--interface", "127.0.0.1", "--advertise", f"{node.address}:{state.port}"]
        else:
            where = ["--port", str(state.port), "--interface", node.address]
        command = [*TWISTD, "-n", "--pidfile=", "counterdb", *where, "--data-dir", data, *state.node_args]
        node.pid, node.pid_start = self._spawn(node, command, "node.log")
        log.info("started %s: pid %s", node.name, node.pid)

    def _start_proxy(self, node: _Node) -> None:
        state = self._require_state()
        command = [
            *PROXY,
            "--listen",
            f"{node.address}:{state.port}",
            "--target",
            f"127.0.0.1:{state.listen_port}",
            "--delay-file",
            str(_delay_file(node)),
        ]
        node.proxy_pid, node.proxy_start = self._spawn(node, command, "proxy.log")

    def _state_of(self, pid: int | None, start: int | None) -> str:
        if pid is None:
            return STOPPED
        child = self._children.get(pid)
        if child is None:
            return _proc_state(pid, start)
        if child.poll() is None:
            stat = _proc_stat(pid)
            if stat is not None and stat[0] not in "ZXx":
                return PAUSED if stat[0] in "Tt" else RUNNING
            # A zombie: reap it through its Popen, which keeps the status.
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(1.0)
            if child.returncode is None:
                return RUNNING
        self._exit_status[pid] = child.returncode  # type: ignore[assignment]
        del self._children[pid]
        return STOPPED

    def _stop_process(self, node: _Node, proxy: bool, timeout: float = STOP_TIMEOUT, record: bool = True) -> None:
        """SIGCONT, SIGTERM, then SIGKILL after ``timeout``. With ``record``,
        a node (not a proxy) that did not end the normal way gets an entry
        in :attr:`shutdown_problems`."""
        pid, start = (node.proxy_pid, node.proxy_start) if proxy else (node.pid, node.pid_start)
        problem: str | None = None
        if self._state_of(pid, start) != STOPPED:
            assert pid is not None
            for sig in (signal.SIGCONT, signal.SIGTERM):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            what = "proxy of " + node.name if proxy else node.name
            if not _wait_for(lambda: self._state_of(pid, start) == STOPPED, timeout):
                log.warning("%s (pid %s) still running %s s after SIGTERM: SIGKILL", what, pid, timeout)
                problem = f"was still running {timeout:g} s after SIGTERM: SIGKILLed"
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not _wait_for(lambda: self._state_of(pid, start) == STOPPED, STOP_TIMEOUT):
                    raise ClusterError(f"{what} (pid {pid}) survived SIGKILL")
            else:
                status = self._exit_status.get(pid)
                # twistd shuts down, then re-raises the signal that stopped
                # it, so that its parent sees why it ended: -SIGTERM.
                if status is not None and status not in (0, -signal.SIGTERM):
                    problem = f"exited with status {status} after SIGTERM"
        elif pid is not None:
            status = self._exit_status.get(pid)
            problem = "had exited by itself" + (f" with status {status}" if status is not None else "")
        if problem is not None and record and not proxy:
            log.warning("%s %s", node.name, problem)
            self.shutdown_problems[node.name] = problem
        if proxy:
            node.proxy_pid = node.proxy_start = None
        else:
            node.pid = node.pid_start = None

    def _wait_ready(self, nodes: Sequence[_Node], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node in nodes:
            url = self._url(node) + "/config"
            last: object = None
            while True:
                if self._state_of(node.pid, node.pid_start) == STOPPED:
                    tail = self.log_tail(node.name)
                    error = _CannotListen if "cannot listen on" in tail else ClusterError
                    raise error(f"{node.name} exited while starting\n{tail}")
                if node.netns is not None and self._state_of(node.proxy_pid, node.proxy_start) == STOPPED:
                    raise ClusterError(f"the proxy of {node.name} exited\n{self._proxy_log_tail(node)}")
                # Only our own process counts: with a port picked by
                # free_common_port, another program may have bound it first,
                # and then its answers must not pass for our node's.
                if not self._listening(node):
                    last = "no 'counterdb listening on' in its log yet"
                else:
                    try:
                        code, _ = _http("GET", url, None, 1.0)
                        if code == 200:
                            break
                        last = f"status {code}"
                    except OSError as e:
                        last = e
                if time.monotonic() >= deadline:
                    raise ClusterError(
                        f"{node.name} did not answer {url} within {timeout:g} s (last: {last!r})\n{self.log_tail(node.name)}"
                    )
                time.sleep(0.05)

    # -- internals: the network (netns mode) ----------------------------------------------------

    def _create_network(self) -> None:
        state = self._require_state()
        ip = _tool("ip")
        with _global_lock():
            subnet = _choose_subnet(self._subnet, self.size)
            hosts = list(itertools.islice(subnet.hosts(), self.size + 1))
            state.subnet = str(subnet)
            state.bridge_address = str(hosts[0])
            for node, address in zip(state.nodes, hosts[1:]):
                node.address = str(address)
            self._save()
            _run([ip, "link", "add", state.bridge, "type", "bridge"])  # type: ignore[list-item]
            _run([ip, "addr", "add", f"{state.bridge_address}/{subnet.prefixlen}", "dev", state.bridge])  # type: ignore[list-item]
            _run([ip, "link", "set", state.bridge, "up"])  # type: ignore[list-item]
        # With br_netfilter, bridged packets go through the root
        # namespace's FORWARD chain, whose policy may be DROP (Docker).
        if _bridge_netfilter() and _find_tool("iptables") is not None:
            _run([_tool("iptables"), "-I", "FORWARD", "-i", state.bridge, "-o", state.bridge, "-j", "ACCEPT"])  # type: ignore[list-item]
            state.forward_rule = True
            self._save()
        for node in state.nodes:
            ns, veth = node.netns, node.veth
            assert ns is not None and veth is not None
            _run([ip, "netns", "add", ns])
            _run([ip, "link", "add", veth, "type", "veth", "peer", "name", NS_IFACE, "netns", ns])
            _run([ip, "link", "set", veth, "master", state.bridge])  # type: ignore[list-item]
            _run([ip, "link", "set", veth, "up"])
            _run([ip, "-n", ns, "link", "set", "lo", "up"])
            _run([ip, "-n", ns, "addr", "add", f"{node.address}/{subnet.prefixlen}", "dev", NS_IFACE])
            _run([ip, "-n", ns, "link", "set", NS_IFACE, "up"])
        log.info("network %s: bridge %s (%s), %d namespaces", state.subnet, state.bridge, state.bridge_address, len(state.nodes))

    def _delete_network(self) -> list[str]:
        """Delete every namespace, link and rule of this cluster that still
        exists; return what could not be deleted."""
        state = self._require_state()
        ip = _find_tool("ip")
        if ip is None:
            return ["`ip` (iproute2) is not installed: cannot delete namespaces and links"]
        problems: list[str] = []
        namespaces = _netns_names()
        links = _link_names()
        for node in state.nodes:
            if node.netns in namespaces:
                # Anything still inside is ours (the namespace is).
                pids = _run([ip, "netns", "pids", node.netns], check=False).stdout.split()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            if node.veth in links:
                result = _run([ip, "link", "del", node.veth], check=False)
                if result.returncode != 0 and node.veth in _link_names():
                    problems.append(f"ip link del {node.veth}: {result.stderr.strip()}")
            if node.netns in namespaces:
                result = _run([ip, "netns", "del", node.netns], check=False)
                if result.returncode != 0 and node.netns in _netns_names():
                    problems.append(f"ip netns del {node.netns}: {result.stderr.strip()}")
        if state.forward_rule:
            iptables = _find_tool("iptables")
            if iptables is not None:
                rule = ["FORWARD", "-i", state.bridge, "-o", state.bridge, "-j", "ACCEPT"]
                for _ in range(10):  # every copy, in case it was added twice
                    if _run([iptables, "-C", *rule], check=False).returncode != 0:  # type: ignore[list-item]
                        break
                    _run([iptables, "-D", *rule], check=False)  # type: ignore[list-item]
            state.forward_rule = False
        if state.bridge in links:
            result = _run([ip, "link", "del", state.bridge], check=False)  # type: ignore[list-item]
            if result.returncode != 0 and state.bridge in _link_names():
                problems.append(f"ip link del {state.bridge}: {result.stderr.strip()}")
        mine = {node.veth for node in state.nodes} | {state.bridge}
        if not _wait_for(lambda: not (mine & _link_names()), 5.0):
            problems.append(f"links still present: {sorted(mine & _link_names())}")  # type: ignore[type-var]
        return problems


class _CannotListen(ClusterError):
    """A node exited because its port was taken."""


# -- helpers ---------------------------------------------------------------------------


def _read_state(base_dir: Path) -> _State | None:
    path = base_dir / STATE_FILE
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ClusterError(f"cannot read {path}: {e}") from None
    try:
        return _State.from_json(data)
    except (TypeError, KeyError) as e:
        raise ClusterError(f"{path} is not a cluster state file: {e}") from None


def _flock(fd: int, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise ClusterError(f"{what} is held by another process for more than {timeout:g} s") from None
            time.sleep(0.05)


@contextlib.contextmanager
def _global_lock() -> Iterator[None]:
    """Serialises subnet choice between clusters on this machine."""
    directory = Path("/run/lock") if os.access("/run/lock", os.W_OK) else Path(tempfile.gettempdir())
    path = directory / "counterdb-cluster-netns.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    _flock(fd, str(path))
    try:
        yield
    finally:
        os.close(fd)


def _wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of a process, or None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _proc_start(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _proc_state(pid: int, start: int | None) -> str:
    stat = _proc_stat(pid)
    if stat is None or (start is not None and stat[1] != start):
        return STOPPED  # gone, or the pid now belongs to another process
    letter = stat[0]
    if letter in "ZXx":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        return STOPPED
    if letter in "Tt":
        return PAUSED
    return RUNNING


def _http(method: str, url: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


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


def _find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _tool(name: str) -> str:
    found = _find_tool(name)
    if found is None:
        package = "iproute2" if name == "ip" else "iptables"
        raise ClusterError(f"`{name}` is not installed (package {package}); netns clusters and their faults need it")
    return found


def _require_netns_tools() -> None:
    if os.geteuid() != 0:
        raise ClusterError("netns mode needs root (it creates network namespaces, veth pairs and a bridge)")
    _tool("ip")


def _run(command: list[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            command, input=input, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=None if input else subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{' '.join(command)}` did not finish within {COMMAND_TIMEOUT:g} s") from None
    if check and result.returncode != 0:
        raise ClusterError(f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()}")
    return result


def _netns_names() -> set[str]:
    ip = _find_tool("ip")
    if ip is None:
        return set()
    out = _run([ip, "netns", "list"], check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _link_names() -> set[str]:
    ip = _find_tool("ip")
    if ip is None:
        return set()
    out = _run([ip, "-o", "link", "show"], check=False).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.add(parts[1].strip().split("@")[0])
    return names


def _new_id() -> str:
    """A 6-hex-digit id no namespace or link on this machine uses yet."""
    for _ in range(20):
        candidate = secrets.token_hex(3)
        taken = any(candidate in name for name in _netns_names() | _link_names())
        if not taken:
            return candidate
    raise ClusterError("could not find an unused cluster id")


def _used_networks() -> list[ipaddress.IPv4Network]:
    ip = _tool("ip")
    used = []
    for line in _run([ip, "-o", "-4", "addr", "show"]).stdout.splitlines():
        match = re.search(r"\binet (\S+)", line)
        if match:
            used.append(ipaddress.ip_interface(match.group(1)).network)
    for line in _run([ip, "-4", "route", "show", "table", "all"], check=False).stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("broadcast", "local", "unreachable", "blackhole", "prohibit", "throw", "multicast"):
            first = line.split()[1] if len(line.split()) > 1 else ""
        with contextlib.suppress(ValueError):
            if first and first != "default":
                used.append(ipaddress.ip_network(first, strict=False))
    return used


def _choose_subnet(wanted: str | None, size: int) -> ipaddress.IPv4Network:
    candidates = [wanted] if wanted is not None else list(DEFAULT_SUBNETS)
    used = _used_networks()
    for text in candidates:
        try:
            subnet = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            raise ClusterError(f"subnet {text!r}: {e}") from None
        if not isinstance(subnet, ipaddress.IPv4Network) or not subnet.is_private:
            raise ClusterError(f"subnet {text}: use a private IPv4 subnet such as 10.213.0.0/24")
        if subnet.num_addresses - 2 < size + 1:
            raise ClusterError(f"subnet {text} is too small for a bridge and {size} nodes")
        clash = [str(n) for n in used if n.overlaps(subnet)]
        if not clash:
            return subnet
        if wanted is not None:
            raise ClusterError(f"subnet {text} overlaps networks already in use on this machine: {clash}")
    raise ClusterError("every subnet 10.213.N.0/24 is in use; pass a free private subnet")


def _bridge_netfilter() -> bool:
    try:
        return Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip() == "1"
    except OSError:
        return False


def _delay_file(node: _Node) -> Path:
    return Path(node.workdir) / "proxy-delay"


def _write_delay(node: _Node, seconds: float) -> None:
    path = _delay_file(node)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{seconds:.6f}\n")
    os.replace(tmp, path)


# -- the delaying proxy (a process of its own) --------------------------------------------------


class _DelayedWriter:
    """Writes chunks to a transport ``delay()`` seconds after they arrived,
    in arrival order (a chunk never overtakes an earlier one, even when the
    delay shrinks). ``None`` stands for closing the connection."""

    def __init__(self, clock: Any, delay: Callable[[], float]) -> None:
        self.clock = clock
        self.delay = delay
        self.transport: Any = None
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.last_due = 0.0
        self.call: Any = None
        self.done = False

    def attach(self, transport: Any) -> None:
        self.transport = transport
        self._schedule()

    def put(self, data: bytes | None) -> None:
        if self.done:
            return
        due = max(self.clock.seconds() + self.delay(), self.last_due)
        self.last_due = due
        self.queue.append((due, data))
        self._schedule()

    def cancel(self) -> None:
        self.done = True
        self.queue.clear()
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def _schedule(self) -> None:
        if self.done or self.call is not None or self.transport is None or not self.queue:
            return
        wait = self.queue[0][0] - self.clock.seconds()
        self.call = self.clock.callLater(max(0.0, wait), self._flush)

    def _flush(self) -> None:
        self.call = None
        now = self.clock.seconds()
        while self.queue and self.queue[0][0] <= now and not self.done:
            _, data = self.queue.popleft()
            if data is None:
                self.done = True
                self.queue.clear()
                self.transport.loseConnection()
                return
            self.transport.write(data)
        self._schedule()


def _read_delay(path: Path) -> float:
    try:
        value = float(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0.0
    return value if 0 < value < 3600 else 0.0


def proxy_main(argv: Sequence[str] | None = None) -> None:
    """``--listen HOST:PORT --target HOST:PORT --delay-file PATH``: forward
    TCP connections, delaying data both ways by the number of seconds in
    the delay file, which is re-read for every chunk of data."""
    import argparse

    from twisted.internet import reactor
    from twisted.internet.protocol import ClientFactory, Factory, Protocol
    from twisted.python import log as twisted_log

    parser = argparse.ArgumentParser(prog="counterdb-cluster-proxy")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay-file", required=True, type=Path)
    args = parser.parse_args(argv)
    listen_host, _, listen_port = args.listen.rpartition(":")
    target_host, _, target_port = args.target.rpartition(":")

    def delay() -> float:
        return _read_delay(args.delay_file)

    class Backend(Protocol):
        def __init__(self, front: Front) -> None:
            self.front = front

        def connectionMade(self) -> None:
            self.front.backend_connected(self.transport)

        def dataReceived(self, data: bytes) -> None:
            self.front.to_client.put(data)

        def connectionLost(self, reason: object = None) -> None:
            self.front.backend_lost()

    class BackendFactory(ClientFactory):
        noisy = False

        def __init__(self, front: Front) -> None:
            self.front = front

        def buildProtocol(self, addr: object) -> Backend:
            return Backend(self.front)

        def clientConnectionFailed(self, connector: object, reason: object) -> None:
            self.front.backend_lost()

    class Front(Protocol):
        def connectionMade(self) -> None:
            self.to_client = _DelayedWriter(reactor, delay)
            self.to_server = _DelayedWriter(reactor, delay)
            self.to_client.attach(self.transport)
            reactor.connectTCP(target_host, int(target_port), BackendFactory(self), timeout=5)  # type: ignore[attr-defined]

        def dataReceived(self, data: bytes) -> None:
            self.to_server.put(data)

        def connectionLost(self, reason: object = None) -> None:
            self.to_client.cancel()
            self.to_server.put(None)

        def backend_connected(self, transport: Any) -> None:
            self.to_server.attach(transport)

        def backend_lost(self) -> None:
            self.to_server.cancel()
            self.to_client.put(None)

    factory = Factory.forProtocol(Front)
    factory.noisy = False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s proxy: %(message)s", stream=sys.stdout)
    twisted_log.startLogging(sys.stdout, setStdout=False)
    reactor.listenTCP(int(listen_port), factory, interface=listen_host)  # type: ignore[attr-defined]
    log.info("listening on %s, forwarding to %s, delay from %s", args.listen, args.target, args.delay_file)
    reactor.run()  # type: ignore[attr-defined]
