"""Protocol versions between nodes (``Counterdb-Protocol``), on task.Clock with StubTreq.

An "old" node here is one whose requests and answers carry no protocol
header, as every release before 0.2.0; a "future" one states version 3,
which this release does not speak. The real previous release talking to
this one runs in the rolling-upgrade test.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource

from counterdb.observe import Metrics
from counterdb.peer_client import PeerClient, PeerIncompatible
from counterdb.testing import FAST, FakeNet, SimNode
from counterdb.wire import PROTOCOL_HEADER, read_protocol

A, B, F = "127.0.0.2", "127.0.0.3", "127.0.0.9"
OLD: str | None = None  # states no version: a release before 0.2.0
FUTURE = "3"


class _Stating:
    """A treq-like client that states ``version`` on every request instead of this release's."""

    def __init__(self, http: Any, version: str | None) -> None:
        self.http = http
        self.version = version

    def get(self, url: Any, **kwargs: Any) -> Any:
        return self.http.get(url, **self._restated(kwargs))

    def post(self, url: Any, **kwargs: Any) -> Any:
        return self.http.post(url, **self._restated(kwargs))

    def _restated(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        headers = {k: v for k, v in (kwargs.get("headers") or {}).items() if k != PROTOCOL_HEADER}
        if self.version is not None:
            headers[PROTOCOL_HEADER] = [self.version]
        return {**kwargs, "headers": headers}


class _AnsweringIn(Resource):
    """A node's resource whose answers state ``version`` instead of this release's."""

    isLeaf = True

    def __init__(self, inner: Resource, version: str | None) -> None:
        super().__init__()
        self.inner = inner
        self.version = version

    def render(self, request: Any) -> object:
        set_header = request.setHeader

        def restated(name: bytes, value: bytes) -> None:
            if name.lower() != PROTOCOL_HEADER.lower().encode():
                set_header(name, value)
            elif self.version is not None:
                set_header(name, self.version.encode())

        request.setHeader = restated
        return self.inner.render(request)


def speaking(net: FakeNet, host: str, version: str | None) -> SimNode:
    """A node of this code whose requests and answers state ``version``."""
    sim = net.add(host)
    sim.replication.http = _Stating(net.http, version)
    net.router.hosts[host] = _AnsweringIn(sim.api.resource(), version)
    return sim


def cluster(net: FakeNet, *nodes: SimNode) -> None:
    hosts = [n.host for n in nodes]
    for n in nodes:
        net.result(n.members.configure(hosts))
    net.settle()


def status(net: FakeNet, host: str) -> dict[str, Any]:
    code, body = net.request("GET", host, "/status")
    assert code == 200, body
    return json.loads(body)


@pytest.fixture
def net() -> FakeNet:
    return FakeNet()


@pytest.fixture
def logged() -> Any:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- the header ------------------------------------------------------------------


class _Recorder(Resource):
    """A peer that answers every request with ``answer``, in protocol ``version``."""

    isLeaf = True

    def __init__(self, version: str | None, answer: bytes = b"{}") -> None:
        super().__init__()
        self.version = version
        self.answer = answer
        self.stated: list[list[bytes] | None] = []

    def render(self, request: Any) -> bytes:
        self.stated.append(request.requestHeaders.getRawHeaders(PROTOCOL_HEADER))
        if self.version is not None:
            request.setHeader(PROTOCOL_HEADER, self.version)
        return self.answer


def client_of(peer: Resource) -> tuple[PeerClient, StubTreq]:
    http = StubTreq(peer)
    return PeerClient(http, "http://127.0.0.5:8080", Clock(), 5.0, 10, lambda: "me"), http


def outcome(d: Any, http: StubTreq) -> Any:
    http.flush()
    seen: list[Any] = []
    d.addBoth(seen.append)
    assert seen, "no answer"
    return seen[0]


def test_every_peer_request_states_this_release_s_protocol_version() -> None:
    peer = _Recorder("2")
    client, http = client_of(peer)
    calls = [
        client.get_changes(0, None),
        client.push(b'{"counters":{}}'),
        client.get_config(),
        client.post_config({"actors": [], "version": [1, "x"]}),
        client.get_counter("c"),
    ]
    for d in calls:
        assert outcome(d, http) == {}
    assert peer.stated == [["2"]] * len(calls)
    assert client.peer_protocol == 2


def test_an_answer_without_the_header_is_version_1_and_is_used() -> None:
    client, http = client_of(_Recorder(OLD, b'{"replica": "old"}'))
    assert outcome(client.get_config(), http) == {"replica": "old"}
    assert client.peer_protocol == 1


@pytest.mark.parametrize("stated", ["3", "0", "two", "1, 2", ""])
def test_an_answer_in_a_version_this_node_does_not_speak_is_not_used(stated: str) -> None:
    client, http = client_of(_Recorder(stated, b'{"counters": {"c": {"x": 5}}}'))
    failure = outcome(client.get_changes(0, None), http)
    assert failure.check(PeerIncompatible), failure
    assert "speaks versions 1 to 2" in str(failure.value)
    assert client.peer_protocol is None


PRIVATE_ROUTES = [
    ("GET", "/sync", None),
    ("POST", "/sync", {"counters": {}}),
    ("GET", "/config", None),
    ("POST", "/config", {"actors": [A]}),
    ("GET", "/status", None),
    ("GET", "/counter/c/getsync", None),
    ("POST", "/counter/c/setsync", {"partials": {}}),
]


@pytest.mark.parametrize("method,path,body", PRIVATE_ROUTES)
def test_every_private_answer_states_the_version_of_the_request(
    net: FakeNet, method: str, path: str, body: Any
) -> None:
    net.add(A)
    new = net.response(method, A, path, body, headers={PROTOCOL_HEADER: ["2"]})
    old = net.response(method, A, path, body)  # a release before 0.2.0
    assert (new.code, old.code) == (200, 200)
    assert new.headers.getRawHeaders(PROTOCOL_HEADER) == ["2"]
    assert old.headers.getRawHeaders(PROTOCOL_HEADER) == ["1"]


def test_public_answers_do_not_carry_the_header(net: FakeNet) -> None:
    net.add(A)
    response = net.response("GET", A, "/counter/c/value")
    assert response.headers.getRawHeaders(PROTOCOL_HEADER) is None


# -- old and new nodes together ----------------------------------------------------


def test_new_and_old_nodes_push_and_poll_both_ways_without_loss(net: FakeNet) -> None:
    new, old = net.add(A), speaking(net, B, OLD)
    cluster(net, new, old)
    net.increment(A, "c", "2")
    net.increment(B, "c", "3")
    net.settle()  # pushes alone, both ways
    assert [net.value(A, "c"), net.value(B, "c")] == [5, 5]
    # Polls too: changes made while each was away from the other.
    net.router.state[B] = "down"
    new.node.increment("d", 4)
    net.router.state[B] = "up"
    net.router.state[A] = "down"
    old.node.increment("d", 6)
    net.router.state[A] = "up"
    net.run(FAST.poll_interval * 3)
    assert [net.value(A, "d"), net.value(B, "d")] == [10, 10]
    assert status(net, A)["peers"][f"http://{B}:8080"]["protocol"] == 1
    # The old node's requests state nothing: the new node answers in version 1.
    assert old.replication.links[f"http://{A}:8080"].client.peer_protocol == 1
    assert all(link.incompatible is None for n in (new, old) for link in n.replication.links.values())


def test_a_consistent_read_on_a_new_node_includes_an_old_peer(net: FakeNet) -> None:
    new, old = net.add(A), speaking(net, B, OLD)
    cluster(net, new, old)
    net.router.state[A] = "down"
    old.node.increment("c", 7)  # not pushed: A is away
    net.router.state[A] = "up"
    code, body = net.request("GET", A, "/counter/c/consistent_value?timeout=5")
    assert (code, body) == (200, b"7")


# -- an incompatible peer ------------------------------------------------------------


def test_a_request_in_an_unknown_version_is_refused_with_both_versions_and_changes_nothing(net: FakeNet) -> None:
    a = net.add(A)
    before = (a.members.version, a.members.wanted)
    push = {"counters": {"c": {"f" * 32: 5}}}
    code, body = net.request("POST", A, "/sync", push, headers={PROTOCOL_HEADER: [FUTURE], "Counterdb-Replica": ["f"]})
    assert code == 400
    answer = json.loads(body)
    assert "version 3" in answer["error"] and "(protocol 2)" in answer["error"] and "1 to 2" in answer["error"]
    assert answer["protocol"] == {"stated": "3", "accepted": [1, 2], "version": 2}
    config = {"actors": [A, F], "version": [99, "f"]}
    assert net.request("POST", A, "/config", config, headers={PROTOCOL_HEADER: [FUTURE]})[0] == 400
    assert net.value(A, "c") == 0 and len(a.node.table) == 0
    assert (a.members.version, a.members.wanted) == before
    assert status(net, A)["protocol"] == {"version": 2, "accepted": [1, 2], "refused_requests": 2}


@pytest.mark.parametrize("stated", ["0", "-1", "two", "2.0", "99999999999", "2\u00b2"])
def test_a_garbage_protocol_header_is_refused_with_what_is_expected(net: FakeNet, stated: str) -> None:
    net.add(A)
    code, body = net.request("GET", A, "/sync", headers={PROTOCOL_HEADER: [stated.encode("utf-8")]})
    assert code == 400
    assert "speaks versions 1 to 2" in json.loads(body)["error"]


def test_several_protocol_headers_are_refused(net: FakeNet) -> None:
    net.add(A)
    code, body = net.request("GET", A, "/sync", headers={PROTOCOL_HEADER: ["2", "2"]})
    assert code == 400, body
    assert json.loads(body)["protocol"]["stated"] == "'2, 2'"


def test_refused_requests_are_logged_rate_limited_and_counted(net: FakeNet, logged: list[dict[str, Any]]) -> None:
    a = net.add(A)
    a.api.metrics = Metrics()
    for _ in range(50):
        assert net.request("GET", A, "/sync", headers={PROTOCOL_HEADER: [FUTURE]})[0] == 400
    lines = [formatEvent(e) for e in logged if "protocol version" in formatEvent(e)]
    assert len(lines) == 1 and "version 3" in lines[0], lines
    assert a.api.metrics.registry.get_sample_value("counterdb_protocol_refusals_total") == 50
    net.clock.advance(61)  # the window closes with the sum of the others
    lines = [formatEvent(e) for e in logged if "protocol version" in formatEvent(e)]
    assert "49 more" in lines[-1]


def test_an_incompatible_peer_is_neither_merged_nor_fatal_and_clients_are_still_served(
    net: FakeNet, logged: list[dict[str, Any]]
) -> None:
    a, f = net.add(A), speaking(net, F, FUTURE)
    cluster(net, a, f)
    f.node.increment("c", 5)
    a.node.increment("d", 3)
    net.run(FAST.poll_interval * 30)
    # A refuses F's pushes and polls (requests in version 3), and merges
    # nothing from F's answers to its own (answers in version 3). (F itself
    # is this code in disguise: it takes A's pushes, as a real future
    # release that still spoke version 2 would.)
    assert net.value(A, "c") == 0 and a.node.partials("c") == {}
    a_to_f = status(net, A)["peers"][f"http://{F}:8080"]
    assert "version 3" in a_to_f["incompatible"] and "1 to 2" in a_to_f["incompatible"]
    assert a_to_f["protocol"] is None
    assert status(net, A)["protocol"]["refused_requests"] > 0
    assert "version 3" in f.replication.links[f"http://{A}:8080"].incompatible
    # Bounded: pushes give up after their retries, polls keep their interval.
    pushes = len(net.requests_to(F, "POST", "/sync"))
    assert 1 <= pushes <= FAST.push_retries + 1
    assert len(net.requests_to(F, "GET", "/sync")) <= 31
    incompatible = [formatEvent(e) for e in logged if "speaks no protocol version" in formatEvent(e)]
    assert len(incompatible) == 2, incompatible  # once per side, not once per request
    # A's clients are served all along.
    assert net.increment(A, "d", "1") == 4
    read = net.http.get(f"http://{A}:8080/counter/d/consistent_value?timeout=2")
    net.run(2.5)
    assert net.result(read).code == 504  # F never reports a state A accepts


def test_an_incompatible_link_recovers_once_the_versions_overlap(net: FakeNet) -> None:
    a, f = net.add(A), speaking(net, F, FUTURE)
    cluster(net, a, f)
    f.node.increment("c", 5)
    net.run(FAST.poll_interval * 3)
    assert net.value(A, "c") == 0
    # F is rolled back to this release: everything it held arrives.
    f.replication.http.version = "2"
    net.router.hosts[F].version = "2"
    net.run(FAST.poll_interval * 3)
    assert net.value(A, "c") == 5
    assert status(net, A)["peers"][f"http://{F}:8080"]["incompatible"] is None


def test_read_protocol_rules() -> None:
    assert read_protocol(None, "x") == 1
    assert read_protocol([], "x") == 1
    assert read_protocol([b" 2 "], "x") == 2
    assert read_protocol(["1"], "x") == 1
