"""The two routes that bypass Klein's URL matching (``POST /counter/<name>``
and ``GET /counter/<name>/value``, see docs/design.md): they must answer
exactly what Klein would, over a real HTTP channel."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.server import Site

from counterdb.api import Access
from counterdb.auth import Secrets
from counterdb.store import MemoryStore
from counterdb.testing import FakeNet

HOST = "127.0.0.2"


class HeldStore(MemoryStore):
    """Commits wait until the test lets them through."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Deferred[None]] = []

    def write_own(self, *args: Any, **kwargs: Any) -> Deferred[None]:
        super().write_own(*args, **kwargs)
        d: Deferred[None] = Deferred()
        self.held.append(d)
        return d


def http_exchange(resource: Any, raw: bytes) -> tuple[Any, StringTransport]:
    site = Site(resource, reactor=Clock())
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    return channel, transport


@pytest.fixture
def errors() -> Any:
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_an_increment_is_answered_with_a_content_length_not_chunks() -> None:
    net = FakeNet()
    sim = net.add(HOST)
    _, transport = http_exchange(
        sim.api.resource(), b"POST /counter/c HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n4"
    )
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: 1" in head and b"chunked" not in head.lower()
    assert body == b"4"


def test_a_plain_name_and_its_percent_encoded_spelling_are_one_counter() -> None:
    net = FakeNet()
    net.add(HOST)
    assert net.request("POST", HOST, "/counter/abc") == (200, b"1")  # direct
    assert net.request("POST", HOST, "/counter/a%62c") == (200, b"2")  # through Klein
    assert net.request("GET", HOST, "/counter/a%62c/value") == (200, b"2")
    assert net.request("GET", HOST, "/counter/abc/value") == (200, b"2")


@pytest.mark.parametrize("path", ["/counter/c", "/counter/c/value"])
def test_direct_routes_check_the_api_token_like_every_route(path: str) -> None:
    net = FakeNet(access=Access(api=Secrets([b"t" * 32], "test")))
    net.add(HOST)
    method = "POST" if path.endswith("/c") else "GET"
    response = net.response(method, HOST, path)
    assert response.code == 401
    assert response.headers.getRawHeaders("www-authenticate") == ['Bearer realm="counterdb"']
    ok = net.response(method, HOST, path, headers={"Authorization": "Bearer " + "t" * 32})
    assert ok.code == 200


def test_a_client_that_leaves_before_the_commit_gets_nothing_and_nothing_is_logged(errors: list[Any]) -> None:
    net = FakeNet()
    store = HeldStore()
    sim = net.add(HOST, store=store)
    channel, transport = http_exchange(sim.api.resource(), b"POST /counter/c HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(store.held) == 1
    channel.connectionLost(Failure(ConnectionDone()))
    store.held[0].callback(None)
    assert transport.value() == b""
    assert sim.node.value("c") == 1  # it was durable: it counts, nobody is left to tell
    assert errors == []


def test_a_failed_commit_is_a_503_on_the_direct_route() -> None:
    net = FakeNet()
    store = HeldStore()
    sim = net.add(HOST, store=store)
    _, transport = http_exchange(sim.api.resource(), b"POST /counter/c HTTP/1.1\r\nHost: x\r\n\r\n")
    store.held[0].errback(OSError("disk full"))
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"could not commit" in body
    assert sim.node.value("c") == 0
