"""
Replication: pushing this node's changes to its peers and polling theirs.

Each peer gets one :class:`PeerLink`. After a local increment the counter is
marked dirty for every link; a link keeps at most one push in flight and
sends whatever became dirty meanwhile in the next one, so a burst of
increments costs a handful of requests. A push that gets no answer is
retried with exponential backoff and jitter up to a limit; after that the
peer is left to polling until a poll reaches it again. A peer that answers
with a 4xx is up but refuses that data: it is not retried. Independently,
every link polls its peer for the entries that changed since the last poll
(``GET /sync``), so an update that reached any live host spreads to all.

Every answer is checked before anything is merged. A peer that answers
with this node's own replica id, or with the replica id another peer
already answers with, is refused loudly: two places writing one replica id
(a copied data dir) would make the max-merge drop increments silently.
An answer in a protocol version this node does not speak (or a refusal
saying the peer does not speak ours) is not merged either: the link says so
in ``GET /status`` until the two versions overlap again.

Everything waits on an injected clock and talks through an injected
treq-like client, so the module runs under ``task.Clock`` and ``StubTreq``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from counterdb.crdt import InvalidState, is_replica_id, validate_counters
from counterdb.membership import Membership
from counterdb.node import Node
from counterdb.peer_client import HTTPClient, PeerClient, PeerIncompatible, PeerRefused
from counterdb.wire import MAX_BODY_BYTES, PROTOCOL_MEMBER, SAME_REPLICA, encode_json

log = Logger()

#: Largest push body: half of what a peer accepts, whatever the names and
#: the number of replica ids of the counters in it.
MAX_PUSH_BYTES = MAX_BODY_BYTES // 2

#: Pages of changes one poll reads at most (5 million counters at the
#: default page size): a peer that keeps answering "more" is asked again at
#: the next poll tick, never in an endless loop.
MAX_PAGES_PER_POLL = 1_000


@attrs.frozen
class SyncSettings:
    poll_interval: float = 1.0
    push_retries: int = 8
    backoff_initial: float = 0.05
    backoff_max: float = 5.0
    peer_timeout: float = 5.0
    # Counters per GET /sync answer asked of a peer. Building and encoding
    # a page is one reactor turn of the peer: 2,000 rather than the 5,000
    # a peer allows halved its reads' p99 while a new node caught up from
    # it, at the same catch-up time (docs/design.md, "Catching up").
    poll_batch: int = 2_000
    #: Least time between the starts of two pushes to one peer. A change
    #: after a quiet spell is pushed at once; changes coming faster go,
    #: together, in one push per interval: a push costs the sender about
    #: as much CPU as a few increments (docs/design.md, "Push coalescing").
    min_push_interval: float = 0.05


@attrs.define
class LinkStats:
    """Running totals per peer (``GET /status``, benchmarks)."""

    pushes: int = 0  # push requests answered 200
    push_bytes: int = 0  # bytes of those request bodies
    pushed_counters: int = 0
    push_failures: int = 0  # pushes that got no answer
    refused: int = 0  # requests the peer answered with a 4xx
    polls: int = 0  # poll pages answered
    poll_failures: int = 0


class ReplicaConflict(Exception):
    """A replica id answers from two places."""


def backoff_delay(attempt: int, settings: SyncSettings, rng: random.Random) -> float:
    """Delay before retry number ``attempt`` (0-based): exponential, capped,
    with "equal jitter" (between half and all of the step) so that nodes
    retrying after the same outage do not retry in lockstep."""
    step = min(settings.backoff_max, settings.backoff_initial * 2**attempt)
    return step / 2 + rng.uniform(0, step / 2)


class PeerLink:
    """Push and poll towards one peer, and what this node knows of it."""

    def __init__(
        self,
        node: Node,
        entry: str,
        client: PeerClient,
        clock: IReactorTime,
        settings: SyncSettings,
        rng: random.Random,
        claim_replica: Callable[[PeerLink, str], None],
    ) -> None:
        self.node = node
        self.entry = entry  # the peer as written in the actors list
        self.client = client
        self.clock = clock
        self.settings = settings
        self.rng = rng
        self.dirty: set[str] = set()
        self.reachable: bool | None = None  # unknown until the first exchange
        self.replica: str | None = None  # the peer's replica id, once it answered
        self.conflict: str | None = None  # why this peer's data is refused
        #: Why this node and the peer cannot talk: their protocol versions do
        #: not overlap (cleared by the next exchange that works).
        self.incompatible: str | None = None
        self.last_success: float | None = None  # clock.seconds() of the last successful exchange
        self.stats = LinkStats()
        self._claim_replica = claim_replica
        #: Told of the versioned actors list each poll answer carries.
        self.replication_hears_config: Callable[[PeerLink, Any], None] = lambda link, config: None
        self._push_soon: IDelayedCall | None = None
        self._pushing: Deferred[None] | None = None
        self._last_push: float | None = None  # when the last push started
        self._given_up = False
        self._since = 0
        self._epoch: str | None = None
        self._poller = LoopingCall(self.poll_once)
        self._poller.clock = clock
        self._polling: Deferred[Any] | None = None
        self._poll_in_flight: Deferred[None] | None = None
        self._stopped = False
        self._last_refusal: tuple[int, str] | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._polling = self._poller.start(self.settings.poll_interval, now=True)
        self._polling.addErrback(lambda f: log.failure("poller for {peer} stopped", f, peer=self.entry))

    def stop(self) -> Deferred[Any]:
        """Cancel the poll, the push and its retries; fires when they are gone."""
        self._stopped = True
        if self._poller.running:
            self._poller.stop()
        if self._poll_in_flight is not None:
            self._poll_in_flight.cancel()
        if self._push_soon is not None:
            self._push_soon.cancel()
            self._push_soon = None
        if self._pushing is not None:
            self._pushing.cancel()
        return DeferredList([d for d in (self._polling, self._pushing) if d is not None and not d.called])

    # -- push ----------------------------------------------------------------

    def mark_dirty(self, names: set[str]) -> None:
        self.dirty |= names
        if self._stopped or self._given_up or not self.dirty:
            return
        if self._push_soon is None and self._pushing is None:
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
            while self.dirty and self.conflict is None:
                await self._wait_for_push_interval()
                batch, body = self._take_push_batch()
                self._last_push = self.clock.seconds()
                try:
                    answer = await self.client.push(body)
                    self.check_replica(answer.get("replica") if isinstance(answer, dict) else None)
                except CancelledError:
                    self.dirty |= batch
                    raise
                except ReplicaConflict:
                    self.dirty |= batch
                    return
                except PeerRefused as e:
                    self.note_refused("a push", len(batch), e)
                except Exception as e:
                    self.dirty |= batch
                    self.stats.push_failures += 1
                    self.note_failure(e)
                    if attempt >= self.settings.push_retries:
                        log.warn(
                            "giving up pushing to {peer} after {n} retries; polling will catch up",
                            peer=self.entry,
                            n=attempt,
                        )
                        self._given_up = True
                        return
                    await deferLater(self.clock, backoff_delay(attempt, self.settings, self.rng))
                    attempt += 1
                else:
                    attempt = 0
                    self.stats.pushes += 1
                    self.stats.push_bytes += len(body)
                    self.stats.pushed_counters += len(batch)
                    self.note_reachable()
        finally:
            self._pushing = None

    async def _wait_for_push_interval(self) -> None:
        if self._last_push is None:
            return
        wait = self._last_push + self.settings.min_push_interval - self.clock.seconds()
        if wait > 0:
            await deferLater(self.clock, wait)

    def _take_push_batch(self) -> tuple[set[str], bytes]:
        """Dirty counters whose encoded push stays under :data:`MAX_PUSH_BYTES`
        (at least one), and that body. Capped by bytes, not by count: long
        names and many replica ids must not make a push the peer refuses."""
        parts: list[bytes] = []
        batch: set[str] = set()
        size = len(b'{"counters":{}}')
        for name in self.dirty:
            part = encode_json(name) + b":" + encode_json(self.node.partials(name))
            if parts and size + len(part) + 1 > MAX_PUSH_BYTES:
                break
            parts.append(part)
            batch.add(name)
            size += len(part) + 1
        self.dirty -= batch
        return batch, b'{"counters":{' + b",".join(parts) + b"}}"

    def note_refused(self, what: str, count: int, error: PeerRefused) -> None:
        """The peer is up but will not take (or give) this data: retrying
        the same request cannot help. Polling carries what it needs."""
        self.stats.refused += 1
        self._mark_up()
        refusal = (error.code, error.reason)
        repeated, self._last_refusal = refusal == self._last_refusal, refusal
        if PROTOCOL_MEMBER in error.details:  # the peer does not speak this node's version
            self.note_incompatible(error.reason)
            return
        self.note_incompatible(None)
        if error.code == 409:  # the peer saw our replica id answer from two places
            self.mark_conflict(f"it refuses this node: {error.reason}")
            if error.details.get("conflict") == SAME_REPLICA:
                self.node.renew_identity(f"peer {self.entry} has it too")
            return
        if repeated:
            return  # logged when it started
        log.error(
            "peer {peer} refused {what} of {count} counters: {code} {reason}",
            peer=self.entry,
            what=what,
            count=count,
            code=error.code,
            reason=error.reason,
        )

    # -- poll ----------------------------------------------------------------

    def poll_once(self) -> Deferred[None]:
        """Fetch what changed on the peer since the last poll (never fails)."""
        d = Deferred.fromCoroutine(self._poll())
        d.addErrback(lambda f: f.trap(CancelledError))
        self._poll_in_flight = d
        return d

    async def _poll(self) -> None:
        # Page after page while the peer has more and its version moves on:
        # a new node fetching a million counters (200 pages per peer) used
        # to stop after 10 pages and wait for the next poll tick, idle for
        # most of every second (docs/design.md, "Catching up"). A peer that
        # says "more" without moving on waits for the next tick.
        for _ in range(MAX_PAGES_PER_POLL):
            try:
                answer = await self.client.get_changes(self._since, self._epoch)
                counters, version, epoch, more = self._read_changes(answer)
                moved_on = (version, epoch) != (self._since, self._epoch)
            except CancelledError:
                raise
            except PeerRefused as e:
                self.note_refused("a poll", 0, e)
                return
            except Exception as e:
                self.stats.poll_failures += 1
                self.note_failure(e)
                return
            self.stats.polls += 1
            self.replication_hears_config(self, answer.get("config"))
            self.node.merge(counters, source=self.replica)
            self._since, self._epoch = version, epoch
            self.note_reachable()
            if not more or not moved_on:
                return

    def _read_changes(self, answer: Any) -> tuple[dict[str, Any], int, str, bool]:
        """Check a ``GET /sync`` answer before any of it is merged."""
        if not isinstance(answer, dict):
            raise InvalidState("the answer is not a JSON object")
        self.check_replica(answer.get("replica"))
        counters = validate_counters(answer.get("counters"))
        version, epoch, more = answer.get("version"), answer.get("epoch"), answer.get("more", False)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidState("version must be a non-negative integer")
        if not isinstance(epoch, str) or not isinstance(more, bool):
            raise InvalidState("epoch must be a string and more a boolean")
        return counters, version, epoch, more

    def check_replica(self, replica: Any) -> None:
        """Refuse an answer from a replica id that is ours or another peer's."""
        if not is_replica_id(replica):
            raise InvalidState("the answer does not name a valid replica id")
        # Every answer re-decides: a conflict clears once the copies differ.
        self.replica = replica
        self._claim_replica(self, replica)
        if self.conflict is not None:
            raise ReplicaConflict(self.conflict)

    @property
    def given_up(self) -> bool:
        """Whether pushes stopped after their retries (polls carry on)."""
        return self._given_up

    def send_config(self, config: dict[str, Any]) -> None:
        """Hand the peer a versioned actors list; it keeps it if newer.
        Failures are left to the next poll, which compares versions again."""
        d = self.client.post_config(config)
        d.addErrback(lambda f: f.trap(Exception))

    # -- what this node knows of the peer --------------------------------------

    def mark_conflict(self, reason: str | None) -> None:
        if reason is not None and self.conflict != reason:
            log.error("refusing data from peer {peer}: {reason}", peer=self.entry, reason=reason)
        elif reason is None and self.conflict is not None:
            log.info("peer {peer} no longer conflicts; accepting its data again", peer=self.entry)
        self.conflict = reason

    def note_reachable(self) -> None:
        """A successful exchange."""
        self.note_incompatible(None)
        self._last_refusal = None
        self.last_success = self.clock.seconds()
        self._mark_up()

    def _mark_up(self) -> None:
        if self.reachable is not True:
            log.info("peer {peer} is reachable", peer=self.entry)
        self.reachable = True
        if self._given_up:
            self._given_up = False
            if self.dirty:
                self.mark_dirty(set())

    def note_failure(self, error: Exception) -> None:
        """A request that got no usable answer."""
        if isinstance(error, PeerIncompatible):
            self.note_incompatible(str(error))
        else:
            self.note_unreachable(str(error))

    def note_incompatible(self, reason: str | None) -> None:
        """The peer and this node speak no common protocol version (None:
        they do again). One log line per change, not one per request."""
        if reason is not None and self.incompatible is None:
            log.error("peer {peer} speaks no protocol version this node does: {reason}", peer=self.entry, reason=reason)
        elif reason is None and self.incompatible is not None:
            log.info("peer {peer} speaks a protocol version this node does again", peer=self.entry)
        self.incompatible = reason

    def note_unreachable(self, reason: str) -> None:
        """One log line per transition, with the reason, not one per retry."""
        if self.reachable is not False:
            log.warn("peer {peer} is unreachable: {reason}", peer=self.entry, reason=reason)
        self.reachable = False


class Replication:
    """One :class:`PeerLink` per peer of the current membership."""

    def __init__(
        self,
        node: Node,
        http: HTTPClient,
        clock: IReactorTime,
        settings: SyncSettings = SyncSettings(),
        rng: random.Random | None = None,
        authorization: str | None = None,
        scheme: str = "http",
    ) -> None:
        self.node = node
        self.http = http
        self.scheme = scheme  # "https" when the cluster speaks TLS
        self.authorization = authorization  # sent to every peer
        self.clock = clock
        self.settings = settings
        self.rng = rng or random.Random()
        self.links: dict[str, PeerLink] = {}  # keyed by peer base URL
        #: Called with (link, the "config" of a poll answer): membership's hook.
        self.hears_config: Callable[[PeerLink, Any], None] = lambda link, config: None
        self._running = False
        node.on_local_change(self._local_change)
        node.on_new_identity(lambda _: self._recheck_replicas())

    def start(self) -> None:
        self._running = True
        for link in self.links.values():
            link.start()

    def stop(self) -> Deferred[Any]:
        self._running = False
        stopping = [link.stop() for link in self.links.values()]
        return DeferredList(stopping) if stopping else succeed(None)

    def follow(self, membership: Membership | None, listen_port: int) -> None:
        """Have exactly one link per peer of ``membership`` (none: removed),
        and hand the new list to every peer, old and new."""
        wanted = membership.peers(listen_port, self.scheme) if membership else {}
        config = membership.config() if membership else None
        for url in list(self.links):
            if url not in wanted:
                self._drop(self.links.pop(url), config)
        for url, actor in wanted.items():
            if url in self.links:
                self.links[url].entry = actor.entry  # same peer, maybe written differently
            else:
                self.links[url] = self._new_link(actor.entry, url)
            if config is not None:
                self.links[url].send_config(config)
        self._recheck_replicas()

    def _drop(self, link: PeerLink, config: dict[str, Any] | None) -> None:
        """A peer leaves: tell it, take what it holds one last time, stop."""
        if config is not None:
            link.send_config(config)
        last = link.poll_once() if self._running else succeed(None)
        last.addBoth(lambda _: link.stop())

    def _new_link(self, entry: str, url: str) -> PeerLink:
        s = self.settings
        client = PeerClient(
            self.http, url, self.clock, s.peer_timeout, s.poll_batch, lambda: self.node.replica_id, self.authorization
        )
        link = PeerLink(self.node, entry, client, self.clock, s, self.rng, self._claim_replica)
        link.replication_hears_config = lambda link, config: self.hears_config(link, config)
        if self._running:
            link.start()
        # No push of everything we hold: the new peer's first poll of us
        # fetches it in pages, which a push of a large table could not be.
        return link

    def conflicted_replicas(self) -> set[str]:
        """Replica ids this node refuses: each answers from two places."""
        return {replica for replica, links in self._by_replica().items() if self._conflict_reason(replica, links)}

    def _local_change(self, names: set[str]) -> None:
        for link in self.links.values():
            link.mark_dirty(names)

    def _claim_replica(self, link: PeerLink, replica: str) -> None:
        self._recheck_replicas()

    def _recheck_replicas(self) -> None:
        """Mark every link whose replica id is another link's; take a new
        replica id if a peer answers with ours."""
        for replica, links in self._by_replica().items():
            if replica == self.node.replica_id:
                self.node.renew_identity(f"peer {links[0].entry} answers with it")
            for link in links:
                link.mark_conflict(self._conflict_reason(replica, links))

    def _by_replica(self) -> dict[str, list[PeerLink]]:
        by_replica: dict[str, list[PeerLink]] = {}
        for link in self.links.values():
            if link.replica is not None:
                by_replica.setdefault(link.replica, []).append(link)
        return by_replica

    def _conflict_reason(self, replica: str, links: list[PeerLink]) -> str | None:
        if replica in self.node.shared_ids:
            return (
                f"it still answers with replica id {replica}, which a copy of a data dir also used; "
                "it takes a new one as soon as it hears this from this node"
            )
        if replica == self.node.replica_id:
            return (
                f"it answers with this node's own replica id {replica}: one of the two was started "
                "from a copy of the other's data dir"
            )
        if len(links) > 1:
            return (
                f"replica id {replica} answers from {len(links)} peers "
                f"({', '.join(sorted(link.entry for link in links))}): one was started from a copy "
                "of another's data dir"
            )
        return None
