"""
Storage of a node's state.

A store persists the node's replica id, its last accepted actors list, its
own partials (durably: an increment is acknowledged only after the write's
Deferred fired) and its copies of peers' partials (may be written lazily:
they can be fetched again, but they never go backwards).
"""

from __future__ import annotations

import uuid
from typing import Iterable, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed

from counterdb.crdt import Partials


def new_replica_id() -> str:
    """A fresh replica id: random, so a wiped data dir never reuses an old one."""
    return uuid.uuid4().hex


@attrs.frozen
class LoadedState:
    replica_id: str
    actors: list[str] | None
    entries: list[tuple[str, str, int]] = attrs.field(factory=list)  # (counter, replica, count)


class Store(Protocol):
    def load(self) -> LoadedState:
        """Read everything persisted (called once, at start-up)."""

    def write_own(self, partials: dict[str, int]) -> Deferred[None]:
        """Durably record this node's own new partials (absolute values)."""

    def write_peers(self, counters: dict[str, Partials]) -> Deferred[None]:
        """Record partials learnt from peers (never lower than before)."""

    def write_config(self, actors: list[str]) -> Deferred[None]:
        """Record the accepted actors list."""

    def close(self) -> None:
        """Release files and threads."""


class MemoryStore:
    """Keeps nothing across restarts: for tests and throw-away nodes."""

    def __init__(self, replica_id: str | None = None) -> None:
        self.replica_id = replica_id or new_replica_id()
        self.actors: list[str] | None = None
        self.counters: dict[str, Partials] = {}

    def load(self) -> LoadedState:
        entries = [
            (name, replica, count)
            for name, partials in self.counters.items()
            for replica, count in partials.items()
        ]
        return LoadedState(self.replica_id, self.actors, entries)

    def write_own(self, partials: dict[str, int]) -> Deferred[None]:
        for name, count in partials.items():
            self._raise(name, self.replica_id, count)
        return succeed(None)

    def write_peers(self, counters: dict[str, Partials]) -> Deferred[None]:
        for name, partials in counters.items():
            for replica, count in partials.items():
                self._raise(name, replica, count)
        return succeed(None)

    def write_config(self, actors: list[str]) -> Deferred[None]:
        self.actors = list(actors)
        return succeed(None)

    def close(self) -> None:
        pass

    def _raise(self, name: str, replica: str, count: int) -> None:
        partials = self.counters.setdefault(name, {})
        partials[replica] = max(partials.get(replica, 0), count)


def entries_of(counters: dict[str, Partials]) -> Iterable[tuple[str, str, int]]:
    for name, partials in counters.items():
        for replica, count in partials.items():
            yield name, replica, count
