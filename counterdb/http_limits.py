"""
Limits that hold against hostile HTTP clients, built into twisted.web's own
HTTP/1.1 channel and Site.

- **Body size.** A ``Content-Length`` over the limit is answered 413 from
  the headers, before any body byte is read (and before ``100 Continue``).
  A chunked body is counted as it is decoded and cut off, 413 and closed,
  as soon as it passes the limit.
- **Header size.** The request line and headers together are capped
  (431); a malformed request or too many headers gets a JSON 400 instead
  of Twisted's bare one.
- **Deadlines.** Headers must be complete within ``header_timeout`` of the
  connection's start or of the previous response, however the bytes
  trickle in (Twisted's ``timeOut`` is an idle timeout that every byte
  restarts, which is what let slow clients hold connections forever). A
  body must then arrive within ``body_timeout``.
- **Connection cap.** At most ``max_connections`` connections are served at
  once; each one past that is answered 503 (over TLS: closed unanswered)
  and closed at once, without reading from it, so the process never runs
  out of file descriptors.

Every refusal is one JSON ``{"error": "..."}`` answer with
``Connection: close``, and one log line per kind per ``log_interval`` at
most, with a count of the others.
"""

from __future__ import annotations

import json
import resource
from typing import Any

import attrs
from twisted.internet.interfaces import IAddress, IDelayedCall, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.server import Request, Site

from counterdb.ratelimit import RateLimitedLog
from counterdb.wire import MAX_BODY_BYTES

log = Logger()

#: Never serve more connections than this by default, whatever the file limit.
CONNECTIONS_CEILING = 1000

_REASONS = {431: b"Request Header Fields Too Large", 413: b"Content Too Large"}


def default_max_connections(soft_limit: int | None = None) -> int:
    """min(1000, RLIMIT_NOFILE soft limit / 2): every connection may hold a
    second descriptor (a request body spooled to a temporary file), and the
    store, the log and the peer connections need some too."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY or soft_limit < 0:
        return CONNECTIONS_CEILING
    return max(1, min(CONNECTIONS_CEILING, soft_limit // 2))


@attrs.frozen
class HTTPLimits:
    """The limits of one site; the defaults are what a node serves with."""

    max_body_bytes: int = MAX_BODY_BYTES
    #: Request line plus every header line, line ends included.
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = attrs.field(factory=default_max_connections)
    #: After a refusal, how long a client that does not read the answer may
    #: keep its connection before it is aborted.
    abort_timeout: float = 5.0
    log_interval: float = 60.0


def error_response(code: int, message: str) -> bytes:
    """A complete HTTP/1.1 answer carrying the API's JSON error body."""
    body = json.dumps({"error": message}).encode("utf-8")
    reason = _REASONS.get(code) or RESPONSES.get(code, b"Error")
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    return head % (code, reason, len(body)) + body


def _peer(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    return str(host) if host is not None else str(address)


class GuardedRequest(Request):
    """Counts the decoded body as it arrives: a chunked body announces no
    length, so only counting can cut it off at the limit."""

    body_bytes = 0

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        limit = channel.site.limits.max_body_bytes if isinstance(channel, GuardedChannel) else None
        if limit is None:
            super().handleContentChunk(data)
            return
        if self.body_bytes > limit:
            return  # already refused; the decoder may still hold bytes of this read
        self.body_bytes += len(data)
        if self.body_bytes > limit:
            channel.refuse_body()
            return
        super().handleContentChunk(data)


class GuardedChannel(HTTPChannel):
    """HTTPChannel with a header deadline, a body deadline, a body cap and
    JSON refusals. Its ``site`` is a :class:`GuardedSite`."""

    site: GuardedSite
    _refused = False
    _heard = False  # bytes of a next request arrived since the last response
    _deadline: IDelayedCall | None = None
    _on_deadline: Any = None  # what the deadline timer does when it fires, if anything
    _abort: IDelayedCall | None = None
    _header_bytes = 0
    _host: IAddress | None = None
    _peer: IAddress | None = None

    # -- connection lifetime ------------------------------------------------

    def connectionMade(self) -> None:
        self.site.connection_opened()
        limits = self.site.limits
        self.MAX_LENGTH = limits.max_header_bytes
        self.totalHeadersSize = limits.max_header_bytes
        self.maxHeaders = limits.max_headers
        super().connectionMade()
        self._arm(limits.header_timeout, self._headers_too_slow)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_deadline()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort = None
        super().connectionLost(reason)
        self.site.connection_closed()

    def getHost(self) -> IAddress:
        # twisted.web's Request asks for it on every request, and the
        # transport asks the kernel each time (getsockname): measured at 5 %
        # of a loaded node's reactor. A connection's local address never
        # changes, so the first answer is kept.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self) -> IAddress:
        # The same for the client's address (getpeername, 1.5 % in py-spy).
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # the answer is written; nothing more is read
        if not self._handlingRequest:
            self._heard = True
        super().dataReceived(data)

    # -- headers ------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        # Counted here, with the line end, so that our 431 (not Twisted's
        # bare 400) answers first.
        self._header_bytes += len(line) + 2
        if self._header_bytes > self.site.limits.max_header_bytes:
            self._refuse_headers()
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # One line longer than the whole header allowance, or no line end.
        self._refuse_headers()

    def allHeadersReceived(self) -> None:
        self._header_bytes = 0
        limits = self.site.limits
        # Decided before super(), which would send "100 Continue".
        if self.length is not None and self.length > limits.max_body_bytes:
            self.refuse_body()
            return
        super().allHeadersReceived()
        if self.length == 0:
            self._disarm()
        else:
            self._arm(limits.body_timeout, self._body_too_slow)

    def allContentReceived(self) -> None:
        if self._refused:
            return  # a chunked body finished in the same read that passed the limit
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        # Armed before super(), which may parse pipelined headers (and disarm).
        if self.persistent:
            self._heard = bool(self._dataBuffer)
            self._arm(self.site.limits.header_timeout, self._headers_too_slow)
        super().requestDone(request)

    # -- refusals -----------------------------------------------------------

    def refuse_body(self) -> None:
        limit = self.site.limits.max_body_bytes
        self._refuse(413, "body", f"request body is larger than {limit} bytes")

    def _refuse_headers(self) -> None:
        limit = self.site.limits.max_header_bytes
        self._refuse(431, "headers", f"request headers are larger than {limit} bytes")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's own answer to a malformed request or too many headers is
        # a bare 400; ours says so in JSON, like every other error.
        self._refuse(400, "malformed", "malformed request or too many headers")

    def _headers_too_slow(self) -> None:
        if not self._heard:
            # An idle keep-alive connection: closing it is routine, and an
            # unasked-for 408 would confuse the client's connection pool.
            self._close()
            return
        timeout = self.site.limits.header_timeout
        self._refuse(408, "header-deadline", f"request headers did not arrive within {timeout:g} s")

    def _body_too_slow(self) -> None:
        timeout = self.site.limits.body_timeout
        self._refuse(408, "body-deadline", f"request body did not arrive within {timeout:g} s")

    def _refuse(self, code: int, kind: str, message: str) -> None:
        if self._refused or self.transport is None or self.transport.disconnecting:
            return
        self.site.refused(kind, message, self.transport.getPeer())
        self.transport.write(error_response(code, message))
        self._close()

    def _close(self) -> None:
        """Stop reading and close; abort if the client does not read the
        answer, so a refused connection cannot keep its descriptor."""
        self._refused = True
        self._cancel_deadline()
        self.setTimeout(None)
        self.loseConnection()
        self._abort = self.callLater(self.site.limits.abort_timeout, self._abort_now)

    def _abort_now(self) -> None:
        self._abort = None
        if self.transport is not None:
            self.transport.abortConnection()

    # -- the deadline -------------------------------------------------------

    # One timer per connection, moved rather than replaced: arming and
    # disarming happen twice per request, and a cancelled call stays in
    # the reactor's heap until it comes due.

    def _arm(self, seconds: float, expired: Any) -> None:
        self._on_deadline = expired
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(seconds)
        else:
            self._deadline = self.callLater(seconds, self._deadline_passed)

    def _disarm(self) -> None:
        self._on_deadline = None  # the timer may still fire: it then does nothing

    def _deadline_passed(self) -> None:
        expired, self._on_deadline = self._on_deadline, None
        if expired is not None:
            expired()

    def _cancel_deadline(self) -> None:
        self._on_deadline = None
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


class _Overloaded(Protocol):
    """A connection past the cap, never read from.

    Over plain TCP it is answered 503 and closed: one small write into an
    empty socket buffer costs less than keeping the descriptor to read the
    request. The price is that a client whose request is still unread when
    the socket closes gets a reset after the 503, which some stacks report
    before the answer (Linux clients read the 503 first).

    Over TLS it is closed at once, unanswered: the answer would first cost a
    whole handshake, and a client that never finishes it would keep the
    descriptor.
    """

    _abort: IDelayedCall | None = None

    def __init__(self, site: GuardedSite) -> None:
        self.site = site

    def connectionMade(self) -> None:
        assert self.transport is not None
        limits = self.site.limits
        message = f"the node is serving its maximum of {limits.max_connections} connections; try again shortly"
        self.site.refused("connections", message, self.transport.getPeer())
        if ISSLTransport.providedBy(self.transport):
            self.transport.abortConnection()
            return
        self.transport.write(error_response(503, message))
        self.transport.loseConnection()
        # A client that does not read even this much is not waited for.
        self._abort = self.site.reactor.callLater(limits.abort_timeout, self.transport.abortConnection)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort = None


class GuardedSite(Site):
    """A Site whose channels enforce :class:`HTTPLimits`. Subclass it, or
    pass ``limits=`` for other values than the defaults. A ``requestFactory``
    of your own must subclass :class:`GuardedRequest`, which counts chunked
    bodies."""

    protocol = GuardedChannel  # type: ignore[assignment]
    requestFactory = GuardedRequest

    def __init__(self, resource: Any, *args: Any, limits: HTTPLimits | None = None, **kwargs: Any) -> None:
        super().__init__(resource, *args, **kwargs)
        self.limits = limits if limits is not None else HTTPLimits()
        self.open_connections = 0
        #: Refusals since start, by kind (body, headers, header-deadline, ...).
        self.refusals: dict[str, int] = {}
        self._refusal_log = RateLimitedLog(self.reactor, self.limits.log_interval)

    def buildProtocol(self, addr: IAddress) -> Any:
        if self.open_connections >= self.limits.max_connections:
            overloaded = _Overloaded(self)
            overloaded.factory = self
            return overloaded
        return super().buildProtocol(addr)

    def connection_opened(self) -> None:
        self.open_connections += 1

    def connection_closed(self) -> None:
        self.open_connections -= 1

    def refused(self, kind: str, message: str, peer: IAddress | None) -> None:
        self.refusals[kind] = self.refusals.get(kind, 0) + 1
        self._refusal_log.event(kind, message, _peer(peer))

    def stopFactory(self) -> None:
        self._refusal_log.stop()
        super().stopFactory()
