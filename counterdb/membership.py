"""
Membership: which hosts form the cluster, and which of them is this node.

:class:`Members` validates an actors list, finds this node in it (which may
resolve names, so that part runs in a thread), has the node record it, and
then tells its listeners (replication) about the new membership. Only the
node writes the node's store.

Every list carries a **version** ``(number, replica id of the node that
made it)``. A list posted by an operator gets the next number on the node it
was posted to; lists spread between nodes (in poll answers, and pushed to a
peer that answers with an older one) are adopted only if newer. Tuples
compare number first, then replica id, so two lists posted at the same time
on two nodes resolve to the same winner on every node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from counterdb.actors import (
    Actor,
    ConfigError,
    NotAMember,
    identify_self,
    is_local_address,
    parse_actors,
    resolve_host,
)
from counterdb.node import Node, StoreUnavailable

log = Logger()


@attrs.frozen
class Identity:
    """What this node knows about its own address, to find itself in a config."""

    listen_port: int
    interface: str | None = None
    advertise: Actor | None = None


Version = tuple[int, str]

#: The version of "no list yet": older than any list.
NO_VERSION: Version = (0, "")


@attrs.frozen
class Membership:
    actors: tuple[Actor, ...]
    self_index: int
    version: Version = NO_VERSION

    def peers(self, listen_port: int, scheme: str = "http") -> dict[str, Actor]:
        """Every actor but this node, keyed by base URL."""
        return {
            actor.base_url(listen_port, scheme): actor for i, actor in enumerate(self.actors) if i != self.self_index
        }

    def config(self) -> dict[str, Any]:
        """The versioned list, as nodes hand it to each other."""
        return {"actors": [a.entry for a in self.actors], "version": list(self.version)}

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.self_index,
            "self": self.actors[self.self_index].entry,
            "actors": [a.entry for a in self.actors],
            "version": list(self.version),
        }


class Members:
    """This node's current membership, and how it changes."""

    def __init__(
        self,
        node: Node,
        identity: Identity,
        resolve: Callable[[str], set[str]] | None = None,
        is_local: Callable[[str], bool] | None = None,
        run_blocking: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        self.node = node
        self.identity = identity
        self.current: Membership | None = None
        #: Set when a newer list left this node out: it serves reads, but
        #: takes no increments and answers no consistent reads.
        self.removed_by: Version | None = None
        #: Set when peers sync with this node while it has no list (its data
        #: dir was wiped, or it is joining): it is part of a cluster it does
        #: not know yet, so it cannot answer consistent reads.
        self.wanted = False
        self._resolve = resolve or resolve_host
        self._is_local = is_local or is_local_address
        self._run_blocking = run_blocking or maybeDeferred
        self._listeners: list[Callable[[Membership | None], None]] = []

    def on_change(self, listener: Callable[[Membership | None], None]) -> None:
        """Call ``listener(membership)`` on every change; None: removed."""
        self._listeners.append(listener)

    def not_consistent_because(self) -> str | None:
        """Why a consistent read here would not be consistent, if it would not."""
        if self.removed_by is not None:
            return "this node was removed from the cluster; ask a member"
        if self.current is None and self.wanted:
            return "this node is not configured yet, but peers sync with it: it waits for their actors list"
        return None

    @property
    def version(self) -> Version:
        return self.current.version if self.current else self.removed_by or NO_VERSION

    def configure(self, entries: Any) -> Deferred[Membership]:
        """Validate, record and apply an actors list an operator posted
        (``POST /config``) under the next version; fails with ConfigError
        or StoreUnavailable and then changes nothing. The list this node
        already has is kept as it is (posting one list to every node stays
        one version)."""
        if self.current is not None and entries == [a.entry for a in self.current.actors]:
            return succeed(self.current)
        version = (self.version[0] + 1, self.node.replica_id)
        return self._configure(entries, version)

    def heard(self, config: Any, send: Callable[[dict[str, Any]], None]) -> None:
        """A peer's versioned list (from a poll answer): adopt it if newer;
        if older (or none: a wiped peer), ``send`` it ours."""
        version, entries = read_config(config)
        if version > self.version:
            d = self.adopt(entries, version)
            d.addErrback(lambda f: log.failure("could not adopt a peer's actors list", f))
        elif version < self.version and self.current is not None:
            send(self.current.config())

    def adopt(self, entries: Any, version: Version) -> Deferred[Membership | None]:
        """Apply a list spread from another node if it is newer than ours
        (else fire with None). A newer list without this node removes it."""
        if version <= self.version:
            return succeed(None)
        d = self._configure(entries, version)
        d.addErrback(self._removed_unless_other_error, version)
        return d

    def _configure(self, entries: Any, version: Version) -> Deferred[Membership]:
        try:
            actors = parse_actors(entries, self.identity.listen_port)
        except ConfigError as e:
            return fail(e)
        d = self._run_blocking(self._find_self, actors, version)
        d.addCallback(self._record)
        return d

    def _removed_unless_other_error(self, failure: Failure, version: Version) -> None:
        failure.trap(NotAMember)
        if self.current is not None and version > self.current.version:
            log.warn("a newer actors list (version {version}) leaves this node out: removed", version=version)
            self.current, self.removed_by = None, version
            for listener in self._listeners:
                listener(None)

    def configure_at_start(self, entries: Any, persist: bool) -> Membership:
        """Apply an actors list before the node serves anything, at once:
        a restarted node must not answer, even briefly, as a one-node
        cluster while its stored list is written back. Raises ConfigError.
        ``persist`` records it too (for ``--actors``), in the background."""
        version = self.node.stored_version if not persist else (self.node.stored_version[0] + 1, self.node.replica_id)
        membership = self._find_self(parse_actors(entries, self.identity.listen_port), version)
        self._apply(membership)
        if persist:
            d = self.node.save_config(_entries(membership), membership.version)
            d.addErrback(lambda f: log.failure("could not store the --actors list", f))
        return membership

    def _find_self(self, actors: list[Actor], version: Version) -> Membership:
        i = self.identity
        index = identify_self(actors, i.listen_port, i.interface, i.advertise, self._resolve, self._is_local)
        return Membership(tuple(actors), index, version)

    def _record(self, membership: Membership) -> Deferred[Membership]:
        d = self.node.save_config(_entries(membership), membership.version)
        d.addCallbacks(lambda _: self._apply(membership), _not_recorded)
        return d

    def _apply(self, membership: Membership) -> Membership:
        self.current, self.removed_by = membership, None
        for listener in self._listeners:
            listener(membership)
        log.info(
            "configured: {actors} (version {version}), this node is #{index}",
            actors=_entries(membership),
            version=list(membership.version),
            index=membership.self_index,
        )
        return membership


def read_config(config: Any) -> tuple[Version, Any]:
    """``(version, actors)`` of a versioned list from a peer; no list (or
    one not in that shape) is :data:`NO_VERSION`."""
    if not isinstance(config, dict):
        return NO_VERSION, None
    version = config.get("version")
    if (
        isinstance(version, list)
        and len(version) == 2
        and isinstance(version[0], int)
        and not isinstance(version[0], bool)
        and 0 <= version[0] < 2**63
        and isinstance(version[1], str)
        and len(version[1]) <= 128
    ):
        return (version[0], version[1]), config.get("actors")
    return NO_VERSION, None


def _entries(membership: Membership) -> list[str]:
    return [a.entry for a in membership.actors]


def _not_recorded(failure: Failure) -> None:
    log.failure("could not store the actors list", failure)
    raise StoreUnavailable(f"could not record the configuration: {failure.getErrorMessage()}")
