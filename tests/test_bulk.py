"""Bulk increments (POST /counters) and multi-reads (GET /counters), in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from counterdb.crdt import MAX_COUNT
from counterdb.node import Node
from counterdb.store import SqliteStore
from counterdb.testing import FakeNet

A, B = "127.0.0.2", "127.0.0.3"


def bulk(net: FakeNet, host: str, increments: object, **kwargs: object) -> tuple[int, dict[str, object]]:
    code, content = net.request("POST", host, "/counters", {"increments": increments}, **kwargs)
    return code, json.loads(content)


def test_a_bulk_increment_answers_every_new_value_and_is_one_commit_and_one_push() -> None:
    net = FakeNet()
    nodes = net.cluster_of(A, B)
    net.increment(A, "a", "10")
    net.settle()
    pushes = nodes[0].replication.links[f"http://{B}:8080"].stats.pushes
    commits = nodes[0].node.stats.commits
    code, answer = bulk(net, A, {f"c{i}": i for i in range(100)} | {"a": 5})
    assert code == 200 and answer["values"]["a"] == 15 and answer["values"]["c7"] == 7
    assert nodes[0].node.stats.commits == commits + 1
    net.settle()
    assert nodes[0].replication.links[f"http://{B}:8080"].stats.pushes == pushes + 1
    code, content = net.request("GET", B, "/counters?name=a&name=c99&name=never")
    assert json.loads(content) == {"values": {"a": 15, "c99": 99, "never": 0}}


def test_a_bulk_increment_counts_whole_or_not_at_all() -> None:
    net = FakeNet()
    net.add(A)
    net.increment(A, "full", str(MAX_COUNT - 1))
    code, answer = bulk(net, A, {"fine": 1, "full": 2})
    assert code == 400 and "exceed" in answer["error"]
    assert net.value(A, "fine") == 0 and net.value(A, "full") == MAX_COUNT - 1
    net.nodes[A].node.max_counters = 2
    code, answer = bulk(net, A, {"full": 1, "new1": 1, "new2": 1})
    assert code == 507 and net.value(A, "new1") == 0 and net.value(A, "full") == MAX_COUNT - 1


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"increments": {}}, "1 to 1000"),
        ({"increments": {f"c{i}": 1 for i in range(1001)}}, "1 to 1000"),
        ({"increments": {"a": -1}}, "whole number"),
        ({"increments": {"a": True}}, "whole number"),
        ({"increments": {"a/b": 1}}, "must not contain"),
        ({"increments": [1]}, "expected a JSON object"),
        ({"counters": {"a": 1}}, "expected a JSON object"),
    ],
)
def test_bad_bulk_increments_are_400_and_change_nothing(body: object, fragment: str) -> None:
    net = FakeNet()
    net.add(A)
    code, content = net.request("POST", A, "/counters", body)
    assert code == 400 and fragment in json.loads(content)["error"]
    assert len(net.nodes[A].node.table) == 0


def test_a_repeated_bulk_increment_with_its_key_is_answered_and_not_counted_again() -> None:
    net = FakeNet()
    net.add(A)
    key = {b"Idempotency-Key": [b"bulk-1"]}
    first = bulk(net, A, {"a": 2, "b": 3}, headers=key)
    again = bulk(net, A, {"a": 2, "b": 3}, headers=key)
    assert first == again == (200, {"values": {"a": 2, "b": 3}})
    assert (net.value(A, "a"), net.value(A, "b")) == (2, 3)
    code, answer = bulk(net, A, {"a": 2}, headers=key)
    assert code == 422 and "bulk increment of 2 counters" in answer["error"]
    code, _ = net.request("POST", A, "/counter/a", "2", headers=key)
    assert code == 422, "a single increment cannot reuse a bulk key"


@pytest_twisted.ensureDeferred
async def test_a_bulk_key_survives_a_restart(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path), reactor)
    ack = await Node(store).increment_many({"a": 1, "b": 2}, key="k")
    store.close()
    again = SqliteStore(str(tmp_path), reactor)
    try:
        replay = await Node(again).increment_many({"a": 1, "b": 2}, key="k")
        assert replay.replayed and replay.values == ack.values == {"a": 1, "b": 2}
    finally:
        again.close()


def test_a_consistent_multi_read_asks_every_host() -> None:
    net = FakeNet()
    net.cluster_of(A, B)
    net.increment(B, "a", "4")
    net.increment(A, "b", "1")
    code, content = net.request("GET", A, "/counters?name=a&name=b&consistent=1")
    assert code == 200 and json.loads(content) == {"values": {"a": 4, "b": 1}}
    net.router.state[B] = "down"
    d = net.http.get(f"http://{A}:8080/counters?name=a&name=b&consistent=1&timeout=1")
    net.run(1.5)
    response = net.result(d)
    answer = json.loads(net.result(response.content()))
    assert response.code == 504 and answer["missing"] == [B], answer
