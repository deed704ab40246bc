"""
Operating a node: health and readiness probes, Prometheus metrics, JSON logs.

- ``GET /health`` answers 200 ``{"status": "ok"}`` whenever the process
  serves HTTP at all (a liveness probe).
- ``GET /ready`` answers 200 ``{"status": "ready"}`` once the store is open
  and the configuration applied, and 503 ``{"error": "<reason>"}`` before
  that and from the moment a graceful stop begins (:class:`Readiness`).
- ``GET /metrics`` is the Prometheus text format of one node's
  :class:`Metrics`, each in its own ``CollectorRegistry``. Most values are
  read from the live node and replication objects at scrape time by a
  custom collector (no cost on the request path); the histograms are fed by
  hooks the node and the API call.
- ``GET /openapi.json`` is the API's OpenAPI document (:mod:`counterdb.openapi`).
- :func:`json_logger` is a ``twistd --logger`` factory that writes one JSON
  object per line per log event.

:func:`observed_root` puts these endpoints in front of the site's
resource, so they answer before the node is loaded too, and
:func:`quiet_path` tells the access log which paths to leave out.
"""

from __future__ import annotations

import bisect
import gzip
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any

from constantly import NamedConstant
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import ILogObserver, formatEvent
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from counterdb.openapi import document

if TYPE_CHECKING:
    from counterdb.auth import Secrets
    from counterdb.consistent import ConsistentReads
    from counterdb.membership import Members
    from counterdb.node import Node
    from counterdb.replication import PeerLink, Replication

#: Paths left out of the access log: node-to-node sync (every poll interval
#: per peer), and what monitoring calls every few seconds.
QUIET_PATHS = frozenset({b"/sync", b"/metrics", b"/health", b"/ready"})

#: Peers that get their own series in one scrape: bounds its time and size.
MAX_PEERS = 64


def quiet_path(path: bytes) -> bool:
    """Whether a request for ``path`` (``request.path``, no query string)
    stays out of the access log."""
    return path in QUIET_PATHS


# -- readiness -------------------------------------------------------------------


def ready_reasons(node: Node | None, members: Members | None, join: bool = False) -> list[str]:
    """Why this node should not get traffic yet; empty when it should.

    A node that has no actors list at all is ready, as a one-node cluster,
    unless it was started to join a cluster (``join``): then it waits for
    its list (``POST /config``). Unreachable peers do not make a node
    unready: it counts and serves what it holds without them."""
    if node is None:
        return ["the node is starting: the data dir is not open yet"]
    if members is None:
        return ["the node is starting: replication is not running yet"]
    if members.current is None:
        if node.stored_actors:
            return ["the stored actors list does not fit this node; waiting for POST /config"]
        if join:
            return ["waiting for the cluster's actors list (POST /config)"]
    return []


class Readiness:
    """What ``GET /ready`` answers: :meth:`reason` is ``None`` when ready.

    The service calls :meth:`serving` once the node runs and
    :meth:`draining` at the start of its ``stopService``; more conditions
    can be added with :meth:`add_check`."""

    def __init__(self, join: bool = False) -> None:
        self.join = join
        self.node: Node | None = None
        self.members: Members | None = None
        self._draining = False
        self._checks: list[Callable[[], str | None]] = []

    def serving(self, node: Node, members: Members | None) -> None:
        self.node = node
        self.members = members

    def draining(self) -> None:
        """A graceful stop began: answer 503 from now on, so load balancers
        stop sending requests while the queued ones are answered."""
        self._draining = True

    def add_check(self, check: Callable[[], str | None]) -> None:
        """Another condition: ``check()`` returns why the node is not ready, or None."""
        self._checks.append(check)

    def reasons(self) -> list[str]:
        if self._draining:
            return ["the node is shutting down"]
        reasons = ready_reasons(self.node, self.members, self.join)
        for check in self._checks:
            reason = check()
            if reason:
                reasons.append(reason)
        return reasons

    def reason(self) -> str | None:
        reasons = self.reasons()
        return "; ".join(reasons) if reasons else None


# -- metrics ---------------------------------------------------------------------

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
_READ_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)

#: Outcomes of a consistent read, the ``outcome`` label of ``counterdb_consistent_reads_total``.
READ_OUTCOMES = ("ok", "timeout", "rejected", "cancelled", "error")


class Metrics:
    """One node's metrics, in a registry of its own (several nodes in one
    process must not share the global one).

    Built before the node exists; :meth:`attach` hands it the running
    parts. The hooks (:meth:`observe_commit`, :meth:`track_increment`,
    :meth:`track_consistent_read`) are cheap and may be called from any
    thread; the collector reads the live objects and so must be collected
    from the reactor thread, as :meth:`resource` does."""

    def __init__(
        self,
        readiness: Readiness | None = None,
        replica_ids: Callable[[], int] | None = None,
        timer: Callable[[], float] = time.perf_counter,
        max_peers: int = MAX_PEERS,
    ) -> None:
        self.registry = CollectorRegistry()
        self.readiness = readiness
        self.replica_ids = replica_ids  # distinct replica ids in the table, if the table can tell cheaply
        self.timer = timer
        self.max_peers = max_peers
        self.node: Node | None = None
        self.replication: Replication | None = None
        self.reads: ConsistentReads | None = None
        r = self.registry
        self.increment_latency = ReactorHistogram(
            "counterdb_increment_latency_seconds",
            "Time from receiving an increment to its durable acknowledgement (replays included).",
            _LATENCY_BUCKETS,
        )
        r.register(self.increment_latency)
        self.replays = Counter(
            "counterdb_idempotent_replays",
            "Increments answered from an earlier request with the same Idempotency-Key, not counted again.",
            registry=r,
        )
        self.commit_batch = Histogram(
            "counterdb_commit_batch_size",
            "Increments made durable by one group commit.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "counterdb_commit_seconds",
            "Time one group commit took to be durable (the store's write and fsync).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.consistent_reads = Counter(
            "counterdb_consistent_reads",
            "Consistent reads by outcome: ok, timeout (its ?timeout= passed), rejected (too many waiting), "
            "cancelled (the client went away or the node stopped), error.",
            ["outcome"],
            registry=r,
        )
        for outcome in READ_OUTCOMES:
            self.consistent_reads.labels(outcome)
        self.consistent_read_seconds = Histogram(
            "counterdb_consistent_read_seconds",
            "Time a successful consistent read waited for every peer.",
            buckets=_READ_BUCKETS,
            registry=r,
        )
        self.protocol_refusals = Counter(
            "counterdb_protocol_refusals",
            "Peer requests this node refused because they state a protocol version it does not speak.",
            registry=r,
        )
        r.register(_LiveCollector(self))

    def attach(self, node: Node, replication: Replication | None = None, reads: ConsistentReads | None = None) -> None:
        """The running parts the collector reads at each scrape."""
        self.node = node
        self.replication = replication
        self.reads = reads

    # -- hooks -------------------------------------------------------------------

    def observe_commit(self, batch_size: int, seconds: float) -> None:
        """One durable group commit of ``batch_size`` increments that took ``seconds``."""
        self.commit_batch.observe(batch_size)
        self.commit_seconds.observe(seconds)

    def observe_increment(self, seconds: float, replayed: bool = False) -> None:
        """One acknowledged increment, ``seconds`` after it arrived."""
        self.increment_latency.observe(seconds)
        if replayed:
            self.replays.inc()

    def track_increment(self, d: Deferred[Any]) -> Deferred[Any]:
        """Time the Deferred of ``Node.increment`` until it is acknowledged;
        returns ``d`` with its result untouched."""
        return d.addCallback(self._increment_done, self.timer())

    def _increment_done(self, ack: Any, started: float) -> Any:
        self.observe_increment(self.timer() - started, bool(getattr(ack, "replayed", False)))
        return ack

    def observe_consistent_read(self, outcome: str, seconds: float | None = None) -> None:
        self.consistent_reads.labels(outcome).inc()
        if outcome == "ok" and seconds is not None:
            self.consistent_read_seconds.observe(seconds)

    def track_consistent_read(self, d: Deferred[Any]) -> Deferred[Any]:
        """Count the outcome of the Deferred of ``ConsistentReads.value``
        (and time it if it succeeds); returns ``d`` with its result untouched."""
        from counterdb.consistent import ConsistencyTimeout, TooManyReads

        started = self.timer()

        def ok(value: Any) -> Any:
            self.observe_consistent_read("ok", self.timer() - started)
            return value

        def failed(failure: Any) -> Any:
            if failure.check(ConsistencyTimeout):
                outcome = "timeout"
            elif failure.check(TooManyReads):
                outcome = "rejected"
            elif failure.check(CancelledError):
                outcome = "cancelled"
            else:
                outcome = "error"
            self.observe_consistent_read(outcome)
            return failure

        return d.addCallbacks(ok, failed)

    # -- exposition --------------------------------------------------------------

    def resource(self) -> IResource:
        """``GET /metrics``: rendered at once in the reactor thread."""
        return MetricsPage(self.registry)


class ReactorHistogram(Collector):
    """A histogram observed from the reactor thread only, so without the
    lock and the per-call bookkeeping of ``prometheus_client.Histogram``:
    it is observed once per increment, thousands of times a second."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = sorted(b for b in buckets if b != math.inf)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        cumulative = list(itertools.accumulate(self.counts))
        labels = [*(_bound(b) for b in self.bounds), "+Inf"]
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], list(zip(labels, cumulative)), sum_value=self.sum)
        yield family


def _bound(value: float) -> str:
    return repr(float(value))


class _LiveCollector(Collector):
    """Reads the node, its replication and its consistent reads at scrape
    time. Bounded: nothing here walks the counter table, and at most
    ``max_peers`` peers get series of their own."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        if m.readiness is not None:
            yield _gauge("counterdb_ready", "1 when GET /ready answers 200, else 0.", m.readiness.reason() is None)
        node = m.node
        if node is None:
            return
        yield from _node_metrics(node, m.replica_ids)
        if m.reads is not None:
            waiting = getattr(m.reads, "_reads", None)
            if waiting is not None:
                yield _gauge(
                    "counterdb_consistent_reads_waiting", "Consistent reads waiting for peers now.", len(waiting)
                )
        if m.replication is not None:
            yield from _peer_metrics(m.replication, m.max_peers)


def _gauge(name: str, documentation: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), float(value))
    return family


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _node_metrics(node: Node, replica_ids: Callable[[], int] | None) -> Iterator[Metric]:
    stats = node.stats
    yield _gauge(
        "counterdb_node_info", "Always 1; labels name this node's current replica id.", 1, {"replica": node.replica_id}
    )
    yield _counter(
        "counterdb_increments",
        "Increment requests accepted (replays of an Idempotency-Key excluded).",
        stats.increments,
    )
    yield _counter("counterdb_commits", "Durable group commits.", stats.commits)
    yield _counter(
        "counterdb_committed_increments", "Increments made durable by those commits.", stats.committed_increments
    )
    yield _counter(
        "counterdb_store_errors",
        "Group commits the store failed to make durable (their increments were refused).",
        stats.failed_commits,
    )
    yield _counter(
        "counterdb_store_writer_restarts",
        "Store writer processes that died and were replaced (their unanswered writes sent again).",
        node.store.writer_restarts,
    )
    yield _gauge("counterdb_counters", "Counters this node holds.", len(node.table))
    if replica_ids is not None:
        yield _gauge(
            "counterdb_replica_ids", "Distinct replica ids with a partial in this node's table.", replica_ids()
        )


_PEER_FAMILIES = (
    ("counterdb_peer_up", "gauge", "1 if the last exchange with the peer got an answer, 0 if not or none yet."),
    (
        "counterdb_peer_conflict",
        "gauge",
        "1 while this node refuses the peer's data (a replica id answering from two places).",
    ),
    (
        "counterdb_replication_lag_seconds",
        "gauge",
        "Seconds since the last successful exchange with the peer (absent before the first).",
    ),
    (
        "counterdb_peer_incompatible",
        "gauge",
        "1 while the peer and this node speak no common protocol version (nothing is exchanged).",
    ),
    ("counterdb_replication_pending_counters", "gauge", "Counters changed here and not yet pushed to the peer."),
    ("counterdb_pushes", "counter", "Pushes to the peer, by outcome: ok (answered 200) or failed (no answer)."),
    ("counterdb_push_bytes", "counter", "Bytes of the request bodies of the pushes answered 200."),
    ("counterdb_pushed_counters", "counter", "Counters carried by the pushes answered 200."),
    ("counterdb_polls", "counter", "Poll pages from the peer, by outcome: ok (answered) or failed (no answer)."),
    (
        "counterdb_peer_refusals",
        "counter",
        "Requests to the peer it answered with a 4xx (it is up but refuses that data).",
    ),
)


def _peer_metrics(replication: Replication, max_peers: int) -> Iterator[Metric]:
    links = list(itertools.islice(replication.links.values(), max_peers))
    yield _gauge("counterdb_peers", "Peers in this node's current membership.", len(replication.links))
    families: dict[str, Metric] = {}
    for name, kind, documentation in _PEER_FAMILIES:
        labels = ["peer", "outcome"] if name in ("counterdb_pushes", "counterdb_polls") else ["peer"]
        family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
        families[name] = family(name, documentation, labels=labels)
    for link in links:
        _add_peer(families, link)
    yield from families.values()


def _add_peer(families: dict[str, Any], link: PeerLink) -> None:
    peer, stats = link.entry, link.stats
    families["counterdb_peer_up"].add_metric([peer], 1.0 if link.reachable else 0.0)
    families["counterdb_peer_conflict"].add_metric([peer], 0.0 if link.conflict is None else 1.0)
    families["counterdb_peer_incompatible"].add_metric([peer], 0.0 if link.incompatible is None else 1.0)
    last_success = getattr(link, "last_success", None)
    if last_success is not None:
        families["counterdb_replication_lag_seconds"].add_metric([peer], max(0.0, link.clock.seconds() - last_success))
    families["counterdb_replication_pending_counters"].add_metric([peer], len(link.dirty))
    families["counterdb_pushes"].add_metric([peer, "ok"], stats.pushes)
    families["counterdb_pushes"].add_metric([peer, "failed"], stats.push_failures)
    families["counterdb_push_bytes"].add_metric([peer], stats.push_bytes)
    families["counterdb_pushed_counters"].add_metric([peer], stats.pushed_counters)
    families["counterdb_polls"].add_metric([peer, "ok"], stats.polls)
    families["counterdb_polls"].add_metric([peer, "failed"], stats.poll_failures)
    families["counterdb_peer_refusals"].add_metric([peer], stats.refused)


class MetricsPage(Resource):
    """Renders a registry in the reactor thread, in the format the scraper
    asks for (Prometheus text, or OpenMetrics), gzipped if it accepts it.

    Not ``prometheus_client.twisted.MetricsResource``: that runs the
    exposition in the reactor's thread pool, where the collector would read
    the node's dicts and sets while the reactor thread changes them."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return _not_allowed(request)
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else None)
        output = encoder(self.registry)
        accept_encoding = request.getHeader(b"accept-encoding")
        if accept_encoding and gzip_accepted(accept_encoding.decode("latin-1")):
            output = gzip.compress(output)
            request.setHeader(b"Content-Encoding", b"gzip")
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return output


# -- the three endpoints -----------------------------------------------------------


def _answer(request: IRequest, code: int, obj: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(obj).encode("utf-8") + b"\n"


def _not_allowed(request: IRequest) -> bytes:
    request.setHeader(b"Allow", b"GET, HEAD")
    method = request.method.decode("latin-1")
    return _answer(request, 405, {"error": f"method {method} not allowed here; use GET, HEAD"})


class _Probe(Resource):
    isLeaf = True

    def __init__(self, answer: Callable[[IRequest], bytes]) -> None:
        super().__init__()
        self._answer = answer

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return _not_allowed(request)
        return self._answer(request)


def _openapi(request: IRequest) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return document()


class _Guarded(Resource):
    """A resource that needs one of some secrets (``Authorization: Bearer``)."""

    isLeaf = True

    def __init__(self, inner: Resource, secrets: list[Secrets]) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = secrets

    def render(self, request: IRequest) -> Any:
        authorization = request.getHeader(b"authorization")
        if not any(s.accepts(authorization) for s in self.secrets):
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="counterdb"')
            message = "this endpoint needs a token: send Authorization: Bearer <secret>"
            return _answer(request, 401, {"error": message})
        return self.inner.render(request)


class ObservedRoot(Resource):
    """The site's root: ``/health``, ``/ready`` and ``/metrics`` here, every
    other path to ``inner`` (whose resource may change: :attr:`inner` is
    read at each request)."""

    def __init__(
        self,
        inner: IResource,
        readiness: Readiness,
        metrics: Metrics | None = None,
        metrics_secrets: Iterable[Secrets | None] = (),
    ) -> None:
        super().__init__()
        self.inner = inner
        self.readiness = readiness
        self.probes: dict[bytes, Resource] = {
            b"health": _Probe(lambda request: _answer(request, 200, {"status": "ok"})),
            b"ready": _Probe(self._ready),
            # Public like /health: it says what docs/api.md says, nothing secret,
            # and a client may need it before it has a token.
            b"openapi.json": _Probe(_openapi),
        }
        if metrics is not None:
            page: Resource = metrics.resource()  # type: ignore[assignment]
            secrets = [s for s in metrics_secrets if s is not None]
            self.probes[b"metrics"] = _Guarded(page, secrets) if secrets else page

    def _ready(self, request: IRequest) -> bytes:
        reason = self.readiness.reason()
        if reason is not None:
            return _answer(request, 503, {"error": reason})
        return _answer(request, 200, {"status": "ready"})

    def getChildWithDefault(self, path: bytes, request: IRequest) -> IResource:
        probe = self.probes.get(path)
        if probe is not None and request.postpath == [] and request.prepath == [path]:
            return probe
        # Give the segment back: the inner resource routes the whole path.
        request.postpath.insert(0, request.prepath.pop())
        return self.inner

    def render(self, request: IRequest) -> Any:  # "/" itself, which has no segment to give back
        return self.inner.render(request)


def observed_root(
    inner: IResource,
    readiness: Readiness,
    metrics: Metrics | None = None,
    metrics_secrets: Iterable[Secrets | None] = (),
) -> ObservedRoot:
    """``inner`` with the three endpoints in front. ``metrics_secrets``:
    if any is given, ``/metrics`` needs one of them."""
    return ObservedRoot(inner, readiness, metrics, metrics_secrets)


# -- JSON logs -------------------------------------------------------------------

#: Keys of legacy (``twisted.python.log``) events already said by the standard fields.
_LEGACY_KEYS = frozenset({"message", "isError", "time", "system", "format", "printed", "why", "failure"})
_MAX_TEXT = 2000
_MAX_ITEMS = 50


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as something JSON can hold, bounded in size."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value[:_MAX_TEXT]
    if isinstance(value, bytes):
        return value[:_MAX_TEXT].decode("utf-8", "replace")
    if isinstance(value, NamedConstant):
        return value.name
    if depth < 3 and isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, depth + 1) for v in itertools.islice(value, _MAX_ITEMS)]
    if depth < 3 and isinstance(value, dict):
        return {str(k)[:200]: _plain(v, depth + 1) for k, v in itertools.islice(value.items(), _MAX_ITEMS)}
    try:
        return repr(value)[:_MAX_TEXT]
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def event_as_record(event: dict[str, Any]) -> dict[str, Any]:
    """One log event as a flat JSON object: ``time`` (ISO 8601, UTC),
    ``level``, ``namespace``, ``system``, ``message`` (the formatted text),
    ``traceback`` when the event carries a failure, then the event's own
    fields (a field named like a standard one gets a ``_`` appended)."""
    when = event.get("log_time")
    if not isinstance(when, (int, float)):
        when = time.time()
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level.name if isinstance(level, NamedConstant) else ("error" if event.get("isError") else "info"),
        "namespace": _plain(event.get("log_namespace")),
        "system": _plain(event.get("log_system", event.get("system", "-"))),
        "message": formatEvent(event)[:100_000],
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = _plain(failure)
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS:
            continue
        record[key + "_" if key in record else key] = _plain(value)
    return record


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one line of JSON (ASCII, so any pipe takes it)."""

    def __init__(self, out: IO[Any]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            line = json.dumps(event_as_record(event), ensure_ascii=True, allow_nan=False)
        except Exception as e:  # never lose an event to a field that will not encode
            line = json.dumps({"level": "error", "message": f"unencodable log event: {e!r}"})
        self.out.write(line + "\n")
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            flush()


def _calling_app_logger() -> Any:
    """The twistd ``AppLogger`` that is calling a ``--logger`` factory: it
    calls it with no arguments, and only it knows ``--logfile`` and ``-n``."""
    from twisted.application.app import AppLogger

    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, AppLogger):
            return candidate
        frame = frame.f_back
    return None


def json_logger() -> ILogObserver:
    """A ``twistd --logger`` factory: ``twistd --logger counterdb.observe.json_logger counterdb ...``.

    Writes where twistd would have written its text log: to stdout with
    ``-n`` (unless ``--logfile`` names a file), else to ``--logfile``
    (default ``twistd.log``), which ``SIGUSR1`` rotates as with twistd's
    own logger."""
    app_logger = _calling_app_logger()
    filename = getattr(app_logger, "_logfilename", "") or ""
    nodaemon = bool(getattr(app_logger, "_nodaemon", True))  # twistd's non-Unix AppLogger: as with -n
    if filename == "-":
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return JSONLinesObserver(sys.stdout)
    if nodaemon and not filename:
        return JSONLinesObserver(sys.stdout)
    from twisted.python.logfile import LogFile

    log_file = LogFile.fromFullPath(filename or "twistd.log")
    _rotate_on_sigusr1(log_file)
    return JSONLinesObserver(log_file)


def _rotate_on_sigusr1(log_file: Any) -> None:
    import signal

    if signal.getsignal(signal.SIGUSR1):  # someone else handles it already
        return

    def rotate(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

    signal.signal(signal.SIGUSR1, rotate)
