"""
One counterdb node's state: the counter table, its store and group commit.

Increments are queued and written to the store in batches: while one batch
is being made durable the next one accumulates, so concurrent increments
share a commit. Memory changes only after the store confirmed the write, so
a failed write changes nothing and nothing unacknowledged is ever served.
"""

from __future__ import annotations

import uuid
from typing import Callable, Iterable

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from counterdb.crdt import MAX_COUNT, CounterTable, Partials
from counterdb.store import Store


class Overflow(ValueError):
    """The increment would take the counter above :data:`MAX_COUNT`."""


class StoreUnavailable(RuntimeError):
    """The store could not make an increment durable; nothing was counted."""


@attrs.define
class _PendingIncrement:
    name: str
    amount: int
    done: Deferred[int]
    own_after: int = 0


class Node:
    log = Logger()

    def __init__(self, store: Store) -> None:
        self.store = store
        loaded = store.load()
        self.replica_id = loaded.replica_id
        self.stored_actors = loaded.actors
        self.table = CounterTable()
        self.table.load(loaded.entries)
        # Versions are not persisted: a new epoch tells pollers to start over.
        self.epoch = uuid.uuid4().hex
        self._queue: list[_PendingIncrement] = []
        self._committing = False
        self._change_listeners: list[Callable[[set[str]], None]] = []

    # -- reads ---------------------------------------------------------------

    def value(self, name: str) -> int:
        return self.table.value(name)

    def partials(self, name: str) -> Partials:
        return self.table.partials(name)

    def changes_since(self, since: int, epoch: str | None, limit: int) -> dict[str, object]:
        """The node-level delta a polling peer asks for (``GET /sync``)."""
        if epoch != self.epoch:
            since = 0  # the caller's version belongs to another run of ours
        counters, version, more = self.table.changes_since(since, limit)
        return {
            "replica": self.replica_id,
            "epoch": self.epoch,
            "version": version,
            "more": more,
            "counters": counters,
        }

    # -- writes --------------------------------------------------------------

    def on_local_change(self, listener: Callable[[set[str]], None]) -> None:
        """Call ``listener(names)`` after increments on this node are durable."""
        self._change_listeners.append(listener)

    def increment(self, name: str, amount: int) -> Deferred[int]:
        """Add ``amount`` to this node's partial of ``name``.

        Fires with the counter's new local value once the increment is
        durable; fails with :class:`Overflow` or :class:`StoreUnavailable`
        (and then nothing was counted).
        """
        pending = _PendingIncrement(name, amount, Deferred())
        self._queue.append(pending)
        if not self._committing:
            self._commit_next_batch()
        return pending.done

    def merge(self, counters: dict[str, Partials]) -> dict[str, Partials]:
        """Merge partials learnt from elsewhere; return the entries that grew."""
        grown: dict[str, Partials] = {}
        for name, partials in counters.items():
            changed = self.table.merge(name, partials)
            if changed:
                grown[name] = changed
        if grown:
            self.store.write_peers(grown).addErrback(self._log_peer_write_failure)
        return grown

    def _commit_next_batch(self) -> None:
        batch, self._queue = self._queue, []
        own = self._apply_batch(batch)
        accepted = [p for p in batch if not p.done.called]
        if not accepted:
            return
        self._committing = True
        d = self.store.write_own(own)
        d.addCallbacks(
            self._batch_durable,
            self._batch_failed,
            callbackArgs=(own, accepted),
            errbackArgs=(accepted,),
        )
        d.addBoth(self._batch_finished)

    def _apply_batch(self, batch: list[_PendingIncrement]) -> dict[str, int]:
        """New absolute own partials for ``batch``; rejects overflowing ones."""
        own: dict[str, int] = {}
        for pending in batch:
            mine = own.get(pending.name, self.table.partial(pending.name, self.replica_id))
            others = self.table.value(pending.name) - self.table.partial(
                pending.name, self.replica_id
            )
            if others + mine + pending.amount > MAX_COUNT:
                pending.done.errback(
                    Overflow(f"counter {pending.name!r} would exceed {MAX_COUNT}")
                )
                continue
            own[pending.name] = pending.own_after = mine + pending.amount
        return own

    def _batch_durable(self, _: None, own: dict[str, int], accepted: list[_PendingIncrement]) -> None:
        for name, count in own.items():
            self.table.merge(name, {self.replica_id: count})
        changed = set(own)
        for listener in self._change_listeners:
            listener(changed)
        for pending in accepted:
            others = self.table.value(pending.name) - self.table.partial(
                pending.name, self.replica_id
            )
            _fire(pending.done, others + pending.own_after)

    def _batch_failed(self, failure: Failure, accepted: list[_PendingIncrement]) -> None:
        self.log.failure("could not make {count} increments durable", failure, count=len(accepted))
        error = StoreUnavailable(f"the store could not commit: {failure.getErrorMessage()}")
        for pending in accepted:
            if not pending.done.called:
                pending.done.errback(error)

    def _batch_finished(self, result: object) -> None:
        self._committing = False
        if self._queue:
            self._commit_next_batch()

    def _log_peer_write_failure(self, failure: Failure) -> None:
        self.log.failure("could not store partials learnt from peers", failure)


def _fire(d: Deferred[int], result: int) -> None:
    # The client may have gone away (Klein then cancels its Deferred); the
    # increment still counted, there is just nobody left to tell.
    if not d.called:
        d.callback(result)


def names_of(counters: Iterable[str]) -> set[str]:
    return set(counters)
