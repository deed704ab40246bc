"""
``counterdb``: a command line for a running cluster, in the style of
``redis-cli`` and ``etcdctl``, built on :class:`counterdb.client.BlockingClient`.

    counterdb [--url URL | -H HOST -p PORT] [--token-file F] COMMAND ...
    counterdb incr NAME [N]
    counterdb get NAME [--consistent [--timeout S]]
    counterdb config
    counterdb config set HOST...
    counterdb status
    counterdb cluster-status

Exit status: 0 when it worked, 1 on an error (one line on stderr, starting
``counterdb:``), 2 on a usage error. ``cluster-status`` exits 1 when a node
does not answer, the actors lists differ, a replica id conflicts, or a
node's store can write nothing more. The
``--help`` texts are plain text for a terminal; this docstring is for
readers of the code. Also runs as ``python -m counterdb.cli``.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO
from urllib.parse import urlsplit

import attrs

from counterdb.actors import ConfigError, parse_actor
from counterdb.auth import SecretFileError, load_secrets
from counterdb.client import BlockingClient, CounterDBError, Retry, check_base_url

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
URL_VARIABLE = "COUNTERDB_URL"
#: Replica ids are shown by their first characters, as git shows commits.
SHORT_ID = 8

DESCRIPTION = """\
Talk to a running counterdb node: increment and read counters, show and set
the actors list, and see the state of the node and of its cluster.
"""
EPILOG = f"""\
The node is --url, or -H/-p, or ${URL_VARIABLE}, or http://{DEFAULT_HOST}:{DEFAULT_PORT}.
A node started with --cluster-secret-file (or --api-token-file) needs
--token-file: a file holding the secret (the first line is sent).
Failed requests are retried (connection failures, timeouts, 503); an
increment carries an Idempotency-Key, so a retry is never counted twice.

Exit status: 0 success, 1 error (one line on stderr), 2 usage error.
Run "counterdb COMMAND --help" for the details of a command.
"""
INCR_DESCRIPTION = """\
Add N (default 1) to the counter NAME and print the counter's value on this
node right after the increment.
"""
GET_DESCRIPTION = """\
Print this node's value of the counter NAME: fast, but it may not include the
latest increments made on other nodes yet. With --consistent, the node asks
every host in its actors list, and the value includes every increment any of
them acknowledged before the read.
"""
CONFIG_DESCRIPTION = """\
Show this node's actors list, its own entry and its replica id, or with
"config set HOST..." set its actors list. Give every node the same list.
"""
CONFIG_SET_DESCRIPTION = """\
Set this node's actors list: every host of the cluster, this one included,
as HOST or HOST:PORT (a bare HOST means this node's port). Run it on every
node with the same list.
"""
STATUS_DESCRIPTION = """\
Show this node's replica id, counters and running totals, and for each peer
whether it is reachable and how many counters wait to be pushed to it.
"""
CLUSTER_STATUS_DESCRIPTION = """\
Ask every node in this node's actors list for its status and configuration,
and print one line per node: whether it answered, its replica id, its number
of counters, whether its actors list is the same as this node's, and for each
of its peers whether it reaches it and how many counters wait to be pushed to
it ("dirty"; 0 everywhere means every change has been pushed).

Exits 1 if a node did not answer, the lists differ, a node reports a
replica id conflict, or a node's store can write nothing more until it is
restarted.
"""


class UsageError(Exception):
    """A problem with the command line that argparse cannot see (exit 2)."""


class CommandError(Exception):
    """A problem that ends the command with exit status 1; the message says what."""


# -- command line ----------------------------------------------------------------


def _whole_number(text: str) -> int:
    try:
        number = int(text, 10)
    except ValueError:
        number = -1
    if number < 0 or not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of 0 or more, got {text!r}")
    return number


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds greater than 0, got {text!r}")
    return seconds


def _url(text: str) -> str:
    try:
        return check_base_url(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port(text: str) -> int:
    port = _whole_number(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 1 to 65535, got {text!r}")
    return port


def _parser() -> argparse.ArgumentParser:
    plain = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="counterdb", description=DESCRIPTION, epilog=EPILOG, formatter_class=plain)
    node = parser.add_argument_group("which node")
    node.add_argument("--url", type=_url, help="the node's URL, e.g. http://127.0.0.2:8080")
    node.add_argument("-H", "--host", help=f"the node's host (default {DEFAULT_HOST})")
    node.add_argument("-p", "--port", type=_port, help=f"the node's port (default {DEFAULT_PORT})")
    node.add_argument("--token-file", metavar="FILE", help="send the secret in FILE as Authorization: Bearer")
    node.add_argument("--cacert", metavar="FILE", help="verify an https:// node against the CA certificates in FILE")
    node.add_argument(
        "--request-timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="give up on one attempt after S seconds (default 10)",
    )
    node.add_argument(
        "--retries", type=_whole_number, default=2, metavar="N", help="retry a failed request N times (default 2)"
    )
    parser.add_argument("--json", action="store_true", help="print answers as JSON")

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    incr = commands.add_parser(
        "incr", help="add N (default 1) to a counter", description=INCR_DESCRIPTION, formatter_class=plain
    )
    incr.add_argument("name", metavar="NAME", help="the counter")
    incr.add_argument("amount", metavar="N", nargs="?", type=_whole_number, default=1, help="how much to add")

    get = commands.add_parser("get", help="print a counter's value", description=GET_DESCRIPTION, formatter_class=plain)
    get.add_argument("name", metavar="NAME", help="the counter")
    get.add_argument("--consistent", action="store_true", help="ask every host (a consistent read)")
    get.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help="with --consistent: give up after S seconds if a host has not answered",
    )

    config = commands.add_parser(
        "config", help="show or set the actors list", description=CONFIG_DESCRIPTION, formatter_class=plain
    )
    config_commands = config.add_subparsers(dest="config_command", metavar="set")
    config_set = config_commands.add_parser(
        "set", help="set the actors list", description=CONFIG_SET_DESCRIPTION, formatter_class=plain
    )
    config_set.add_argument("actors", metavar="HOST", nargs="+", help="HOST or HOST:PORT")

    remove = commands.add_parser(
        "remove",
        help="remove a host from the cluster",
        description=(
            "Post the actors list without HOST to this node; it spreads to every node. Each remaining node "
            "polls HOST one last time before dropping it, so its partials stay in every total, and HOST, once "
            "it has the new list, takes no more increments. Stop sending HOST increments first."
        ),
        formatter_class=plain,
    )
    remove.add_argument("leaving", metavar="HOST", help="the entry to remove, as the actors list writes it")
    commands.add_parser(
        "status", help="this node's state and its peers", description=STATUS_DESCRIPTION, formatter_class=plain
    )
    commands.add_parser(
        "cluster-status",
        help="every node of the cluster, side by side",
        description=CLUSTER_STATUS_DESCRIPTION,
        formatter_class=plain,
    )
    return parser


def node_url(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> str:
    """The node to talk to, from ``--url``, ``-H``/``-p`` or the environment."""
    if args.url is not None:
        if args.host is not None or args.port is not None:
            raise UsageError("give --url or -H/-p, not both")
        return args.url
    if args.host is None and args.port is None and environ.get(URL_VARIABLE):
        try:
            return check_base_url(environ[URL_VARIABLE])
        except ValueError as e:
            raise UsageError(f"${URL_VARIABLE}: {e}") from None
    host = args.host or DEFAULT_HOST
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return check_base_url(f"http://{host}:{args.port or DEFAULT_PORT}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "get" and args.timeout is not None and not args.consistent:
        parser.error("get --timeout needs --consistent")
    try:
        url = node_url(args)
    except (UsageError, ValueError) as e:
        parser.error(str(e))
    try:
        connect = _connector(args)
        return _COMMANDS[args.command](connect(url), args, connect, sys.stdout)
    except (CounterDBError, SecretFileError, CommandError) as e:
        sys.stderr.write(f"counterdb: {_one_line(e)}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("counterdb: interrupted\n")
        return 130


Connect = Callable[..., BlockingClient]


def _connector(args: argparse.Namespace) -> Connect:
    """A factory of clients for one node URL, with the command line's settings."""
    authorization = load_secrets(args.token_file).header if args.token_file else None
    context = None
    if args.cacert:
        try:
            context = ssl.create_default_context(cafile=args.cacert)
        except (OSError, ssl.SSLError) as e:
            raise CommandError(f"{args.cacert}: cannot read CA certificates: {e.strerror or e}") from None

    def connect(url: str, timeout: float | None = None, retries: int | None = None) -> BlockingClient:
        return BlockingClient(
            url,
            authorization=authorization,
            timeout=args.request_timeout if timeout is None else timeout,
            retry=Retry(attempts=1 + (args.retries if retries is None else retries)),
            ssl_context=context,
        )

    return connect


def _one_line(error: BaseException) -> str:
    text = str(error)
    if isinstance(error, CounterDBError) and "best_value" in error.details:
        text += f"; best value so far {error.details['best_value']}"
    return " ".join(text.split())


# -- commands ----------------------------------------------------------------------


def _incr(client: BlockingClient, args: argparse.Namespace, connect: Connect, out: TextIO) -> int:
    out.write(f"{client.increment(args.name, args.amount)}\n")
    return 0


def _get(client: BlockingClient, args: argparse.Namespace, connect: Connect, out: TextIO) -> int:
    if args.consistent:
        value = client.consistent_value(args.name, args.timeout)
    else:
        value = client.value(args.name)
    out.write(f"{value}\n")
    return 0


def _config(client: BlockingClient, args: argparse.Namespace, connect: Connect, out: TextIO) -> int:
    if args.config_command == "set":
        answer = client.set_config(args.actors)
    else:
        answer = client.config()
    if args.json:
        out.write(json.dumps(answer) + "\n")
    else:
        out.write(format_config(answer))
    return 0


def _remove(client: BlockingClient, args: argparse.Namespace, connect: Connect, out: TextIO) -> int:
    actors = client.config().get("actors") or []
    if args.leaving not in actors:
        raise CommandError(f"{args.leaving} is not in the actors list {actors}")
    answer = client.set_config([entry for entry in actors if entry != args.leaving])
    out.write(json.dumps(answer) + "\n" if args.json else format_config(answer))
    return 0


def format_config(config: dict[str, Any]) -> str:
    """``GET /config`` (or a ``POST /config`` answer) for people."""
    lines = []
    if "replica" in config:
        lines.append(("replica", str(config["replica"])))
    actors = config.get("actors") or []
    if actors:
        lines.append(("self", f"{config.get('self')} (index {config.get('index')})"))
        lines.append(("actors", " ".join(map(str, actors))))
    else:
        lines.append(("actors", "none: unconfigured, a one-node cluster"))
    for key, value in config.items():
        if key not in ("replica", "self", "index", "actors"):
            lines.append((key, json.dumps(value) if not isinstance(value, str) else value))
    return _aligned(lines)


def _status(client: BlockingClient, args: argparse.Namespace, connect: Connect, out: TextIO) -> int:
    status = client.status()
    if args.json:
        out.write(json.dumps(status) + "\n")
    else:
        out.write(format_status(client.base_url, status))
    return 0


def format_status(url: str, status: dict[str, Any]) -> str:
    """``GET /status`` for people: the node, then a table of its peers."""
    stats = status.get("stats") or {}
    actors = status.get("actors") or []
    text = _aligned(
        [
            ("node", url),
            ("replica", str(status.get("replica"))),
            ("epoch", str(status.get("epoch"))),
            ("actors", " ".join(actors) if actors else "none: unconfigured, a one-node cluster"),
            ("counters", str(status.get("counters"))),
            ("totals", ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in stats.items())),
        ]
    )
    peers = status.get("peers") or {}
    if not peers:
        return text
    rows = [["PEER", "REACHABLE", "DIRTY", "REPLICA", "PUSHES", "FAILED", "POLLS", "FAILED", "REFUSED", "CONFLICT"]]
    for url_, peer in sorted(peers.items(), key=lambda item: str(item[1].get("entry", item[0]))):
        peer_stats = peer.get("stats") or {}
        rows.append(
            [
                str(peer.get("entry") or url_),
                _reachable(peer.get("reachable")),
                str(peer.get("dirty")),
                _short(peer.get("replica")),
                str(peer_stats.get("pushes", "-")),
                str(peer_stats.get("push_failures", "-")),
                str(peer_stats.get("polls", "-")),
                str(peer_stats.get("poll_failures", "-")),
                str(peer_stats.get("refused", "-")),
                str(peer.get("conflict") or "-"),
            ]
        )
    return text + "\n" + _table(rows)


@attrs.define
class NodeReport:
    """What ``cluster-status`` learned about one node."""

    entry: str
    url: str
    status: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    error: str | None = None
    answered: bool = False  # it answered HTTP (perhaps with an error)
    same_actors: bool | None = None

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _cluster_status(client: BlockingClient, args: argparse.Namespace, connect: Connect, out: TextIO) -> int:
    config = client.config()
    reports = cluster_status(client.base_url, config, connect)
    if args.json:
        out.write(json.dumps([report.as_json() for report in reports]) + "\n")
    else:
        out.write(format_cluster_status(reports))
    problems = cluster_problems(reports)
    if problems:
        sys.stderr.write(f"counterdb: {'; '.join(problems)}\n")
        return 1
    return 0


def cluster_status(url: str, config: dict[str, Any], connect: Connect) -> list[NodeReport]:
    """Ask every node in ``config``'s actors list (this node's, reached at
    ``url``) for ``/status`` and ``/config``, all at once."""
    base = check_base_url(url)
    scheme = urlsplit(base).scheme
    default_port = _port_of(base)
    entries = list(config.get("actors") or [])
    if not entries:  # unconfigured: a cluster of one
        reports = [NodeReport(str(config.get("self") or base), base)]
    else:
        reports = [NodeReport(entry, _entry_url(entry, default_port, scheme)) for entry in entries]
    # Bare entries mean "this node's port": the port we reached it on.
    # Each node is asked once, with a short timeout and no retry, so a dead
    # node costs one timeout, in parallel with the others.
    with ThreadPoolExecutor(max_workers=min(16, len(reports))) as pool:
        list(pool.map(lambda report: _probe(report, connect), reports))
    reference = _actor_urls(entries, default_port, scheme)
    for report in reports:
        if report.config is not None:
            theirs = _actor_urls(report.config.get("actors") or [], default_port, scheme)
            report.same_actors = theirs == reference
    return reports


def _probe(report: NodeReport, connect: Connect) -> None:
    node = connect(report.url, retries=0)
    try:
        report.status = node.status()
        report.config = node.config()
    except CounterDBError as e:
        report.error = _one_line(e)
        report.answered = e.status is not None
    else:
        report.answered = True


def _entry_url(entry: str, default_port: int, scheme: str) -> str:
    try:
        return parse_actor(entry).base_url(default_port, scheme)
    except ConfigError:
        return entry


def _actor_urls(entries: list[Any], default_port: int, scheme: str) -> set[str]:
    return {_entry_url(str(entry), default_port, scheme) for entry in entries}


def _port_of(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def format_cluster_status(reports: list[NodeReport]) -> str:
    rows = [["NODE", "ANSWERS", "REPLICA", "COUNTERS", "ACTORS", "PEERS: reachable?, dirty = counters not yet pushed"]]
    for report in reports:
        if report.status is None or report.config is None:
            rows.append([report.entry, "yes" if report.answered else "no", "-", "-", "-", report.error or "-"])
            continue
        peers = sorted((report.status.get("peers") or {}).values(), key=lambda peer: str(peer.get("entry")))
        lag = "; ".join(_peer_lag(peer) for peer in peers) or "-"
        rows.append(
            [
                report.entry,
                "yes",
                _short(report.status.get("replica")),
                str(report.status.get("counters")),
                "same" if report.same_actors else "DIFFERENT",
                lag,
            ]
        )
    return _table(rows)


def _peer_lag(peer: dict[str, Any]) -> str:
    text = f"{peer.get('entry')} {_reachable(peer.get('reachable'))}, {peer.get('dirty')} dirty"
    if peer.get("conflict"):
        text += f", CONFLICT: {peer['conflict']}"
    return text


def cluster_problems(reports: list[NodeReport]) -> list[str]:
    """What makes ``cluster-status`` exit 1, one phrase each."""
    problems = []
    silent = [r.entry for r in reports if r.status is None or r.config is None]
    if silent:
        problems.append(f"{len(silent)} of {len(reports)} nodes did not answer: {', '.join(silent)}")
    different = [r.entry for r in reports if r.same_actors is False]
    if different:
        problems.append(f"actors lists differ from this node's on {', '.join(different)}")
    conflicts = [
        r.entry
        for r in reports
        if r.status is not None and any(peer.get("conflict") for peer in (r.status.get("peers") or {}).values())
    ]
    if conflicts:
        problems.append(f"replica id conflicts reported by {', '.join(conflicts)}")
    stuck = [r.entry for r in reports if r.status is not None and r.status.get("store_problem")]
    if stuck:
        problems.append(f"the store can write nothing more until a restart on {', '.join(stuck)}")
    return problems


_COMMANDS: dict[str, Callable[[BlockingClient, argparse.Namespace, Connect, TextIO], int]] = {
    "incr": _incr,
    "get": _get,
    "config": _config,
    "remove": _remove,
    "status": _status,
    "cluster-status": _cluster_status,
}


# -- formatting ----------------------------------------------------------------------


def _short(replica: Any) -> str:
    return str(replica)[:SHORT_ID] if replica else "-"


def _reachable(flag: bool | None) -> str:
    return {True: "yes", False: "NO", None: "unknown"}[flag]


def _aligned(pairs: list[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in pairs)
    return "".join(f"{key:<{width}}  {value}\n" for key, value in pairs)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n" for row in rows)


if __name__ == "__main__":
    sys.exit(main())
