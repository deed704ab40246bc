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

import re
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs

#: Largest value of one replica's partial: a signed 64-bit integer, so that
#: every node can check it locally and store it as an SQLite INTEGER. A
#: counter's total (the sum of its partials) is an exact integer of any size.
MAX_COUNT = 2**63 - 1

#: Counter names are 1..255 bytes of UTF-8.
MAX_NAME_BYTES = 255

#: Replica ids are short ASCII strings (we generate 32 hex characters).
MAX_REPLICA_ID_CHARS = 128
#: Most replica ids one counter state from outside may carry: a cluster has
#: a handful of nodes plus the retired ids of replaced ones, and this bounds
#: what one counter costs to store, answer and merge.
MAX_REPLICAS = 1000
_REPLICA_ID = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_REPLICA_ID_CHARS}}}")

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
        raise ValueError(f"counter name must be 1 to {MAX_NAME_BYTES} bytes of UTF-8, got {size} bytes")
    if "/" in name:
        raise ValueError("counter name must not contain '/'")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("counter name must be valid UTF-8") from None
    return name


def is_replica_id(text: object) -> bool:
    """Whether ``text`` is a replica id: 1 to 128 of ``A-Z a-z 0-9 _ . -``.
    As strict as this, a replica id from a peer can never fail to encode
    or compare differently in the store."""
    return isinstance(text, str) and _REPLICA_ID.fullmatch(text) is not None


def validate_partials(obj: Any) -> Partials:
    """Check a JSON-decoded state ``{"<replica id>": <count>, ...}``.

    Raises :class:`InvalidState` naming the first problem found.
    """
    if not isinstance(obj, dict):
        raise InvalidState("partials must be a JSON object mapping replica ids to counts")
    if len(obj) > MAX_REPLICAS:
        raise InvalidState(f"a counter has at most {MAX_REPLICAS} replicas' partials, got {len(obj)}")
    for replica, count in obj.items():
        if not is_replica_id(replica):
            raise InvalidState(
                f"replica ids must be 1 to {MAX_REPLICA_ID_CHARS} characters from A-Z, a-z, 0-9, '_', '.' "
                f"and '-', got {replica[: MAX_REPLICA_ID_CHARS + 1]!r}"
            )
        # bool is an int subclass in Python; true/false are not counts.
        if isinstance(count, bool) or not isinstance(count, int):
            raise InvalidState(f"count for replica {replica!r} must be an integer")
        if not 0 <= count <= MAX_COUNT:
            raise InvalidState(f"count for replica {replica!r} must be between 0 and {MAX_COUNT}")
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
    """Every counter a node knows, with per-counter versions for delta sync.

    Each change stamps the counter with the next version and appends it to
    a :class:`ChangeLog`, so "what changed after version V" costs
    O(log n + page) whatever the table size.
    """

    def __init__(self) -> None:
        self._counters: dict[str, Partials] = {}
        self._versions: dict[str, int] = {}  # counter -> version of its last change
        # Every replica id with a partial anywhere, each stored once: partials
        # only grow, so this only grows too (and shares the id strings).
        self._replicas: dict[str, str] = {}
        self._log = ChangeLog()
        self.version = 0

    def __len__(self) -> int:
        return len(self._counters)

    def __contains__(self, name: object) -> bool:
        return name in self._counters

    def replica_ids(self) -> set[str]:
        """Every replica id with a partial in some counter."""
        return set(self._replicas)

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
                current[self._replicas.setdefault(replica, replica)] = count
                grown[replica] = count
        if grown:
            self._stamp(name)
        return grown

    def load(self, entries: Iterable[tuple[str, str, int]]) -> None:
        """Bulk-load ``(counter, replica, count)`` rows at start-up.

        Replica ids repeat on every row; sharing one string object per id
        keeps a table of a million counters from holding millions of copies.
        """
        replicas = self._replicas
        counters = self._counters
        for name, replica, count in entries:
            if count <= 0:
                continue
            replica = replicas.setdefault(replica, replica)
            current = counters.get(name)
            if current is None:
                current = counters[name] = {}
                self._stamp(name)
            if count > current.get(replica, 0):
                current[replica] = count

    def changes_since(
        self,
        since: int,
        limit: int | None = None,
        budget: int | None = None,
        cost: Callable[[str, Partials], int] | None = None,
    ) -> tuple[dict[str, Partials], int, bool]:
        """The counters changed after version ``since``, oldest change first.

        Returns ``(counters, version, more)``: the changed counters with all
        their partials, the version to ask from next time, and whether the
        answer was cut short by ``limit`` counters or by ``budget`` (the sum
        of ``cost(name, partials)``; at least one counter is always given).
        """
        counters: dict[str, Partials] = {}
        last, spent = since, 0
        for version, name in self._log.after(since):
            partials = self._counters[name]
            if cost is not None and budget is not None:
                spent += cost(name, partials)
                if counters and spent > budget:
                    return counters, last, True
            if limit is not None and len(counters) == limit:
                return counters, last, True
            counters[name] = dict(partials)
            last = version
        return counters, self.version, False

    def _stamp(self, name: str) -> None:
        self.version += 1
        previous = self._versions.get(name)
        if previous is not None:
            self._log.forget(previous)
        self._versions[name] = self.version
        self._log.append(self.version, name)


@attrs.define
class _Block:
    versions: array  # ascending
    names: list[str]
    stale: set[int] = attrs.Factory(set)  # versions re-stamped since


class ChangeLog:
    """``(version, name)`` entries in ascending version order, in blocks of
    at most :attr:`BLOCK` entries, with superseded entries dropped.

    Forgetting an entry marks it stale in its block; a block that is half
    stale is rewritten (O(BLOCK)) and an empty one removed, so no single
    change ever costs more than one block's rewrite, and a reader skips at
    most about as many stale entries as it returns live ones.
    """

    BLOCK = 4096

    def __init__(self) -> None:
        self._blocks: list[_Block] = []
        self._firsts: list[int] = []  # first version of each block, for bisect

    def append(self, version: int, name: str) -> None:
        if not self._blocks or len(self._blocks[-1].versions) >= self.BLOCK:
            self._blocks.append(_Block(array("q"), []))
            self._firsts.append(version)
        block = self._blocks[-1]
        block.versions.append(version)
        block.names.append(name)

    def forget(self, version: int) -> None:
        i = bisect_right(self._firsts, version) - 1
        block = self._blocks[i]
        block.stale.add(version)
        if len(block.stale) * 2 >= len(block.versions):
            self._rewrite(i)

    def after(self, since: int) -> Iterator[tuple[int, str]]:
        """Live entries with a version above ``since``, oldest first. Do
        not change the log while iterating."""
        i = max(0, bisect_right(self._firsts, since) - 1)
        for block in self._blocks[i:]:
            start = bisect_right(block.versions, since)
            for version, name in zip(block.versions[start:], block.names[start:]):
                if version not in block.stale:
                    yield version, name

    def _rewrite(self, i: int) -> None:
        block = self._blocks[i]
        keep = [j for j, v in enumerate(block.versions) if v not in block.stale]
        if not keep:
            del self._blocks[i], self._firsts[i]
            return
        self._blocks[i] = _Block(array("q", [block.versions[j] for j in keep]), [block.names[j] for j in keep])
        self._firsts[i] = block.versions[keep[0]]
