"""
Service wiring: one counterdb node as a tree of Twisted services, each
opening what it owns in ``startService`` and releasing it in a
``stopService`` that returns a Deferred.

- :class:`StoreService` opens the data dir (lock, integrity check, writer
  thread) and loads the :class:`~counterdb.node.Node`. twistd calls
  ``startService`` after it has forked into the background and dropped
  privileges (``--uid/--gid``), so the thread, the lock's pid and every file
  belong to the daemon.
- :class:`ListeningService`, the stock ``StreamServerEndpointService``, binds
  in ``privilegedStartService`` (so ``--port 80 --uid nobody`` works) and
  hands the bound address on through a Deferred.
- :class:`SyncService` waits for both, then runs membership, replication
  and consistent reads; stopping it cancels every peer request.

Until the node is loaded the site answers 503; in practice twistd starts
every service before the reactor serves the first request.
"""

from __future__ import annotations

import gc
import ipaddress
from collections.abc import Callable
from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.resource import Resource

from counterdb.actors import Actor, ConfigError
from counterdb.api import Access, CounterAPI, error_body
from counterdb.consistent import ConsistentReads
from counterdb.http_limits import GuardedSite
from counterdb.join import join
from counterdb.membership import Identity, Members
from counterdb.node import Node
from counterdb.observe import Metrics, Readiness, observed_root, quiet_path
from counterdb.peer_client import PeerClient
from counterdb.replication import Replication, SyncSettings
from counterdb.store import SqliteStore, Store, StoreError, StoreSettings
from counterdb.tls import TLSConfig

log = Logger()

# One log line per pooled peer connection drowns the useful lines.
_HTTP11ClientFactory.noisy = False


@attrs.frozen
class ServiceConfig:
    endpoint: str = "tcp:8080"
    data_dir: str = "./counterdb-data"
    advertise: Actor | None = None
    actors: list[str] | None = None
    sync: SyncSettings = SyncSettings()
    store: StoreSettings = StoreSettings()
    access: Access = Access()
    tls: TLSConfig | None = None
    max_counters: int | None = None
    access_log: bool = False  # --access-log: a line per client request
    join: Actor | None = None  # --join: a member to join through, when this node has no list


class StartFailed(SystemExit, Exception):
    """The node cannot start; the message says why, in one line.

    Both a ``SystemExit`` and an ``Exception``, because twistd treats them
    differently and each mode needs one: in the foreground (``-n``) an
    uncaught ``SystemExit`` prints just the message and exits 1, while a
    daemonizing twistd reports only an ``Exception`` to the parent waiting
    on its status pipe (which then exits 1 instead of waiting forever).
    """

    def __init__(self, message: str) -> None:
        log.critical("{message}", message=message)
        super().__init__(message)


class _Waiters:
    """Deferreds waiting for one result that comes once."""

    def __init__(self) -> None:
        self._waiting: list[Deferred[Any]] = []
        self._result: list[Any] = []

    def when(self) -> Deferred[Any]:
        if self._result:
            return succeed(self._result[0])
        d: Deferred[Any] = Deferred()
        self._waiting.append(d)
        return d

    def fire(self, result: Any) -> None:
        self._result = [result]
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(result)


def _raise_now(d: Deferred[Any]) -> None:
    """Raise the failure of an already-fired Deferred synchronously, so
    that twistd (which calls startService before the reactor runs) exits
    with the reason instead of serving a half-started node."""
    failures: list[Failure] = []
    d.addErrback(failures.append)
    if failures:
        failures[0].raiseException()


class StoreService(Service):
    """Owns the data dir and the node loaded from it."""

    def __init__(self, open_store: Callable[[], Store], clock: Any, max_counters: int | None = None) -> None:
        self._open_store = open_store
        self.clock = clock
        self.max_counters = max_counters
        self.store: Store | None = None
        self.node: Node | None = None
        self._ready = _Waiters()

    def when_ready(self) -> Deferred[Node]:
        return self._ready.when()

    def startService(self) -> None:
        super().startService()
        self.store = self._open_store()
        try:
            self.node = Node(self.store, self.clock, max_counters=self.max_counters)
        except BaseException:
            self.store.close()
            raise
        # The loaded table is long-lived: keep the collector from scanning it
        # on every full collection (about 140 ms per million counters).
        gc.freeze()
        self._ready.fire(self.node)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.node is None or self.store is None:
            return succeed(None)
        store = self.store
        d = self.node.stop()  # answer every queued increment first
        d.addCallback(lambda _: store.shutdown())
        return d

    def close_now(self) -> None:
        """Release the data dir at once (a start that failed: no reactor runs)."""
        if self.store is not None:
            self.store.close()


class ListeningService(StreamServerEndpointService):
    """The stock endpoint service, failing loudly and telling who waits
    for it which address it got."""

    _raiseSynchronously = True

    def __init__(self, description: str, reactor: Any, factory: Factory) -> None:
        super().__init__(serverFromString(reactor, description), factory)
        self.description = description
        self.port: IListeningPort | None = None
        self._listening = _Waiters()

    def when_listening(self) -> Deferred[IAddress]:
        return self._listening.when()

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            # Exiting now, with the reason, beats running a node nobody can reach.
            raise StartFailed(f"counterdb: cannot listen on {self.description}: {e}") from None
        self._waitingForPort.addCallback(self._bound)

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        log.info("counterdb listening on {host}:{port}", host=address.host, port=address.port)
        self._listening.fire(address)
        return port

    def stopService(self) -> Deferred[None]:
        d = super().stopService()
        d.addBoth(lambda result: (setattr(self, "port", None), result)[1])
        return d


@attrs.define
class Syncing:
    """The running sync parts of one node."""

    members: Members
    replication: Replication
    reads: ConsistentReads


class SyncService(Service):
    """Membership, replication and consistent reads, once the node is
    loaded and its address known."""

    def __init__(
        self,
        config: ServiceConfig,
        reactor: Any,
        node_ready: Callable[[], Deferred[Node]],
        listening: Callable[[], Deferred[IAddress]],
    ) -> None:
        self.config = config
        self.reactor = reactor
        self._node_ready = node_ready
        self._listening = listening
        self.parts: Syncing | None = None
        self._joining: Deferred[Any] | None = None
        self._started = _Waiters()
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        # Peers close idle connections after their 10 s header deadline:
        # drop ours before that, so a push never goes out on a closing one.
        self.pool.cachedConnectionTimeout = 8

    def when_started(self) -> Deferred[Syncing]:
        return self._started.when()

    def startService(self) -> None:
        super().startService()
        d = gatherResults([self._node_ready(), self._listening()], consumeErrors=True)
        d.addCallback(lambda results: self._start(*results))
        _raise_now(d)

    def _start(self, node: Node, address: IAddress) -> None:
        tls = self.config.tls
        agent = Agent(
            self.reactor,
            contextFactory=tls.peer_policy() if tls else BrowserLikePolicyForHTTPS(),
            pool=self.pool,
            connectTimeout=self.config.sync.peer_timeout,
        )
        http = HTTPClient(agent)
        identity = Identity(
            listen_port=address.port,  # type: ignore[attr-defined]
            interface=getattr(address, "host", None),
            advertise=self.config.advertise,
        )
        members = Members(node, identity, run_blocking=deferToThread)
        secret = self.config.access.cluster
        replication = Replication(
            node,
            http,
            self.reactor,
            self.config.sync,
            authorization=secret.header if secret else None,
            scheme="https" if tls else "http",
        )
        _warn_if_open(address, self.config.access)
        members.on_change(lambda membership: replication.follow(membership, identity.listen_port))
        replication.hears_config = lambda link, config: members.heard(config, link.send_config)
        self._configure_at_start(members, node)
        replication.start()
        self.parts = Syncing(members, replication, ConsistentReads(node, replication, self.reactor))
        if self.config.join is not None and members.current is None:
            self._joining = self._join(members, replication, identity)
        self._started.fire(self.parts)

    def _join(self, members: Members, replication: Replication, identity: Identity) -> Deferred[Any]:
        own = _own_entry(identity)
        url = self.config.join.base_url(identity.listen_port, replication.scheme)  # type: ignore[union-attr]
        member = PeerClient(
            replication.http,
            url,
            self.reactor,
            self.config.sync.peer_timeout,
            1,
            lambda: replication.node.replica_id,
            replication.authorization,
        )
        d = Deferred.fromCoroutine(join(members, member, own, self.reactor, self.config.sync))
        d.addErrback(lambda f: f.trap(CancelledError))
        return d

    def _configure_at_start(self, members: Members, node: Node) -> None:
        entries = self.config.actors or node.stored_actors
        if not entries:
            log.info("not configured: a one-node cluster until POST /config")
            return
        try:
            members.configure_at_start(entries, persist=bool(self.config.actors))
        except ConfigError as e:
            if self.config.actors:
                raise StartFailed(f"counterdb: --actors: {e}") from None
            log.error("the stored actors list no longer fits this node ({error}); waiting for POST /config", error=e)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        stopping = [self.pool.closeCachedConnections()]
        if self._joining is not None:
            self._joining.cancel()
        if self.parts is not None:
            stopping = [self.parts.reads.stop(), self.parts.replication.stop(), *stopping]
        return DeferredList(stopping)


class CounterDBSite(GuardedSite):
    """The node's Site. Its access log is off unless asked for: a line per
    increment cost about a third of a busy node's throughput
    (docs/benchmarks.md); when on, it leaves out node-to-node sync
    (``/sync``, every poll interval per peer) and probes, so the log shows
    what clients did. Request bodies are never parsed as forms: every
    endpoint reads JSON or a number, and a malformed multipart body must
    get our JSON 400."""

    def __init__(self, resource: Resource, access_log: bool = False) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False)
        self.displayTracebacks = False
        self.access_log = access_log

    def log(self, request: object) -> None:
        if self.access_log and not quiet_path(getattr(request, "path", b"")):
            super().log(request)


class _Starting(Resource):
    """What the site serves until the node is loaded."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return error_body(request, 503, "the node is starting; try again in a moment")


class CounterDBService(MultiService):
    """One counterdb node: store, listener and sync, started in that order
    and stopped in the reverse one."""

    def __init__(self, config: ServiceConfig, reactor: Any, store: Store | None = None) -> None:
        super().__init__()
        self.config = config
        self.readiness = Readiness(join=config.join is not None)
        self.metrics = Metrics(
            readiness=self.readiness,
            replica_ids=lambda: len(self.storage.node.table.replica_ids()) if self.storage.node else 0,
        )
        self.root = observed_root(
            _Starting(), self.readiness, self.metrics, metrics_secrets=[config.access.api, config.access.cluster]
        )
        self.site = CounterDBSite(self.root, access_log=config.access_log)
        self.storage = StoreService(lambda: store or _open_store(config, reactor), reactor, config.max_counters)
        factory = config.tls.wrap(self.site) if config.tls else self.site
        self.web = ListeningService(config.endpoint, reactor, factory)
        self.sync = SyncService(config, reactor, self.storage.when_ready, self.web.when_listening)
        for service in (self.storage, self.web, self.sync):
            service.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except BaseException:
            self._abandon_start()
            raise

    def startService(self) -> None:
        try:
            super().startService()
        except BaseException:
            self._abandon_start()
            raise
        d = gatherResults([self.storage.when_ready(), self.sync.when_started()])
        d.addCallback(lambda results: self._serve(*results))

    def _abandon_start(self) -> None:
        # A start that fails must release the data dir and stop the store's
        # writer process, or the process would hang instead of exiting.
        self.storage.close_now()
        if self.web.port is not None:
            self.web.port.stopListening()

    def _serve(self, node: Node, parts: Syncing) -> None:
        api = CounterAPI(node, parts.members, parts.replication, parts.reads, self.config.access, self.metrics)
        self.root.inner = api.resource()
        node.commit_observers.append(self.metrics.observe_commit)
        self.metrics.attach(node, parts.replication, parts.reads)
        self.readiness.add_check(node.store.write_problem)
        self.readiness.serving(node, parts.members)

    def stopService(self) -> Deferred[Any]:
        self.readiness.draining()  # GET /ready answers 503 from now on
        return super().stopService()

    # Shortcuts for tests and tools.
    @property
    def node(self) -> Node | None:
        return self.storage.node

    @property
    def members(self) -> Members | None:
        return self.sync.parts.members if self.sync.parts else None

    @property
    def replication(self) -> Replication | None:
        return self.sync.parts.replication if self.sync.parts else None


def _own_entry(identity: Identity) -> str:
    """This node's entry for ``--join``: what it tells the cluster it is."""
    if identity.advertise is not None:
        return identity.advertise.entry
    host = identity.interface or ""
    if host in ("", "0.0.0.0", "::"):
        raise StartFailed("counterdb: --join needs --advertise (or --interface): which address is this node?")
    return f"[{host}]:{identity.listen_port}" if ":" in host else f"{host}:{identity.listen_port}"


def _warn_if_open(address: IAddress, access: Access) -> None:
    """Say it loudly when anyone on the network may rewrite this node."""
    host = getattr(address, "host", "")
    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if access.cluster is None and not loopback:
        log.warn(
            "WARNING: listening on {host} without --cluster-secret-file: anyone who can reach this port can "
            "reconfigure this node and raise its counters for good through the private API "
            "(see docs/security.md)",
            host=host or "every address",
        )


def _open_store(config: ServiceConfig, reactor: Any) -> SqliteStore:
    try:
        return SqliteStore(config.data_dir, reactor, config.store)
    except StoreError as e:
        # Refuse to start: never fall back to a store that forgets.
        raise StartFailed(f"counterdb: cannot use the data directory: {e}") from None
