"""
What the other modules share: the error they raise, the records kept in
``<base_dir>/cluster.json`` (read and written under the cluster's flock),
and polling a condition until a deadline.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

STATE_FILE = "cluster.json"
LOCK_FILE = "cluster.lock"
STATE_VERSION = 1

#: Modes of a cluster.
LOOPBACK = "loopback"
NETNS = "netns"

#: States of a node's process.
RUNNING = "running"
PAUSED = "paused"
STOPPED = "stopped"


class ClusterError(Exception):
    """Something the user asked for cannot be done; the message says why."""


@attrs.frozen
class NodeStatus:
    """One node as :meth:`LocalCluster.status` found it."""

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
class NodeRecord:
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
    #: The interpreter that runs the node, with only what it has installed
    #: (a virtualenv holding another release); None: this interpreter, with
    #: the imported ``counterdb`` on ``PYTHONPATH``.
    python: str | None = None

    @property
    def log_path(self) -> Path:
        return Path(self.workdir) / "node.log"

    @property
    def data_dir(self) -> Path:
        return Path(self.workdir) / "data"


@attrs.define
class ClusterState:
    """Everything cluster.json records: enough for another process to act
    on the cluster, or to take down what a dead process left half made."""

    mode: str
    id: str
    port: int  # where clients and peers reach every node
    listen_port: int  # where twistd binds (port+1 on 127.0.0.1 in netns mode)
    node_args: list[str]
    nodes: list[NodeRecord]
    subnet: str | None = None
    bridge: str | None = None
    bridge_address: str | None = None
    forward_rule: bool = False  # root-namespace FORWARD accept for bridged traffic
    faults: dict[str, Any] = attrs.field(factory=dict)
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterState:
        if data.get("version") != STATE_VERSION:
            raise ClusterError(f"cluster.json has version {data.get('version')!r}, expected {STATE_VERSION}")
        fields = dict(data)
        fields["nodes"] = [NodeRecord(**node) for node in data["nodes"]]
        return cls(**fields)

    def url(self, node: NodeRecord) -> str:
        return f"http://{node.address}:{self.port}"


def read_state(base_dir: Path) -> ClusterState | None:
    """The state in ``base_dir/cluster.json``, or None if there is none."""
    path = base_dir / STATE_FILE
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ClusterError(f"cannot read {path}: {e}") from None
    try:
        return ClusterState.from_json(data)
    except (TypeError, KeyError) as e:
        raise ClusterError(f"{path} is not a cluster state file: {e}") from None


def write_state(base_dir: Path, state: ClusterState) -> None:
    """Replace ``base_dir/cluster.json`` atomically."""
    path = base_dir / STATE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n", "utf-8")
    os.replace(tmp, path)


def flock(fd: int, what: str, timeout: float = 60.0) -> None:
    """Take an exclusive flock on ``fd``, waiting at most ``timeout`` s;
    closes ``fd`` and raises :class:`ClusterError` if it cannot."""
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
def locked_file(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    flock(fd, str(path))
    try:
        yield
    finally:
        os.close(fd)  # releases the flock


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` s passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
