"""
The pure G-Counter CRDT: state, merge, value and deltas. No I/O, no reactor.

A counter's state maps each *replica id* (a stable random id per data dir,
never a position in the actors list) to that replica's partial count.
Partials only grow, so merging two states is the element-wise maximum; the
counter's value is the sum of its partials.

:class:`CounterTable` holds every counter a node knows and stamps each
counter with the node-local, monotonically increasing version of its last
change, so a peer can ask for "everything that changed since version V" at a
cost proportional to what changed, not to the number of counters.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

#: Largest value of any partial or counter total (a signed 64-bit integer),
#: so that every client language can hold it.
MAX_COUNT = 2**63 - 1

#: Counter names are 1..255 bytes of UTF-8.
MAX_NAME_BYTES = 255

#: Replica ids are short printable strings (we generate 32 hex characters).
MAX_REPLICA_ID_CHARS = 128

Partials = dict[str, int]


class InvalidState(ValueError):
    """A counter state received from outside does not have the expected shape."""


def merge(a: Mapping[str, int], b: Mapping[str, int]) -> Partials:
    """The element-wise maximum of two states: commutative, associative and
    idempotent, so states can be exchanged in any order, any number of times.
    A missing replica counts as 0, so zero entries are left out."""
    merged = {replica: count for replica, count in a.items() if count > 0}
    for replica, count in b.items():
        if count > merged.get(replica, 0):
            merged[replica] = count
    return merged


def value(partials: Mapping[str, int]) -> int:
    """A counter's value: the sum of every replica's partial."""
    return sum(partials.values())


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid counter name, else raise ValueError."""
    size = len(name.encode("utf-8", "surrogatepass"))
    if not 1 <= size <= MAX_NAME_BYTES:
        raise ValueError(
            f"counter name must be 1 to {MAX_NAME_BYTES} bytes of UTF-8, got {size} bytes"
        )
    if "/" in name:
        raise ValueError("counter name must not contain '/'")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("counter name must be valid UTF-8") from None
    return name


def validate_partials(obj: Any) -> Partials:
    """Check a JSON-decoded state ``{"<replica id>": <count>, ...}``.

    Raises :class:`InvalidState` naming the first problem found.
    """
    if not isinstance(obj, dict):
        raise InvalidState("partials must be a JSON object mapping replica ids to counts")
    for replica, count in obj.items():
        if not isinstance(replica, str) or not 1 <= len(replica) <= MAX_REPLICA_ID_CHARS:
            raise InvalidState(
                f"replica ids must be strings of 1 to {MAX_REPLICA_ID_CHARS} characters"
            )
        # bool is an int subclass in Python; true/false are not counts.
        if isinstance(count, bool) or not isinstance(count, int):
            raise InvalidState(f"count for replica {replica!r} must be an integer")
        if not 0 <= count <= MAX_COUNT:
            raise InvalidState(
                f"count for replica {replica!r} must be between 0 and {MAX_COUNT}"
            )
    return dict(obj)


def validate_counters(obj: Any) -> dict[str, Partials]:
    """Check a JSON-decoded batch ``{"<counter>": {"<replica>": <count>}}``."""
    if not isinstance(obj, dict):
        raise InvalidState("counters must be a JSON object mapping names to partials")
    checked: dict[str, Partials] = {}
    for name, partials in obj.items():
        try:
            validate_name(name)
        except ValueError as e:
            raise InvalidState(str(e)) from None
        checked[name] = validate_partials(partials)
    return checked


class CounterTable:
    """Every counter a node knows, with per-counter versions for delta sync."""

    def __init__(self) -> None:
        self._counters: dict[str, Partials] = {}
        # counter -> version of its last change, oldest first (a plain dict
        # keeps insertion order and is half the size of an OrderedDict), so
        # the newest changes can be read from the end without a full scan.
        self._versions: dict[str, int] = {}
        self.version = 0

    def __len__(self) -> int:
        return len(self._counters)

    def names(self) -> Iterator[str]:
        return iter(self._counters)

    def partials(self, name: str) -> Partials:
        """A copy of the state of ``name`` (empty if nobody incremented it)."""
        return dict(self._counters.get(name, {}))

    def partial(self, name: str, replica: str) -> int:
        return self._counters.get(name, {}).get(replica, 0)

    def value(self, name: str) -> int:
        return value(self._counters.get(name, {}))

    def merge(self, name: str, partials: Mapping[str, int]) -> Partials:
        """Merge ``partials`` into counter ``name``.

        Returns the entries that grew (replica -> new count); empty if the
        merge taught us nothing.
        """
        current = self._counters.get(name)
        grown: Partials = {}
        for replica, count in partials.items():
            if count > (current.get(replica, 0) if current else 0):
                if current is None:
                    current = self._counters[name] = {}
                current[replica] = count
                grown[replica] = count
        if grown:
            self._stamp(name)
        return grown

    def load(self, entries: Iterable[tuple[str, str, int]]) -> None:
        """Bulk-load ``(counter, replica, count)`` rows at start-up.

        Replica ids repeat on every row; sharing one string object per id
        keeps a table of a million counters from holding millions of copies.
        """
        replicas: dict[str, str] = {}
        counters, versions = self._counters, self._versions
        for name, replica, count in entries:
            if count <= 0:
                continue
            replica = replicas.setdefault(replica, replica)
            current = counters.get(name)
            if current is None:
                current = counters[name] = {}
                self.version += 1
                versions[name] = self.version
            if count > current.get(replica, 0):
                current[replica] = count

    def changes_since(self, since: int, limit: int | None = None) -> tuple[dict[str, Partials], int, bool]:
        """The counters changed after version ``since``, oldest change first.

        Returns ``(counters, version, more)``: the changed counters with all
        their partials, the version to ask from next time, and whether
        ``limit`` cut the answer short. Costs O(counters changed since
        ``since``), not O(all counters).
        """
        newer: list[tuple[str, int]] = []
        for name in reversed(self._versions):
            version = self._versions[name]
            if version <= since:
                break
            newer.append((name, version))
        newer.reverse()
        more = limit is not None and len(newer) > limit
        if more:
            newer = newer[:limit]
        counters = {name: dict(self._counters[name]) for name, _ in newer}
        next_since = newer[-1][1] if more else self.version
        return counters, next_since, more

    def _stamp(self, name: str) -> None:
        self.version += 1
        self._versions.pop(name, None)  # re-inserting moves it to the end
        self._versions[name] = self.version
