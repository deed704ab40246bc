"""
The client library (``counterdb.client``) and the ``counterdb`` command line
(``counterdb.cli``).

The Twisted :class:`Client` runs against FakeNet (in memory, fake time); the
:class:`BlockingClient` and the command line against one module-wide
cluster of three real ``twistd`` nodes with a cluster secret, because they
need no reactor and so cannot share one with an in-process node.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nodes import CONVERGE, HOSTS, NODE_ARGS, NodeCluster, checkout_env, running_cluster
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived

from counterdb import cli
from counterdb.api import Access
from counterdb.auth import Secrets
from counterdb.cli import NodeReport, cluster_problems
from counterdb.client import BlockingClient, Client, CounterDBError, Retry, Unreachable
from counterdb.testing import FakeNet

A, B = "127.0.0.2", "127.0.0.3"
URL = f"http://{A}:8080"
SECRET = "0123456789abcdef" * 4
#: No jitter: every wait is known.
STEADY = Retry(attempts=4, initial=0.5, maximum=2.0, jitter=lambda: 0.0)


def fake_cluster(**kwargs: Any) -> FakeNet:
    net = FakeNet(**kwargs)
    net.cluster_of(A, B)
    return net


def client(net: FakeNet, http: Any = None, **kwargs: Any) -> Client:
    kwargs.setdefault("retry", STEADY)
    return Client(URL, http if http is not None else net.http, clock=net.clock, **kwargs)


def failure(net: FakeNet, d: Deferred[Any]) -> BaseException:
    outcome: list[Any] = []
    net.settle()
    d.addBoth(outcome.append)
    assert outcome and isinstance(outcome[0], Failure), f"expected a failure, got {outcome!r}"
    return outcome[0].value


class Recording:
    """A treq stand-in that records each request's headers and can lose the
    answer of the first increment after the node has handled it."""

    def __init__(self, http: Any, lose_first_answer: bool = False) -> None:
        self.http = http
        self.lose_first_answer = lose_first_answer
        self.requests: list[tuple[str, str, dict[str, Any]]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.requests.append((method, url, kwargs.get("headers") or {}))
        d = self.http.request(method, url, **kwargs)
        if method == "POST" and self.lose_first_answer:
            self.lose_first_answer = False
            # The node committed and answered; the connection broke before
            # the client read the answer.
            d.addCallback(lambda _: Failure(ResponseNeverReceived([Failure(ConnectionLost("reset"))])))
        return d

    def keys(self) -> list[str]:
        return [headers["Idempotency-Key"][0] for method, _, headers in self.requests if method == "POST"]


# -- the Twisted client against FakeNet ------------------------------------------


def test_every_call_answers_what_the_node_answers() -> None:
    net = fake_cluster()
    c = client(net)
    assert net.result(c.increment("visits")) == 1
    assert net.result(c.increment("visits", 5)) == 6
    assert net.result(c.increment("visits", 0)) == 6
    assert net.result(c.value("visits")) == 6
    assert net.result(c.consistent_value("visits")) == 6
    assert net.result(c.consistent_value("visits", timeout=2.5)) == 6
    assert net.result(c.value("never")) == 0
    config = net.result(c.config())
    assert config["actors"] == [A, B] and config["self"] == A
    assert net.result(c.set_config([B, A]))["actors"] == [B, A]
    status = net.result(c.status())
    assert status["replica"] == config["replica"] and status["counters"] == 1


def test_names_travel_as_one_percent_encoded_path_segment() -> None:
    net = fake_cluster()
    c = client(net)
    for name in ("päge views?#1 %2F", "a+b&c=d", "..", ".", "x" * 255):
        assert net.result(c.increment(name, 3)) == 3
        assert net.result(c.value(name)) == 3 == net.value(A, name)
    seen = [uri for _, host, method, uri in net.router.seen if method == "POST" and host == A]
    assert seen[1:5] == [
        "/counter/p%C3%A4ge%20views%3F%231%20%252F",
        "/counter/a%2Bb%26c%3Dd",
        "/counter/%2E%2E",  # dot segments escaped: URL normalisation would drop them
        "/counter/%2E",
    ]


def test_increments_carry_a_new_idempotency_key_or_the_callers() -> None:
    net = fake_cluster()
    http = Recording(net.http)
    c = client(net, http)
    net.result(c.increment("k"))
    net.result(c.increment("k"))
    first, second = http.keys()
    assert first != second and len(first) == 36  # a uuid4
    assert net.result(c.increment("k", 2, idempotency_key="order-42")) == 4
    assert net.result(c.increment("k", 2, idempotency_key="order-42")) == 4  # replayed, not counted
    assert net.value(A, "k") == 4
    error = failure(net, c.increment("k", 3, idempotency_key="order-42"))
    assert isinstance(error, CounterDBError) and error.status == 422 and "order-42" in error.message


def test_a_lost_answer_is_retried_with_the_same_key_and_counted_once() -> None:
    net = fake_cluster()
    http = Recording(net.http, lose_first_answer=True)
    c = client(net, http)
    d = c.increment("paid", 5)
    net.settle()
    assert net.value(A, "paid") == 5  # the node counted the first attempt
    assert not net.fired(d)  # the client saw no answer and waits to retry
    net.run(STEADY.initial + 0.1)
    assert net.result(d) == 5
    first, retry = http.keys()
    assert first == retry
    assert net.value(A, "paid") == 5
    net.run(2.0)
    assert net.value(B, "paid") == 5


def test_a_node_that_hangs_then_recovers_gets_the_increment_once() -> None:
    net = fake_cluster()
    net.router.state[A] = "hung"
    c = client(net, timeout=1.0)
    d = c.increment("slow", 7)
    net.run(1.2)  # the first attempt timed out; the retry waits 0.5 s
    net.router.state[A] = "up"
    net.run(0.5)
    assert net.result(d) == 7
    assert len(net.requests_to(A, "POST", "/counter/slow")) == 2
    assert net.value(A, "slow") == 7


def test_503_is_retried_with_exponential_backoff_up_to_the_bound() -> None:
    net = fake_cluster()
    net.router.state[A] = "down"  # FakeNet answers 503
    d = client(net).increment("down")
    net.run(4.0, step=0.01)
    error = failure(net, d)
    assert isinstance(error, CounterDBError) and error.status == 503
    times = net.requests_to(A, "POST", "/counter/down")
    waits = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert waits == pytest.approx([0.5, 1.0, 2.0], abs=0.011)  # 4 attempts: 0.5 s doubling, capped at 2 s
    # ... and a node that comes back in time is retried successfully.
    d = client(net).increment("down")
    net.run(1.0)
    net.router.state[A] = "up"
    net.run(2.0)
    assert net.result(d) == 1


def test_a_node_that_never_answers_is_unreachable_after_the_last_attempt() -> None:
    net = fake_cluster()
    net.router.state[A] = "hung"
    d = client(net, timeout=1.0).value("x")
    net.run(4 * 1.0 + 0.5 + 1.0 + 2.0 - 0.3)  # four attempts of 1 s, three waits
    assert not net.fired(d)
    net.run(1.0)
    error = failure(net, d)
    assert isinstance(error, Unreachable) and error.status is None
    assert str(error) == f"{URL}: no answer within 1 s (after 4 attempts)"


def test_errors_carry_the_status_and_the_nodes_message() -> None:
    net = fake_cluster()
    c = client(net)
    error = failure(net, c.increment("x", -1))
    assert isinstance(error, CounterDBError) and not isinstance(error, Unreachable)
    assert (error.status, error.message) == (400, "the increment must not be negative: counters only grow")
    assert str(error) == "the increment must not be negative: counters only grow (HTTP 400)"
    error = failure(net, c.set_config(["10.9.9.9"]))
    assert isinstance(error, CounterDBError) and error.status == 400 and "this node" in error.message
    assert len(net.requests_to(A, "POST", "/counter/x")) == 1  # a 4xx is not retried
    with pytest.raises(TypeError):
        c.increment("x", 1.5)  # type: ignore[arg-type]


def test_a_consistent_read_that_times_out_reports_the_missing_hosts() -> None:
    net = fake_cluster()
    c = client(net)
    net.result(c.increment("c", 4))
    net.router.state[B] = "hung"
    d = c.consistent_value("c", timeout=1.0)
    net.run(1.1)
    error = failure(net, d)
    assert isinstance(error, CounterDBError) and error.status == 504
    assert error.details == {"missing": [B], "best_value": 4}
    assert len(net.requests_to(A, "GET", "/counter/c/consistent_value")) == 1


def test_a_consistent_read_without_a_deadline_is_not_asked_again_on_timeout() -> None:
    net = fake_cluster()
    net.router.state[B] = "hung"
    d = client(net, timeout=2.0).consistent_value("c")
    net.run(2.1)
    error = failure(net, d)
    assert isinstance(error, Unreachable) and "no answer within 2 s (after 1 attempt)" in str(error)
    assert len(net.requests_to(A, "GET", "/counter/c/consistent_value")) == 1


def test_the_token_is_sent_as_a_bearer_header() -> None:
    secret = SECRET.encode()
    net = fake_cluster(access=Access(cluster=Secrets((secret,), "test"), api=Secrets((b"t" * 32,), "test")))
    error = failure(net, client(net).increment("x"))
    assert isinstance(error, CounterDBError) and error.status == 401
    assert net.result(client(net, token="t" * 32).increment("x")) == 1
    assert net.result(client(net, token=SECRET).status())["counters"] == 1
    assert net.result(client(net, authorization=f"Bearer {SECRET}").config())["self"] == A
    error = failure(net, client(net, token="t" * 32).status())  # the API token is not the cluster secret
    assert isinstance(error, CounterDBError) and error.status == 401


def test_cancelling_a_call_stops_its_retries() -> None:
    net = fake_cluster()
    net.router.state[A] = "down"
    d = client(net).increment("x")
    net.settle()
    d.cancel()
    assert isinstance(failure(net, d), CancelledError)
    net.run(5.0)
    assert len(net.requests_to(A, "POST", "/counter/x")) == 1


def test_retry_delays_double_up_to_the_maximum_with_jitter_down_to_half() -> None:
    assert list(Retry(attempts=6, initial=0.2, maximum=1.0, jitter=lambda: 0.0).delays()) == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert list(Retry(attempts=3, initial=1.0, maximum=4.0, jitter=lambda: 1.0).delays()) == [0.5, 1.0]
    assert list(Retry(attempts=1).delays()) == []


@pytest.mark.parametrize("url", ["127.0.0.2:8080", "ftp://x", "http://", "http://h:99999", "http://h:1/?q=1"])
def test_a_bad_base_url_is_refused_at_once(url: str) -> None:
    with pytest.raises(ValueError):
        Client(url, FakeNet().http)
    with pytest.raises(ValueError):
        BlockingClient(url)


def test_the_command_line_refuses_bad_usage_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [],
        ["incr"],
        ["incr", "x", "-1"],
        ["incr", "x", "1.5"],
        ["get", "x", "--timeout", "1"],
        ["--url", "nope", "get", "x"],
        ["--url", "http://a:1", "-p", "2", "get", "x"],
        ["config", "set"],
        ["frobnicate"],
    ):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2, argv
        assert "usage: counterdb" in capsys.readouterr().err


def test_the_node_url_comes_from_url_or_host_and_port_or_the_environment() -> None:
    def url(*argv: str, environ: dict[str, str] | None = None) -> str:
        return cli.node_url(cli._parser().parse_args([*argv, "status"]), environ or {})

    assert url() == "http://127.0.0.1:8080"
    assert url("-H", "127.0.0.3") == "http://127.0.0.3:8080"
    assert url("-H", "::1", "-p", "9000") == "http://[::1]:9000"
    assert url("-p", "9000") == "http://127.0.0.1:9000"
    assert url("--url", "https://db1:8443/") == "https://db1:8443"
    assert url(environ={"COUNTERDB_URL": "http://10.0.0.1:80"}) == "http://10.0.0.1:80"
    assert url("-p", "81", environ={"COUNTERDB_URL": "http://10.0.0.1:80"}) == "http://127.0.0.1:81"


def test_an_unreachable_node_is_one_line_and_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--url", "http://127.0.0.1:9", "--retries", "1", "get", "x"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "counterdb: http://127.0.0.1:9: connection refused (after 2 attempts)\n"


def test_an_unusable_token_file_is_one_line_and_status_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loose = tmp_path / "secret"
    loose.write_text(SECRET + "\n")
    loose.chmod(0o644)
    assert cli.main(["--token-file", str(loose), "get", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("counterdb: ") and "chmod 600" in err and SECRET not in err and err.count("\n") == 1


# -- the blocking client and the command line against real nodes ------------------


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "cluster-secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, secret_file: Path) -> Iterator[NodeCluster]:
    """Three real nodes with a cluster secret, configured from the start."""
    args = [*NODE_ARGS, "--cluster-secret-file", str(secret_file), "--actors", ",".join(HOSTS)]
    with running_cluster(tmp_path_factory.mktemp("cluster"), HOSTS, args=args) as nodes:
        yield nodes


def run(cluster: NodeCluster, secret_file: Path, *argv: str, node: int = 0) -> tuple[int, str, str]:
    """``counterdb.cli.main`` against one node of ``cluster``: (status, out, err)."""
    from io import StringIO

    out, err = StringIO(), StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = cli.main(["--url", cluster[node].url, "--token-file", str(secret_file), *argv])
    except SystemExit as exited:  # a usage error, from argparse
        code = int(exited.code or 0)
    finally:
        sys.stdout, sys.stderr = old
    return code, out.getvalue(), err.getvalue()


def test_blocking_client_against_a_real_node(cluster: NodeCluster) -> None:
    a = BlockingClient(cluster[0].url, token=SECRET, timeout=5.0)
    assert a.increment("blocking") == 1
    assert a.increment("blocking", 4) == 5
    assert a.increment("blocking", 2, idempotency_key="once") == 7
    assert a.increment("blocking", 2, idempotency_key="once") == 7
    assert a.value("blocking") == 7
    assert a.consistent_value("blocking") == 7
    assert a.consistent_value("blocking", timeout=5.0) == 7
    assert a.increment("päge views?#1 %2F", 3) == 3
    assert cluster[1].consistent_value("päge views?#1 %2F") == 3
    config = a.config()
    assert config["actors"] == HOSTS and config["self"] == HOSTS[0]
    assert a.set_config(HOSTS)["actors"] == HOSTS
    assert a.status()["replica"] == config["replica"]
    with pytest.raises(CounterDBError) as raised:
        a.increment("blocking", -1)
    assert raised.value.status == 400
    assert raised.value.message == "the increment must not be negative: counters only grow"
    with pytest.raises(CounterDBError) as raised:
        BlockingClient(cluster[0].url).config()
    assert raised.value.status == 401 and "Bearer" in raised.value.message


def test_blocking_client_retries_a_refused_connection_with_backoff() -> None:
    waits: list[float] = []
    c = BlockingClient("http://127.0.0.1:9", retry=STEADY, sleep=waits.append)
    with pytest.raises(Unreachable) as raised:
        c.increment("x")
    assert waits == [0.5, 1.0, 2.0]
    assert str(raised.value) == "http://127.0.0.1:9: connection refused (after 4 attempts)"


def test_cli_incr_get_config_and_status(cluster: NodeCluster, secret_file: Path) -> None:
    assert run(cluster, secret_file, "incr", "cli") == (0, "1\n", "")
    assert run(cluster, secret_file, "incr", "cli", "41") == (0, "42\n", "")
    assert run(cluster, secret_file, "get", "cli") == (0, "42\n", "")
    assert run(cluster, secret_file, "get", "cli", "--consistent", node=2) == (0, "42\n", "")
    assert run(cluster, secret_file, "get", "cli", "--consistent", "--timeout", "5", node=1) == (0, "42\n", "")

    code, out, err = run(cluster, secret_file, "config")
    replica = BlockingClient(cluster[0].url, token=SECRET).config()["replica"]
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[:3] == [f"replica  {replica}", "self     127.0.0.2 (index 0)", "actors   " + " ".join(HOSTS)]
    code, out, err = run(cluster, secret_file, "config", "set", *HOSTS)
    assert code == 0 and "actors   " + " ".join(HOSTS) in out.splitlines()
    code, out, _ = run(cluster, secret_file, "--json", "config")
    assert json.loads(out)["replica"] == replica

    code, out, err = run(cluster, secret_file, "status")
    assert code == 0 and err == ""
    assert f"replica   {replica}" in out.splitlines()
    assert out.splitlines()[7].split() == [
        "PEER", "REACHABLE", "DIRTY", "REPLICA", "PUSHES", "FAILED", "POLLS", "FAILED", "REFUSED", "CONFLICT"
    ]  # fmt: skip
    peers = [line.split()[0] for line in out.splitlines()[8:]]
    assert peers == HOSTS[1:]

    code, out, err = run(cluster, secret_file, "incr", "cli", "-5")
    assert code == 2 and out == ""
    code, out, err = run(cluster, secret_file, "get", "x" * 256)
    assert code == 1 and out == ""
    assert err == "counterdb: counter name must be 1 to 255 bytes of UTF-8, got 256 bytes (HTTP 400)\n"


def test_cli_cluster_status_shows_every_node_and_who_lags(cluster: NodeCluster, secret_file: Path) -> None:
    BlockingClient(cluster[1].url, token=SECRET).increment("lag", 2)

    def settled() -> bool:
        peers = [peer for node in cluster for peer in BlockingClient(node.url, token=SECRET).status()["peers"].values()]
        return all(peer["dirty"] == 0 and peer["reachable"] for peer in peers)

    cluster.wait_until(settled, CONVERGE, "every node reached every peer and pushed everything")
    code, out, err = run(cluster, secret_file, "cluster-status", node=1)
    assert (code, err) == (0, ""), out
    header, *rows = out.splitlines()
    assert header.split()[:5] == ["NODE", "ANSWERS", "REPLICA", "COUNTERS", "ACTORS"]
    assert [row.split()[0] for row in rows] == HOSTS
    for row, host in zip(rows, HOSTS):
        cells = row.split()
        assert cells[1] == "yes" and len(cells[2]) == 8 and cells[4] == "same", row
        others = [h for h in HOSTS if h != host]
        assert f"{others[0]} yes," in row and f"{others[1]} yes," in row, row

    cluster[2].pause()
    try:
        code, out, err = run(cluster, secret_file, "--request-timeout", "0.5", "cluster-status")
    finally:
        cluster[2].resume()
    assert code == 1
    assert err == f"counterdb: 1 of 3 nodes did not answer: {HOSTS[2]}\n"
    paused = out.splitlines()[3].split()
    assert paused[:5] == [HOSTS[2], "no", "-", "-", "-"] and "no answer within 0.5 s" in out


def test_cli_runs_as_a_module(cluster: NodeCluster, secret_file: Path) -> None:
    node = ["-H", cluster[0].host, "-p", str(cluster.port), "--token-file", str(secret_file)]
    done = subprocess.run(
        [sys.executable, "-m", "counterdb.cli", *node, "incr", "module", "3"],
        capture_output=True,
        text=True,
        timeout=30,
        env=checkout_env(),
        cwd=os.getcwd(),
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "3\n", "")
    done = subprocess.run(
        [sys.executable, "-m", "counterdb.cli", "--url", "http://127.0.0.1:9", "--retries", "0", "get", "x"],
        capture_output=True,
        text=True,
        timeout=30,
        env=checkout_env(),
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "counterdb: http://127.0.0.1:9: connection refused (after 1 attempt)\n"


class _FakeNodeClient:
    """Just enough of BlockingClient for the remove command."""

    def __init__(self, actors: list[str]) -> None:
        self.actors = actors
        self.posted: list[list[str]] = []

    def config(self) -> dict[str, object]:
        return {"actors": self.actors, "index": 0, "self": self.actors[0], "version": [1, "r"]}

    def set_config(self, actors: list[str]) -> dict[str, object]:
        self.posted.append(actors)
        return {"actors": actors, "index": 0, "self": actors[0], "version": [2, "r"]}


def test_remove_posts_the_list_without_the_host_and_refuses_a_stranger() -> None:
    import argparse
    import io

    from counterdb import cli

    node = _FakeNodeClient(["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    out = io.StringIO()
    args = argparse.Namespace(leaving="10.0.0.3", json=False)
    assert cli._remove(node, args, None, out) == 0
    assert node.posted == [["10.0.0.1", "10.0.0.2"]]
    with pytest.raises(cli.CommandError, match="not in the actors list"):
        cli._remove(node, argparse.Namespace(leaving="10.0.0.9", json=False), None, out)


def test_cluster_status_flags_stuck_stores() -> None:
    """Every node answers the operator, yet n3's store gave up: that must
    fail the check, or a green cluster-status would hide it. A peer shown
    unreachable does not: one failed exchange (a busy moment) shows so."""

    def report(entry: str, peers: dict[str, bool | None], problem: str | None = None) -> NodeReport:
        status = {
            "store_problem": problem,
            "peers": {f"http://{p}:8080": {"entry": p, "reachable": ok} for p, ok in peers.items()},
        }
        return NodeReport(entry, f"http://{entry}:8080", status=status, config={}, answered=True, same_actors=True)

    healthy = [report("n1", {"n2": False, "n3": None}), report("n2", {"n1": True}), report("n3", {"n1": True})]
    assert cluster_problems(healthy) == []
    reports = [*healthy[:2], report("n3", {"n1": True}, problem="the store's writer process is gone")]
    assert cluster_problems(reports) == ["the store can write nothing more until a restart on n3"]
