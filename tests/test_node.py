"""Group commit: acknowledged only once durable, nothing counted on failure."""

from __future__ import annotations

import json
from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from counterdb.crdt import MAX_COUNT
from counterdb.node import Acknowledged, KeyReused, Node, Overflow, StoreUnavailable
from counterdb.store import IdempotencyRecord, MemoryStore
from counterdb.testing import FakeNet


class SlowStore(MemoryStore):
    """A store whose commits finish when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[tuple[dict[str, int], Deferred[None]]] = []

    def write_own(self, partials: dict[str, int], keys: Sequence[IdempotencyRecord] = ()) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.commits.append((dict(partials), list(keys), d))
        return d

    def finish(self, index: int = -1) -> None:
        partials, keys, d = self.commits[index]
        super().write_own(partials, keys)
        d.callback(None)

    def fail(self, index: int = -1) -> None:
        self.commits[index][2].errback(OSError(5, "Input/output error"))


class BrokenStore(MemoryStore):
    def write_own(self, partials: dict[str, int], keys: Sequence[IdempotencyRecord] = ()) -> Deferred[None]:
        return fail(OSError(28, "No space left on device"))


def outcome(d: Deferred[Acknowledged]) -> list[object]:
    """What ``d`` fired with so far: the acknowledged value, or the Failure."""
    seen: list[object] = []
    d.addBoth(lambda r: seen.append(r.value if isinstance(r, Acknowledged) else r))
    return seen


def test_increments_are_acknowledged_only_after_the_commit() -> None:
    store = SlowStore()
    node = Node(store)
    first = outcome(node.increment("c", 2))
    assert first == [] and node.value("c") == 0  # not durable, not visible
    store.finish()
    assert first == [2] and node.value("c") == 2


def test_concurrent_increments_share_one_commit_with_absolute_values() -> None:
    store = SlowStore()
    node = Node(store)
    outcome(node.increment("c", 1))  # commit 0 in flight
    waiting = [outcome(node.increment("c", n)) for n in (2, 3)] + [outcome(node.increment("d", 4))]
    assert len(store.commits) == 1
    store.finish(0)
    assert len(store.commits) == 2
    assert store.commits[1][0] == {"c": 6, "d": 4}  # absolute partials, not deltas
    store.finish(1)
    assert waiting == [[3], [6], [4]]  # each answer is the value right after it


def test_a_failed_commit_counts_nothing_and_the_next_one_works() -> None:
    store = SlowStore()
    node = Node(store)
    failed = outcome(node.increment("c", 5))
    store.fail(0)
    assert failed[0].check(StoreUnavailable)  # type: ignore[attr-defined]
    assert node.value("c") == 0
    ok = outcome(node.increment("c", 1))
    store.finish()
    assert ok == [1] and node.value("c") == 1


def test_only_this_nodes_own_partial_is_bounded_and_totals_grow_past_64_bits() -> None:
    """A forged or legitimately huge partial elsewhere never freezes a
    counter: each node checks only its own partial, locally."""
    node = Node(MemoryStore())
    node.merge({"c": {"other": MAX_COUNT}})
    assert outcome(node.increment("c", 5)) == [MAX_COUNT + 5]
    too_much = outcome(node.increment("c", MAX_COUNT))
    assert too_much[0].check(Overflow)  # type: ignore[attr-defined]
    assert outcome(node.increment("c", MAX_COUNT - 5)) == [2 * MAX_COUNT]
    assert node.value("c") == 2 * MAX_COUNT


def test_merges_never_raise_this_nodes_own_partial() -> None:
    node = Node(MemoryStore())
    outcome(node.increment("c", 2))
    assert node.merge({"c": {node.replica_id: 10**12, "other": 3}}) == {"c": {"other": 3}}
    assert node.partials("c") == {node.replica_id: 2, "other": 3}


def test_a_peer_holding_exactly_this_nodes_state_is_not_sent_it_back() -> None:
    """A peer's state that carries this node's own partial at its exact
    value is this node's state: the peer holds it, so a poll from it leaves
    the counter out. A smaller own partial means the peer lacks increments
    (it is sent them); a larger one is never taken."""
    node = Node(MemoryStore())
    own = node.replica_id
    node.increment("first", 1)
    node.changes_since(0, node.epoch, 10, 1 << 20, peer="p")  # p's link starts: it gets a bit
    since = node.table.version
    for name in ("held", "behind", "ahead"):
        node.increment(name, 2)
    assert node.merge({"held": {own: 2, "p": 5}}, source="p") == {"held": {"p": 5}}
    node.merge({"behind": {own: 1, "p": 5}}, source="p")
    node.merge({"ahead": {own: 9, "p": 5}}, source="p")
    answer = node.changes_since(since, node.epoch, 10, 1 << 20, peer="p")
    assert answer["counters"] == {"behind": {own: 2, "p": 5}, "ahead": {own: 2, "p": 5}}
    assert node.partials("held") == {own: 2, "p": 5}


def test_store_failure_is_503_and_reads_keep_working() -> None:
    net = FakeNet()
    net.add("127.0.0.2", store=BrokenStore())
    code, content = net.request("POST", "127.0.0.2", "/counter/c", "3")
    assert code == 503
    assert "No space left" in json.loads(content)["error"]
    assert net.value("127.0.0.2", "c") == 0


def test_a_client_that_went_away_does_not_break_the_commit() -> None:
    store = SlowStore()
    node = Node(store)
    d = node.increment("c", 1)
    d.cancel()  # what Klein does when the client disconnects
    d.addErrback(lambda f: None)
    store.finish()
    assert node.value("c") == 1  # it was counted; the outcome was just not delivered


def test_state_is_loaded_from_the_store() -> None:
    store = MemoryStore()
    store.write_own({"c": 3})
    store.write_peers({"c": {"other": 4}})
    assert Node(store).value("c") == 7
    assert Node(store).replica_id == store.replica_id


# -- idempotency keys -------------------------------------------------------------


def test_a_repeated_key_is_answered_without_counting_again() -> None:
    clock = Clock()
    node = Node(MemoryStore(), clock)
    first: list[Acknowledged] = []
    again: list[Acknowledged] = []
    node.increment("c", 5, key="k1").addCallback(first.append)
    node.increment("c", 5, key="k1").addCallback(again.append)
    assert first == [Acknowledged(5)] and again == [Acknowledged(5, replayed=True)]
    assert node.value("c") == 5


def test_a_key_reused_for_another_request_is_refused() -> None:
    node = Node(MemoryStore(), Clock())
    outcome(node.increment("c", 5, key="k1"))
    for name, amount in (("c", 6), ("d", 5)):
        refused = outcome(node.increment(name, amount, key="k1"))
        assert refused[0].check(KeyReused)  # type: ignore[attr-defined]
    assert node.value("c") == 5 and node.value("d") == 0


def test_a_retry_while_the_first_attempt_is_still_committing_shares_its_outcome() -> None:
    store = SlowStore()
    node = Node(store, Clock())
    outcome(node.increment("c", 1))  # occupies the writer
    first: list[Acknowledged] = []
    retry: list[Acknowledged] = []
    node.increment("c", 2, key="k").addCallback(first.append)
    node.increment("c", 2, key="k").addCallback(retry.append)
    store.finish(0)
    store.finish(1)
    assert first == [Acknowledged(3)] and retry == [Acknowledged(3, replayed=True)]
    assert node.value("c") == 3
    assert [k.key for k in store.commits[1][1]] == ["k"]  # recorded once, with its partial


def test_a_key_whose_commit_failed_can_be_retried() -> None:
    store = SlowStore()
    node = Node(store, Clock())
    failed = outcome(node.increment("c", 2, key="k"))
    store.fail(0)
    assert failed[0].check(StoreUnavailable)  # type: ignore[attr-defined]
    retried = outcome(node.increment("c", 2, key="k"))
    store.finish(1)
    assert retried == [2] and node.value("c") == 2


def test_keys_survive_a_restart_and_expire_after_the_window() -> None:
    clock = Clock()
    clock.advance(1_000_000)
    store = MemoryStore()
    outcome(Node(store, clock, idempotency_window=3600).increment("c", 4, key="k"))
    clock.advance(3599)
    restarted = Node(store, clock, idempotency_window=3600)
    assert outcome(restarted.increment("c", 4, key="k")) == [4]
    assert restarted.value("c") == 4
    clock.advance(2)
    expired = Node(store, clock, idempotency_window=3600)
    assert outcome(expired.increment("c", 4, key="k")) == [8]


def test_only_the_newest_keys_are_kept_past_the_limit() -> None:
    node = Node(MemoryStore(), Clock(), idempotency_max_keys=3)
    for i in range(5):
        outcome(node.increment("c", 1, key=f"k{i}"))
    assert outcome(node.increment("c", 1, key="k4")) == [5]  # still known
    assert outcome(node.increment("c", 1, key="k0")) == [6]  # forgotten: counted


class ConfigFailsStore(MemoryStore):
    def write_config(self, actors: list[str], version: tuple[int, str] = (0, "")) -> Deferred[None]:
        return fail(OSError(30, "Read-only file system"))


def test_a_config_the_store_cannot_record_is_503_and_not_applied() -> None:
    net = FakeNet()
    net.add("127.0.0.2", store=ConfigFailsStore())
    code, content = net.request("POST", "127.0.0.2", "/config", {"actors": ["127.0.0.2", "127.0.0.3"]})
    assert code == 503
    assert "Read-only" in json.loads(content)["error"]
    assert net.nodes["127.0.0.2"].members.current is None


def test_increments_issued_from_acknowledgements_do_not_nest() -> None:
    """Once the store answers at once, each acknowledgement that issues the
    next increment starts the next commit: thousands of rounds must run in
    a loop, not one call deeper each."""
    store = SlowStore()
    node = Node(store, Clock())
    rounds = 5_000
    done: list[int] = []

    def again(ack: Acknowledged) -> None:
        done.append(ack.value)
        if len(done) < rounds:
            node.increment("c", 1).addCallback(again)

    node.increment("c", 1)  # holds the writer
    node.increment("c", 1).addCallback(again)  # waits for the next commit
    store.write_own = MemoryStore.write_own.__get__(store)  # type: ignore[method-assign]
    store.finish(0)
    assert len(done) == rounds and node.value("c") == rounds + 1


class RaisingStore(MemoryStore):
    def write_own(self, partials: dict[str, int], keys: Sequence[IdempotencyRecord] = ()) -> Deferred[None]:
        raise RuntimeError("store is closed")


def test_a_store_that_raises_fails_the_batch_and_the_node_keeps_working() -> None:
    store = RaisingStore()
    node = Node(store, Clock())
    failed = outcome(node.increment("c", 1))
    assert failed[0].check(StoreUnavailable)  # type: ignore[attr-defined]
    store.__class__ = MemoryStore  # the store works again
    assert outcome(node.increment("c", 2)) == [2]


def test_a_change_listener_that_raises_still_answers_the_batch_and_later_ones() -> None:
    """It used to leave every client of that commit batch waiting forever."""
    node = Node(MemoryStore())
    heard: list[set[str]] = []

    def broken(names: set[str]) -> None:
        raise RuntimeError("listener bug")

    node.on_local_change(broken)
    node.on_local_change(heard.append)
    assert outcome(node.increment("c", 2)) == [2]
    assert outcome(node.increment("c", 1)) == [3]
    assert heard == [{"c"}, {"c"}], "the listeners after the broken one still hear of every change"


def test_stop_answers_queued_increments_then_refuses_new_ones() -> None:
    store = SlowStore()
    node = Node(store)
    first, second = node.increment("c", 1), node.increment("c", 1)
    stopped = node.stop()
    assert outcome(node.increment("c", 1))[0].check(StoreUnavailable)  # type: ignore[attr-defined]
    assert not FakeNet.fired(stopped)
    store.finish(0)
    store.finish(-1)
    assert FakeNet.fired(stopped)
    assert [outcome(first), outcome(second)] == [[1], [2]]


def test_the_next_batch_goes_to_the_store_before_the_answers_are_written() -> None:
    """While a batch's answers are written, the next batch is already being
    made durable (in parallel, by the writer process); it is built on the
    partials just made durable, and one commit at a time stays in flight."""
    store = SlowStore()
    node = Node(store)
    first = node.increment("c", 1)
    queued = [node.increment("c", 2), node.increment("d", 5)]
    seen_when_answered: list[int] = []
    first.addCallback(lambda ack: seen_when_answered.append(len(store.commits)))
    assert len(store.commits) == 1
    store.finish(0)
    assert seen_when_answered == [2]  # the second commit was handed over first
    assert store.commits[1][0] == {"c": 3, "d": 5}  # on top of the durable 1
    answers = [outcome(d) for d in queued]
    assert answers == [[], []]  # not durable yet
    node.increment("c", 4)
    assert len(store.commits) == 2  # still one commit in flight
    store.finish(1)
    assert answers == [[3], [5]]
    store.finish(2)
    assert node.value("c") == 7
