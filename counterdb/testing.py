"""
Test doubles for code that uses counterdb (``counterdb.testing``, as in
Twisted's own ``twisted.internet.testing``): whole clusters in memory.

Every node's Klein resource sits behind one ``StubTreq``, routed by the Host
header, on one ``task.Clock``. No sockets, no real time: ``net.settle()``
delivers everything that can be delivered now, ``net.run(s)`` lets ``s``
seconds of fake time pass. A host can be made ``"down"`` (503) or
``"hung"`` (never answers) through ``net.router.state``::

    net = FakeNet()
    a, b = net.cluster_of("127.0.0.2", "127.0.0.3")
    net.increment("127.0.0.2", "visits")
    net.run(1.0)
    assert net.value("127.0.0.3", "visits") == 1

Real processes (twistd nodes on loopback or in network namespaces) are
:mod:`counterdb.localcluster`.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.pages import errorPage
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from counterdb.api import Access, CounterAPI
from counterdb.consistent import ConsistentReads
from counterdb.http_limits import GuardedSite
from counterdb.membership import Identity, Members
from counterdb.node import Node
from counterdb.replication import Replication, SyncSettings
from counterdb.store import MemoryStore, Store

PORT = 8080
#: Quick retries, and pushes that never wait for the push interval (tests
#: of the interval set their own): fake time only moves when a test says so.
FAST = SyncSettings(
    poll_interval=1.0, push_retries=3, backoff_initial=0.1, backoff_max=1.0, peer_timeout=2.0, min_push_interval=0
)


class _Hang(Resource):
    """A host that accepts requests and never answers (a SIGSTOPped node)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render(self, request: Any) -> object:
        self.requests.append(request)
        return NOT_DONE_YET


class Router(Resource):
    """Sends each request to the resource of the host named in its Host header."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.hosts: dict[str, Resource] = {}
        self.state: dict[str, str] = {}  # host -> "up" | "down" | "hung"
        self.hung = _Hang()
        self.seen: list[tuple[float, str, str, str]] = []  # (time, host, method, uri)

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        host = request.getHeader(b"host").decode().rsplit(":", 1)[0]
        self.seen.append((self.clock.seconds(), host, request.method.decode(), request.uri.decode()))
        # Give the consumed segment back: the node's resource routes the whole path.
        request.postpath.insert(0, request.prepath.pop())
        state = self.state.get(host, "down")
        if state == "hung":
            return self.hung
        if state == "down" or host not in self.hosts:
            return errorPage(503, "unreachable", f"{host} is down in this test")
        return self.hosts[host]


@attrs.define
class SimNode:
    host: str
    node: Node
    members: Members
    replication: Replication
    reads: ConsistentReads
    api: CounterAPI
    store: Store


class FakeNet:
    def __init__(self, settings: SyncSettings = FAST, access: Access | None = None) -> None:
        self.clock = Clock()
        self.router = Router(self.clock)
        self.http = StubTreq(self.router)
        # Serve through the daemon's HTTP layer (header and body limits and
        # their JSON refusals; bodies never parsed as forms), so that what a
        # node refuses in production it refuses here too. treq's in-memory
        # agent has no public switch for its Site.
        site = GuardedSite(self.router, reactor=self.clock, parsePOSTFormSubmission=False)
        site.displayTracebacks = False
        self.http._agent._serverFactory = site
        self.settings = settings
        self.access = access or Access()  # every node's, unless add() is given another
        self.nodes: dict[str, SimNode] = {}

    def add(self, host: str, store: Store | None = None, start: bool = True, access: Access | None = None) -> SimNode:
        store = store or MemoryStore()
        node = Node(store, self.clock)
        members = Members(node, Identity(listen_port=PORT, interface=host), resolve=lambda h: {h})
        access = access or self.access
        secret = access.cluster.header if access.cluster else None
        replication = Replication(node, self.http, self.clock, self.settings, authorization=secret)
        members.on_change(lambda membership: replication.follow(membership, PORT))
        replication.hears_config = lambda link, config: members.heard(config, link.send_config)
        reads = ConsistentReads(node, replication, self.clock)
        api = CounterAPI(node, members, replication, reads, access)
        self.router.hosts[host] = api.resource()
        self.router.state[host] = "up"
        if start:
            replication.start()
        test_node = SimNode(host, node, members, replication, reads, api, store)
        self.nodes[host] = test_node
        return test_node

    def cluster_of(self, *hosts: str) -> list[SimNode]:
        nodes = [self.add(h) for h in hosts]
        for n in nodes:
            self.result(n.members.configure(list(hosts)))
        self.settle()
        return nodes

    def settle(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            self.http.flush()
            self.clock.advance(0)

    def run(self, seconds: float, step: float = 0.05) -> None:
        """Let ``seconds`` of fake time pass in small steps, delivering as we go."""
        steps = round(seconds / step)
        for _ in range(steps):
            self.clock.advance(step)
            self.settle(3)

    @staticmethod
    def fired(d: Deferred[Any]) -> bool:
        """Whether ``d`` has a result now (``d.called`` is also true while it
        waits on a chained Deferred)."""
        seen: list[object] = []

        def note(result: object) -> object:
            seen.append(result)
            return result

        d.addBoth(note)
        return bool(seen)

    def result(self, d: Deferred[Any]) -> Any:
        """The result of a Deferred that must have fired by now."""
        self.settle()
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        assert outcome, "the Deferred has not fired"
        if hasattr(outcome[0], "raiseException"):
            outcome[0].raiseException()
        return outcome[0]

    # -- HTTP as a client sees it -------------------------------------------

    def requests_to(self, host: str, method: str, prefix: str) -> list[float]:
        """When requests to ``host`` whose URI starts with ``prefix`` arrived."""
        return [t for t, h, m, uri in self.router.seen if h == host and m == method and uri.startswith(prefix)]

    def response(self, method: str, host: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        """The treq response to a request (``body``: bytes, str or JSON)."""
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        return self.result(self.http.request(method, f"http://{host}:{PORT}{path}", data=body, **kwargs))

    def request(self, method: str, host: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, bytes]:
        response = self.response(method, host, path, body, **kwargs)
        return response.code, self.result(response.content())

    def increment(self, host: str, name: str, body: Any = None, **kwargs: Any) -> int:
        code, content = self.request("POST", host, f"/counter/{quote(name, safe='')}", body, **kwargs)
        assert code == 200, content
        return int(content)

    def value(self, host: str, name: str) -> int:
        code, content = self.request("GET", host, f"/counter/{quote(name, safe='')}/value")
        assert code == 200, content
        return int(content)
