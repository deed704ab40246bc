"""
One counterdb node's state: the counter table, its store and group commit.

Increments are queued and written to the store in batches: while one batch
is being made durable the next one accumulates, so concurrent increments
share a commit. Memory changes only after the store confirmed the write, so
a failed write changes nothing and nothing unacknowledged is ever served.

Increments may carry an idempotency key. The key is stored in the same
transaction as the partial it produced, so after any crash either both
exist or neither does: a retried request is answered from the record and
never counted twice.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from counterdb.crdt import MAX_COUNT, CounterTable, Partials
from counterdb.store import IDEMPOTENCY_MAX_KEYS, IDEMPOTENCY_WINDOW, IdempotencyRecord, Store


class Overflow(ValueError):
    """The increment would take this node's partial above :data:`MAX_COUNT`."""


class TableFull(RuntimeError):
    """The node holds ``--max-counters`` counters and refuses new names."""


class StoreUnavailable(RuntimeError):
    """The store could not make an increment durable; nothing was counted."""


class KeyReused(ValueError):
    """An idempotency key came back with a different request."""


@attrs.define
class NodeStats:
    """Running totals a benchmark or an operator reads (``GET /status``)."""

    increments: int = 0  # accepted increment requests, replays excluded
    commits: int = 0  # durable group commits
    committed_increments: int = 0  # increments made durable by those commits
    failed_commits: int = 0


@attrs.frozen
class Acknowledged:
    value: int  # the counter's local value right after the increment (0 for a bulk one)
    replayed: bool = False  # answered from an earlier request with the same key
    values: dict[str, int] | None = None  # a bulk increment: each counter's new local value


#: How a bulk increment's idempotency record is told from a single one: its
#: ``amount`` (single amounts are never negative), with the request and its
#: answer as JSON in ``counter``.
BULK_RECORD = -1


class _WallClock:
    def seconds(self) -> float:
        return time.time()


@attrs.define
class _PendingIncrement:
    """One request: a single increment, or a bulk one (all or nothing)."""

    amounts: dict[str, int]
    bulk: bool
    key: str | None
    waiters: list[Deferred[Acknowledged]]
    answers: dict[str, int] = attrs.Factory(dict)

    def acknowledgement(self, replayed: bool) -> Acknowledged:
        if self.bulk:
            return Acknowledged(0, replayed, dict(self.answers))
        return Acknowledged(next(iter(self.answers.values())), replayed)

    def record(self, now: float) -> IdempotencyRecord:
        if not self.bulk:
            ((name, amount),) = self.amounts.items()
            return IdempotencyRecord(self.key, name, amount, self.answers[name], now)  # type: ignore[arg-type]
        answer = json.dumps({"increments": self.amounts, "values": self.answers}, sort_keys=True)
        return IdempotencyRecord(self.key, answer, BULK_RECORD, 0, now)  # type: ignore[arg-type]


class Node:
    log = Logger()

    def __init__(
        self,
        store: Store,
        clock: IReactorTime | None = None,
        idempotency_window: float = IDEMPOTENCY_WINDOW,
        idempotency_max_keys: int = IDEMPOTENCY_MAX_KEYS,
        max_counters: int | None = None,
    ) -> None:
        self.store = store
        self.max_counters = max_counters  # refuse new names past this many
        self.clock = clock or _WallClock()
        self.idempotency_window = idempotency_window
        self.idempotency_max_keys = idempotency_max_keys
        loaded = store.load()
        self.replica_id = loaded.replica_id
        self.stored_actors = loaded.actors
        self.stored_version = loaded.config_version
        # Replica ids this node gave up because a copy of its data dir used
        # them too: a peer still answering with one must take a new id.
        self.shared_ids = set(loaded.shared_ids)
        self.table = CounterTable()
        self.table.load(loaded.entries)
        # Versions are not persisted: a new epoch tells pollers to start over.
        self.epoch = uuid.uuid4().hex
        self._keys: OrderedDict[str, IdempotencyRecord] = OrderedDict((r.key, r) for r in loaded.idempotency)
        self._forget_old_keys()
        self._pending_keys: dict[str, _PendingIncrement] = {}
        self._queue: list[_PendingIncrement] = []
        self._commit: object | None = None  # the commit in flight, if one is
        self._draining = False
        self._stopping: Deferred[None] | None = None
        self._idle_waiters: list[Deferred[None]] = []
        self._renewal: str | None = None  # None, "wanted" or "running"
        self._identity_listeners: list[Callable[[str], None]] = []
        self._change_listeners: list[Callable[[set[str]], None]] = []
        self.stats = NodeStats()
        self.commit_observers: list[Callable[[int, float], None]] = []  # (batch size, seconds)

    # -- reads ---------------------------------------------------------------

    def value(self, name: str) -> int:
        return self.table.value(name)

    def partials(self, name: str) -> Partials:
        return self.table.partials(name)

    def changes_since(
        self, since: int, epoch: str | None, limit: int, max_bytes: int, peer: str | None = None
    ) -> dict[str, object]:
        """The node-level delta a polling peer asks for (``GET /sync``):
        at most ``limit`` counters and about ``max_bytes`` of JSON, without
        the counters the peer (its replica id) is known to hold already."""
        if epoch != self.epoch:
            since = 0  # the caller's version belongs to another run of ours
        counters, version, more = self.table.changes_since(since, limit, max_bytes, json_size_bound, peer)
        return {
            "replica": self.replica_id,
            "epoch": self.epoch,
            "version": version,
            "more": more,
            "counters": counters,
        }

    # -- configuration ---------------------------------------------------------

    def save_config(self, actors: list[str], version: tuple[int, str] = (0, "")) -> Deferred[None]:
        """Durably record the accepted actors list and its version (read back
        at the next start)."""
        d = self.store.write_config(actors, version)
        d.addCallback(lambda _: setattr(self, "stored_actors", list(actors)))
        d.addCallback(lambda _: setattr(self, "stored_version", version))
        return d

    # -- writes --------------------------------------------------------------

    def on_local_change(self, listener: Callable[[set[str]], None]) -> None:
        """Call ``listener(names)`` after increments on this node are durable."""
        self._change_listeners.append(listener)

    def increment(self, name: str, amount: int, key: str | None = None) -> Deferred[Acknowledged]:
        """Add ``amount`` to this node's partial of ``name``.

        Fires once the increment is durable; fails with :class:`Overflow`,
        :class:`KeyReused` or :class:`StoreUnavailable`, and then nothing was
        counted. With ``key``, a repeat of an earlier request is answered as
        the first one was, without counting again.
        """
        return self._enqueue({name: amount}, False, key)

    def increment_many(self, amounts: dict[str, int], key: str | None = None) -> Deferred[Acknowledged]:
        """Add each amount to this node's partial of its counter, in one
        durable commit and one push: all are counted or none is. Fires with
        an :class:`Acknowledged` whose ``values`` holds each counter's new
        local value; fails as :meth:`increment` does."""
        return self._enqueue(dict(amounts), True, key)

    def _enqueue(self, amounts: dict[str, int], bulk: bool, key: str | None) -> Deferred[Acknowledged]:
        if key is not None:
            repeat = self._repeat_of(key, amounts, bulk)
            if repeat is not None:
                return repeat
        if self._stopping is not None:
            return fail(StoreUnavailable("the node is shutting down"))
        self.stats.increments += len(amounts)
        waiter: Deferred[Acknowledged] = Deferred()
        pending = _PendingIncrement(amounts, bulk, key, [waiter])
        self._queue.append(pending)
        if key is not None:
            self._pending_keys[key] = pending
        if self._commit is None:
            self._commit_next_batch()
        return waiter

    def merge(
        self, counters: dict[str, Partials], all_or_nothing: bool = False, source: str | None = None
    ) -> dict[str, Partials]:
        """Merge partials learnt from elsewhere; return the entries that grew.
        ``source`` is the replica id of the peer whose whole states of the
        counters these are (a push or a poll answer), if they are.

        This node's own partial is left out: it only ever grows through this
        node's durable increments, so no peer or client can inflate it (or
        claim this node's replica id from another place).

        Past ``max_counters``, new names are refused: with ``all_or_nothing``
        the whole merge fails with :class:`TableFull` (a request answered
        507), else only the new names are left out (a poll)."""
        counters = self._within_capacity(counters, all_or_nothing)
        grown: dict[str, Partials] = {}
        own, table = self.replica_id, self.table
        for name, partials in counters.items():
            # A copy of this node's own partial that equals it changes
            # nothing and stays in: the table then sees that the source
            # holds this exact state and does not send it back (stripped,
            # no counter with an own partial was ever marked as held).
            if own in partials and partials[own] != table.partial(name, own):
                partials = {replica: count for replica, count in partials.items() if replica != own}
            changed = table.merge(name, partials, source)
            if changed:
                grown[name] = changed
        if grown and self._stopping is None:
            self.store.write_peers(grown)
        return grown

    def _within_capacity(self, counters: dict[str, Partials], all_or_nothing: bool) -> dict[str, Partials]:
        if self.max_counters is None:
            return counters
        room = self.max_counters - len(self.table)
        new = [name for name in counters if name not in self.table]
        if len(new) <= room:
            return counters
        if all_or_nothing:
            raise TableFull(self._full_message(len(new)))
        refused = set(new[max(room, 0) :])
        self.log.warn("{message}; left out of a merge", message=self._full_message(len(refused)))
        return {name: partials for name, partials in counters.items() if name not in refused}

    def _full_message(self, count: int) -> str:
        return (
            f"this node holds {len(self.table)} counters, its --max-counters limit: {count} new counter name(s) refused"
        )

    # -- shutdown --------------------------------------------------------------

    def stop(self) -> Deferred[None]:
        """Refuse new increments and fire once every queued one is answered."""
        if self._stopping is None:
            self._stopping = Deferred()
            self._when_idle(self._stopping)
        d: Deferred[None] = Deferred()
        self._stopping.addBoth(lambda result: (d.callback(None), result)[1])
        return d

    def _when_idle(self, d: Deferred[None]) -> None:
        if self._idle():
            d.callback(None)
        else:
            self._idle_waiters.append(d)

    def _idle(self) -> bool:
        return self._commit is None and not self._queue and self._renewal is None

    def _notify_if_idle(self) -> None:
        if self._idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    # -- identity --------------------------------------------------------------

    def on_new_identity(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(replica_id)`` after this node took a new replica id."""
        self._identity_listeners.append(listener)

    def renew_identity(self, reason: str) -> None:
        """Go on counting under a fresh replica id, because this one answers
        from another place too (a copy of this data dir runs elsewhere).

        The partial counted so far stays, as a retired replica's; only new
        increments go to the new id, so from now on neither copy's
        increments can hide behind the other's. Commits pause while the
        new id is made durable; nothing queued is lost or counted twice."""
        if self._renewal is not None or self._stopping is not None:
            return
        self.log.error(
            "replica id {replica} also answers from another place ({reason}); continuing under a new replica id",
            replica=self.replica_id,
            reason=reason,
        )
        self._renewal = "wanted"
        if self._commit is None:
            self._start_renewal()

    def _start_renewal(self) -> None:
        self._renewal = "running"
        d = maybeDeferred(self.store.renew_identity)
        d.addCallbacks(self._renewed, lambda f: self.log.failure("could not take a new replica id", f))
        d.addBoth(self._renewal_finished)

    def _renewed(self, replica_id: str) -> None:
        old, self.replica_id = self.replica_id, replica_id
        self.shared_ids.add(old)
        self.log.warn("now replica {new} (was {old})", new=replica_id, old=old)
        for listener in self._identity_listeners:
            listener(replica_id)

    def _renewal_finished(self, _: object) -> None:
        self._renewal = None
        self._commit_next_batch()
        self._notify_if_idle()

    # -- idempotency -----------------------------------------------------------

    def _repeat_of(self, key: str, amounts: dict[str, int], bulk: bool) -> Deferred[Acknowledged] | None:
        record = self._keys.get(key)
        if record is not None:
            first, answer = _request_of(record)
            if first != (bulk, amounts):
                return fail(_key_reused(key, first))
            return succeed(answer)
        pending = self._pending_keys.get(key)
        if pending is None:
            return None
        if (pending.bulk, pending.amounts) != (bulk, amounts):
            return fail(_key_reused(key, (pending.bulk, pending.amounts)))
        # The first request with this key is still being committed: answer
        # this one with its outcome.
        waiter: Deferred[Acknowledged] = Deferred()
        pending.waiters.append(waiter)
        return waiter

    def _remember_keys(self, records: list[IdempotencyRecord]) -> None:
        for record in records:
            self._keys[record.key] = record
            self._pending_keys.pop(record.key, None)
        self._forget_old_keys()

    def _forget_old_keys(self) -> None:
        oldest_allowed = self.clock.seconds() - self.idempotency_window
        keys = self._keys
        while keys:
            first = next(iter(keys.values()))
            if first.created >= oldest_allowed and len(keys) <= self.idempotency_max_keys:
                break
            keys.popitem(last=False)

    # -- group commit ------------------------------------------------------------

    def _commit_next_batch(self) -> None:
        # A loop, not recursion: a store that answers at once (or callers
        # that increment again from an acknowledgement) would otherwise nest
        # one call deeper per batch.
        if self._draining or self._renewal is not None:
            return
        self._draining = True
        try:
            while self._queue and self._commit is None:
                self._start_commit()
        finally:
            self._draining = False

    def _start_commit(self) -> None:
        batch, self._queue = self._queue, []
        own = self._apply_batch(batch)
        accepted = [p for p in batch if p.waiters]
        if not accepted:
            return
        now = self.clock.seconds()
        records = [p.record(now) for p in accepted if p.key is not None]
        commit = self._commit = object()
        started = time.perf_counter()
        d = maybeDeferred(self.store.write_own, own, records)
        d.addCallbacks(
            self._batch_durable,
            self._batch_failed,
            callbackArgs=(own, accepted, records, started),
            errbackArgs=(accepted,),
        )
        d.addBoth(self._batch_finished, commit)

    def _apply_batch(self, batch: list[_PendingIncrement]) -> dict[str, int]:
        """New absolute own partials for ``batch``. A request that would
        take a partial past :data:`MAX_COUNT`, or add a counter past
        ``max_counters``, is refused whole and changes nothing."""
        own: dict[str, int] = {}
        new_names = 0  # counters the batch creates, for max_counters
        for pending in batch:
            try:
                changes, added = self._partials_after(pending.amounts, own, new_names)
            except (Overflow, TableFull) as refusal:
                self._fail(pending, refusal)
                continue
            own.update(changes)
            new_names += added
            for name in pending.amounts:
                others = self.table.value(name) - self.table.partial(name, self.replica_id)
                pending.answers[name] = others + own[name]
        return own

    def _partials_after(
        self, amounts: dict[str, int], own: dict[str, int], new_names: int
    ) -> tuple[dict[str, int], int]:
        """This node's partials of ``amounts``' counters once they are added
        on top of ``own`` (the batch so far), and how many counters that
        creates; raises if one would not fit, so a request counts whole."""
        changes: dict[str, int] = {}
        added = 0
        for name, amount in amounts.items():
            if name not in changes and name not in own and name not in self.table:
                if self.max_counters is not None and len(self.table) + new_names + added >= self.max_counters:
                    raise TableFull(self._full_message(1))
                added += 1
            mine = changes.get(name, own.get(name, self.table.partial(name, self.replica_id)))
            # Only this node's own partial is bounded, so the check needs
            # nothing from other nodes: totals may pass 64 bits.
            if mine + amount > MAX_COUNT:
                raise Overflow(
                    f"this node's share of counter {name!r} would exceed {MAX_COUNT}; increment it on another node"
                )
            changes[name] = mine + amount
        return changes, added

    def _batch_durable(
        self,
        _: None,
        own: dict[str, int],
        accepted: list[_PendingIncrement],
        records: list[IdempotencyRecord],
        started: float,
    ) -> None:
        elapsed = time.perf_counter() - started
        for name, count in own.items():
            self.table.merge(name, {self.replica_id: count})
        self._remember_keys(records)
        self.stats.commits += 1
        self.stats.committed_increments += sum(len(p.amounts) for p in accepted)
        # The next batch goes to the store before this one's answers are
        # written: the writer process syncs it meanwhile (+3 % increments/s,
        # a lower p99; docs/design.md). It builds on partials now durable.
        self._commit = None
        self._commit_next_batch()
        self._answer(accepted)
        for observe in self.commit_observers:
            try:
                observe(len(accepted), elapsed)
            except Exception:
                self.log.failure("a commit observer failed")
        self._tell_listeners(set(own))

    def _answer(self, accepted: list[_PendingIncrement]) -> None:
        for pending in accepted:
            # Later waiters are repeats of the first request with the same key.
            for i, waiter in enumerate(pending.waiters):
                # The client may have gone away (Klein then cancels its
                # Deferred): the increment counted, nobody is left to tell.
                if not waiter.called:
                    waiter.callback(pending.acknowledgement(replayed=i > 0))

    def _tell_listeners(self, changed: set[str]) -> None:
        # A listener that raises must not keep the others from hearing of a
        # durable change, nor leave the commit loop stuck.
        for listener in self._change_listeners:
            try:
                listener(changed)
            except Exception:
                self.log.failure("a change listener failed for {count} counters", count=len(changed))

    def _batch_failed(self, failure: Failure, accepted: list[_PendingIncrement]) -> None:
        self.stats.failed_commits += 1
        self.log.failure("could not make {count} increments durable", failure, count=len(accepted))
        error = StoreUnavailable(f"the store could not commit: {failure.getErrorMessage()}")
        for pending in accepted:
            self._fail(pending, error)

    def _fail(self, pending: _PendingIncrement, error: Exception) -> None:
        if pending.key is not None:
            self._pending_keys.pop(pending.key, None)
        waiters, pending.waiters = pending.waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(error)

    def _batch_finished(self, result: object, commit: object) -> None:
        if self._commit is commit:  # not if the next commit already started
            self._commit = None
        if isinstance(result, Failure):
            self.log.failure("the group commit loop failed", result)
        if self._renewal == "wanted":
            self._start_renewal()
        self._commit_next_batch()
        self._notify_if_idle()


def json_size_bound(name: str, partials: Partials) -> int:
    """An upper bound on the bytes of ``"name": {partials},`` in ASCII JSON,
    without encoding it: a non-ASCII character takes at most 12 bytes
    (a surrogate pair of escapes), a replica id is ASCII, a count at most
    19 digits."""
    name_bytes = len(name) if name.isascii() else 12 * len(name)
    return name_bytes + 8 + sum(len(replica) + 25 for replica in partials)


def _request_of(record: IdempotencyRecord) -> tuple[tuple[bool, dict[str, int]], Acknowledged]:
    """The request a stored key answered, and the answer to replay."""
    if record.amount != BULK_RECORD:
        return (False, {record.counter: record.amount}), Acknowledged(record.value, replayed=True)
    stored = json.loads(record.counter)
    return (True, stored["increments"]), Acknowledged(0, True, stored["values"])


def _key_reused(key: str, first: tuple[bool, dict[str, int]]) -> KeyReused:
    bulk, amounts = first
    if bulk:
        what = f"a bulk increment of {len(amounts)} counters"
    else:
        ((counter, amount),) = amounts.items()
        what = f"an increment of {counter!r} by {amount}"
    return KeyReused(
        f"Idempotency-Key {key!r} was already used for a different request ({what}); use a new key for a new increment"
    )
