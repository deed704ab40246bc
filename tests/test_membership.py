"""Versioned actors lists that spread by themselves, in memory (StubTreq + Clock)."""

from __future__ import annotations

import json

from counterdb.store import MemoryStore
from counterdb.testing import FAST, FakeNet, SimNode

A, B, C, D = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"


def config_of(net: FakeNet, host: str) -> dict[str, object]:
    code, content = net.request("GET", host, "/config")
    assert code == 200, content
    return json.loads(content)


def lists(net: FakeNet, *hosts: str) -> list[tuple[list[str], list[object]]]:
    return [(config_of(net, h)["actors"], config_of(net, h)["version"]) for h in hosts]


def test_a_list_posted_to_one_node_reaches_every_node_in_it_within_a_second() -> None:
    net = FakeNet()
    for host in (A, B, C):
        net.add(host)
    code, content = net.request("POST", A, "/config", {"actors": [A, B, C]})
    assert code == 200 and json.loads(content)["version"][0] == 1
    net.run(1.0)
    assert lists(net, A, B, C) == [([A, B, C], json.loads(content)["version"])] * 3
    net.increment(C, "c")
    net.run(FAST.poll_interval)
    assert net.value(A, "c") == 1


def test_posting_the_same_list_to_every_node_stays_one_version() -> None:
    net = FakeNet()
    nodes = net.cluster_of(A, B, C)  # the original's way: the same list posted to each
    net.run(FAST.poll_interval * 2)
    versions = {tuple(config_of(net, n.host)["version"]) for n in nodes}
    assert len(versions) == 1 and next(iter(versions))[0] == 1


def test_concurrent_posts_resolve_to_the_same_winner_on_every_node() -> None:
    net = FakeNet()
    nodes = [net.add(h) for h in (A, B, C)]
    net.router.state[C] = "down"
    for n in nodes:
        net.result(n.members.configure([A, B, C]))
    net.run(FAST.poll_interval * 2)
    # Two operators at once, on two nodes that cannot hear each other yet,
    # with two different lists: both make version 2.
    net.router.state[A] = net.router.state[B] = "down"
    net.result(nodes[0].members.configure([A, B, C, D]))
    net.result(nodes[1].members.configure([A, B]))
    assert nodes[0].members.version[0] == nodes[1].members.version[0] == 2
    for host in (A, B, C):
        net.router.state[host] = "up"
    net.run(FAST.poll_interval * 3)
    winner = max((nodes[0].node.replica_id, [A, B, C, D]), (nodes[1].node.replica_id, [A, B]))[1]
    assert [config_of(net, h)["actors"] for h in (A, B)] == [winner, winner]
    if C in winner:
        assert config_of(net, C)["actors"] == winner
    else:
        assert nodes[2].members.removed_by is not None


def test_a_node_cut_off_during_the_change_gets_the_list_when_it_is_back() -> None:
    net = FakeNet()
    net.cluster_of(A, B, C)
    net.router.state[C] = "down"  # nobody reaches C ...
    net.nodes[C].replication.stop()  # ... and C reaches nobody
    net.request("POST", A, "/config", {"actors": [A, B, C, D]})
    net.add(D)
    net.run(FAST.poll_interval * 3)
    assert [a.entry for a in net.nodes[C].members.current.actors] == [A, B, C]
    net.router.state[C] = "up"
    net.run(FAST.poll_interval * 2)  # the others' polls of C find its older list and hand it theirs
    assert [config_of(net, h)["actors"] for h in (A, B, C, D)] == [[A, B, C, D]] * 4


def test_a_wiped_node_is_handed_the_list_again_and_is_not_consistent_until_then() -> None:
    net = FakeNet()
    net.cluster_of(A, B, C)
    net.increment(A, "c", "5")
    net.run(FAST.poll_interval * 2)
    wiped = net.add(B, store=MemoryStore(), start=False)  # the same host, an empty data dir
    net.request("GET", B, "/sync?since=0", headers={"Counterdb-Replica": ["peer"]})  # a peer polls it
    code, content = net.request("GET", B, "/counter/c/consistent_value")
    assert code == 503 and "not configured" in json.loads(content)["error"]
    wiped.replication.start()
    net.run(FAST.poll_interval * 2)
    assert config_of(net, B)["actors"] == [A, B, C]
    assert net.request("GET", B, "/counter/c/consistent_value") == (200, b"5")


def test_a_removed_node_stops_taking_increments_and_every_member_keeps_its_partial() -> None:
    net = FakeNet()
    nodes = net.cluster_of(A, B, C)
    leaving: SimNode = nodes[2]
    net.increment(C, "c", "7")
    net.increment(A, "c", "1")
    net.request("POST", A, "/config", {"actors": [A, B]})
    net.run(FAST.poll_interval * 2)
    code, content = net.request("POST", C, "/counter/c")
    assert code == 503 and "removed" in json.loads(content)["error"]
    assert leaving.members.current is None and leaving.members.removed_by is not None
    assert [net.value(h, "c") for h in (A, B)] == [8, 8]
    assert net.request("GET", A, "/counter/c/consistent_value") == (200, b"8")
    assert leaving.node.replica_id in nodes[1].node.partials("c")
