"""
Service wiring: a ``MultiService`` of the HTTP listener and peer sync.

Kept thin on purpose: it builds the node, the cluster and the API from a
:class:`ServiceConfig` and starts/stops them in the right order.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

import attrs
from treq.client import HTTPClient
from twisted.application.service import MultiService, Service
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.server import Site

from counterdb.actors import Actor, ConfigError
from counterdb.api import CounterAPI
from counterdb.node import Node
from counterdb.store import SqliteStore, Store, StoreError, StoreSettings
from counterdb.sync import Cluster, Identity, SyncSettings

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


class CounterDBSite(Site):
    """A Site that leaves node-to-node sync (``/sync``, every poll interval
    per peer) out of the access log, so the log shows what clients did."""

    def log(self, request: object) -> None:
        if getattr(request, "path", None) != b"/sync":
            super().log(request)


class WebService(Service):
    """Listens on the configured endpoint; refuses to start if it cannot."""

    def __init__(self, endpoint: str, site: Site) -> None:
        self.endpoint = endpoint
        self.site = site
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list[object] = []
        serverFromString(global_reactor, self.endpoint).listen(self.site).addBoth(outcome.append)
        # Stream endpoints listen synchronously; failing now makes twistd exit
        # with the reason instead of running a node nobody can reach.
        if not outcome or isinstance(outcome[0], Failure):
            reason = outcome[0].getErrorMessage() if outcome else "listening did not complete"
            raise SystemExit(f"counterdb: cannot listen on {self.endpoint}: {reason}")
        self.port = outcome[0]  # type: ignore[assignment]
        address = self.port.getHost()
        log.info("counterdb listening on {host}:{port}", host=address.host, port=address.port)

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class SyncService(Service):
    """Finds this node in its actors list and runs the peer links."""

    def __init__(self, cluster: Cluster, web: WebService, config: ServiceConfig, pool: HTTPConnectionPool) -> None:
        self.cluster = cluster
        self.web = web
        self.config = config
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        assert self.web.port is not None, "the web service starts first"
        address = self.web.port.getHost()
        self.cluster.identity = Identity(
            listen_port=address.port,
            interface=getattr(address, "host", None),
            advertise=self.config.advertise,
        )
        self._configure_at_start()
        self.cluster.start()

    def _configure_at_start(self) -> None:
        entries = self.config.actors or self.cluster.node.stored_actors
        if not entries:
            log.info("not configured: a one-node cluster until POST /config")
            return
        try:
            self.cluster.configure_at_start(entries, persist=bool(self.config.actors))
        except ConfigError as e:
            if self.config.actors:
                raise SystemExit(f"counterdb: --actors: {e}") from None
            log.error("the stored actors list no longer fits this node ({error}); waiting for POST /config", error=e)

    def stopService(self) -> Deferred[object]:
        super().stopService()
        self.cluster.stop()
        return DeferredList([self.pool.closeCachedConnections()])


class CounterDBService(MultiService):
    """One counterdb node: store, counter table, cluster sync and HTTP API."""

    def __init__(self, config: ServiceConfig, store: Store | None = None) -> None:
        super().__init__()
        self.config = config
        self.store = store or _open_store(config)
        self.node = Node(self.store, global_reactor)
        # The loaded table is long-lived: keep the collector from scanning it
        # on every full collection (about 140 ms per million counters).
        gc.freeze()
        self.pool = HTTPConnectionPool(global_reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        http = HTTPClient(Agent(global_reactor, pool=self.pool, connectTimeout=config.sync.peer_timeout))
        self.cluster = Cluster(
            self.node,
            http,
            global_reactor,
            Identity(listen_port=0),  # replaced once we listen
            config.sync,
            run_blocking=deferToThread,
        )
        site = CounterDBSite(CounterAPI(self.node, self.cluster).resource())
        site.displayTracebacks = False
        self.web = WebService(config.endpoint, site)
        self.web.setServiceParent(self)
        SyncService(self.cluster, self.web, config, self.pool).setServiceParent(self)

    def privilegedStartService(self) -> None:
        with self._closing_store_on_failure():
            super().privilegedStartService()

    def startService(self) -> None:
        with self._closing_store_on_failure():
            super().startService()

    @contextmanager
    def _closing_store_on_failure(self) -> Iterator[None]:
        # A start that fails must release the data dir and stop the store's
        # writer thread, or the process would hang instead of exiting.
        try:
            yield
        except BaseException:
            self.store.close()
            raise

    def stopService(self) -> Deferred[object]:
        d = super().stopService()
        d.addBoth(lambda result: (self.store.close(), result)[1])
        return d


def _open_store(config: ServiceConfig) -> SqliteStore:
    try:
        return SqliteStore(config.data_dir, global_reactor, config.store)
    except StoreError as e:
        # Refuse to start: never fall back to a store that forgets.
        raise SystemExit(f"counterdb: cannot use the data directory: {e}") from None
