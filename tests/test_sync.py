"""Push, poll, backoff and consistent reads, on task.Clock with StubTreq."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import attrs
import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.pages import notFound
from twisted.web.resource import Resource

from counterdb.node import Node
from counterdb.peer_client import describe_failure
from counterdb.replication import MAX_PUSH_BYTES, PeerLink, SyncSettings, backoff_delay
from counterdb.store import MemoryStore
from counterdb.testing import FAST, FakeNet, SimNode
from counterdb.wire import MAX_BODY_BYTES

A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"


@pytest.fixture
def net() -> FakeNet:
    return FakeNet()


def values(net: FakeNet, name: str) -> list[int]:
    return [net.value(h, name) for h in (A, B, C)]


# -- push ----------------------------------------------------------------------


def test_increment_reaches_every_peer_by_push_without_waiting_for_a_poll(net: FakeNet) -> None:
    net.cluster_of(A, B, C)
    net.increment(A, "c", "2")
    net.increment(B, "c", "3")
    net.settle()  # no clock advance: only pushes can have carried it
    assert values(net, "c") == [5, 5, 5]


def test_a_burst_of_increments_costs_a_handful_of_pushes(net: FakeNet) -> None:
    nodes = net.cluster_of(A, B, C)
    before = len(net.requests_to(B, "POST", "/sync"))
    for i in range(10_000):
        nodes[0].node.increment(f"c{i % 10}", 1)
    net.settle()
    pushes = len(net.requests_to(B, "POST", "/sync")) - before
    assert 1 <= pushes <= 3
    assert sum(net.value(B, f"c{i}") for i in range(10)) == 10_000


def test_at_most_one_push_in_flight_per_peer(net: FakeNet) -> None:
    nodes = net.cluster_of(A, B, C)
    net.router.state[B] = "hung"
    before = len(net.router.hung.requests)
    for _ in range(100):
        nodes[0].node.increment("c", 1)
        net.settle(1)
    # One push to B hangs; nothing else is sent to B until it times out.
    pushes_to_b = [r for r in net.router.hung.requests[before:] if r.method == b"POST"]
    assert len(pushes_to_b) == 1
    assert net.value(C, "c") == 100  # the hung peer did not hold C back


def test_failed_pushes_back_off_exponentially_with_jitter_then_give_up(net: FakeNet) -> None:
    settings = FAST  # retries=3, initial=0.1, max=1.0
    nodes = net.cluster_of(A, B, C)
    net.router.state[B] = "down"
    start = net.clock.seconds()
    nodes[0].node.increment("c", 1)
    net.run(10)
    attempts = [t for t in net.requests_to(B, "POST", "/sync") if t >= start]
    assert len(attempts) == settings.push_retries + 1
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    for n, gap in enumerate(gaps):
        step = min(settings.backoff_max, settings.backoff_initial * 2**n)
        assert step / 2 - 0.051 <= gap <= step + 0.051, (n, gap, step)
    # Given up: more increments do not start another round of pushes...
    nodes[0].node.increment("c", 1)
    net.run(5)
    assert len([t for t in net.requests_to(B, "POST", "/sync") if t >= start]) == len(attempts)
    # ...until a poll reaches B again; then the dirty counters go out at once.
    net.router.state[B] = "up"
    net.run(settings.poll_interval + 0.1)
    assert net.value(B, "c") == 2


def test_backoff_delay_is_capped_and_jittered() -> None:
    settings = SyncSettings(backoff_initial=0.05, backoff_max=5.0)
    rng = random.Random(7)
    for attempt in range(20):
        step = min(5.0, 0.05 * 2**attempt)
        samples = [backoff_delay(attempt, settings, rng) for _ in range(50)]
        assert all(step / 2 <= s <= step for s in samples)
        assert len(set(samples)) > 1  # jittered, not lockstep


def test_a_peer_that_comes_back_gets_everything_it_missed(net: FakeNet) -> None:
    net.cluster_of(A, B, C)
    net.router.state[C] = "down"
    for _ in range(5):
        net.increment(A, "c", "1")
        net.increment(B, "d", "1")
    net.router.state[C] = "up"
    net.run(2)
    assert net.value(C, "c") == 5 and net.value(C, "d") == 5


# -- poll ----------------------------------------------------------------------


def test_polling_spreads_what_pushes_did_not_carry(net: FakeNet) -> None:
    net.cluster_of(A, B, C)
    # setsync merges do not push: only polls can spread this.
    net.request("POST", B, "/counter/c/setsync", {"partials": {"elsewhere": 4}})
    assert net.value(A, "c") == 0
    net.run(FAST.poll_interval + 0.1)
    assert values(net, "c") == [4, 4, 4]


def test_polls_ask_only_for_changes_since_the_last_answer(net: FakeNet) -> None:
    net.cluster_of(A, B, C)
    for i in range(50):
        net.request("POST", B, f"/counter/n{i}/setsync", {"partials": {"x": 1}})
    net.run(FAST.poll_interval + 0.1)
    net.request("POST", B, "/counter/n7/setsync", {"partials": {"x": 2}})
    polls_before = len(net.requests_to(B, "GET", "/sync"))
    net.run(FAST.poll_interval)
    polls = [uri for t, h, m, uri in net.router.seen if h == B and m == "GET" and uri.startswith("/sync")]
    assert len(polls) > polls_before
    last_since = int(polls[-1].split("since=")[1].split("&")[0])
    answer = json.loads(net.request("GET", B, polls[-1])[1])
    # The poll that carried the change asked from where the previous one
    # ended, so its answer held only the one counter that changed.
    assert last_since >= 50 and answer["counters"] == {"n7": {"x": 2}}
    assert net.value(A, "n7") == 2


def test_changes_spread_through_a_third_node(net: FakeNet) -> None:
    """A reaches C only through B: polls forward what B learnt."""
    net.cluster_of(A, B, C)
    net.router.state[C] = "down"
    net.increment(A, "c", "6")
    net.router.state[C] = "up"
    net.router.state[A] = "down"  # C can no longer ask A itself
    net.run(FAST.poll_interval * 2 + 0.1)
    assert net.value(C, "c") == 6


# -- consistent reads ------------------------------------------------------------


def test_consistent_value_includes_increments_no_push_delivered(net: FakeNet) -> None:
    net.cluster_of(A, B, C)
    net.router.state[A] = net.router.state[C] = "down"
    net.increment(B, "c", "7")  # its pushes fail
    net.router.state[A] = net.router.state[C] = "up"
    assert net.value(A, "c") == 0
    code, content = net.request("GET", A, "/counter/c/consistent_value")
    assert (code, content) == (200, b"7")


def test_consistent_value_waits_for_a_hung_host_then_answers(net: FakeNet) -> None:
    nodes = net.cluster_of(A, B, C)
    net.increment(C, "c", "4")
    net.router.state[C] = "hung"
    net.increment(A, "c", "1")
    read = nodes[0].reads.value("c", None)
    net.run(30)
    assert not net.fired(read)
    net.router.state[C] = "up"
    net.run(FAST.backoff_max + FAST.peer_timeout + 0.5)
    assert net.result(read) == 5


def test_consistent_value_timeout_is_504_naming_missing_hosts(net: FakeNet) -> None:
    net.cluster_of(A, B, C)
    net.increment(B, "c", "2")
    net.router.state[C] = "hung"
    d = net.http.get(f"http://{A}:8080/counter/c/consistent_value?timeout=3")
    net.run(2.9)
    assert not net.fired(d)
    net.run(0.2)
    response = net.result(d)
    body = json.loads(net.result(response.content()))
    assert response.code == 504
    assert body["missing"] == [C]
    assert body["best_value"] == 2
    assert C in body["error"]


def test_cancelled_consistent_read_stops_fetching(net: FakeNet) -> None:
    nodes = net.cluster_of(A, B, C)
    net.router.state[C] = "down"
    read = nodes[0].reads.value("c", None)
    net.run(3)
    read.cancel()
    failures: list[object] = []
    read.addErrback(failures.append)
    assert failures and failures[0].check(CancelledError)
    fetches = len(net.requests_to(C, "GET", "/counter/c/getsync"))
    net.run(60)
    assert len(net.requests_to(C, "GET", "/counter/c/getsync")) == fetches


# -- membership ----------------------------------------------------------------------


def test_reordering_the_actors_list_never_mixes_up_counts(net: FakeNet) -> None:
    net.cluster_of(A, B, C)
    net.increment(A, "c", "1")
    net.increment(B, "c", "10")
    net.increment(C, "c", "100")
    net.settle()
    for host in (A, B, C):
        code, _ = net.request("POST", host, "/config", {"actors": [C, A, B]})
        assert code == 200
    net.increment(A, "c", "1")
    net.settle()
    assert values(net, "c") == [112, 112, 112]
    replica_a = net.nodes[A].node.replica_id
    assert json.loads(net.request("GET", C, "/counter/c/getsync")[1])["partials"][replica_a] == 2


def test_a_node_added_later_receives_existing_counters(net: FakeNet) -> None:
    net.cluster_of(A, B)
    net.increment(A, "c", "3")
    net.add(C)
    for host in (A, B, C):
        net.request("POST", host, "/config", {"actors": [A, B, C]})
    net.settle()
    assert net.value(C, "c") == 3


def test_stopped_cluster_sends_nothing(net: FakeNet) -> None:
    nodes = net.cluster_of(A, B)
    for n in nodes:
        n.replication.stop()
    seen = len(net.router.seen)
    net.run(10)
    assert len(net.router.seen) == seen


def test_a_large_backlog_is_fetched_in_pages() -> None:
    import attrs

    net = FakeNet(attrs.evolve(FAST, poll_batch=3))
    net.cluster_of(A, B)
    for i in range(10):
        net.request("POST", B, f"/counter/n{i}/setsync", {"partials": {"x": 1}})
    net.run(FAST.poll_interval + 0.1)
    assert sum(net.value(A, f"n{i}") for i in range(10)) == 10
    pages = [uri for t, h, m, uri in net.router.seen if h == B and uri.startswith("/sync?") and "limit=3" in uri]
    assert len(pages) >= 4


def test_a_large_backlog_is_fetched_page_after_page_without_waiting_for_the_next_poll() -> None:
    """A poll goes on while the peer has more (a new node catching up was
    idle for most of each second after every 10 pages)."""
    net = FakeNet(attrs.evolve(FAST, poll_batch=3))
    net.cluster_of(A, B)
    net.run(0.1)
    for i in range(90):  # 30 pages
        net.request("POST", B, f"/counter/n{i}/setsync", {"partials": {"x": 1}})
    net.run(FAST.poll_interval)
    assert sum(net.value(A, f"n{i}") for i in range(90)) == 90


class _AlwaysMore(Resource):
    """A peer whose every poll answer says "more" at the same version."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        answer: dict[str, Any] = {"replica": "f" * 32}
        if request.method == b"GET":
            answer.update(epoch="e", version=7, more=True, counters={})
        return json.dumps(answer).encode()


def test_a_peer_that_says_more_without_moving_on_is_asked_again_only_at_the_next_poll() -> None:
    net = FakeNet()
    net.cluster_of(A, B)
    net.router.hosts[B] = _AlwaysMore()
    before = len(net.requests_to(B, "GET", "/sync"))
    net.run(FAST.poll_interval * 5)
    polls = len(net.requests_to(B, "GET", "/sync")) - before
    assert 5 <= polls <= 2 * 5 + 2  # a page that moves on from the last version, then one that does not


def test_a_backlog_of_long_names_and_many_replicas_is_pushed_in_bodies_the_peer_accepts() -> None:
    """Pushes are capped by bytes, not by a count of counters: 3,000
    counters with 250-byte names and six replica ids each are well over the
    peer's 1 MiB body limit in one request, and none may be refused."""
    net = FakeNet(attrs.evolve(FAST, poll_interval=3600))
    nodes = net.cluster_of(A, B)
    names = [f"{i:05d}".ljust(250, "x") for i in range(3000)]
    others = {f"{'r' * 30}{j:02d}": 10**15 for j in range(5)}
    nodes[0].node.merge({name: dict(others) for name in names})
    net.router.state[B] = "hung"
    for name in names:
        nodes[0].node.increment(name, 1)
    net.settle()
    net.router.state[B] = "up"
    net.run(FAST.peer_timeout + FAST.backoff_max + 1)
    stats = nodes[0].replication.links[f"http://{B}:8080"].stats
    assert stats.refused == 0
    assert stats.pushes >= 3 and stats.push_bytes > MAX_BODY_BYTES
    assert stats.push_bytes / stats.pushes <= MAX_PUSH_BYTES
    assert all(net.value(B, name) == 5 * 10**15 + 1 for name in names[::100])


def test_a_push_the_peer_refuses_is_not_retried_as_if_the_peer_were_down(net: FakeNet) -> None:
    nodes = net.cluster_of(A, B)
    link = nodes[0].replication.links[f"http://{B}:8080"]
    refusing = notFound()  # answers 404 to everything: up, but refusing
    net.router.hosts[B], real = refusing, net.router.hosts[B]
    net.increment(A, "c")
    net.run(FAST.backoff_max * 4)
    posts = net.requests_to(B, "POST", "/sync")
    assert len(posts) == 1, "a 4xx answer is final for that push"
    assert link.reachable is True and link.stats.refused >= 1
    net.router.hosts[B] = real
    net.run(FAST.poll_interval * 2)
    assert net.value(B, "c") == 1, "polling still carries the change"


def test_rewording_an_entry_keeps_the_link_and_shows_the_new_text(net: FakeNet) -> None:
    net.cluster_of(A, B)
    link = net.nodes[A].replication.links[f"http://{B}:8080"]
    net.request("POST", A, "/config", {"actors": [A, f"{B}:8080"]})
    assert net.nodes[A].replication.links[f"http://{B}:8080"] is link
    assert link.entry == f"{B}:8080"


def copied_twins(net: FakeNet) -> tuple[SimNode, SimNode, SimNode]:
    """Two hosts started from copies of one data dir, and a third host."""
    twin_a = net.add(A, store=MemoryStore(replica_id="copied"))
    twin_b = net.add(B, store=MemoryStore(replica_id="copied"))
    return twin_a, twin_b, net.add(C)


def test_twins_from_a_copied_data_dir_each_take_a_new_replica_id_and_lose_nothing_after(net: FakeNet) -> None:
    """Two hosts started from copies of one data dir share a replica id:
    the max-merge then hid one copy's increments behind the other's (36%
    of acknowledged increments vanished). Each twin sees its own id answer
    from the other and goes on under a fresh one, so nothing counted after
    that first exchange is lost anywhere."""
    nodes = copied_twins(net)
    for n in nodes:
        net.result(n.members.configure([A, B, C]))
    for _ in range(20):
        net.increment(A, "c")
    for _ in range(7):
        net.increment(B, "c")
    net.run(FAST.poll_interval * 3)
    assert [net.value(host, "c") for host in (A, B, C)] == [27, 27, 27]
    assert len({n.node.replica_id for n in nodes}) == 3, "one twin (or both) went on under a new id"
    assert all(link.conflict is None for n in nodes for link in n.replication.links.values())


def test_increments_before_the_twins_met_are_bounded_and_later_ones_all_count(net: FakeNet) -> None:
    """What the twins counted before their first exchange sits under the
    shared id: only the larger of the two partials can survive the merge.
    Everything after is counted exactly."""
    twin_a = net.add(A, store=MemoryStore(replica_id="copied"))
    third = net.add(C)
    twin_b = net.add(B, store=MemoryStore(replica_id="copied"), start=False)  # not yet on the network
    net.router.state[B] = "down"
    for node in (twin_a, third):
        net.result(node.members.configure([A, B, C]))
    for _ in range(20):
        net.increment(A, "c")
    twin_b.node.increment("c", 7)  # counted under the same replica id, unseen by anyone
    net.run(FAST.poll_interval * 2)
    net.router.state[B] = "up"
    twin_b.replication.start()  # the copy joins: the first exchange shows the shared id
    net.run(FAST.poll_interval * 3)
    for _ in range(5):
        net.increment(A, "c")
        net.increment(B, "c")
    net.run(FAST.poll_interval * 3)
    assert [net.value(host, "c") for host in (A, B, C)] == [30, 30, 30]  # max(20, 7) + 10


def test_a_third_node_refuses_a_replica_id_that_answers_from_two_of_its_peers(net: FakeNet) -> None:
    third = net.add(C)
    net.result(third.members.configure([A, B, C]))
    for twin in (A, B):  # answer polls with one replica id from two addresses
        net.router.hosts[twin] = _Fixed({"replica": "copied", "epoch": "e", "version": 1, "counters": {}})
        net.router.state[twin] = "up"
    net.run(FAST.poll_interval * 2)
    for peer in (A, B):
        assert "answers from 2 peers" in (third.replication.links[f"http://{peer}:8080"].conflict or "")
    code, content = net.request("POST", C, "/sync", {"counters": {"c": {"copied": 5}}}, headers=_from("copied"))
    assert code == 409 and json.loads(content)["conflict"] == "duplicated-replica"
    assert net.value(C, "c") == 0
    code, content = net.request("GET", C, "/sync", headers=_from(third.node.replica_id))
    assert code == 409 and json.loads(content)["conflict"] == "same-replica"


def _from(replica: str) -> dict[str, list[str]]:
    return {"Counterdb-Replica": [replica]}


class _Fixed(Resource):
    """A host that answers every request with one JSON body."""

    isLeaf = True

    def __init__(self, answer: object) -> None:
        super().__init__()
        self.answer = json.dumps(answer).encode()

    def render(self, request: object) -> bytes:
        return self.answer


def test_an_unreachable_peer_is_logged_once_per_transition_with_a_reason(net: FakeNet) -> None:
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        net.cluster_of(A, B)
        net.router.state[B] = "down"
        net.run(FAST.poll_interval * 5)
        net.router.state[B] = "up"
        net.run(FAST.poll_interval * 2)
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events if "peer" in str(e.get("log_format", ""))]
    down = [line for line in lines if "unreachable" in line and f"http://{B}" in line]
    assert len(down) == 1, lines
    assert "503" in down[0] and "Failure" not in down[0]
    assert len([line for line in lines if "is reachable" in line and B in line]) == 2  # start, recovery


def test_describe_failure_gives_one_readable_reason() -> None:
    wrapped = ResponseNeverReceived([Failure(ConnectionRefusedError("Connection refused"))])
    reason = describe_failure(Failure(wrapped))
    assert "refused" in reason and "\n" not in reason and "Failure" not in reason


class HeldPushes:
    """A peer client whose pushes are answered when the test says so."""

    def __init__(self) -> None:
        self.pushes: list[tuple[bytes, Deferred[dict[str, str]]]] = []

    def push(self, body: bytes) -> Deferred[dict[str, str]]:
        d: Deferred[dict[str, str]] = Deferred()
        self.pushes.append((body, d))
        return d

    def answer(self) -> None:
        for _, d in self.pushes:
            if not d.called:
                d.callback({"replica": "peer-b"})


class HeldCommits(MemoryStore):
    """Commits wait until the test lets them through, so increments batch."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Deferred[None]] = []

    def write_own(self, partials: dict[str, int], keys: Any = ()) -> Deferred[None]:
        super().write_own(partials, keys)
        d: Deferred[None] = Deferred()
        self.held.append(d)
        return d

    def finish(self) -> None:
        for d in list(self.held):  # not the commits these start
            if not d.called:
                d.callback(None)


def linked_node(interval: float) -> tuple[Clock, Node, HeldCommits, HeldPushes, PeerLink]:
    clock, store, client = Clock(), HeldCommits(), HeldPushes()
    node = Node(store, clock)
    settings = attrs.evolve(FAST, min_push_interval=interval)
    link = PeerLink(node, "127.0.0.3", client, clock, settings, random.Random(1), lambda link, replica: None)
    node.on_local_change(link.mark_dirty)
    return clock, node, store, client, link


def test_a_change_after_a_quiet_spell_is_pushed_at_once_and_faster_ones_once_per_interval() -> None:
    clock, node, store, client, _ = linked_node(0.02)
    node.increment("c", 1)
    store.finish()
    clock.advance(0)
    assert len(client.pushes) == 1  # the first change: no wait
    client.answer()
    for _ in range(5):  # more within the interval, each its own commit
        node.increment("c", 1)
        store.finish()
        clock.advance(0.001)
        client.answer()
    assert len(client.pushes) == 1  # they wait for the interval ...
    clock.advance(0.015)
    assert len(client.pushes) == 2 and b":6}" in client.pushes[-1][0]  # ... and go in one push
    client.answer()
    clock.advance(1.0)  # a quiet spell
    node.increment("c", 1)
    store.finish()
    clock.advance(0)
    assert len(client.pushes) == 3  # at once again


def test_stopping_cancels_a_push_waiting_for_its_interval() -> None:
    clock, node, store, client, link = linked_node(5.0)
    node.increment("c", 1)
    node.increment("c", 1)
    node.increment("c", 1)
    store.finish()
    clock.advance(0)
    store.finish()  # changed again within the interval: the next push waits 5 s
    client.answer()
    assert clock.getDelayedCalls() != []
    stopped = link.stop()
    assert stopped.called
    assert clock.getDelayedCalls() == []  # the wait is gone
    assert len(client.pushes) == 1 and link.dirty == {"c"}


def test_a_joining_node_does_not_send_its_peers_back_what_it_learnt_from_them(net: FakeNet) -> None:
    net.cluster_of(A, B)
    for i in range(50):
        net.increment(A, f"c{i}", "1")
        net.increment(B, f"c{i}", "2")
    net.settle()
    c = net.add(C)
    answered: list[str] = []
    changes_since = c.node.changes_since

    def recording(*args: Any, **kwargs: Any) -> dict[str, object]:
        answer = changes_since(*args, **kwargs)
        answered.extend(answer["counters"])  # type: ignore[arg-type]
        return answer

    c.node.changes_since = recording  # type: ignore[method-assign]
    for host in (A, B, C):
        net.request("POST", host, "/config", {"actors": [A, B, C]})
    net.settle()
    assert [net.value(C, f"c{i}") for i in range(50)] == [3] * 50
    # Without the record of who holds what, A and B would each poll all 50
    # back. A first poll (from version 0) assumes nothing, so the peer whose
    # first poll comes after C learnt them from the other still gets them.
    assert len(answered) <= 50, len(answered)
    net.increment(C, "c0", "4")
    net.settle()
    assert net.value(A, "c0") == net.value(B, "c0") == 7
