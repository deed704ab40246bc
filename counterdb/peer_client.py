"""
The HTTP calls one node makes to one peer: bounded in time, bounded in
size, and cancellable end to end.

Every request names the calling replica (``Counterdb-Replica``) so that the
peer can refuse a replica id that answers from two places, and the protocol
version it is written in (``Counterdb-Protocol``); every answer is checked
for a protocol version this node speaks before its body is looked at, and
read with a size cap and decoded with the same hostile-input rules as the
node's own API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import quote

import treq
from hyperlink import EncodedURL
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived

from counterdb.wire import (
    MAX_ANSWER_BYTES,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    REPLICA_HEADER,
    BadJSON,
    IncompatibleProtocol,
    decode_json,
    encode_json,
    read_protocol,
)

_OUR_PROTOCOL = str(PROTOCOL_VERSION)
_PROTOCOL_KEY = PROTOCOL_HEADER.lower().encode("ascii")
#: How much of a refusal's body goes into the error message.
_REASON_CHARS = 200
#: Every peer request: a peer that redirects is not followed (it would send
#: this node's cluster secret elsewhere), and answers are read by
#: :meth:`PeerClient._json_body` under its own size cap, not buffered first.
_PEER_REQUEST: dict[str, Any] = {"allow_redirects": False, "unbuffered": True}


class HTTPClient(Protocol):
    def get(self, url: str | EncodedURL, **kwargs: Any) -> Deferred[Any]: ...

    def post(self, url: str | EncodedURL, **kwargs: Any) -> Deferred[Any]: ...


class PeerUnreachable(Exception):
    """No answer: the connection failed, broke or timed out."""


class PeerRefused(Exception):
    """The peer answered with a 4xx: it is up, but will not take or give
    this data. Retrying the same request would not help."""

    def __init__(self, url: str, code: int, reason: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{url} answered {code}: {reason}")
        self.code = code
        self.reason = reason
        self.details = details or {}  # the JSON answer, when it was an object


class PeerError(Exception):
    """The peer answered, but not as the protocol promises (a 5xx, a body
    that is too large or not the JSON expected)."""


class PeerIncompatible(PeerError):
    """The peer answered in a protocol version this node does not speak:
    nothing in the answer is used."""


class PeerClient:
    """Requests to one peer, each with a timeout and a cap on the answer."""

    def __init__(
        self,
        http: HTTPClient,
        base_url: str,
        clock: IReactorTime,
        timeout: float,
        page_size: int,
        replica_id: Callable[[], str],
        authorization: str | None = None,
    ) -> None:
        self.http = http
        self.base_url = base_url
        self.clock = clock
        self.timeout = timeout
        self.page_size = page_size
        self._replica_id = replica_id
        self._authorization = authorization  # "Bearer <cluster secret>": never logged
        self._sync_url = EncodedURL.from_text(f"{base_url}/sync")
        #: The protocol version of the peer's last answer: 1 for a release
        #: before 0.2.0, None before the first answer this node could read.
        self.peer_protocol: int | None = None

    def _headers(self) -> dict[str, list[str]]:
        headers = {REPLICA_HEADER: [self._replica_id()], PROTOCOL_HEADER: [_OUR_PROTOCOL]}
        if self._authorization is not None:
            headers["Authorization"] = [self._authorization]
        return headers

    def get_changes(self, since: int, epoch: str | None) -> Deferred[Any]:
        params = {"since": str(since), "epoch": epoch or "", "limit": str(self.page_size)}
        return self._call(self.http.get(self._sync_url, params=params, headers=self._headers(), **_PEER_REQUEST))

    def push(self, body: bytes) -> Deferred[Any]:
        """POST /sync with a body already encoded (and size-checked) by the caller."""
        headers = {**self._headers(), "Content-Type": ["application/json"]}
        # The URL parsed once: a busy node pushes tens of times a second.
        return self._call(self.http.post(self._sync_url, data=body, headers=headers, **_PEER_REQUEST))

    def get_config(self) -> Deferred[Any]:
        return self._call(self.http.get(f"{self.base_url}/config", headers=self._headers(), **_PEER_REQUEST))

    def post_config(self, config: dict[str, Any]) -> Deferred[Any]:
        """Hand the peer a versioned actors list (it keeps it if newer)."""
        headers = {**self._headers(), "Content-Type": ["application/json"]}
        body = encode_json(config)
        return self._call(self.http.post(f"{self.base_url}/config", data=body, headers=headers, **_PEER_REQUEST))

    def get_counter(self, name: str) -> Deferred[Any]:
        url = f"{self.base_url}/counter/{quote(name, safe='')}/getsync"
        return self._call(self.http.get(url, headers=self._headers(), **_PEER_REQUEST))

    def _call(self, request: Deferred[Any]) -> Deferred[Any]:
        answer = cancellable(request.addCallback(self._json_body))
        answer.addTimeout(self.timeout, self.clock)
        answer.addErrback(self._classify)
        return answer

    def _json_body(self, response: Any) -> Deferred[Any]:
        body = bytearray()
        d = treq.collect(response, _Capped(MAX_ANSWER_BYTES, self.base_url, body).write)
        d.addCallback(lambda _: self._decode(response.code, bytes(body), response.headers))
        return d

    def _decode(self, code: int, body: bytes, headers: Any) -> Any:
        # First: a body in a version this node does not speak may mean
        # something else than it seems, refusals included.
        try:
            self.peer_protocol = read_protocol(headers.getRawHeaders(_PROTOCOL_KEY), f"the answer of {self.base_url}")
        except IncompatibleProtocol as e:
            raise PeerIncompatible(str(e)) from None
        if 400 <= code < 500:
            details = _json_object(body)
            raise PeerRefused(self.base_url, code, _reason(body, details), details)
        if code != 200:
            raise PeerError(f"{self.base_url} answered {code}: {_reason(body, _json_object(body))}")
        try:
            return decode_json(body)
        except BadJSON as e:
            raise PeerError(f"{self.base_url} answered with a body that is not usable JSON: {e}") from None

    def _classify(self, failure: Failure) -> Failure:
        if failure.check(CancelledError, PeerRefused, PeerError):
            return failure
        return Failure(PeerUnreachable(f"{self.base_url}: {describe_failure(failure)}"))


class _Capped:
    """A body sink that refuses to grow past ``limit`` bytes."""

    def __init__(self, limit: int, url: str, into: bytearray | None = None) -> None:
        self.limit = limit
        self.url = url
        self.body = into if into is not None else bytearray()

    def write(self, data: bytes) -> None:
        self.body += data
        if len(self.body) > self.limit:
            raise PeerError(f"{self.url} answered with more than {self.limit} bytes")


def describe_failure(failure: Failure | BaseException) -> str:
    """One readable reason for a failed peer request, whatever wraps it
    (treq and the Agent report a list of Failures for one broken request)."""
    error = failure.value if isinstance(failure, Failure) else failure
    if isinstance(error, (ResponseNeverReceived, ResponseFailed)) and error.reasons:
        return describe_failure(error.reasons[0])
    if isinstance(error, TimeoutError):
        return "no answer in time"
    if isinstance(error, (ConnectingCancelledError, CancelledError)):
        return "no connection in time"
    if isinstance(error, DNSLookupError):
        return "the host name does not resolve"
    if isinstance(error, ConnectError):
        return (error.osError and str(error.osError)) or error.__class__.__name__
    text = str(error) or error.__class__.__name__
    return text.splitlines()[0][:_REASON_CHARS]


def cancellable(inner: Deferred[Any]) -> Deferred[Any]:
    """A Deferred that mirrors ``inner`` but fails with ``CancelledError``
    when cancelled. A cancelled treq request fails with
    ``ResponseNeverReceived`` instead, which retry loops would mistake for
    an unreachable peer and retry, outliving the caller that gave up."""
    cancelled = False

    def cancel(_: Deferred[Any]) -> None:
        nonlocal cancelled
        cancelled = True
        inner.cancel()

    outer: Deferred[Any] = Deferred(cancel)

    def forward(result: Any) -> None:
        if cancelled:
            return  # outer already failed with CancelledError
        if isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)

    inner.addBoth(forward)
    return outer


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        decoded = decode_json(body)
    except BadJSON:
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _reason(body: bytes, details: dict[str, Any]) -> str:
    """The ``error`` of a JSON refusal, else the start of the body."""
    error = details.get("error")
    text = error if isinstance(error, str) else body[:_REASON_CHARS].decode("utf-8", "replace")
    return text[:_REASON_CHARS]
