"""
Clients of a counterdb node: :class:`Client` for Twisted code (methods
return Deferreds) and :class:`BlockingClient` for everything else (the
``counterdb`` command line, scripts), built on the standard library only.

Both speak the same API through the same code: what a call sends is a
:class:`Call` (method, path, body, headers, how to read the answer), built
by the ``*_call`` functions below, and every answer is read by
:func:`read_answer`. The two classes only move bytes and wait.

Increments are safe to retry. Each one carries an ``Idempotency-Key`` (a
new uuid4 unless the caller gives one), and a retry after a connection
failure, a timeout or a 503 reuses it, so a node that counted the first
attempt answers the retry from its record instead of counting it again.
Retries use exponential backoff with jitter, a bounded number of times
(:class:`Retry`). Keys belong to one node: a client retries against the
node it was made for, never another.

    client = BlockingClient("http://127.0.0.2:8080", token="...")
    client.increment("visits", 5)      # -> the node's new local value
    client.consistent_value("visits", timeout=2.0)

Errors are :class:`CounterDBError` (the node answered a 4xx or 5xx: its
``status`` and the ``error`` text of its JSON answer) or
:class:`Unreachable`, a subclass, when no answer came after every retry.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import attrs
from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web._newclient import RequestNotSent, ResponseFailed, ResponseNeverReceived

from counterdb import __version__
from counterdb.peer_client import cancellable, describe_failure
from counterdb.wire import BadJSON, decode_json

#: Seconds one attempt may take before it is abandoned (and retried).
DEFAULT_TIMEOUT = 10.0
USER_AGENT = f"counterdb-client/{__version__}"
#: How much of a body that is not a JSON error goes into a message.
_REASON_CHARS = 200


class CounterDBError(Exception):
    """The node answered with an error: ``status`` and its ``error`` text.

    ``details`` holds the other members of the JSON answer (a 504 from
    ``consistent_value`` has ``missing`` and ``best_value``).
    """

    def __init__(self, status: int | None, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message if status is None else f"{message} (HTTP {status})")
        self.status = status
        self.message = message
        self.details = dict(details or {})


class Unreachable(CounterDBError):
    """No answer: every attempt failed to connect, broke off or timed out
    (``status`` is None). An increment may or may not have been counted."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


# -- what is sent, and how the answer is read (shared by both clients) -------------


@attrs.frozen
class Call:
    """One API request, independent of how it is sent."""

    method: str
    path: str  # percent-encoded path and query, starting with "/"
    read: Callable[[bytes], Any]  # reads a 200 answer's body
    body: bytes | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    #: Seconds added to the client's timeout (a consistent read with a
    #: server-side deadline may take that long before it answers).
    extra_time: float = 0.0
    #: Whether an attempt that timed out is retried. Not for a consistent
    #: read without a deadline: it waits for every host, so a timeout means
    #: a host is down, and asking again would wait again.
    retry_timeouts: bool = True


def counter_path(name: str) -> str:
    """``/counter/<name>`` with the name percent-encoded as one path segment."""
    if not isinstance(name, str):
        raise TypeError(f"a counter name is a str, got {name!r}")
    segment = quote(name, safe="")
    if segment in (".", ".."):  # a dot segment: URL normalisation (RFC 3986) would remove it
        segment = segment.replace(".", "%2E")
    return "/counter/" + segment


def increment_call(name: str, amount: int = 1, idempotency_key: str | None = None) -> Call:
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise TypeError(f"an increment is an int, got {amount!r}")
    key = idempotency_key if idempotency_key is not None else str(uuid.uuid4())
    return Call("POST", counter_path(name), _read_int, str(amount).encode("ascii"), {"Idempotency-Key": key})


def value_call(name: str) -> Call:
    return Call("GET", counter_path(name) + "/value", _read_int)


def consistent_value_call(name: str, timeout: float | None = None) -> Call:
    path = counter_path(name) + "/consistent_value"
    if timeout is None:
        return Call("GET", path, _read_int, retry_timeouts=False)
    return Call("GET", f"{path}?timeout={float(timeout)!r}", _read_int, extra_time=float(timeout))


def config_call() -> Call:
    return Call("GET", "/config", _read_json)


def set_config_call(actors: list[str]) -> Call:
    body = json.dumps({"actors": list(actors)}).encode("utf-8")
    return Call("POST", "/config", _read_json, body, {"Content-Type": "application/json"})


def status_call() -> Call:
    return Call("GET", "/status", _read_json)


def _read_int(body: bytes) -> int:
    try:
        return int(body.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise CounterDBError(200, f"expected a number, got {_excerpt(body)!r}") from None


def _read_json(body: bytes) -> Any:
    try:
        return decode_json(body)
    except BadJSON as e:
        raise CounterDBError(200, f"expected JSON: {e}") from None


def read_answer(call: Call, status: int, body: bytes) -> Any:
    """The result of ``call`` from its answer, or :class:`CounterDBError`."""
    if status == 200:
        return call.read(body)
    try:
        answer = decode_json(body)
    except BadJSON:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        details = {k: v for k, v in answer.items() if k != "error"}
        raise CounterDBError(status, answer["error"], details)
    text = _excerpt(body)
    if not text or text.startswith("<"):  # an HTML page (a proxy's?) says no more than its status
        text = http.client.responses.get(status, "no reason given")
    raise CounterDBError(status, text)


def _excerpt(body: bytes) -> str:
    return body[:_REASON_CHARS].decode("utf-8", "replace").strip()


def request_headers(call: Call, authorization: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, **call.headers}
    if authorization is not None:
        headers["Authorization"] = authorization
    return headers


def authorization_header(token: str | None, authorization: str | None) -> str | None:
    """``Authorization`` from a bare token, or a whole header value
    (``counterdb.auth.Secrets.header``); not both."""
    if token is not None and authorization is not None:
        raise ValueError("give a token or an authorization header, not both")
    return f"Bearer {token}" if token is not None else authorization


#: Statuses a retry may cure: the node is starting or stopping, has too many
#: connections or waiting reads, or its store failed (nothing was counted).
RETRY_STATUSES = frozenset({503})


@attrs.frozen
class Retry:
    """How often and how soon a call is tried again: at most ``attempts``
    tries, waiting ``initial`` seconds after the first failure, doubling up
    to ``maximum``, each wait jittered down by up to half."""

    attempts: int = 5
    initial: float = 0.2
    maximum: float = 2.0
    jitter: Callable[[], float] = random.random

    def delays(self) -> Iterator[float]:
        """The waits between attempts: ``attempts - 1`` of them."""
        for n in range(self.attempts - 1):
            yield min(self.maximum, self.initial * 2**n) * (1 - self.jitter() / 2)


def _schedule(retry: Retry) -> Iterator[tuple[int, float | None]]:
    """``(attempt number, wait before the next one)``; the last wait is None."""
    delays = list(retry.delays())
    yield from enumerate(delays, start=1)
    yield len(delays) + 1, None


def _after(attempts: int, reason: str) -> str:
    return f"{reason} (after {attempts} attempt{'s' if attempts != 1 else ''})"


def check_base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected a URL like http://127.0.0.2:8080, got {url!r}")
    parts.port  # noqa: B018 -- raises ValueError for a port out of range
    if parts.query or parts.fragment:
        raise ValueError(f"a node URL has no query or fragment, got {url!r}")
    return url.rstrip("/")


# -- Twisted ------------------------------------------------------------------------


class HTTPClient(Protocol):
    """What :class:`Client` needs of ``treq`` (or of a ``treq.testing.StubTreq``)."""

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]: ...


class Client:
    """A node's API for Twisted code; every method returns a Deferred.

    ``http`` is ``treq`` by default, or anything with treq's ``request``
    (``FakeNet.http`` in tests); ``clock`` times attempts and backoff (the
    reactor by default). ``token`` is sent as ``Authorization: Bearer``;
    ``authorization`` is a whole header value instead. ``timeout`` bounds
    each attempt, ``retry`` how many attempts a call gets.
    """

    def __init__(
        self,
        base_url: str,
        http: HTTPClient | None = None,
        token: str | None = None,
        *,
        authorization: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: Retry | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if http is None:
            import treq

            http = treq
        if clock is None:
            from twisted.internet import reactor

            clock = reactor  # type: ignore[assignment]
        self.base_url = check_base_url(base_url)
        self.http = http
        self.timeout = timeout
        self.retry = retry or Retry()
        self.clock = clock
        self._authorization = authorization_header(token, authorization)

    def __repr__(self) -> str:
        return f"<Client {self.base_url}>"

    def increment(self, name: str, amount: int = 1, idempotency_key: str | None = None) -> Deferred[int]:
        """Add ``amount``; fires with the counter's new value on this node."""
        return self.call(increment_call(name, amount, idempotency_key))

    def value(self, name: str) -> Deferred[int]:
        return self.call(value_call(name))

    def consistent_value(self, name: str, timeout: float | None = None) -> Deferred[int]:
        """A value including every increment any host acknowledged before the
        call; with ``timeout``, a 504 :class:`CounterDBError` after that many
        seconds if a host did not answer (``details``: ``missing``, ``best_value``)."""
        return self.call(consistent_value_call(name, timeout))

    def config(self) -> Deferred[dict[str, Any]]:
        return self.call(config_call())

    def set_config(self, actors: list[str]) -> Deferred[dict[str, Any]]:
        return self.call(set_config_call(actors))

    def status(self) -> Deferred[dict[str, Any]]:
        return self.call(status_call())

    def call(self, call: Call) -> Deferred[Any]:
        """Send ``call``, retrying as :attr:`retry` allows."""
        return Deferred.fromCoroutine(self._call(call))

    async def _call(self, call: Call) -> Any:
        for attempts, delay in _schedule(self.retry):
            try:
                status, body = await self._attempt(call)
            except _NoAnswer as e:
                if delay is None or (e.timed_out and not call.retry_timeouts):
                    raise Unreachable(_after(attempts, str(e))) from None
            else:
                if delay is None or status not in RETRY_STATUSES:
                    return read_answer(call, status, body)
            await deferLater(self.clock, delay)
        raise AssertionError("unreachable: the last attempt has no delay")

    async def _attempt(self, call: Call) -> tuple[int, bytes]:
        headers = {k: [v] for k, v in request_headers(call, self._authorization).items()}
        url = self.base_url + call.path
        answer = cancellable(self.http.request(call.method, url, data=call.body, headers=headers))
        answer.addCallback(_with_body)
        answer.addTimeout(self.timeout + call.extra_time, self.clock)
        try:
            return await answer
        except CancelledError:
            raise
        except defer.TimeoutError:
            raise _NoAnswer(f"{self.base_url}: no answer within {self.timeout + call.extra_time:g} s", True) from None
        except _TRANSPORT_ERRORS as e:
            raise _NoAnswer(f"{self.base_url}: {describe_failure(e)}", False) from None


#: What a treq request fails with when no answer came.
_TRANSPORT_ERRORS = (
    ConnectError,
    DNSLookupError,
    ConnectionClosed,
    ResponseNeverReceived,
    ResponseFailed,
    RequestNotSent,
    error.TimeoutError,
    OSError,
)


def _with_body(response: Any) -> Deferred[tuple[int, bytes]]:
    import treq

    return treq.content(response).addCallback(lambda body: (response.code, body))


class _NoAnswer(Exception):
    def __init__(self, reason: str, timed_out: bool) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


# -- blocking -----------------------------------------------------------------------


class BlockingClient:
    """The same API as :class:`Client`, blocking, with the standard library
    (``http.client``): no reactor needed. Proxy settings in the environment
    are not used: it talks to the node directly. ``ssl_context`` verifies
    an ``https://`` node (for example ``ssl.create_default_context(cafile=...)``
    for a cluster's own CA)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        authorization: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: Retry | None = None,
        ssl_context: ssl.SSLContext | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = check_base_url(base_url)
        parts = urlsplit(self.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.retry = retry or Retry()
        self.ssl_context = ssl_context
        self._sleep = sleep
        self._authorization = authorization_header(token, authorization)

    def __repr__(self) -> str:
        return f"<BlockingClient {self.base_url}>"

    def increment(self, name: str, amount: int = 1, idempotency_key: str | None = None) -> int:
        """Add ``amount``; returns the counter's new value on this node."""
        return self.call(increment_call(name, amount, idempotency_key))

    def value(self, name: str) -> int:
        return self.call(value_call(name))

    def consistent_value(self, name: str, timeout: float | None = None) -> int:
        """See :meth:`Client.consistent_value`."""
        return self.call(consistent_value_call(name, timeout))

    def config(self) -> dict[str, Any]:
        return self.call(config_call())

    def set_config(self, actors: list[str]) -> dict[str, Any]:
        return self.call(set_config_call(actors))

    def status(self) -> dict[str, Any]:
        return self.call(status_call())

    def call(self, call: Call) -> Any:
        """Send ``call``, retrying as :attr:`retry` allows."""
        for attempts, delay in _schedule(self.retry):
            try:
                status, body = self._attempt(call)
            except _NoAnswer as e:
                if delay is None or (e.timed_out and not call.retry_timeouts):
                    raise Unreachable(_after(attempts, str(e))) from None
            else:
                if delay is None or status not in RETRY_STATUSES:
                    return read_answer(call, status, body)
            self._sleep(delay)
        raise AssertionError("unreachable: the last attempt has no delay")

    def _attempt(self, call: Call) -> tuple[int, bytes]:
        timeout = self.timeout + call.extra_time
        connection: http.client.HTTPConnection
        if self._https:
            connection = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self.ssl_context)
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        try:
            connection.request(
                call.method, self._prefix + call.path, call.body, request_headers(call, self._authorization)
            )
            response = connection.getresponse()
            return response.status, response.read()
        except TimeoutError:
            raise _NoAnswer(f"{self.base_url}: no answer within {timeout:g} s", True) from None
        except ssl.SSLCertVerificationError as e:
            raise Unreachable(f"{self.base_url}: {e.verify_message or e}") from None
        except socket.gaierror:
            raise _NoAnswer(f"{self.base_url}: the host name does not resolve", False) from None
        except (OSError, http.client.HTTPException) as e:
            raise _NoAnswer(f"{self.base_url}: {_os_reason(e)}", False) from None
        finally:
            connection.close()


def _os_reason(error: BaseException) -> str:
    if isinstance(error, http.client.RemoteDisconnected):
        return "the connection closed without an answer"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower() if error.strerror[:1].isupper() else error.strerror
    return str(error) or error.__class__.__name__
