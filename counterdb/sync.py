"""
Peer sync: pushing changes, polling for them, and consistent reads.

Each peer gets one :class:`PeerLink`. After a local increment the counter is
marked dirty for every link; a link keeps at most one push in flight and
sends whatever became dirty meanwhile in the next one, so a burst of
increments costs a handful of requests. A failed push is retried with
exponential backoff and jitter up to a limit; after that the peer is left to
polling until a poll reaches it again. Independently, every link polls its
peer for the entries that changed since the last poll (``GET /sync``), so an
update that reached any live host spreads to all.

Everything that waits does so on an injected clock, and every peer request
goes through an injected treq-like client with a timeout, so the whole module
runs under ``task.Clock`` and ``treq.testing.StubTreq`` in tests.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Callable, Protocol
from urllib.parse import quote

import attrs
import treq
from twisted.internet.defer import CancelledError, Deferred, FirstError, fail, gatherResults, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from counterdb.actors import (
    Actor,
    ConfigError,
    identify_self,
    is_local_address,
    parse_actors,
    resolve_host,
)
from counterdb.crdt import Partials, validate_counters, validate_partials
from counterdb.node import Node, StoreUnavailable

log = Logger()


@attrs.frozen
class SyncSettings:
    poll_interval: float = 1.0
    push_retries: int = 8
    backoff_initial: float = 0.05
    backoff_max: float = 5.0
    peer_timeout: float = 5.0
    poll_batch: int = 10_000  # counters per GET /sync answer
    # counters per POST /sync; at most 255-byte names and 64-bit counts, 1,000
    # counters with a few replicas each stay far below the 1 MiB body limit
    push_batch: int = 1_000


@attrs.frozen
class Identity:
    """What this node knows about its own address, to find itself in a config."""

    listen_port: int
    interface: str | None = None
    advertise: Actor | None = None


class ConsistencyTimeout(Exception):
    def __init__(self, missing: list[str], value: int) -> None:
        super().__init__(f"no answer from {', '.join(missing)}")
        self.missing = missing
        self.value = value


class HTTPClient(Protocol):
    def get(self, url: str, **kwargs: Any) -> Deferred[Any]: ...

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]: ...


def backoff_delay(attempt: int, settings: SyncSettings, rng: random.Random) -> float:
    """Delay before retry number ``attempt`` (0-based): exponential, capped,
    with "equal jitter" (between half and all of the step) so that nodes
    retrying after the same outage do not retry in lockstep."""
    step = min(settings.backoff_max, settings.backoff_initial * 2**attempt)
    return step / 2 + rng.uniform(0, step / 2)


class PeerError(Exception):
    """A peer answered, but not with what the protocol promises."""


class PeerClient:
    """The HTTP calls one node makes to one peer, each with a timeout."""

    def __init__(self, http: HTTPClient, base_url: str, clock: IReactorTime, settings: SyncSettings) -> None:
        self.http = http
        self.base_url = base_url
        self.clock = clock
        self.timeout = settings.peer_timeout
        self.page_size = settings.poll_batch

    def get_changes(self, since: int, epoch: str | None) -> Deferred[dict[str, Any]]:
        params = {"since": str(since), "epoch": epoch or "", "limit": str(self.page_size)}
        return self._call(self.http.get(f"{self.base_url}/sync", params=params))

    def push(self, counters: dict[str, Partials]) -> Deferred[dict[str, Any]]:
        return self._call(self.http.post(f"{self.base_url}/sync", json={"counters": counters}))

    def get_counter(self, name: str) -> Deferred[dict[str, Any]]:
        quoted = _quote_segment(name)
        return self._call(self.http.get(f"{self.base_url}/counter/{quoted}/getsync"))

    def _call(self, request: Deferred[Any]) -> Deferred[dict[str, Any]]:
        answer = _cancellable(request.addCallback(self._json_body))
        answer.addTimeout(self.timeout, self.clock)
        return answer

    def _json_body(self, response: Any) -> Deferred[dict[str, Any]]:
        if response.code != 200:
            return treq.content(response).addCallback(self._refuse, response.code)
        return treq.json_content(response)

    def _refuse(self, body: bytes, code: int) -> None:
        raise PeerError(f"{self.base_url} answered {code}: {body[:200]!r}")


class PeerLink:
    """Push, poll and consistent-read fetches towards one peer."""

    def __init__(
        self,
        node: Node,
        actor: Actor,
        client: PeerClient,
        clock: IReactorTime,
        settings: SyncSettings,
        rng: random.Random,
    ) -> None:
        self.node = node
        self.actor = actor
        self.client = client
        self.clock = clock
        self.settings = settings
        self.rng = rng
        self.dirty: set[str] = set()
        self.reachable: bool | None = None  # unknown until the first exchange
        self._push_soon: IDelayedCall | None = None
        self._pushing: Deferred[None] | None = None
        self._given_up = False
        self._since = 0
        self._epoch: str | None = None
        self._poller = LoopingCall(self.poll_once)
        self._poller.clock = clock
        self._polling: Deferred[None] | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._polling = self._poller.start(self.settings.poll_interval, now=True)
        self._polling.addErrback(lambda f: log.failure("poller for {peer} stopped", f, peer=self.actor.entry))

    def stop(self) -> None:
        if self._poller.running:
            self._poller.stop()
        if self._push_soon is not None:
            self._push_soon.cancel()
            self._push_soon = None
        if self._pushing is not None:
            self._pushing.cancel()

    # -- push ----------------------------------------------------------------

    def mark_dirty(self, names: set[str]) -> None:
        self.dirty |= names
        if self.dirty and not self._given_up and self._push_soon is None and self._pushing is None:
            # Wait for the end of this reactor turn: everything marked dirty
            # in the same turn (a burst of requests) goes in one push.
            self._push_soon = self.clock.callLater(0, self._start_pushing)

    def _start_pushing(self) -> None:
        self._push_soon = None
        pushing = Deferred.fromCoroutine(self._push_until_clean())
        pushing.addErrback(lambda f: f.trap(CancelledError))
        # A push that finished synchronously has already cleared the slot.
        self._pushing = None if pushing.called else pushing

    async def _push_until_clean(self) -> None:
        attempt = 0
        try:
            while self.dirty:
                batch = self._take_push_batch()
                try:
                    await self.client.push({name: self.node.partials(name) for name in batch})
                except CancelledError:
                    self.dirty |= batch
                    raise
                except Exception as e:
                    self.dirty |= batch
                    self._note_unreachable(e)
                    if attempt >= self.settings.push_retries:
                        log.warn(
                            "giving up pushing to {peer} after {n} retries; polling will catch up",
                            peer=self.actor.entry,
                            n=attempt,
                        )
                        self._given_up = True
                        return
                    await deferLater(self.clock, backoff_delay(attempt, self.settings, self.rng))
                    attempt += 1
                else:
                    attempt = 0
                    self._note_reachable()
        finally:
            self._pushing = None

    def _take_push_batch(self) -> set[str]:
        """Up to ``push_batch`` dirty counters: a push must stay well below
        the peer's request size limit, whatever piled up while it was away."""
        if len(self.dirty) <= self.settings.push_batch:
            batch, self.dirty = self.dirty, set()
            return batch
        batch = set(itertools.islice(self.dirty, self.settings.push_batch))
        self.dirty -= batch
        return batch

    # -- poll ----------------------------------------------------------------

    def poll_once(self) -> Deferred[None]:
        """Fetch what changed on the peer since the last poll (never fails)."""
        return Deferred.fromCoroutine(self._poll())

    async def _poll(self) -> None:
        # Bounded: a peer with more changes than fit one answer is drained
        # over a few rounds instead of in one unbounded loop.
        for _ in range(10):
            try:
                answer = await self.client.get_changes(self._since, self._epoch)
                counters = validate_counters(answer.get("counters"))
                version, epoch, more = int(answer["version"]), str(answer["epoch"]), bool(answer.get("more"))
            except CancelledError:
                raise
            except Exception as e:
                self._note_unreachable(e)
                return
            self.node.merge(counters)
            self._since, self._epoch = version, epoch
            self._note_reachable()
            if not more:
                return

    # -- consistent reads ----------------------------------------------------

    async def fetch_counter(self, name: str) -> Partials:
        """The peer's state of ``name``, retrying with backoff until it
        answers or the caller cancels."""
        attempt = 0
        while True:
            try:
                answer = await self.client.get_counter(name)
                return validate_partials(answer.get("partials"))
            except CancelledError:
                raise
            except Exception as e:
                self._note_unreachable(e)
            await deferLater(self.clock, backoff_delay(attempt, self.settings, self.rng))
            attempt += 1

    # -- reachability --------------------------------------------------------

    def _note_reachable(self) -> None:
        if self.reachable is not True:
            log.info("peer {peer} is reachable", peer=self.actor.entry)
        self.reachable = True
        if self._given_up:
            self._given_up = False
            if self.dirty:
                self.mark_dirty(set())

    def _note_unreachable(self, error: Exception) -> None:
        if self.reachable is not False:
            log.warn("peer {peer} is unreachable: {error}", peer=self.actor.entry, error=error)
        self.reachable = False


@attrs.frozen
class Membership:
    actors: tuple[Actor, ...]
    self_index: int

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.self_index,
            "self": self.actors[self.self_index].entry,
            "actors": [a.entry for a in self.actors],
        }


class Cluster:
    """This node's view of the cluster: membership, peer links, consistent reads."""

    def __init__(
        self,
        node: Node,
        http: HTTPClient,
        clock: IReactorTime,
        identity: Identity,
        settings: SyncSettings = SyncSettings(),
        resolve: Callable[[str], set[str]] | None = None,
        is_local: Callable[[str], bool] | None = None,
        run_blocking: Callable[..., Deferred[Any]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.http = http
        self.clock = clock
        self.identity = identity
        self.settings = settings
        self._resolve = resolve or resolve_host
        self._is_local = is_local or is_local_address
        self._run_blocking = run_blocking or maybeDeferred
        self.rng = rng or random.Random()
        self.membership: Membership | None = None
        self.links: dict[str, PeerLink] = {}  # keyed by peer base URL
        self._running = False
        node.on_local_change(self._local_change)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._running = True
        for link in self.links.values():
            link.start()

    def stop(self) -> None:
        self._running = False
        for link in self.links.values():
            link.stop()

    # -- membership ----------------------------------------------------------

    def configure(self, entries: Any) -> Deferred[Membership]:
        """Validate, record and apply an actors list (``POST /config``);
        fails with ConfigError and then changes nothing. Finding ourselves
        may resolve names, so that part runs in a thread."""
        try:
            actors = parse_actors(entries, self.identity.listen_port)
        except ConfigError as e:
            return fail(e)
        d = self._run_blocking(self._membership, actors)
        d.addCallback(self._persist_membership)
        return d

    def configure_at_start(self, entries: Any, persist: bool) -> Membership:
        """Apply an actors list before the node serves anything, at once:
        a restarted node must not answer, even briefly, as a one-node
        cluster while its stored list is written back. Raises ConfigError.
        ``persist`` records it too (for ``--actors``), in the background."""
        membership = self._membership(parse_actors(entries, self.identity.listen_port))
        self._apply_membership(membership)
        if persist:
            d = self.node.store.write_config([a.entry for a in membership.actors])
            d.addErrback(lambda f: log.failure("could not store the --actors list", f))
        return membership

    def _membership(self, actors: list[Actor]) -> Membership:
        index = identify_self(
            actors,
            self.identity.listen_port,
            self.identity.interface,
            self.identity.advertise,
            self._resolve,
            self._is_local,
        )
        return Membership(tuple(actors), index)

    def _persist_membership(self, membership: Membership) -> Deferred[Membership]:
        d = self.node.store.write_config([a.entry for a in membership.actors])
        d.addCallbacks(lambda _: self._apply_membership(membership), self._config_not_stored)
        return d

    def _config_not_stored(self, failure: Failure) -> None:
        log.failure("could not store the actors list", failure)
        raise StoreUnavailable(f"could not record the configuration: {failure.getErrorMessage()}")

    def _apply_membership(self, membership: Membership) -> Membership:
        port = self.identity.listen_port
        wanted = {
            actor.base_url(port): actor
            for i, actor in enumerate(membership.actors)
            if i != membership.self_index
        }
        for url in list(self.links):
            if url not in wanted:
                self.links.pop(url).stop()
        for url, actor in wanted.items():
            if url in self.links:
                self.links[url].actor = actor  # same peer, maybe written differently
            else:
                self.links[url] = self._new_link(actor, url)
        self.membership = membership
        log.info("configured: {actors}, this node is #{index}", actors=[a.entry for a in membership.actors], index=membership.self_index)
        return membership

    def _new_link(self, actor: Actor, url: str) -> PeerLink:
        client = PeerClient(self.http, url, self.clock, self.settings)
        link = PeerLink(self.node, actor, client, self.clock, self.settings, self.rng)
        if self._running:
            link.start()
        # No push of everything we hold: the new peer's first poll of us
        # fetches it in pages, which a push of a large table could not be.
        return link

    # -- sync ----------------------------------------------------------------

    def _local_change(self, names: set[str]) -> None:
        for link in self.links.values():
            link.mark_dirty(names)

    def consistent_value(self, name: str, timeout: float | None) -> Deferred[int]:
        """The total of ``name`` after every peer reported its state.

        Includes every increment acknowledged by any host before the call.
        Without ``timeout`` it waits as long as it takes; cancelling the
        returned Deferred cancels every fetch.
        """
        return Deferred.fromCoroutine(self._consistent_value(name, timeout))

    async def _consistent_value(self, name: str, timeout: float | None) -> int:
        missing = {link.actor.entry for link in self.links.values()}

        def merged(partials: Partials, link: PeerLink) -> None:
            self.node.merge({name: partials})
            missing.discard(link.actor.entry)

        fetches = [
            Deferred.fromCoroutine(link.fetch_counter(name)).addCallback(merged, link)
            for link in self.links.values()
        ]
        everyone: Deferred[Any] = gatherResults(fetches, consumeErrors=True)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            everyone.cancel()

        deadline = self.clock.callLater(timeout, expire) if timeout is not None else None
        try:
            await everyone
        except FirstError:
            # Fetches retry until they succeed: they only stop when cancelled,
            # by the deadline or by our caller going away.
            if expired:
                raise ConsistencyTimeout(sorted(missing), self.node.value(name)) from None
            raise CancelledError() from None
        finally:
            if deadline is not None and deadline.active():
                deadline.cancel()
        return self.node.value(name)


def _cancellable(inner: Deferred[Any]) -> Deferred[Any]:
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


def _quote_segment(name: str) -> str:
    return quote(name, safe="")
