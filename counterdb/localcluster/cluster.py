"""
:class:`LocalCluster`: N real counterdb nodes on this machine, brought up
and down as one, with node operations (kill, start, stop, pause, resume)
and, in netns mode, network faults. See :mod:`counterdb.localcluster`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import attrs

from counterdb.auth import load_secrets
from counterdb.localcluster import network, processes
from counterdb.localcluster.processes import (
    HTTP_TIMEOUT,
    LISTENING,
    PORT_ATTEMPTS,
    START_TIMEOUT,
    STOP_TIMEOUT,
    CannotListen,
    free_common_port,
)
from counterdb.localcluster.proxy import delay_file, write_delay
from counterdb.localcluster.state import (
    LOCK_FILE,
    LOOPBACK,
    NETNS,
    PAUSED,
    RUNNING,
    STATE_FILE,
    STOPPED,
    ClusterError,
    ClusterState,
    Faults,
    NodeRecord,
    NodeStatus,
    flock,
    read_state,
    wait_for,
    write_state,
)

log = logging.getLogger(__name__)


class LocalCluster:
    """N real counterdb nodes on this machine; see :mod:`counterdb.localcluster`.

    ``with LocalCluster(base_dir, 3) as c:`` brings the cluster up and
    always takes it down again. With ``python``, the nodes run in that
    interpreter with only what it has installed (a virtualenv holding an
    earlier release, for upgrade tests); :meth:`set_python` changes it for
    one stopped node.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        size: int = 3,
        netns: bool = False,
        port: int | None = None,
        node_args: Sequence[str] = (),
        subnet: str | None = None,
        python: str | None = None,
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
        self._python = python
        self._state: ClusterState | None = None
        #: The cluster's random id, part of every namespace and link name;
        #: kept after :meth:`down` so callers can check nothing is left.
        self.id: str | None = None
        self._processes = processes.ProcessTable()
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

    # -- loading, saving, locking ------------------------------------------------

    @classmethod
    def load(cls, base_dir: str | os.PathLike[str]) -> LocalCluster:
        """The cluster recorded in ``base_dir/cluster.json`` by another
        :class:`LocalCluster` (maybe in another process)."""
        path = Path(base_dir).resolve()
        state = read_state(path)
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
        write_state(self.base_dir, self._require_state())

    def _save_if_present(self) -> None:
        if self._state is not None and self.state_path.exists():
            self._save()

    @contextlib.contextmanager
    def _locked(self, reload: bool = True) -> Iterator[None]:
        """Hold the cluster's flock (re-entrant), with the state re-read from disk."""
        with self._thread_lock, self._flocked():
            if reload:
                state = read_state(self.base_dir)
                if state is None:
                    self._state = None
                    raise ClusterError(f"no cluster in {self.base_dir} (no {STATE_FILE}): it is down")
                self._state = state
            yield

    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._lock_depth == 0:
            fd = os.open(self.base_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            flock(fd, str(self.base_dir / LOCK_FILE))
            self._lock_fd = fd
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> LocalCluster:
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # -- up and down ------------------------------------------------------------------

    def up(self, timeout: float = START_TIMEOUT, configure: bool = True) -> None:
        """Start every node, wait until each answers HTTP, and post the
        actors list to each (with ``configure=False`` the nodes stay
        unconfigured, for callers that post ``/config`` themselves). On any
        failure, tears down whatever it made."""
        if self.netns:
            network.require_netns_tools()
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
        self._state = self._new_netns_state() if self.netns else self._new_loopback_state()
        self.id = self._state.id
        for node in self._state.nodes:
            Path(node.workdir).mkdir(parents=True, exist_ok=True)
        # Recorded before anything is created, so a `down` from another
        # process can clean up after a controlling process that died midway.
        self._save()
        if self.netns:
            self._up_network()
        self._start_all_nodes(timeout)
        if configure:
            self._post_actors()
        self._save()
        log.info("cluster %s up in %s: %s", self._state.id, self.base_dir, ", ".join(self.nodes))

    def _new_loopback_state(self) -> ClusterState:
        addresses = [f"127.0.0.{i + 1}" for i in range(1, self.size + 1)]
        port = self._port if self._port is not None else free_common_port(addresses)
        nodes = [
            NodeRecord(name=f"n{i}", address=addresses[i - 1], workdir=self._workdir(i), python=self._python)
            for i in self._numbers()
        ]
        return ClusterState(LOOPBACK, secrets.token_hex(3), port, port, self.node_args, nodes)

    def _new_netns_state(self) -> ClusterState:
        cluster_id = network.new_id()
        port = self._port or network.DEFAULT_NETNS_PORT
        listen_port = port + 1 if port < 65535 else port - 1
        nodes = [
            NodeRecord(
                name=f"n{i}",
                address="",  # set once the subnet is chosen
                workdir=self._workdir(i),
                netns=f"cdb-{cluster_id}-n{i}",
                veth=f"cdb{cluster_id}h{i}",
                python=self._python,
            )
            for i in self._numbers()
        ]
        return ClusterState(NETNS, cluster_id, port, listen_port, self.node_args, nodes, bridge=f"cdb{cluster_id}br")

    def _numbers(self) -> range:
        return range(1, self.size + 1)

    def _workdir(self, number: int) -> str:
        return str(self.base_dir / f"n{number}")

    def _up_network(self) -> None:
        state = self._require_state()
        network.create_network(state, self._subnet, self._save)
        self._save()
        for node in state.nodes:
            write_delay(delay_file(node.workdir), 0.0)
            self._start_proxy(node)
        self._apply_faults()

    def _start_all_nodes(self, timeout: float) -> None:
        """Start every node and wait until each answers; on loopback with a
        picked port, another port if a node could not listen on it."""
        state = self._require_state()
        attempts = PORT_ATTEMPTS if (not self.netns and self._port is None) else 1
        for attempt in range(1, attempts + 1):
            for node in state.nodes:
                self._start_node(node)
            self._save()
            try:
                self._wait_ready(state.nodes, timeout)
                return
            except CannotListen as e:
                if attempt == attempts:
                    raise
                log.info("%s; trying another port", e)
                for node in state.nodes:
                    self._stop_process(node, proxy=False, record=False)
                state.port = state.listen_port = free_common_port([n.address for n in state.nodes], state.port + 1)
                self._save()

    def _post_actors(self) -> None:
        body = json.dumps({"actors": self.actors}).encode()
        for node in self._require_state().nodes:
            code, answer = processes.http("POST", self._url(node) + "/config", body, HTTP_TIMEOUT, self.auth_headers)
            if code != 200:
                raise ClusterError(f"POST /config to {node.name} answered {code}: {answer[:300]!r}")

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
        problems = self._stop_everything(state)
        self._save_if_present()
        if state.mode == NETNS:
            problems += network.delete_network(state)
        if problems:
            self._save_if_present()
            raise ClusterError("could not take everything down:\n  " + "\n  ".join(problems))
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        log.info("cluster %s in %s is down", state.id, self.base_dir)
        self._state = None

    def _stop_everything(self, state: ClusterState) -> list[str]:
        # Resume paused nodes first: a node shutting down must not wait on
        # a paused peer.
        for node in state.nodes:
            if node.pid is not None and self._state_of(node.pid, node.pid_start) == PAUSED:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGCONT)
        problems = []
        for node in state.nodes:
            for proxy in (False, True):
                try:
                    self._stop_process(node, proxy)
                except Exception as e:
                    problems.append(f"{node.name}: {e}")
        return problems

    # -- what the cluster is -----------------------------------------------------------

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
        return str(self._node(node).netns)

    def log_path(self, node: str) -> Path:
        return self._node(node).log_path

    def data_dir(self, node: str) -> Path:
        return self._node(node).data_dir

    def log_tail(self, node: str, lines: int = 30) -> str:
        path = self.log_path(node)
        try:
            text = path.read_text("utf-8", "replace").splitlines()[-lines:]
        except OSError as e:
            return f"--- {node}: no log ({e}) ---"
        return "\n".join([f"--- {node} ({path}), last {len(text)} lines ---", *text])

    # -- nodes ---------------------------------------------------------------------------

    def kill(self, node: str) -> None:
        """SIGKILL the node's process (in netns mode, and its proxy)."""
        with self._locked():
            record = self._running(node)
            os.kill(record.pid, signal.SIGKILL)  # type: ignore[arg-type]
            wait_for(lambda: self._state_of(record.pid, record.pid_start) == STOPPED, STOP_TIMEOUT)
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
            record = self._stopped(node, "is already running")
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
            record = self._running(node)
            self._stop_process(record, proxy=False, timeout=timeout)
            if record.netns:
                self._stop_process(record, proxy=True)
            self._save()

    def set_python(self, node: str, python: str | None) -> None:
        """Run a stopped node in ``python`` from its next :meth:`start` on
        (None: this interpreter and this checkout's code): an upgrade, or a
        downgrade, on the same data dir, address and port."""
        with self._locked():
            record = self._stopped(node, "is running: stop it before changing its interpreter")
            record.python = python
            self._save()

    def pid(self, node: str) -> int | None:
        """The node's process id while it runs (or is paused), else None."""
        with self._locked():
            record = self._node(node)
            return record.pid if self._state_of(record.pid, record.pid_start) != STOPPED else None

    def wipe_data(self, node: str) -> None:
        """Delete the data dir of a stopped node, as if its machine had been
        replaced: :meth:`start` then brings it up unconfigured, with a new
        replica id."""
        with self._locked():
            record = self._stopped(node, "is running: stop it before wiping its data")
            shutil.rmtree(record.data_dir, ignore_errors=True)
            if record.data_dir.exists():
                raise ClusterError(f"could not delete {record.data_dir}")

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
            record = self._running(node)
            os.kill(record.pid, sig)  # type: ignore[arg-type]
            if not wait_for(lambda: self._state_of(record.pid, record.pid_start) in (want, STOPPED), 2.0):
                raise ClusterError(f"{record.name} (pid {record.pid}) is not {want} after {sig.name}")

    def status(self, http_timeout: float = 1.0) -> list[NodeStatus]:
        """Every node's state, pid, address and replica id (asked over
        HTTP from running nodes)."""
        with self._locked():
            return [self._status(node, http_timeout) for node in self._require_state().nodes]

    def _status(self, node: NodeRecord, http_timeout: float) -> NodeStatus:
        run_state = self._state_of(node.pid, node.pid_start)
        replica = None
        if run_state == RUNNING:
            with contextlib.suppress(OSError, ValueError, KeyError):
                code, body = processes.http("GET", self._url(node) + "/config", None, http_timeout, self.auth_headers)
                if code == 200:
                    replica = json.loads(body)["replica"]
        pid = node.pid if run_state != STOPPED else None
        return NodeStatus(node.name, run_state, pid, node.address, self._url(node), replica, node.netns)

    # -- faults (netns mode) ----------------------------------------------------------------

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
            self._update_faults(lambda f: attrs.evolve(f, delay=_set_or_drop(f.delay, name, seconds)))

    def flaky(self, node: str, loss: float) -> None:
        """Drop each packet arriving at ``node`` with probability ``loss``
        (0 to 1; 0 removes the loss)."""
        self._require_netns("flaky")
        if not 0 <= loss <= 1:
            raise ClusterError(f"the loss must be a probability from 0 to 1, got {loss}")
        with self._locked():
            name = self.node_name(node)
            self._update_faults(lambda f: attrs.evolve(f, loss=_set_or_drop(f.loss, name, loss)))

    def _update_faults(self, change: Callable[[Faults], Faults]) -> None:
        state = self._require_state()
        state.faults = change(Faults.from_json(state.faults)).to_json()
        self._save()
        self._apply_faults()
        log.info("faults now %s", state.faults)

    def _apply_faults(self) -> None:
        """Make every namespace's firewall and proxy delay match the
        recorded faults (idempotent)."""
        state = self._require_state()
        faults = Faults.from_json(state.faults)
        for node in state.nodes:
            write_delay(delay_file(node.workdir), faults.delay.get(node.name, 0.0))
        network.apply_firewall(state, faults)

    # -- internals: lookups ---------------------------------------------------------------------

    def _require_state(self) -> ClusterState:
        if self._state is None:
            state = read_state(self.base_dir)
            if state is None:
                raise ClusterError(f"no cluster in {self.base_dir}: it is not up")
            self._state = state
        return self._state

    def _require_netns(self, what: str) -> None:
        if self._require_state().mode != NETNS:
            raise ClusterError(
                f"{what} needs a netns cluster (`counterdb-cluster up --netns`, or LocalCluster(..., netns=True)); "
                f"the cluster in {self.base_dir} runs on loopback"
            )

    def _node(self, ref: str) -> NodeRecord:
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

    def _running(self, ref: str) -> NodeRecord:
        record = self._node(ref)
        if self._state_of(record.pid, record.pid_start) == STOPPED:
            raise ClusterError(f"{record.name} is not running")
        return record

    def _stopped(self, ref: str, complaint: str) -> NodeRecord:
        record = self._node(ref)
        if self._state_of(record.pid, record.pid_start) != STOPPED:
            raise ClusterError(f"{record.name} {complaint} (pid {record.pid})")
        return record

    def _url(self, node: NodeRecord) -> str:
        return self._require_state().url(node)

    # -- internals: processes -----------------------------------------------------------------

    def _state_of(self, pid: int | None, start: int | None) -> str:
        return self._processes.state_of(pid, start)

    def _start_node(self, node: NodeRecord) -> None:
        command = network.in_netns(node.netns, processes.node_command(self._require_state(), node))
        env = processes.node_env(node.python)
        node.pid, node.pid_start = self._processes.spawn(command, Path(node.workdir), "node.log", env)
        log.info("started %s: pid %s", node.name, node.pid)

    def _start_proxy(self, node: NodeRecord) -> None:
        command = processes.proxy_command(self._require_state(), node, delay_file(node.workdir))
        node.proxy_pid, node.proxy_start = self._processes.spawn(
            network.in_netns(node.netns, command), Path(node.workdir), "proxy.log"
        )

    def _stop_process(self, node: NodeRecord, proxy: bool, timeout: float = STOP_TIMEOUT, record: bool = True) -> None:
        """Stop the node's process (or its proxy's). With ``record``, a node
        that did not end the normal way gets an entry in :attr:`shutdown_problems`."""
        if proxy:
            self._processes.stop(node.proxy_pid, node.proxy_start, f"proxy of {node.name}", timeout)
            node.proxy_pid = node.proxy_start = None
            return
        problem = self._processes.stop(node.pid, node.pid_start, node.name, timeout)
        node.pid = node.pid_start = None
        if problem is not None and record:
            log.warning("%s %s", node.name, problem)
            self.shutdown_problems[node.name] = problem

    @property
    def auth_headers(self) -> dict[str, str]:
        """What the tool sends to the private API: the cluster secret, when
        the nodes run with ``--cluster-secret-file``."""
        args = self.node_args
        for i, arg in enumerate(args):
            path = args[i + 1] if arg == "--cluster-secret-file" and i + 1 < len(args) else None
            if arg.startswith("--cluster-secret-file="):
                path = arg.split("=", 1)[1]
            if path is not None:
                return {"Authorization": load_secrets(path).header}
        return {}

    def _wait_ready(self, nodes: Sequence[NodeRecord], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node in nodes:
            url = self._url(node) + "/config"
            log_path = node.log_path

            def listening(path: Path = log_path) -> bool:
                return LISTENING in self._processes.log_since_start(path)

            last = processes.wait_answering(
                url, deadline, lambda n=node: self._check_starting(n), listening, self.auth_headers
            )
            if last is not None:
                raise ClusterError(
                    f"{node.name} did not answer {url} within {timeout:g} s (last: {last})\n{self.log_tail(node.name)}"
                )

    def _check_starting(self, node: NodeRecord) -> None:
        """Raise if ``node`` (or its proxy) exited while starting."""
        if self._state_of(node.pid, node.pid_start) == STOPPED:
            tail = self.log_tail(node.name)
            error = CannotListen if "cannot listen on" in tail else ClusterError
            raise error(f"{node.name} exited while starting\n{tail}")
        if node.netns is not None and self._state_of(node.proxy_pid, node.proxy_start) == STOPPED:
            raise ClusterError(f"the proxy of {node.name} exited\n{_tail(Path(node.workdir) / 'proxy.log')}")


def _set_or_drop(values: dict[str, float], name: str, value: float) -> dict[str, float]:
    """``values`` with ``name`` set to ``value``, or left out if it is 0."""
    changed = {k: v for k, v in values.items() if k != name}
    if value > 0:
        changed[name] = value
    return changed


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text("utf-8", "replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no {path.name}: {e})"
