"""
Membership: which hosts form the cluster, and which of them is this node.

:class:`Members` validates an actors list, finds this node in it (which may
resolve names, so that part runs in a thread), has the node record it, and
then tells its listeners (replication) about the new membership. Only the
node writes the node's store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from counterdb.actors import Actor, ConfigError, identify_self, is_local_address, parse_actors, resolve_host
from counterdb.node import Node, StoreUnavailable

log = Logger()


@attrs.frozen
class Identity:
    """What this node knows about its own address, to find itself in a config."""

    listen_port: int
    interface: str | None = None
    advertise: Actor | None = None


@attrs.frozen
class Membership:
    actors: tuple[Actor, ...]
    self_index: int

    def peers(self, listen_port: int, scheme: str = "http") -> dict[str, Actor]:
        """Every actor but this node, keyed by base URL."""
        return {
            actor.base_url(listen_port, scheme): actor for i, actor in enumerate(self.actors) if i != self.self_index
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.self_index,
            "self": self.actors[self.self_index].entry,
            "actors": [a.entry for a in self.actors],
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
        self._resolve = resolve or resolve_host
        self._is_local = is_local or is_local_address
        self._run_blocking = run_blocking or maybeDeferred
        self._listeners: list[Callable[[Membership], None]] = []

    def on_change(self, listener: Callable[[Membership], None]) -> None:
        self._listeners.append(listener)

    def configure(self, entries: Any) -> Deferred[Membership]:
        """Validate, record and apply an actors list (``POST /config``);
        fails with ConfigError or StoreUnavailable and then changes nothing."""
        try:
            actors = parse_actors(entries, self.identity.listen_port)
        except ConfigError as e:
            return fail(e)
        d = self._run_blocking(self._find_self, actors)
        d.addCallback(self._record)
        return d

    def configure_at_start(self, entries: Any, persist: bool) -> Membership:
        """Apply an actors list before the node serves anything, at once:
        a restarted node must not answer, even briefly, as a one-node
        cluster while its stored list is written back. Raises ConfigError.
        ``persist`` records it too (for ``--actors``), in the background."""
        membership = self._find_self(parse_actors(entries, self.identity.listen_port))
        self._apply(membership)
        if persist:
            d = self.node.save_config(_entries(membership))
            d.addErrback(lambda f: log.failure("could not store the --actors list", f))
        return membership

    def _find_self(self, actors: list[Actor]) -> Membership:
        i = self.identity
        index = identify_self(actors, i.listen_port, i.interface, i.advertise, self._resolve, self._is_local)
        return Membership(tuple(actors), index)

    def _record(self, membership: Membership) -> Deferred[Membership]:
        d = self.node.save_config(_entries(membership))
        d.addCallbacks(lambda _: self._apply(membership), _not_recorded)
        return d

    def _apply(self, membership: Membership) -> Membership:
        self.current = membership
        for listener in self._listeners:
            listener(membership)
        log.info(
            "configured: {actors}, this node is #{index}",
            actors=_entries(membership),
            index=membership.self_index,
        )
        return membership


def _entries(membership: Membership) -> list[str]:
    return [a.entry for a in membership.actors]


def _not_recorded(failure: Failure) -> None:
    log.failure("could not store the actors list", failure)
    raise StoreUnavailable(f"could not record the configuration: {failure.getErrorMessage()}")
