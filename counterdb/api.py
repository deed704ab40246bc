"""
The HTTP API: a Klein resource tree over a :class:`Node` and its :class:`Cluster`.

Counter values are plain-text decimal integers; every error is JSON
``{"error": "..."}`` with a 4xx status saying what was wrong, or 500 for
the unexpected (logged with the request it came from).

Every answer of a private route states the protocol version it is written
in (``Counterdb-Protocol``): the request's, which must be one this node
speaks (no header: version 1, a release before 0.2.0).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from typing import Any

import attrs
from klein import Klein
from klein.resource import KleinResource
from twisted.internet.defer import CancelledError, Deferred, FirstError, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from counterdb.actors import ConfigError
from counterdb.auth import Secrets
from counterdb.consistent import ConsistencyTimeout, ConsistentReads, TooManyReads
from counterdb.crdt import (
    MAX_COUNT,
    MAX_NAME_BYTES,
    InvalidState,
    is_replica_id,
    validate_counters,
    validate_name,
    validate_partials,
)
from counterdb.membership import NO_VERSION, Members, read_config
from counterdb.node import Acknowledged, KeyReused, Node, Overflow, StoreUnavailable, TableFull
from counterdb.observe import Metrics
from counterdb.ratelimit import RateLimitedLog
from counterdb.replication import PeerLink, Replication
from counterdb.wire import (
    DUPLICATED_REPLICA,
    MAX_BODY_BYTES,
    MAX_PAGE_BYTES,
    PROTOCOL_HEADER,
    PROTOCOL_MEMBER,
    PROTOCOL_VERSION,
    REPLICA_HEADER,
    SAME_REPLICA,
    BadJSON,
    IncompatibleProtocol,
    accepted_protocols,
    decode_json,
    read_protocol,
)

#: Largest ?timeout= a consistent read accepts, in seconds.
MAX_READ_TIMEOUT = 24 * 3600.0
#: Longest Idempotency-Key accepted.
MAX_IDEMPOTENCY_KEY = 255
#: Largest number of counters one GET /sync answer may be asked for: a page
#: of this many (or 1 MiB of JSON) costs about 10 ms of one reactor turn.
MAX_SYNC_LIMIT = 5_000
#: Most counters one POST /sync may carry (a node's pushes stay far below:
#: they are capped at 512 KiB).
MAX_SYNC_COUNTERS = 10_000


class ClientError(Exception):
    """A request we refuse, with the status and message to answer."""

    def __init__(self, code: int, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details  # more members of the JSON answer


@attrs.frozen
class Access:
    """Who may call what. Without secrets, everyone may call everything."""

    cluster: Secrets | None = None  # the private API: nodes and operators
    api: Secrets | None = None  # the public counter API (the cluster secret works too)


Handler = Callable[..., Any]


def private(handler: Handler) -> Handler:
    """A route for nodes and operators: it needs the cluster secret."""

    @functools.wraps(handler)
    def guarded(self: CounterAPI, request: IRequest, *args: Any, **kwargs: Any) -> Any:
        request.setHeader(_PROTOCOL_KEY, _OUR_PROTOCOL)  # refusals state ours, too
        self._check_access(request, self.access.cluster, None, "the cluster secret")
        self._check_protocol(request)
        return handler(self, request, *args, **kwargs)

    guarded.access = "private"  # type: ignore[attr-defined]
    return guarded


def public(handler: Handler) -> Handler:
    """A route for clients: it needs the API token, if the node has one."""

    @functools.wraps(handler)
    def guarded(self: CounterAPI, request: IRequest, *args: Any, **kwargs: Any) -> Any:
        self._check_access(request, self.access.api, self.access.cluster, "an API token")
        return handler(self, request, *args, **kwargs)

    guarded.access = "public"  # type: ignore[attr-defined]
    return guarded


class CounterAPI:
    """The HTTP API. Every route is declared :func:`private` or :func:`public`."""

    app = Klein()
    # "/counter/c//value" is not "/counter/c/value": no redirects, a 404.
    app.url_map.merge_slashes = False
    log = Logger()

    def __init__(
        self,
        node: Node,
        members: Members,
        replication: Replication,
        reads: ConsistentReads,
        access: Access = Access(),
        metrics: Metrics | None = None,
    ) -> None:
        self.access = access
        self.metrics = metrics
        self._refusals = RateLimitedLog(node.clock, 60.0, self.log)
        #: Peer requests refused for their protocol version (``GET /status``, metrics).
        self.protocol_refusals = 0
        self.node = node
        self.members = members
        self.replication = replication
        self.reads = reads

    def resource(self) -> IResource:
        return _Router(self.app.resource(), self)

    def render_direct(self, request: IRequest, handler: Handler, name: str) -> object:
        """Run one of :data:`_DIRECT_ROUTES`' handlers the way Klein would
        (same access check, same error answers, cancelled if the client
        goes away), minus the URL matching, and answer with a
        ``Content-Length`` instead of chunks."""
        try:
            result = handler(self, request, name)
        except Exception:
            return self.error(request, Failure())
        if not isinstance(result, Deferred):
            return result
        request.notifyFinish().addErrback(lambda _: result.cancel())
        # One (callback, errback) pair: a Deferred costs per entry, and this
        # runs for nearly every request.
        result.addCallbacks(_write_whole, self._write_error, callbackArgs=(request,), errbackArgs=(request,))
        result.addErrback(lambda f: self.log.failure("could not write an answer", f))
        return NOT_DONE_YET

    def _write_error(self, failure: Failure, request: IRequest) -> None:
        if not _gone(request):  # else the client left, and nobody is there to answer
            _write_whole(self.error(request, failure), request)

    # -- cluster configuration ----------------------------------------------

    @app.route("/config", methods=["POST"])
    @private
    def post_config(self, request: IRequest) -> Deferred[bytes]:
        body = _read_json(request)
        if not isinstance(body, dict) or "actors" not in body:
            raise ClientError(400, 'expected a JSON object like {"actors": ["10.0.0.1", "10.0.0.2:8080"]}')
        if "version" not in body:  # an operator's list: the next version
            d = self.members.configure(body["actors"])
        else:  # a list spread by a peer: kept if newer
            version, actors = read_config(body)
            if version == NO_VERSION:
                raise ClientError(400, 'version must be [number, "replica id"], as GET /config shows it')
            d = self.members.adopt(actors, version)
        d.addCallback(lambda _: _json(request, self._config_answer()))
        d.addErrback(_config_error)
        return d

    def _config_answer(self) -> dict[str, Any]:
        membership = self.members.current
        if membership is not None:
            return membership.as_json()
        return {"index": 0, "self": None, "actors": [], "version": list(self.members.version)}

    @app.route("/config", methods=["GET"])
    @private
    def get_config(self, request: IRequest) -> bytes:
        info = self._config_answer()
        info["replica"] = self.node.replica_id
        return _json(request, info)

    @app.route("/status", methods=["GET"])
    @private
    def status(self, request: IRequest) -> bytes:
        """This node's view: identity, size, running totals, and each peer."""
        membership = self.members.current
        return _json(
            request,
            {
                "replica": self.node.replica_id,
                "epoch": self.node.epoch,
                "actors": membership.as_json()["actors"] if membership else [],
                "version": list(self.members.version),
                "removed": self.members.removed_by is not None,
                "counters": len(self.node.table),
                "store_bytes": self.node.store.size_bytes(),
                "store_problem": self.node.store.write_problem(),
                "writer_restarts": self.node.store.writer_restarts,
                **self._replica_census(),
                "stats": attrs.asdict(self.node.stats),
                "protocol": self._protocol_status(),
                "peers": {url: _link_status(link) for url, link in self.replication.links.items()},
            },
        )

    # -- counters ------------------------------------------------------------

    @app.route("/counter/<name>", methods=["POST"])
    @public
    def increment(self, request: IRequest, name: str) -> Deferred[bytes]:
        name = _counter_name(name)
        self._refuse_if_removed()
        key = _idempotency_key(request)
        amount = _parse_amount(_read_body(request))
        if amount > MAX_COUNT:
            raise ClientError(400, f"the increment must be at most {MAX_COUNT}")
        return self._answer_increment(self.node.increment(name, amount, key), _acknowledge, request)

    @app.route("/counters", methods=["POST"])
    @public
    def increment_many(self, request: IRequest) -> Deferred[bytes]:
        """Several increments in one durable commit and one push: all are
        counted or none is."""
        self._refuse_if_removed()
        key = _idempotency_key(request)
        amounts = _bulk_increments(_read_json(request))
        return self._answer_increment(self.node.increment_many(amounts, key), _acknowledge_many, request)

    def _refuse_if_removed(self) -> None:
        if self.members.removed_by is not None:
            raise ClientError(
                503, "this node was removed from the cluster: it takes no increments; send them to a member"
            )

    def _answer_increment(
        self, d: Deferred[Acknowledged], answer: Callable[[Acknowledged, IRequest], bytes], request: IRequest
    ) -> Deferred[bytes]:
        if self.metrics is not None:
            self.metrics.track_increment(d)
        d.addCallbacks(answer, _increment_error, callbackArgs=(request,))
        return d

    @app.route("/counters", methods=["GET"])
    @public
    def values(self, request: IRequest) -> Deferred[bytes] | bytes:
        """Several counters' values: local, or consistent with ``consistent=1``."""
        names = _names_arg(request)
        if _arg(request, b"consistent") not in (None, b"0", b"1"):
            raise ClientError(400, "consistent must be 0 or 1")
        if _arg(request, b"consistent") != b"1":
            return _json(request, {"values": {name: self.node.value(name) for name in names}})
        reason = self.members.not_consistent_because()
        if reason is not None:
            raise ClientError(503, reason)
        timeout = _timeout_arg(request)
        reads = [self.reads.value(name, timeout) for name in names]
        d = gatherResults(reads, consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure if f.check(FirstError) else f)
        d.addCallback(lambda totals: _json(request, {"values": dict(zip(names, totals))}))
        d.addErrback(_read_timeout, request)
        return d

    @app.route("/counter/<name>/value", methods=["GET"])
    @public
    def value(self, request: IRequest, name: str) -> bytes:
        return _text(request, self.node.value(_counter_name(name)))

    @app.route("/counter/<name>/consistent_value", methods=["GET"])
    @public
    def consistent_value(self, request: IRequest, name: str) -> Deferred[bytes]:
        name = _counter_name(name)
        timeout = _timeout_arg(request)
        reason = self.members.not_consistent_because()
        if reason is not None:
            raise ClientError(503, reason)
        d = self.reads.value(name, timeout)
        if self.metrics is not None:
            self.metrics.track_consistent_read(d)
        d.addCallback(lambda total: _text(request, total))
        d.addErrback(_read_timeout, request)
        return d

    @app.route("/counter/<name>/getsync", methods=["GET"])
    @private
    def getsync(self, request: IRequest, name: str) -> bytes:
        name = _counter_name(name)
        self._refuse_own_replica(request)
        return self._counter_state(request, name)

    @app.route("/counter/<name>/setsync", methods=["POST"])
    @private
    def setsync(self, request: IRequest, name: str) -> bytes:
        name = _counter_name(name)
        self._refuse_own_replica(request)
        body = _read_json(request)
        if not isinstance(body, dict) or "partials" not in body:
            raise ClientError(400, 'expected a JSON object like {"partials": {"<replica id>": 5}}')
        if body.get("name", name) != name:
            raise ClientError(400, f"state is for counter {body['name']!r}, not {name!r}")
        try:
            partials = validate_partials(body["partials"])
        except InvalidState as e:
            raise ClientError(400, str(e)) from None
        self.node.merge({name: partials}, all_or_nothing=True)
        return self._counter_state(request, name)

    def _counter_state(self, request: IRequest, name: str) -> bytes:
        state = {"name": name, "replica": self.node.replica_id, "partials": self.node.partials(name)}
        return _json(request, state)

    # -- node-level sync (extension: what polls and pushes use) --------------

    @app.route("/sync", methods=["GET"])
    @private
    def get_changes(self, request: IRequest) -> bytes:
        peer = self._refuse_own_replica(request)
        since = _int_arg(request, b"since", 0, 0, 2**63)
        limit = _int_arg(request, b"limit", MAX_SYNC_LIMIT, 1, MAX_SYNC_LIMIT)
        epoch = _str_arg(request, b"epoch")
        answer = self.node.changes_since(since, epoch, limit, MAX_PAGE_BYTES, peer)
        membership = self.members.current
        answer["config"] = membership.config() if membership else None
        return _json(request, answer)

    @app.route("/sync", methods=["POST"])
    @private
    def post_changes(self, request: IRequest) -> bytes:
        peer = self._refuse_own_replica(request)
        body = _read_json(request)
        if not isinstance(body, dict) or "counters" not in body:
            raise ClientError(400, 'expected a JSON object like {"counters": {"<name>": {"<replica id>": 5}}}')
        if isinstance(body["counters"], dict) and len(body["counters"]) > MAX_SYNC_COUNTERS:
            raise ClientError(413, f"a push may carry at most {MAX_SYNC_COUNTERS} counters")
        try:
            counters = validate_counters(body["counters"])
        except InvalidState as e:
            raise ClientError(400, str(e)) from None
        grown = self.node.merge(counters, all_or_nothing=True, source=peer)
        return _json(request, {"replica": self.node.replica_id, "merged": sum(len(p) for p in grown.values())})

    def _replica_census(self) -> dict[str, int]:
        """Replica ids with a partial here; those of no current node are
        retired (wiped, restored or renewed data dirs), kept for good."""
        known = self.node.table.replica_ids()
        live = {self.node.replica_id} | {link.replica for link in self.replication.links.values() if link.replica}
        return {"replica_ids": len(known), "retired_replica_ids": len(known - live)}

    def _check_access(self, request: IRequest, needed: Secrets | None, also: Secrets | None, what: str) -> None:
        if needed is None:
            return
        authorization = request.getHeader(b"authorization")
        if needed.accepts(authorization) or (also is not None and also.accepts(authorization)):
            return
        method, path = request.method.decode("latin-1"), request.path.decode("latin-1")[:200]
        self._refusals.event("unauthorized", f"{method} {path} without {what} or with a wrong one", _client_of(request))
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="counterdb"')
        raise ClientError(401, f"this endpoint needs {what}: send Authorization: Bearer <secret>")

    def _check_protocol(self, request: IRequest) -> None:
        """Refuse (400, before anything is read or changed) a request in a
        protocol version this node does not speak; else answer in the
        request's version, and say so. 400, not 409 or 5xx: every release
        takes a 4xx from a peer as "up, but refuses this", and neither
        retries it nor marks a replica conflict (docs/design.md)."""
        try:
            version = read_protocol(request.requestHeaders.getRawHeaders(_PROTOCOL_KEY), "the request")
        except IncompatibleProtocol as e:
            self.protocol_refusals += 1
            if self.metrics is not None:
                self.metrics.protocol_refusals.inc()
            self._refusals.event("protocol version", str(e), _client_of(request))
            refusal = {"stated": e.stated, "accepted": accepted_protocols(), "version": PROTOCOL_VERSION}
            raise ClientError(400, str(e), **{PROTOCOL_MEMBER: refusal}) from None
        if version != PROTOCOL_VERSION:
            request.setHeader(_PROTOCOL_KEY, str(version).encode("ascii"))

    def _protocol_status(self) -> dict[str, Any]:
        refused = self.protocol_refusals
        return {"version": PROTOCOL_VERSION, "accepted": accepted_protocols(), "refused_requests": refused}

    def _refuse_own_replica(self, request: IRequest) -> str | None:
        """A peer that sends this node's own replica id (or one this node
        gave up for that reason) runs on a copy of this node's data dir:
        exchanging state with it would let the max-merge hide one copy's
        increments behind the other's. Refused (409), with a ``conflict``
        that tells the sender to go on under a new replica id. Else the
        sender's replica id, if it sent one."""
        raw = request.getHeader(REPLICA_HEADER.lower().encode("ascii"))
        if raw is None:
            return None
        if self.members.current is None:
            self.members.wanted = True  # a peer syncs with us: we belong to a cluster we do not know
        sender = raw.decode("ascii", "replace")
        if not is_replica_id(sender):
            raise ClientError(400, f"{REPLICA_HEADER} must be a replica id (1 to 128 of A-Z a-z 0-9 _ . -)")
        if sender == self.node.replica_id or sender in self.node.shared_ids:
            self._log_shared_replica(request, sender)
            raise ClientError(
                409,
                f"replica id {sender} is (or was) this node's own: one of the two nodes was started from a copy "
                "of the other's data dir; the sender must go on under a new replica id",
                conflict=SAME_REPLICA,
            )
        if sender in self.replication.conflicted_replicas():
            raise ClientError(
                409,
                f"replica id {sender} answers from two places; this node takes data from neither",
                conflict=DUPLICATED_REPLICA,
            )
        return sender

    def _log_shared_replica(self, request: IRequest, replica: str) -> None:
        self._refusals.event(
            "shared replica id",
            f"sync that sends replica id {replica}, which is (or was) this node's own: one of the two was started "
            "from a copy of the other's data dir (see docs/operations.md)",
            _client_of(request),
        )

    # -- errors --------------------------------------------------------------

    @app.handle_errors(Exception)
    def error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        if isinstance(error, (TableFull, TooManyReads)):
            return error_body(request, 507 if isinstance(error, TableFull) else 503, str(error))
        if isinstance(error, ClientError):
            return error_body(request, error.code, error.message, **error.details)
        if isinstance(error, NotFound):
            return error_body(request, 404, f"no such resource: {request.path.decode('latin-1')}")
        if isinstance(error, MethodNotAllowed):
            allowed = ", ".join(error.valid_methods or [])
            request.setHeader(b"Allow", allowed.encode("ascii"))
            return error_body(
                request, 405, f"method {request.method.decode('latin-1')} not allowed here; use {allowed}"
            )
        if isinstance(error, HTTPException):
            if error.code is None or error.code < 400:  # e.g. a werkzeug redirect: there is no other path
                return error_body(request, 404, f"no such resource: {request.path.decode('latin-1')}")
            return error_body(request, error.code, error.description or "bad request")
        self.log.failure(
            "unexpected error answering {method} {path}",
            failure,
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
        )
        return error_body(request, 500, "internal error; the node logged the details")


def _link_status(link: PeerLink) -> dict[str, Any]:
    return {
        "entry": link.entry,
        "reachable": link.reachable,
        "replica": link.replica,
        "conflict": link.conflict,
        "protocol": link.client.peer_protocol,
        "incompatible": link.incompatible,
        "dirty": len(link.dirty),
        "last_success": link.last_success,
        "pushing_given_up": link.given_up,
        "stats": attrs.asdict(link.stats),
    }


def _client_of(request: IRequest) -> str:
    peer = request.getClientAddress()
    return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"


_PROTOCOL_KEY = PROTOCOL_HEADER.encode("ascii")
_OUR_PROTOCOL = str(PROTOCOL_VERSION).encode("ascii")

#: Reason phrases Twisted does not know.
_REASONS = {422: b"Unprocessable Content"}


#: A counter name that needs no percent-decoding: the direct routes take
#: only these, so they see exactly the names Klein would have matched.
_PLAIN_NAME = rb"([A-Za-z0-9._~-]{1,%d})" % MAX_NAME_BYTES

#: (method, path) -> handler for the routes almost every request takes.
#: They bypass Klein's URL matching and its chunked answers, which took
#: about a third of a node's CPU per increment (docs/design.md,
#: "The request path"); every other request, and these with any other
#: spelling, goes through Klein.
_DIRECT_ROUTES: list[tuple[bytes, re.Pattern[bytes], Handler]] = [
    (b"POST", re.compile(rb"/counter/" + _PLAIN_NAME), CounterAPI.increment),
    (b"GET", re.compile(rb"/counter/" + _PLAIN_NAME + rb"/value"), CounterAPI.value),
]


class _Router(Resource):
    """The API's root. Sends :data:`_DIRECT_ROUTES` straight to their
    handlers and everything else to Klein, after answering a path that is
    not UTF-8 with our JSON 400 (Klein would answer it with an HTML page
    before any of our handlers run)."""

    isLeaf = True

    def __init__(self, inner: KleinResource, api: CounterAPI) -> None:
        super().__init__()
        self.inner = inner
        self.api = api

    def render(self, request: IRequest) -> object:
        for method, pattern, handler in _DIRECT_ROUTES:
            if request.method == method and (match := pattern.fullmatch(request.path)):
                return self.api.render_direct(request, handler, match.group(1).decode("ascii"))
        try:
            b"/".join(request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            return error_body(request, 400, "the URL path is not valid UTF-8 once percent-decoded")
        return self.inner.render(request)


def _gone(request: IRequest) -> bool:
    return bool(request.finished or getattr(request, "_disconnected", False))


def _write_whole(body: bytes, request: IRequest) -> None:
    if _gone(request):
        return
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


def error_body(request: IRequest, code: int, message: str, **details: Any) -> bytes:
    request.setResponseCode(code, _REASONS.get(code))
    return _json(request, {"error": message, **details})


def _json(request: IRequest, obj: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(obj).encode("utf-8")


def _text(request: IRequest, number: int) -> bytes:
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return str(number).encode("ascii")


def _counter_name(name: str) -> str:
    try:
        return validate_name(name)
    except ValueError as e:
        raise ClientError(400, str(e)) from None


def _read_body(request: IRequest) -> bytes:
    length = request.getHeader(b"content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ClientError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    body = request.content.read(MAX_BODY_BYTES + 1) if request.content else b""
    if len(body) > MAX_BODY_BYTES:
        raise ClientError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    return body


def _read_json(request: IRequest) -> Any:
    try:
        return decode_json(_read_body(request))
    except BadJSON as e:
        raise ClientError(400, f"request body must be JSON: {e}") from None


#: A decimal amount: ASCII digits only (str.isdigit() also takes "²" and
#: other scripts' digits), and no more than MAX_COUNT has.
_DECIMAL = re.compile(rb"[0-9]{1,%d}" % len(str(MAX_COUNT)))


def _parse_amount(body: bytes) -> int:
    """Body of an increment: empty (+1), a decimal integer, or {"addValue": n}."""
    text = body.strip()
    if not text:
        return 1
    if _DECIMAL.fullmatch(text):
        return int(text)
    if text.isdigit() and text.isascii():
        raise ClientError(400, f"the increment must be at most {MAX_COUNT}")
    expected = 'expected an empty body, a non-negative integer like 5, or {"addValue": 5}'
    try:
        decoded = decode_json(text)
    except BadJSON:
        raise ClientError(400, f"cannot read the increment: {expected}") from None
    if isinstance(decoded, dict) and set(decoded) == {"addValue"}:
        decoded = decoded["addValue"]
    if isinstance(decoded, bool) or not isinstance(decoded, int):
        raise ClientError(400, f"the increment must be a whole number: {expected}")
    if decoded < 0:
        raise ClientError(400, "the increment must not be negative: counters only grow")
    return decoded


def _arg(request: IRequest, key: bytes) -> bytes | None:
    values = (request.args or {}).get(key)
    return values[0] if values else None


def _str_arg(request: IRequest, key: bytes) -> str | None:
    raw = _arg(request, key)
    return raw.decode("utf-8", "replace") if raw is not None else None


def _int_arg(request: IRequest, key: bytes, default: int, low: int, high: int) -> int:
    raw = _arg(request, key)
    if raw is None:
        return default
    # ASCII digits, and no more of them than ``high`` has: int() of a
    # longer string could raise (past 4,300 digits) or cost time.
    if not _DECIMAL_ARG.fullmatch(raw) or len(raw) > len(str(high)) or not low <= int(raw) <= high:
        raise ClientError(400, f"{key.decode()} must be an integer from {low} to {high}")
    return int(raw)


_DECIMAL_ARG = re.compile(rb"[0-9]+")


def _timeout_arg(request: IRequest) -> float | None:
    raw = _arg(request, b"timeout")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_READ_TIMEOUT:  # also rejects nan and inf
        raise ClientError(400, f"timeout must be a number of seconds above 0 and at most {MAX_READ_TIMEOUT:g}")
    return seconds


def _config_error(failure: Failure) -> None:
    if failure.check(StoreUnavailable):
        raise ClientError(503, str(failure.value))
    failure.trap(ConfigError)
    raise ClientError(400, str(failure.value))


def _idempotency_key(request: IRequest) -> str | None:
    values = request.requestHeaders.getRawHeaders(b"idempotency-key")
    if not values:
        return None
    if len(values) > 1:
        raise ClientError(400, "send one Idempotency-Key header, not several: a request is one increment")
    key = values[0].strip()
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not all(0x21 <= b <= 0x7E for b in key):
        raise ClientError(
            400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters, e.g. a UUID"
        )
    return key.decode("ascii")


#: Most counters one POST /counters or GET /counters names.
MAX_BULK = 1000


def _bulk_increments(body: Any) -> dict[str, int]:
    expected = 'expected a JSON object like {"increments": {"<counter name>": 5, ...}}'
    if not isinstance(body, dict) or not isinstance(body.get("increments"), dict):
        raise ClientError(400, expected)
    increments = body["increments"]
    if not 1 <= len(increments) <= MAX_BULK:
        raise ClientError(400, f"a bulk increment names 1 to {MAX_BULK} counters, got {len(increments)}")
    for name, amount in increments.items():
        _counter_name(name)
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= MAX_COUNT:
            raise ClientError(400, f"the increment of {name!r} must be a whole number from 0 to {MAX_COUNT}")
    return increments


def _names_arg(request: IRequest) -> list[str]:
    raw = (request.args or {}).get(b"name", [])
    if not 1 <= len(raw) <= MAX_BULK:
        raise ClientError(400, f"name 1 to {MAX_BULK} counters: ?name=a&name=b")
    try:
        names = [_counter_name(value.decode("utf-8")) for value in raw]
    except UnicodeDecodeError:
        raise ClientError(400, "counter names must be UTF-8") from None
    return list(dict.fromkeys(names))


def _acknowledge_many(ack: Acknowledged, request: IRequest) -> bytes:
    if ack.replayed:
        request.setHeader(b"Idempotent-Replayed", b"true")
    return _json(request, {"values": ack.values})


def _acknowledge(ack: Acknowledged, request: IRequest) -> bytes:
    if ack.replayed:
        request.setHeader(b"Idempotent-Replayed", b"true")
    return _text(request, ack.value)


def _increment_error(failure: Failure) -> None:
    if failure.check(Overflow):
        raise ClientError(400, str(failure.value))
    if failure.check(KeyReused):
        raise ClientError(422, str(failure.value))  # Unprocessable Content
    if failure.check(StoreUnavailable):
        raise ClientError(503, str(failure.value))
    failure.raiseException()


def _read_timeout(failure: Failure, request: IRequest) -> bytes:
    if failure.check(CancelledError):  # the node is stopping (or the client left)
        raise ClientError(503, "the node is shutting down; ask another node")
    failure.trap(ConsistencyTimeout)
    error = failure.value
    request.setResponseCode(504)
    return _json(
        request,
        {
            "error": f"not every host answered in time: no answer from {', '.join(error.missing)}",
            "missing": error.missing,
            "best_value": error.value,
        },
    )
