"""The HTTP limits of counterdb.http_limits: body and header size, header and
body deadlines, the connection cap and the rate-limited log.

Where time matters, an HTTP channel is driven over a StringTransport on a
task.Clock; the rest runs on real loopback sockets, each opened and closed
by its test."""

from __future__ import annotations

import json
import resource as rlimit
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from counterdb.http_limits import (
    GuardedChannel,
    GuardedSite,
    HTTPLimits,
    RateLimitedLog,
    default_max_connections,
)
from counterdb.wire import MAX_BODY_BYTES

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class Recorder(Resource):
    """Answers "ok" and remembers each body; with ``hold``, keeps requests open."""

    isLeaf = True

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.held: list[Request] = []
        self.hold = hold

    def render(self, request: Request) -> Any:
        self.bodies.append(request.content.read())
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        return b"ok"


class CountingChannel(GuardedChannel):
    """Counts every byte the server read from the connection."""

    bytes_read = 0

    def dataReceived(self, data: bytes) -> None:
        self.bytes_read += len(data)
        super().dataReceived(data)


class CountingSite(GuardedSite):
    protocol = CountingChannel  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channels: list[CountingChannel] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if isinstance(protocol, CountingChannel):
            self.channels.append(protocol)
        return protocol


def make_site(clock: Any = None, site_class: type[GuardedSite] = GuardedSite, **limits: Any) -> GuardedSite:
    # The same call CounterDBSite makes, with limits and a clock added.
    kwargs: dict[str, Any] = {"limits": HTTPLimits(**limits), "parsePOSTFormSubmission": False}
    if clock is not None:
        kwargs["reactor"] = clock
    return site_class(Recorder(), **kwargs)


def connect(site: GuardedSite) -> tuple[Any, StringTransport]:
    protocol = site.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    protocol.makeConnection(transport)
    return protocol, transport


def parse(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """The first answer in ``raw``: status, headers (lower-case names), body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def json_error(raw: bytes, code: int) -> str:
    status, headers, body = parse(raw)
    assert status == code, raw[:200]
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body)
    answer = json.loads(body)
    assert set(answer) == {"error"}
    return answer["error"]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# -- the connection --------------------------------------------------------


class HostAsker(StringTransport):
    """A transport that counts how often it is asked for its addresses."""

    asked = 0
    asked_peer = 0

    def getHost(self) -> Any:
        self.asked += 1
        return super().getHost()

    def getPeer(self) -> Any:
        self.asked_peer += 1
        return super().getPeer()


def test_every_request_on_a_connection_sees_its_addresses_asked_of_the_kernel_once() -> None:
    seen: list[Any] = []

    class Host(Resource):
        isLeaf = True

        def render(self, request: Request) -> bytes:
            seen.append((request.getHost(), request.getClientAddress()))
            return b"ok"

    site = GuardedSite(Host(), limits=HTTPLimits(), parsePOSTFormSubmission=False, reactor=Clock())
    channel = site.buildProtocol(PEER)
    transport = HostAsker(hostAddress=IPv4Address("TCP", "127.0.0.7", 8080), peerAddress=PEER)
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
    assert seen == [(IPv4Address("TCP", "127.0.0.7", 8080), PEER)] * 2
    assert transport.asked == 1 and transport.asked_peer == 1


# -- body size ---------------------------------------------------------------


def test_a_content_length_over_the_limit_is_refused_from_the_headers() -> None:
    site = make_site(Clock())
    channel, transport = connect(site)
    channel.dataReceived(
        b"POST /counter/c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1)
    )
    # Answered before a single body byte, and without inviting the body.
    assert json_error(transport.value(), 413) == "request body is larger than 1048576 bytes"
    assert b"100 Continue" not in transport.value()
    assert transport.disconnecting
    answered = transport.value()
    channel.dataReceived(b"x" * 65536)  # whatever is still in flight is ignored
    assert transport.value() == answered
    assert site.resource.bodies == []
    assert site.refusals == {"body": 1}


def test_a_body_of_exactly_the_limit_is_served() -> None:
    site = make_site(Clock(), max_body_bytes=1000)
    channel, transport = connect(site)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"y" * 1000)
    assert parse(transport.value())[0] == 200
    assert site.resource.bodies == [b"y" * 1000]


def test_a_chunked_body_is_cut_off_as_soon_as_it_passes_the_limit() -> None:
    site = make_site(Clock(), max_body_bytes=1000)
    channel, transport = connect(site)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(10):
        channel.dataReceived(chunk(b"z" * 100))
    assert transport.value() == b""  # 1000 bytes: still within the limit
    channel.dataReceived(chunk(b"z"))
    assert json_error(transport.value(), 413) == "request body is larger than 1000 bytes"
    assert transport.disconnecting
    request = channel.requests[-1]
    assert request.body_bytes == 1001
    assert request.content.tell() == 1000  # nothing past the limit was kept
    answered = transport.value()
    channel.dataReceived(chunk(b"z" * 100) + b"0\r\n\r\n")  # the body ends: still not served
    assert transport.value() == answered
    assert site.resource.bodies == []


def test_a_chunk_that_passes_the_limit_and_ends_the_body_in_one_read_is_not_served() -> None:
    site = make_site(Clock(), max_body_bytes=1000)
    channel, transport = connect(site)
    channel.dataReceived(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk(b"z" * 600)
        + chunk(b"z" * 600)
        + b"0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert json_error(transport.value(), 413) == "request body is larger than 1000 bytes"
    assert transport.value().count(b"HTTP/1.1") == 1
    assert site.resource.bodies == []


def test_a_chunked_body_within_the_limit_is_served() -> None:
    site = make_site(Clock(), max_body_bytes=1000)
    channel, transport = connect(site)
    channel.dataReceived(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"a" * 500) * 2 + b"0\r\n\r\n"
    )
    assert parse(transport.value())[0] == 200
    assert site.resource.bodies == [b"a" * 1000]


# -- header size -------------------------------------------------------------


def test_headers_over_the_limit_are_refused_with_431() -> None:
    site = make_site(Clock(), max_header_bytes=4096)
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    for i in range(80):  # 80 lines of 62 bytes: past 4096 in total
        channel.dataReceived(b"X-Filler-%02d: %s\r\n" % (i, b"f" * 48))
        if transport.disconnecting:
            break
    assert json_error(transport.value(), 431) == "request headers are larger than 4096 bytes"
    assert transport.disconnecting
    assert site.resource.bodies == []


def test_one_header_line_longer_than_the_limit_is_refused_without_waiting_for_its_end() -> None:
    site = make_site(Clock(), max_header_bytes=4096)
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\nX-Long: " + b"l" * 5000)  # no line end
    assert json_error(transport.value(), 431) == "request headers are larger than 4096 bytes"
    assert transport.disconnecting


def test_too_many_headers_and_malformed_requests_get_a_json_400() -> None:
    site = make_site(Clock(), max_headers=10)
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(11)) + b"\r\n")
    assert json_error(transport.value(), 400) == "malformed request or too many headers"
    channel, transport = connect(site)
    channel.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: ten\r\n\r\n")
    assert json_error(transport.value(), 400) == "malformed request or too many headers"
    assert site.refusals == {"malformed": 2}


def test_headers_within_the_limit_are_served() -> None:
    site = make_site(Clock(), max_header_bytes=4096)
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"f" * 3000 + b"\r\n\r\n")
    assert parse(transport.value())[0] == 200


# -- deadlines -----------------------------------------------------------------


def test_a_header_trickle_is_closed_at_the_deadline_although_bytes_keep_coming() -> None:
    clock = Clock()
    site = make_site(clock, header_timeout=10.0, abort_timeout=5.0)
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    for _ in range(39):  # one byte every 0.25 s, for 9.75 s
        clock.advance(0.25)
        channel.dataReceived(b"X")
    assert not transport.disconnecting
    clock.advance(0.25)
    assert json_error(transport.value(), 408) == "request headers did not arrive within 10 s"
    assert transport.disconnecting
    assert not transport.disconnected
    clock.advance(5.0)  # a client that does not read the answer is aborted
    assert transport.disconnected


def test_the_header_deadline_runs_from_the_previous_response() -> None:
    clock = Clock()
    site = make_site(clock, header_timeout=10.0)
    channel, transport = connect(site)
    clock.advance(8.0)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # answered at t=8
    assert parse(transport.value())[0] == 200
    transport.clear()
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    clock.advance(9.9)
    assert not transport.disconnecting  # t=17.9: 9.9 s after the response
    clock.advance(0.1)
    assert parse(transport.value())[0] == 408


def test_an_idle_keep_alive_connection_is_closed_quietly_at_the_deadline() -> None:
    clock = Clock()
    site = make_site(clock, header_timeout=10.0)
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answered = transport.value()
    clock.advance(10.0)
    assert transport.disconnecting
    assert transport.value() == answered  # no unasked-for 408 for a pooled connection
    assert site.refusals == {}


def test_a_slow_body_is_closed_at_the_body_deadline() -> None:
    clock = Clock()
    site = make_site(clock, header_timeout=10.0, body_timeout=30.0)
    channel, transport = connect(site)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    clock.advance(10.0)
    assert not transport.disconnecting  # the headers came in time
    for _ in range(19):
        channel.dataReceived(b"b")
        clock.advance(1.0)
    assert not transport.disconnecting
    clock.advance(1.0)
    assert json_error(transport.value(), 408) == "request body did not arrive within 30 s"


def test_no_deadline_runs_while_a_request_is_being_answered() -> None:
    """A long request (a consistent read with a timeout) is not cut off, and
    a request pipelined behind it gets its deadline from its response."""
    clock = Clock()
    site = GuardedSite(Recorder(hold=True), reactor=clock, limits=HTTPLimits(header_timeout=10.0))
    channel, transport = connect(site)
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\n")
    clock.advance(60.0)
    assert not transport.disconnecting
    held = site.resource.held[0]
    held.write(b"done")
    held.finish()
    assert parse(transport.value())[0] == 200
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.value().count(b"HTTP/1.1 408") == 1


# -- connection cap --------------------------------------------------------------


def test_connections_past_the_cap_are_answered_503_and_slots_are_freed() -> None:
    site = make_site(Clock(), max_connections=2)
    first, _ = connect(site)
    connect(site)
    assert site.open_connections == 2
    third, transport = connect(site)
    assert not isinstance(third, GuardedChannel)
    error = json_error(transport.value(), 503)
    assert "maximum of 2 connections" in error
    assert transport.disconnecting
    assert site.open_connections == 2
    first.connectionLost(Failure(ConnectionDone()))
    assert site.open_connections == 1
    fourth, transport = connect(site)
    fourth.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse(transport.value())[0] == 200
    assert site.refusals == {"connections": 1}


@implementer(ISSLTransport)
class TLSStringTransport(StringTransport):
    def getPeerCertificate(self) -> None:
        return None


def test_over_tls_connections_past_the_cap_are_closed_unanswered() -> None:
    # Answering would first cost a TLS handshake, which a client may never finish.
    site = make_site(Clock(), max_connections=1)
    connect(site)
    excess = site.buildProtocol(PEER)
    transport = TLSStringTransport(peerAddress=PEER)
    excess.makeConnection(transport)
    assert transport.disconnected  # aborted
    assert transport.value() == b""
    assert site.refusals == {"connections": 1}


def test_a_503_that_is_never_read_does_not_keep_its_connection() -> None:
    clock = Clock()
    site = make_site(clock, max_connections=1, abort_timeout=5.0)
    connect(site)
    excess, transport = connect(site)
    assert transport.disconnecting and not transport.disconnected
    clock.advance(5.0)
    assert transport.disconnected
    excess.connectionLost(Failure(ConnectionDone()))
    # One that closes normally leaves no timer behind.
    before = len(clock.getDelayedCalls())
    closing, _ = connect(site)
    assert len(clock.getDelayedCalls()) == before + 1
    closing.connectionLost(Failure(ConnectionDone()))
    assert len(clock.getDelayedCalls()) == before


@pytest.mark.parametrize(
    "soft, expected",
    [(20000, 1000), (1024, 512), (256, 128), (1, 1), (rlimit.RLIM_INFINITY, 1000)],
)
def test_the_default_cap_is_well_under_the_file_limit(soft: int, expected: int) -> None:
    assert default_max_connections(soft) == expected


def test_the_default_cap_follows_this_process_limit() -> None:
    soft = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)[0]
    assert HTTPLimits().max_connections == default_max_connections(soft)


# -- the log -------------------------------------------------------------------


def test_refusals_log_one_line_per_kind_per_interval_with_a_count() -> None:
    clock = Clock()
    events: list[dict[str, Any]] = []
    limited = RateLimitedLog(clock, 60.0, Logger(observer=events.append))
    for _ in range(5):
        limited.event("body", "request body is larger than 1048576 bytes", "10.0.0.1")
    limited.event("headers", "request headers are larger than 16384 bytes", "10.0.0.2")
    assert [(e["kind"], e.get("count")) for e in events] == [("body", None), ("headers", None)]
    clock.advance(60.0)
    assert [(e["kind"], e.get("count")) for e in events[2:]] == [("body", 4)]
    limited.event("body", "again", "10.0.0.1")  # within the interval after a summary: counted
    clock.advance(60.0)
    assert [(e["kind"], e.get("count")) for e in events[3:]] == [("body", 1)]
    clock.advance(60.0)
    assert len(events) == 4  # a quiet interval ends the window
    limited.event("body", "later", "10.0.0.1")
    assert events[4]["message"] == "later"
    limited.stop()
    assert clock.getDelayedCalls() == []


# -- real sockets ----------------------------------------------------------------


class RawClient(Protocol):
    """Sends ``request`` on connecting, keeps what comes back."""

    def __init__(self, request: bytes = b"") -> None:
        self.request = request
        self.received = bytearray()
        self.closed: Deferred[None] = Deferred()
        self.connected_at = 0.0
        self.closed_at = 0.0

    def connectionMade(self) -> None:
        self.connected_at = reactor.seconds()
        if self.request:
            self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.closed_at = reactor.seconds()
        self.closed.callback(None)


class ChunkedFlood(RawClient):
    """Streams a chunked body of up to ``total`` bytes as fast as the
    connection takes it, as a push producer (never buffering much)."""

    def __init__(self, total: int) -> None:
        super().__init__(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.total = total
        self.sent = 0
        self.paused = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        piece = chunk(b"c" * 65536)
        while not self.paused and self.sent < self.total and self.transport.connected:
            self.sent += 65536
            self.transport.write(piece)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` every 10 ms; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await deferLater(reactor, 0.01, lambda: None)


async def closed_within(client: RawClient, timeout: float = 10.0) -> None:
    await until(lambda: client.closed.called, timeout)


def listen(site: GuardedSite) -> IListeningPort:
    return reactor.listenTCP(0, site, interface="127.0.0.1")


async def open_client(port: IListeningPort, client: RawClient) -> RawClient:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    await connectProtocol(endpoint, client)
    return client


async def close_all(site: GuardedSite, clients: list[RawClient]) -> None:
    for client in clients:
        if client.transport is not None and not client.closed.called:
            client.transport.abortConnection()
    await until(lambda: all(c.closed.called for c in clients) and site.open_connections == 0)


@pytest_twisted.ensureDeferred
async def test_real_a_content_length_over_the_limit_is_answered_before_any_body_is_sent() -> None:
    site = make_site()
    port = listen(site)
    clients: list[RawClient] = []
    try:
        # Only the headers are sent: the answer must come without the body.
        client = await open_client(port, RawClient(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n\r\n"))
        clients.append(client)
        await closed_within(client)
        assert json_error(bytes(client.received), 413) == "request body is larger than 1048576 bytes"
        assert site.resource.bodies == []
    finally:
        await close_all(site, clients)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_real_a_chunked_flood_is_cut_off_at_about_the_limit() -> None:
    site = make_site(site_class=CountingSite)
    port = listen(site)
    total = 64 * 1024 * 1024
    clients: list[RawClient] = []
    try:
        client = await open_client(port, ChunkedFlood(total))
        clients.append(client)
        await closed_within(client, timeout=20.0)
        (channel,) = site.channels
        # The server read at most the limit plus one read (64 KiB) and framing.
        assert channel.bytes_read < MAX_BODY_BYTES + 256 * 1024
        assert channel.requests[0].body_bytes <= MAX_BODY_BYTES + 65536
        assert client.sent < total // 4  # closed long before the client was done
        assert site.refusals == {"body": 1}
        assert site.resource.bodies == []
    finally:
        await close_all(site, clients)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_real_a_header_trickle_is_closed_at_the_deadline() -> None:
    site = make_site(header_timeout=0.5)
    port = listen(site)
    clients: list[RawClient] = []
    trickle: LoopingCall | None = None
    try:
        client = await open_client(port, RawClient(b"GET / HTTP/1.1\r\n"))
        clients.append(client)
        dripped: list[float] = []

        def drip() -> None:
            if not client.closed.called:
                client.transport.write(b"X")
                dripped.append(reactor.seconds())

        trickle = LoopingCall(drip)
        trickle.start(0.05)
        await closed_within(client)
        elapsed = client.closed_at - client.connected_at
        assert 0.45 <= elapsed < 3.0
        assert len(dripped) >= 5 and dripped[-1] > client.closed_at - 0.5  # bytes kept coming all along
        assert parse(bytes(client.received))[0] == 408
    finally:
        if trickle is not None and trickle.running:
            trickle.stop()
        await close_all(site, clients)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_real_many_slow_connections_do_not_delay_a_normal_request() -> None:
    site = make_site()
    port = listen(site)
    slow: list[RawClient] = []
    trickle: LoopingCall | None = None
    try:
        for _ in range(300):
            slow.append(await open_client(port, RawClient(b"GET / HTTP/1.1\r\nX-Slow: ")))
        await until(lambda: site.open_connections == 300)

        def drip() -> None:
            for client in slow:
                client.transport.write(b"s")

        trickle = LoopingCall(drip)
        trickle.start(0.2)
        normal = await open_client(port, RawClient(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        await closed_within(normal, timeout=5.0)
        assert parse(bytes(normal.received))[0] == 200
        assert normal.closed_at - normal.connected_at < 1.0
        assert not any(client.closed.called for client in slow)  # their deadline (10 s) is still running
    finally:
        if trickle is not None and trickle.running:
            trickle.stop()
        await close_all(site, slow)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_real_the_connection_cap_answers_the_excess_and_frees_slots() -> None:
    site = make_site(max_connections=3)
    port = listen(site)
    clients: list[RawClient] = []
    try:
        for _ in range(3):
            clients.append(await open_client(port, RawClient()))
        await until(lambda: site.open_connections == 3)
        request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        excess = await open_client(port, RawClient(request))
        clients.append(excess)
        await closed_within(excess)
        assert "maximum of 3 connections" in json_error(bytes(excess.received), 503)
        assert site.open_connections == 3

        clients[0].transport.loseConnection()
        await until(lambda: site.open_connections == 2)
        served = await open_client(port, RawClient(request))
        clients.append(served)
        await closed_within(served)
        assert parse(bytes(served.received))[0] == 200
    finally:
        await close_all(site, clients)
        await port.stopListening()
