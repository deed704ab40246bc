"""
Real-process integration tests: three ``twistd -n counterdb`` nodes on
127.0.0.2, 127.0.0.3 and 127.0.0.4, one port shared by all, configured with
bare IP addresses through ``POST /config``.

Plain synchronous pytest functions (subprocess + urllib): the nodes run their
own reactors, the tests only speak HTTP and send signals.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from nodes import (
    CONVERGE,
    FAST,
    HOSTS,
    NODE_ARGS,
    NodeCluster,
    NodeProcess,
    configured_cluster,
    is_timeout,
    running_cluster,
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NodeCluster]:
    """Three configured nodes; stopped (paused ones resumed first) however
    the test ends."""
    with configured_cluster(tmp_path) as nodes:
        yield nodes


def wait_converged(cluster: NodeCluster, name: str, total: int, nodes: list[NodeProcess] | None = None) -> None:
    """Poll until every node (or every node of ``nodes``) has ``name`` == ``total``."""
    nodes = list(cluster) if nodes is None else nodes

    def converged() -> bool:
        return all(node.value(name, timeout=2.0) == total for node in nodes)

    def seen() -> str:
        values: dict[str, object] = {}
        for node in nodes:
            try:
                values[node.host] = node.request("GET", f"/counter/{quote(name, safe='')}/value", timeout=2.0, raw=True)
            except OSError as e:
                values[node.host] = e
        return f"{name} == {total} on {[n.host for n in nodes]}; now {values}"

    cluster.wait_until(converged, CONVERGE, seen)


def timed_increment(cluster: NodeCluster, node: NodeProcess, name: str, body: str | None = None) -> int:
    """Increment, asserting the node answered within :data:`FAST` seconds."""
    response = node.increment_response(name, body, timeout=5.0)
    assert response.status == 200, cluster.explain(f"increment {name} {body!r} on {node}: {response!r}")
    assert response.elapsed < FAST, cluster.explain(
        f"increment {name} on {node} took {response.elapsed:.3f} s (limit {FAST} s) with a peer down"
    )
    return int(response.text)


def test_config_reports_each_nodes_own_entry(cluster: NodeCluster) -> None:
    replicas = set()
    for index, node in enumerate(cluster):
        info = node.get_config()
        assert info["index"] == index and info["self"] == node.host and info["actors"] == HOSTS, cluster.explain(
            f"GET /config on {node}: {info!r}"
        )
        replicas.add(info["replica"])
    assert len(replicas) == len(HOSTS), cluster.explain(f"replica ids are not distinct: {replicas}")


def test_increments_on_every_node_converge(cluster: NodeCluster) -> None:
    a, b, c = cluster
    name = "hits"
    # Every body form: empty (+1), a plain number, {"addValue": n}.
    plan = [
        (a, None, 1),
        (b, "5", 5),
        (c, json.dumps({"addValue": 7}), 7),
        (a, "", 1),
        (b, json.dumps({"addValue": 11}), 11),
        (c, "3", 3),
        (a, "0", 0),
        (c, None, 1),
    ]
    own = {node.host: 0 for node in cluster}
    for node, body, amount in plan:
        answer = node.increment(name, body)
        own[node.host] += amount
        # The answer is the node's local value: at least its own increments.
        assert answer >= own[node.host], cluster.explain(f"{node} answered {answer} after {own}")
    total = sum(own.values())

    wait_converged(cluster, name, total)
    for node in cluster:
        got = node.consistent_value(name, timeout=10.0)
        assert got == total, cluster.explain(f"consistent_value on {node}: {got}, expected {total}")
        got = node.consistent_value(name, server_timeout=5, timeout=10.0)
        assert got == total, cluster.explain(f"consistent_value?timeout=5 on {node}: {got}, expected {total}")
    # Names travel as URL path segments between nodes too.
    odd = "päge views?#1 %2F"
    for amount, node in enumerate(cluster, start=1):
        node.increment(odd, str(amount))
    wait_converged(cluster, odd, 6)
    for node in cluster:
        got = node.consistent_value(odd, timeout=10.0)
        assert got == 6, cluster.explain(f"consistent_value({odd!r}) on {node}: {got}, expected 6")
    # A counter nobody touched is 0 everywhere, consistently too.
    assert [node.consistent_value("untouched", timeout=10.0) for node in cluster] == [0, 0, 0]


def test_paused_node_blocks_neither_writes_nor_bounded_reads(cluster: NodeCluster) -> None:
    a, b, c = cluster
    name = "paused"
    a.increment(name, "2")
    c.increment(name, "4")
    total = 6
    wait_converged(cluster, name, total)

    c.pause()
    # Writes on the live nodes answer at once, though their pushes to the
    # paused peer hang until --peer-timeout.
    for _ in range(3):
        for node, amount in ((a, 1), (b, 10)):
            timed_increment(cluster, node, name, str(amount))
            total += amount
    wait_converged(cluster, name, total, [a, b])

    # An unbounded consistent read waits for the paused peer: no answer
    # before the client gives up.
    started = time.monotonic()
    with pytest.raises(OSError) as raised:
        a.consistent_value_response(name, timeout=1.5, raw=True)
    assert is_timeout(raised.value), cluster.explain(f"expected a client timeout, got {raised.value!r}")
    assert time.monotonic() - started >= 1.4

    # A bounded one answers 504 naming the paused host, with the best value
    # the live nodes know (all of it: c took no increments while paused).
    for node in (a, b):
        response = node.consistent_value_response(name, server_timeout=0.5, timeout=5.0)
        assert response.status == 504, cluster.explain(f"consistent_value?timeout=0.5 on {node}: {response!r}")
        assert response.elapsed < 3.0, cluster.explain(f"504 took {response.elapsed:.3f} s on {node}")
        body = response.json()
        assert body["missing"] == [c.host], cluster.explain(f"504 body on {node}: {body!r}")
        assert body["best_value"] == total, cluster.explain(f"504 body on {node}: {body!r}, expected {total}")
        assert c.host in body["error"], cluster.explain(f"504 body on {node}: {body!r}")

    c.resume()
    wait_converged(cluster, name, total)
    for node in cluster:
        got = node.consistent_value(name, timeout=10.0)
        assert got == total, cluster.explain(f"consistent_value on {node} after SIGCONT: {got}, expected {total}")
    # The resumed node takes writes again, and they spread.
    c.increment(name, "100")
    total += 100
    wait_converged(cluster, name, total)


def test_killed_node_leaves_the_others_working(cluster: NodeCluster) -> None:
    a, b, c = cluster
    name = "killed"
    total = 0
    for node in cluster:
        node.increment(name, "3")
        total += 3
    wait_converged(cluster, name, total)

    c.kill()
    assert not c.running()
    # The survivors keep taking increments (each one fast) and keep agreeing,
    # over several poll intervals and push retries towards the dead peer.
    for _ in range(5):
        for node, amount in ((a, 1), (b, 2)):
            timed_increment(cluster, node, name, str(amount))
            total += amount
        wait_converged(cluster, name, total, [a, b])

    for node in (a, b):
        assert node.value(name) == total
        response = node.consistent_value_response(name, server_timeout=0.5, timeout=5.0)
        assert response.status == 504, cluster.explain(f"consistent_value?timeout=0.5 on {node}: {response!r}")
        body = response.json()
        assert body["missing"] == [c.host] and body["best_value"] == total, cluster.explain(
            f"504 body on {node}: {body!r}, expected best_value {total}"
        )


def test_a_cluster_with_a_secret_syncs_and_refuses_whoever_lacks_it(tmp_path: Path) -> None:
    """Real twistd nodes started with --cluster-secret-file: the peers send
    the secret to each other (so they converge), and a client without it
    can neither reconfigure a node nor forge a partial."""
    secret = "0123456789abcdef" * 4
    secret_file = tmp_path / "cluster-secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    auth = {"Authorization": f"Bearer {secret}"}
    args = [*NODE_ARGS, "--cluster-secret-file", str(secret_file), "--actors", ",".join(HOSTS)]
    with running_cluster(tmp_path / "cluster", HOSTS, args=args) as cluster:
        a, b, c = cluster
        assert a.request("POST", "/counter/guarded", "4").status == 200  # the public API stays open
        cluster.wait_until(lambda: c.value("guarded") == 4, CONVERGE, "the secret cluster converges")
        refused = b.request("POST", "/counter/guarded/setsync", json.dumps({"partials": {"forged": 10**12}}))
        assert refused.status == 401, refused
        assert b.request("POST", "/config", json.dumps({"actors": [b.host]})).status == 401
        assert b.request("GET", "/config", headers=auth).json()["actors"] == HOSTS
        assert all(node.value("guarded") == 4 for node in cluster)
        assert secret not in cluster.logs()
