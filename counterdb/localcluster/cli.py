"""
``counterdb-cluster``: run a local counterdb cluster and inject faults.

    counterdb-cluster up -n 3 [--dir D] [--netns] [--port P] [--subnet S] [--node-args "..."]
    counterdb-cluster status | down
    counterdb-cluster kill|start|pause|resume NODE
    counterdb-cluster partition n1 n2,n3          # netns only: groups by spaces, members by commas
    counterdb-cluster partition --oneway n1 n3    # netns only: packets from n1 to n3 dropped
    counterdb-cluster heal                        # netns only: remove partitions, delays, loss
    counterdb-cluster slow NODE 200ms             # netns only: added delay each way (0 removes it)
    counterdb-cluster flaky NODE 20%              # netns only: incoming packet loss (0 removes it)

The cluster lives in ``--dir`` (default ``./counterdb-cluster``): one
directory per node with its data and log, and ``cluster.json``, which every
later command reads. NODE is a name (``n1``) or an address. The nodes keep
running after ``up`` returns, until ``down``. See :mod:`counterdb.localcluster`.

Also runs as ``python -m counterdb.localcluster``.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from counterdb.localcluster.cluster import LocalCluster
from counterdb.localcluster.state import STATE_FILE, ClusterError

DEFAULT_DIR = "./counterdb-cluster"


def parse_seconds(text: str) -> float:
    """``200ms``, ``0.2s`` or ``0.2`` -> 0.2."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a delay such as 200ms, 0.2s or 0.2, got {text!r}")
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


def parse_loss(text: str) -> float:
    """``20%`` or ``0.2`` -> 0.2."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a loss such as 20% or 0.2, got {text!r}")
    value = float(match.group(1)) / (100 if match.group(2) else 1)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"the loss must be from 0 to 100%, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: --dir may come before or after the command.
    common.add_argument("--dir", default=argparse.SUPPRESS, help=f"the cluster's directory (default {DEFAULT_DIR})")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what is done")

    parser = argparse.ArgumentParser(
        prog="counterdb-cluster",
        description="Run a local counterdb cluster (loopback or network namespaces) and inject faults.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", parents=[common], help="start a cluster")
    up.add_argument("-n", "--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--netns", action="store_true", help="one network namespace per node (root; needed for faults)")
    up.add_argument(
        "--port", type=int, default=None, help="port of every node (default: 18080 up on loopback, 8080 in netns)"
    )
    up.add_argument(
        "--subnet", default=None, help="netns subnet (default: 10.213.0.0/24 or the next free 10.213.N.0/24)"
    )
    up.add_argument("--node-args", default="", help='extra twistd counterdb flags, e.g. "--poll-interval 0.2"')

    commands.add_parser("down", parents=[common], help="stop every node and delete the namespaces and links")
    commands.add_parser("status", parents=[common], help="each node's state, pid, address and replica id")
    for name, text in [
        ("kill", "SIGKILL a node"),
        ("start", "start a stopped node again (same data)"),
        ("pause", "SIGSTOP a node"),
        ("resume", "SIGCONT a paused node"),
    ]:
        sub = commands.add_parser(name, parents=[common], help=text)
        sub.add_argument("node", metavar="NODE", help="n1, n2, ... or an address")

    partition = commands.add_parser(
        "partition",
        parents=[common],
        help="netns: drop traffic between groups (e.g. `partition n1 n2,n3`)",
    )
    partition.add_argument("--oneway", action="store_true", help="SRC DST: drop only packets from SRC to DST")
    partition.add_argument(
        "groups", nargs="+", metavar="GROUP", help="comma-separated nodes; groups separated by spaces"
    )

    commands.add_parser("heal", parents=[common], help="netns: remove every partition, delay and loss")
    slow = commands.add_parser("slow", parents=[common], help="netns: delay a node's traffic (e.g. 200ms; 0 removes)")
    slow.add_argument("node", metavar="NODE")
    slow.add_argument("delay", type=parse_seconds, metavar="DELAY")
    flaky = commands.add_parser(
        "flaky", parents=[common], help="netns: drop a share of a node's incoming packets (e.g. 20%%)"
    )
    flaky.add_argument("node", metavar="NODE")
    flaky.add_argument("loss", type=parse_loss, metavar="LOSS")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    directory = Path(getattr(args, "dir", DEFAULT_DIR))
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="counterdb-cluster: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _run(args, directory)
    except ClusterError as e:
        sys.stderr.write(f"counterdb-cluster: error: {e}\n")
        return 1


def _run(args: argparse.Namespace, directory: Path) -> int:
    if args.command == "up":
        return _up(args, directory, sys.stdout)
    if args.command == "down":
        return _down(directory, sys.stdout)
    cluster = LocalCluster.load(directory)
    _COMMANDS[args.command](args, cluster, sys.stdout)
    return 0


def _up(args: argparse.Namespace, directory: Path, out: TextIO) -> int:
    cluster = LocalCluster(
        directory,
        size=args.nodes,
        netns=args.netns,
        port=args.port,
        node_args=shlex.split(args.node_args),
        subnet=args.subnet,
    )
    cluster.up()
    for name in cluster.nodes:
        out.write(f"{name} {cluster.url(name)}\n")
    return 0


def _down(directory: Path, out: TextIO) -> int:
    if not (directory / STATE_FILE).exists():
        sys.stderr.write(f"counterdb-cluster: no cluster in {directory.resolve()}; nothing to take down\n")
        return 0
    LocalCluster.load(directory).down()
    out.write(f"cluster in {directory.resolve()} is down\n")
    return 0


def _status(args: argparse.Namespace, cluster: LocalCluster, out: TextIO) -> None:
    out.write(f"{cluster.mode} cluster in {cluster.base_dir}\n")
    for node in cluster.status():
        pid = node.pid if node.pid is not None else "-"
        extra = f" netns={node.netns}" if node.netns else ""
        out.write(f"{node.name} {node.state:<8} pid={pid} {node.url} replica={node.replica or '-'}{extra}\n")
    faults = cluster.faults
    if faults:
        blocked = " ".join(f"{a}->{b}" for a, b in faults.blocked) or "-"
        delay = " ".join(f"{k}={v:g}s" for k, v in sorted(faults.delay.items())) or "-"
        loss = " ".join(f"{k}={v:.0%}" for k, v in sorted(faults.loss.items())) or "-"
        out.write(f"faults: blocked {blocked}; delay {delay}; loss {loss}\n")


_DONE = {"kill": "killed", "start": "started", "pause": "paused", "resume": "resumed"}


def _process_command(args: argparse.Namespace, cluster: LocalCluster, out: TextIO) -> None:
    name = cluster.node_name(args.node)
    getattr(cluster, args.command)(name)
    out.write(f"{name} {_DONE[args.command]}\n")


def _partition(args: argparse.Namespace, cluster: LocalCluster, out: TextIO) -> None:
    groups = [[member for member in group.split(",") if member] for group in args.groups]
    if not args.oneway:
        cluster.partition(groups)
        out.write("partitioned: " + " | ".join(",".join(cluster.node_name(m) for m in g) for g in groups) + "\n")
        return
    if len(groups) != 2 or any(len(group) != 1 for group in groups):
        raise ClusterError("partition --oneway takes two nodes: SRC DST")
    cluster.partition_oneway(groups[0][0], groups[1][0])
    out.write(f"dropping packets from {cluster.node_name(groups[0][0])} to {cluster.node_name(groups[1][0])}\n")


def _heal(args: argparse.Namespace, cluster: LocalCluster, out: TextIO) -> None:
    cluster.heal()
    out.write("healed\n")


def _slow(args: argparse.Namespace, cluster: LocalCluster, out: TextIO) -> None:
    cluster.slow(args.node, args.delay)
    out.write(f"{cluster.node_name(args.node)} delayed by {args.delay:g} s each way\n")


def _flaky(args: argparse.Namespace, cluster: LocalCluster, out: TextIO) -> None:
    cluster.flaky(args.node, args.loss)
    out.write(f"{cluster.node_name(args.node)} drops {args.loss:.0%} of incoming packets\n")


#: The commands that act on a cluster that is up.
_COMMANDS: dict[str, Callable[[argparse.Namespace, LocalCluster, TextIO], None]] = {
    "status": _status,
    **dict.fromkeys(_DONE, _process_command),
    "partition": _partition,
    "heal": _heal,
    "slow": _slow,
    "flaky": _flaky,
}


if __name__ == "__main__":
    sys.exit(main())
