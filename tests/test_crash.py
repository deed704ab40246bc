"""
Crash tolerance of real nodes: ``twistd -n counterdb`` processes on
127.0.0.2, 127.0.0.3 and 127.0.0.4 (one port for all, configured with bare
IP addresses through ``POST /config``), SIGKILLed and restarted on the same
data directory, replaced by an empty one, or restarted while their peers are
unreachable (SIGSTOP).

Plain synchronous pytest functions (subprocess + urllib), like
``test_integration.py``. Nothing sleeps for a fixed time: every wait polls a
condition until a deadline, and the nodes are stopped however a test ends.
"""

from __future__ import annotations

import http.client
import itertools
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodes import (
    CONVERGE,
    FAST,
    HOSTS,
    NODE_ARGS,
    NodeCluster,
    NodeProcess,
    configured_cluster,
    http_request,
    is_refused,
    without_version,
)

from counterdb.store import DB_FILE

#: Client timeout of each increment of the load test: a request that gets
#: no answer in time is "unknown" (it may or may not have been counted).
LOAD_TIMEOUT = 2.0
#: Client threads of the load test (the machine has 2 cores).
LOAD_CLIENTS = 4


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NodeCluster]:
    with configured_cluster(tmp_path) as nodes:
        yield nodes


# -- helpers -------------------------------------------------------------------


def values(nodes: list[NodeProcess], name: str) -> dict[str, object]:
    """Every node's local value of ``name``, or why it did not answer."""
    seen: dict[str, object] = {}
    for node in nodes:
        try:
            response = node.request("GET", f"/counter/{name}/value", timeout=2.0, raw=True)
            seen[node.host] = int(response.text) if response.status == 200 else response
        except OSError as e:
            seen[node.host] = e
    return seen


def wait_converged(cluster: NodeCluster, name: str, total: int, nodes: list[NodeProcess] | None = None) -> None:
    """Poll until every node (or every node of ``nodes``) has ``name`` == ``total``."""
    nodes = list(cluster) if nodes is None else nodes
    cluster.wait_until(
        lambda: all(v == total for v in values(nodes, name).values()),
        CONVERGE,
        lambda: f"{name} == {total} on {[n.host for n in nodes]}; now {values(nodes, name)}",
    )


def assert_consistent_everywhere(cluster: NodeCluster, name: str, total: int, when: str) -> None:
    for node in cluster:
        got = node.consistent_value(name, server_timeout=10, timeout=15.0)
        assert got == total, cluster.explain(f"{when}: consistent_value of {name} on {node} is {got}, expected {total}")


def assert_configured(cluster: NodeCluster, node: NodeProcess, index: int, replica: str, when: str) -> None:
    info = without_version(node.get_config())
    expected = {"index": index, "self": node.host, "actors": HOSTS, "replica": replica}
    assert info == expected, cluster.explain(f"{when}: GET /config on {node} is {info!r}, expected {expected!r}")


# -- 1. SIGKILL in the middle of load, restart on the same data dir --------------------


class Outcomes:
    """What the load clients saw, per node: thread-safe counters.

    ``acked``: 200, counted for sure. ``failed``: certainly not counted (a
    4xx, or the connection was refused so nothing was sent). ``unknown``: the
    request was sent but no answer came (timeout, reset, node killed): it may
    or may not have been counted.
    """

    def __init__(self, hosts: list[str]) -> None:
        self.lock = threading.Lock()
        self.amount = {kind: {host: 0 for host in hosts} for kind in ("acked", "unknown", "failed")}
        self.requests = {kind: {host: 0 for host in hosts} for kind in ("acked", "unknown", "failed")}
        self.refused = {host: 0 for host in hosts}
        self.unexpected: list[str] = []  # 5xx answers and client-side surprises
        self.unknown_reasons: dict[str, int] = {}

    def record(self, kind: str, host: str, amount: int, reason: str | None = None) -> None:
        with self.lock:
            self.amount[kind][host] += amount
            self.requests[kind][host] += 1
            if reason is not None and kind == "unknown":
                self.unknown_reasons[reason] = self.unknown_reasons.get(reason, 0) + 1

    def total(self, kind: str, host: str | None = None) -> int:
        with self.lock:
            per_host = self.amount[kind]
            return per_host[host] if host is not None else sum(per_host.values())

    def count(self, kind: str, host: str | None = None) -> int:
        with self.lock:
            per_host = self.requests[kind]
            return per_host[host] if host is not None else sum(per_host.values())

    def summary(self) -> str:
        with self.lock:
            parts = []
            for kind in ("acked", "unknown", "failed"):
                n, total = sum(self.requests[kind].values()), sum(self.amount[kind].values())
                parts.append(f"{kind} {n} requests (amount {total}) {self.amount[kind]}")
            parts.append(f"refused {self.refused}; unknown because {self.unknown_reasons}")
            if self.unexpected:
                parts.append(f"unexpected: {self.unexpected[:10]}")
            return "; ".join(parts)


def load_client(seed: int, nodes: list[NodeProcess], name: str, outcomes: Outcomes, stop: threading.Event) -> None:
    """Send increments of 1 to 9 to random nodes until ``stop`` is set."""
    rng = random.Random(seed)
    while not stop.is_set():
        node = rng.choice(nodes)
        amount = rng.randint(1, 9)
        try:
            response = http_request(f"{node.url}/counter/{name}", "POST", str(amount), timeout=LOAD_TIMEOUT)
        except OSError as e:
            if is_refused(e):
                outcomes.record("failed", node.host, amount)
                with outcomes.lock:
                    outcomes.refused[node.host] += 1
                stop.wait(0.02)  # the node is down: do not spin while it restarts
            else:
                reason = getattr(e, "reason", e)
                outcomes.record("unknown", node.host, amount, type(reason).__name__)
            continue
        except http.client.HTTPException as e:  # e.g. a status line cut short by the kill
            outcomes.record("unknown", node.host, amount, type(e).__name__)
            continue
        if response.status == 200:
            outcomes.record("acked", node.host, amount)
        elif 400 <= response.status < 500:
            outcomes.record("failed", node.host, amount)
            with outcomes.lock:
                outcomes.unexpected.append(f"{node.host}: {response!r}")
        else:
            outcomes.record("unknown", node.host, amount, f"HTTP {response.status}")
            with outcomes.lock:
                outcomes.unexpected.append(f"{node.host}: {response!r}")


@pytest.mark.parametrize("durability", ["full", "fast"])
def test_sigkill_under_load_loses_no_acknowledged_increment(tmp_path: Path, durability: str) -> None:
    """With ``full`` (the default) a restarted node keeps its replica id; with
    ``fast`` it takes a new one after every unclean stop (docs/operations.md),
    and the partials of all its ids together hold its increments. Either way
    ``kill -9`` loses no acknowledged increment."""
    with configured_cluster(tmp_path, [*NODE_ARGS, "--durability", durability]) as cluster:
        check_sigkill_under_load(cluster, durability)


def check_sigkill_under_load(cluster: NodeCluster, durability: str) -> None:
    name = "load"
    a, b, c = cluster
    nodes = list(cluster)
    # Every replica id each host has had, oldest first.
    replicas = {node.host: [node.get_config()["replica"]] for node in nodes}
    assert len({ids[0] for ids in replicas.values()}) == 3, cluster.explain(f"replica ids are not distinct: {replicas}")

    def own_partial(partials: dict[str, int], host: str) -> int:
        return sum(partials.get(replica, 0) for replica in replicas[host])

    outcomes = Outcomes(cluster.hosts)
    stop = threading.Event()
    crashes: list[BaseException] = []

    def client(seed: int) -> None:
        try:
            load_client(seed, nodes, name, outcomes, stop)
        except BaseException as e:
            crashes.append(e)
            raise

    def wait_acked(more: int, what: str, host: str | None = None) -> None:
        target = outcomes.count("acked") + more
        cluster.wait_until(
            lambda: outcomes.count("acked") >= target and (host is None or outcomes.refused[host] > 0),
            CONVERGE,
            lambda: f"{what}: {target} acknowledged increments; now {outcomes.summary()}",
        )

    restarts: list[str] = []
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(LOAD_CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        wait_acked(200, "load before the first kill")
        for victim in (b, c, a, b):
            wait_acked(250, f"load before killing {victim}")
            victim.kill()
            with outcomes.lock:
                outcomes.refused[victim.host] = 0
            # The others keep taking increments, and clients do hit the dead node.
            wait_acked(60, f"load while {victim} is dead", host=victim.host)
            restarting = time.monotonic()
            victim.restart()
            # Snapshot, then read: every increment acknowledged before the
            # read, by this run or the killed one, must be in the value.
            floor = outcomes.total("acked", victim.host)
            first = victim.request("GET", f"/counter/{name}/value", timeout=5.0)
            assert first.status == 200 and int(first.text) >= floor, cluster.explain(
                f"{victim} right after restart: GET /value -> {first!r}, but it had acknowledged {floor} itself; "
                f"{outcomes.summary()}"
            )
            # With the stored actors list, without POST /config; the same
            # replica id, or (fast) a new one.
            info = victim.get_config()
            expected = {"index": nodes.index(victim), "self": victim.host, "actors": HOSTS}
            assert {k: info[k] for k in expected} == expected, cluster.explain(
                f"{victim} after restart: GET /config is {info!r}, expected {expected!r}"
            )
            if durability == "full":
                assert info["replica"] == replicas[victim.host][-1], cluster.explain(
                    f"{victim} after restart: replica id {info['replica']}, expected {replicas[victim.host][-1]}"
                )
            else:
                assert all(info["replica"] not in ids for ids in replicas.values()), cluster.explain(
                    f"{victim} after an unclean stop in fast mode kept or reused a replica id: {info!r}, {replicas}"
                )
                replicas[victim.host].append(info["replica"])
            own = own_partial(victim.partials(name), victim.host)
            assert own >= floor, cluster.explain(
                f"{victim} right after restart: its own partial is {own}, but it had acknowledged {floor}; "
                f"{outcomes.summary()}"
            )
            restarts.append(
                f"{victim.host}: restarted in {time.monotonic() - restarting:.2f} s, value {first.text} "
                f"(own partial {own} >= own acked {floor})"
            )
        wait_acked(250, "load after the last restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join(LOAD_TIMEOUT + 5)
    load_seconds = time.monotonic() - started
    assert not crashes, cluster.explain(f"a load client crashed: {crashes[0]!r}")
    assert not any(t.is_alive() for t in threads), "a load client did not stop"
    assert not outcomes.unexpected, cluster.explain(f"unexpected answers: {outcomes.summary()}")

    acked, unknown = outcomes.total("acked"), outcomes.total("unknown")
    low, high = acked, acked + unknown

    def figures() -> str:
        return (
            f"acknowledged total {acked}, unknown {unknown} -> expected within [{low}, {high}]; "
            f"{outcomes.summary()}; restarts: {restarts}"
        )

    consistent = {node.host: node.consistent_value(name, server_timeout=10, timeout=15.0) for node in nodes}
    bad = {host: v for host, v in consistent.items() if not low <= v <= high}
    assert not bad, cluster.explain(f"consistent_value out of bounds: {consistent}; {figures()}")

    # Requests whose client gave up may still be committed late: wait until
    # the local values agree, then check them against the same bounds.
    def agreed() -> int | None:
        seen = set(values(nodes, name).values())
        if len(seen) == 1:
            (value,) = seen
            return value if isinstance(value, int) else None
        return None

    final = cluster.wait_until(agreed, CONVERGE, lambda: f"local values to agree: {values(nodes, name)}; {figures()}")
    assert low <= final <= high and final >= max(consistent.values()), cluster.explain(
        f"local value after convergence {final} out of bounds (consistent reads were {consistent}); {figures()}"
    )
    # Per node too: the partials of its replica ids hold exactly its own
    # increments, and no replica id appeared that GET /config never showed.
    partials = a.partials(name)
    known = {replica for ids in replicas.values() for replica in ids}
    assert set(partials) <= known, cluster.explain(
        f"partials {partials} name replicas other than {replicas}; {figures()}"
    )
    for host, ids in replicas.items():
        own_low = outcomes.total("acked", host)
        own_high = own_low + outcomes.total("unknown", host)
        assert own_low <= own_partial(partials, host) <= own_high, cluster.explain(
            f"partials of {host} ({ids}) add up to {own_partial(partials, host)}, expected within "
            f"[{own_low}, {own_high}]; {figures()}"
        )
    print(
        f"\nload test (--durability {durability}): {load_seconds:.1f} s of load; {figures()}; "
        f"consistent reads {consistent}; final value {final}"
    )


# -- 2. Idempotent retries across a crash ------------------------------------------------


def test_idempotent_retry_after_a_crash_is_answered_from_the_record(cluster: NodeCluster) -> None:
    a, b, c = cluster
    name = "idem"
    b.increment(name, "10")
    wait_converged(cluster, name, 10)

    key = f"crash-{uuid.uuid4()}"
    first = a.increment_response(name, "7", idempotency_key=key)
    assert first.status == 200 and first.text == "17", cluster.explain(f"first keyed increment: {first!r}")
    assert first.headers.get("Idempotent-Replayed") is None, cluster.explain(
        f"the first request is not a replay: {dict(first.headers)}"
    )
    replica = a.get_config()["replica"]
    a.kill()  # right after the acknowledgement: nothing lazy had time to run
    a.restart()
    assert_configured(cluster, a, 0, replica, "after the crash")

    # Meanwhile the counter moved on: the replay still answers what the
    # first request got, and does not count again.
    c.increment(name, "100")
    wait_converged(cluster, name, 117)
    # The same increment in another body form is the same request.
    for attempt, body in enumerate(("7", '{"addValue": 7}', "7")):
        again = a.increment_response(name, body, idempotency_key=key)
        assert again.status == 200 and again.text == first.text, cluster.explain(
            f"retry #{attempt + 1} after the crash: {again!r}, expected the original answer {first.text}"
        )
        assert again.headers.get("Idempotent-Replayed") == "true", cluster.explain(
            f"retry #{attempt + 1} after the crash lacks Idempotent-Replayed: true: {dict(again.headers)}"
        )

    # The record survives another crash; the same key with another request
    # is refused, and counts nothing.
    a.kill()
    a.restart()
    for other_name, body in ((name, "8"), (name, ""), ("idem-other", "7")):
        refused = a.increment_response(other_name, body, idempotency_key=key)
        assert refused.status == 422, cluster.explain(
            f"key {key} reused for {other_name} {body!r}: expected 422, got {refused!r}"
        )
    # A new key is a new increment.
    fresh = a.increment_response(name, "5", idempotency_key=f"crash-{uuid.uuid4()}")
    assert fresh.status == 200 and fresh.text == "122", cluster.explain(f"fresh key: {fresh!r}")
    assert fresh.headers.get("Idempotent-Replayed") is None, cluster.explain(f"fresh key replayed: {fresh!r}")

    wait_converged(cluster, name, 122)
    assert_consistent_everywhere(cluster, name, 122, "after the keyed retries")
    assert_consistent_everywhere(cluster, "idem-other", 0, "after the refused reuse of the key")


def test_keyed_requests_cut_by_kills_count_exactly_once_when_retried(cluster: NodeCluster) -> None:
    """Clients retry each keyed increment (same key, same node) until it is
    answered, across two SIGKILLs of that node: whether or not the killed
    run had committed it, it counts exactly once."""
    a = cluster[0]
    name = "keyed"
    lock = threading.Lock()
    sent: dict[str, int] = {}  # key -> amount, for every increment answered 200
    retried = {"requests": 0, "replayed": 0, "replayed_after_retry": 0}
    problems: list[str] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for i in itertools.count():
            if stop.is_set():
                return
            key, amount = f"keyed-{seed}-{i}-{uuid.uuid4().hex[:8]}", rng.randint(1, 9)
            give_up = time.monotonic() + CONVERGE
            for attempt in itertools.count():
                try:
                    response = a.increment_response(name, str(amount), LOAD_TIMEOUT, raw=True, idempotency_key=key)
                except (OSError, http.client.HTTPException):
                    if time.monotonic() > give_up:
                        with lock:
                            problems.append(f"{key}: no answer for {CONVERGE:g} s")
                        return
                    time.sleep(0.02)  # the node is down: retry until give_up, same key
                    continue
                with lock:
                    if response.status != 200:
                        problems.append(f"{key} attempt {attempt + 1}: {response!r}")
                        return
                    sent[key] = amount
                    replayed = response.headers.get("Idempotent-Replayed") == "true"
                    retried["requests"] += attempt > 0
                    retried["replayed"] += replayed
                    retried["replayed_after_retry"] += replayed and attempt > 0
                break

    def answered() -> int:
        with lock:
            return len(sent)

    threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(LOAD_CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        for _ in range(2):
            target = answered() + 150
            cluster.wait_until(
                lambda target=target: answered() >= target,
                CONVERGE,
                lambda target=target: f"{target} keyed increments answered",
            )
            a.kill()
            a.restart()
        target = answered() + 150
        cluster.wait_until(lambda: answered() >= target, CONVERGE, lambda: f"{target} keyed increments answered")
    finally:
        stop.set()
        for thread in threads:
            thread.join(CONVERGE + LOAD_TIMEOUT + 5)
    assert not any(t.is_alive() for t in threads), "a client did not stop"
    assert not problems, cluster.explain(f"keyed increments failed: {problems[:10]}")
    assert retried["replayed"] == retried["replayed_after_retry"], cluster.explain(
        f"a first attempt was answered as a replay: {retried}"
    )
    total = sum(sent.values())
    wait_converged(cluster, name, total)
    assert_consistent_everywhere(cluster, name, total, f"after {len(sent)} keyed increments, {retried}")
    print(f"\nkeyed retries: {len(sent)} increments (total {total}); {retried}")


# -- 3. A replaced machine: empty data dir at the same address -----------------------------


def test_replaced_node_gets_a_new_replica_and_the_old_partial_still_counts(cluster: NodeCluster) -> None:
    a, b, x = cluster
    name = "replaced"
    for node, amount in ((x, 3), (a, 5), (x, 4), (b, 7), (x, 9)):
        node.increment(name, str(amount))
    old_total = 28
    wait_converged(cluster, name, old_total)
    old_replica = x.get_config()["replica"]
    assert b.partials(name).get(old_replica) == 16, cluster.explain(f"peers lack {x}'s partial: {b.partials(name)}")

    x.stop()
    assert x.shutdown_problem is None, cluster.explain(f"{x} {x.shutdown_problem}")
    x.wipe_data()
    x.restart()
    info = x.get_config()
    assert info["replica"] != old_replica, cluster.explain(f"the empty data dir reused replica id {old_replica}")
    new_replica = info["replica"]
    # Nothing to post: its peers still list it and hand it the list.
    cluster.wait_until(
        lambda: (
            without_version(x.get_config()) == {"index": 2, "self": x.host, "actors": HOSTS, "replica": new_replica}
        ),
        CONVERGE,
        lambda: f"{x} was not handed the actors list: {x.get_config()!r}",
    )

    for amount in (2, 6):
        x.increment(name, str(amount))
    total = old_total + 8
    assert_consistent_everywhere(cluster, name, total, f"after replacing {x}")
    wait_converged(cluster, name, total)
    partials = a.partials(name)
    assert partials.get(old_replica) == 16 and partials.get(new_replica) == 8, cluster.explain(
        f"old ({old_replica}) and new ({new_replica}) replica of {x} in {partials}"
    )
    # The replacement took over the old replica's partial too.
    assert x.partials(name) == partials, cluster.explain(f"{x}: {x.partials(name)}, {a}: {partials}")


# -- 4. Restart while the peers are unreachable ------------------------------------------------


def test_node_restarted_during_a_partition_serves_its_stored_totals(cluster: NodeCluster) -> None:
    x, b, c = cluster
    name = "x"
    for node, amount in ((x, 1), (b, 20), (c, 300), (b, 4000), (c, 50000)):
        node.increment(name, str(amount))
    total = 54321
    wait_converged(cluster, name, total)
    known = x.partials(name)
    assert sum(known.values()) == total and len(known) == 3, cluster.explain(f"{x} has {known}")
    # Peers' partials reach x's disk lazily (within the store's flush
    # interval, ~1 s): wait until its SQLite file holds all of them.
    cluster.wait_until(
        lambda: x.stored_partials(name) == known,
        CONVERGE,
        lambda: f"{x} to persist {known}; stored {x.stored_partials(name)}",
    )

    replica = x.get_config()["replica"]
    b.pause()
    c.pause()
    x.kill()
    x.restart()
    first = x.request("GET", f"/counter/{name}/value", timeout=5.0)
    assert first.status == 200 and int(first.text) == total, cluster.explain(
        f"{x} restarted with its peers unreachable: GET /value -> {first!r}, expected {total}"
    )
    assert first.elapsed < FAST, cluster.explain(f"GET /value took {first.elapsed:.3f} s on {x}")
    assert_configured(cluster, x, 0, replica, "restarted during the partition")

    # It takes increments without waiting for its peers.
    for amount in (600000, 7000000):
        response = x.increment_response(name, str(amount), timeout=5.0)
        total += amount
        assert response.status == 200 and int(response.text) == total, cluster.explain(
            f"increment {amount} on {x} during the partition: {response!r}, expected {total}"
        )
        assert response.elapsed < FAST, cluster.explain(f"increment on {x} took {response.elapsed:.3f} s")
    bounded = x.consistent_value_response(name, server_timeout=0.5, timeout=5.0)
    assert bounded.status == 504, cluster.explain(f"consistent_value?timeout=0.5 on {x}: {bounded!r}")
    body = bounded.json()
    assert body["missing"] == [b.host, c.host] and body["best_value"] == total, cluster.explain(
        f"504 body on {x}: {body!r}, expected best_value {total}"
    )

    b.resume()
    c.resume()
    wait_converged(cluster, name, total)
    assert_consistent_everywhere(cluster, name, total, "after the partition healed")


# -- 5. A host started from a copy of another's data dir ---------------------------------------


def test_a_copied_data_dir_takes_a_new_replica_id_and_no_increment_vanishes(cluster: NodeCluster) -> None:
    """Two hosts on copies of one data dir shared a replica id, and under
    load a third of the acknowledged increments vanished from every total.
    Now the copies notice at their first exchange and one (or both) goes on
    under a new replica id: every increment acknowledged after that counts
    exactly, everywhere."""
    a, x = cluster[0], cluster[2]
    name = "copied"
    a.increment(name, "5")
    wait_converged(cluster, name, 5)
    x.stop()
    x.wipe_data()
    admin = [sys.executable, "-m", "counterdb.admin"]
    backup = x.data_dir.parent / "a-copy.sqlite3"
    subprocess.run([*admin, "backup", str(a.data_dir), str(backup)], check=True, capture_output=True)
    x.data_dir.mkdir()
    shutil.copy(backup, x.data_dir / DB_FILE)  # a raw copy: the same replica id, the same list
    assert x.stored_replica_id() == a.stored_replica_id()
    x.restart()
    cluster.wait_until(
        lambda: a.get_config()["replica"] != x.get_config()["replica"],
        CONVERGE,
        lambda: f"{a} and {x} still share replica id {a.get_config()['replica']}",
    )
    assert "continuing under a new replica id" in x.log_tail(200) + a.log_tail(200), cluster.explain("no log line")

    acked = 0
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        for node in (a, x):
            node.increment(name)
            acked += 1
    assert_consistent_everywhere(cluster, name, 5 + acked, f"after {acked} increments on the two copies")
    wait_converged(cluster, name, 5 + acked)
