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
    if name.isascii() and 1 <= len(name) <= MAX_NAME_BYTES and "/" not in name:
        return name  # the common case: ASCII is one byte a character and always valid UTF-8
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


def validate_partials(obj: Any, valid_ids: set[str] | None = None) -> Partials:
    """Check a JSON-decoded state ``{"<replica id>": <count>, ...}``.

    ``valid_ids`` holds replica ids already found valid (the caller's, for
    one batch): each distinct id is matched against the pattern once, and
    those that pass are added. A batch of 5,000 counters carries the same
    three ids 5,000 times, and the regular expression was 5-9 % of a
    catching-up node's CPU.

    Raises :class:`InvalidState` naming the first problem found.
    """
    if not isinstance(obj, dict):
        raise InvalidState("partials must be a JSON object mapping replica ids to counts")
    if len(obj) > MAX_REPLICAS:
        raise InvalidState(f"a counter has at most {MAX_REPLICAS} replicas' partials, got {len(obj)}")
    known = valid_ids if valid_ids is not None else set()
    for replica, count in obj.items():
        if replica not in known:
            _check_replica_id(replica)
            known.add(replica)
        # ``type() is int`` is the common case and excludes bool (true and
        # false are not counts); anything else gets the exact checks.
        if type(count) is not int or not 0 <= count <= MAX_COUNT:
            _check_count(replica, count)
    return dict(obj)


def _check_replica_id(replica: Any) -> None:
    if not is_replica_id(replica):
        raise InvalidState(
            f"replica ids must be 1 to {MAX_REPLICA_ID_CHARS} characters from A-Z, a-z, 0-9, '_', '.' "
            f"and '-', got {replica[: MAX_REPLICA_ID_CHARS + 1]!r}"
        )


def _check_count(replica: str, count: Any) -> None:
    # bool is an int subclass in Python; true/false are not counts.
    if isinstance(count, bool) or not isinstance(count, int):
        raise InvalidState(f"count for replica {replica!r} must be an integer")
    if not 0 <= count <= MAX_COUNT:
        raise InvalidState(f"count for replica {replica!r} must be between 0 and {MAX_COUNT}")


def validate_counters(obj: Any) -> dict[str, Partials]:
    """Check a JSON-decoded batch ``{"<counter>": {"<replica>": <count>}}``."""
    if not isinstance(obj, dict):
        raise InvalidState("counters must be a JSON object mapping names to partials")
    checked: dict[str, Partials] = {}
    valid_ids: set[str] = set()  # replica ids of this batch that passed
    for name, partials in obj.items():
        try:
            validate_name(name)
        except ValueError as e:
            raise InvalidState(str(e)) from None
        checked[name] = validate_partials(partials, valid_ids)
    return checked


class CounterTable:
    """Every counter a node knows, with per-counter versions for delta sync.

    Each change stamps the counter with the next version and appends it to
    a :class:`ChangeLog`, so "what changed after version V" costs
    O(log n + page) whatever the table size.

    The layout is compact (a million counters of three replicas take about
    150 bytes each, against about 430 as a dict of dicts): each counter is a
    *row* number, found by name in one dict; replica ids are interned to
    small ints; and a row's partials sit in *slots*, column arrays indexed
    by row. Slot ``k`` holds one (replica, count) pair per row: a row fills
    its slots in order and never frees one (partials only grow), so a count
    of 0 marks the first free slot and the end of the row. A counter with
    more than :attr:`SLOTS` replicas keeps the rest in a small dict. Memory
    is therefore proportional to each counter's own replicas, however many
    replica ids the table has seen, and a read or merge touches only them.

    A merge may name its *source*, the peer whose state it is. When the
    counter's state is then exactly that peer's, the row records that the
    peer holds it (a bit per peer, :attr:`SOURCES` at most), and
    :meth:`changes_since` for that peer leaves the row out: a new node that
    learns a million counters from its peers does not send them all back.
    A peer that asks from version 0 again (it restarted, or its link was
    made anew) gets a fresh bit, so it is sent everything: what its last
    run held is not assumed.
    """

    #: Slot columns before a counter's further partials go to a dict.
    SLOTS = 8
    #: Peers whose holdings the table records at once (bits of an int64).
    SOURCES = 63

    def __init__(self) -> None:
        self._rows: dict[str, int] = {}  # counter -> row
        self._names: list[str] = []  # row -> counter
        self._stamps = array("q")  # row -> version of its last change
        self._ids: list[str] = []  # replica number -> replica id
        self._numbers: dict[str, int] = {}  # replica id -> replica number
        # Slot k: the replica number and the count of each row's k-th
        # partial. A column may be shorter than the table: rows past its
        # end have nothing in that slot.
        self._slot_ids: list[array] = []  # "i"
        self._slot_counts: list[array] = []  # "q"
        self._overflow: dict[int, dict[int, int]] = {}  # row -> {replica number: count} past SLOTS
        self._heard = array("q")  # row -> bits of the sources known to hold its state
        self._sources: dict[str, int] = {}  # replica id of a peer -> its bit, for this run of it
        self._next_source = 0  # the next bit to hand out
        self._log = ChangeLog(self._stamps)
        self.version = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, name: object) -> bool:
        return name in self._rows

    def replica_ids(self) -> set[str]:
        """Every replica id with a partial in some counter."""
        return set(self._ids)

    def partials(self, name: str) -> Partials:
        """A copy of the state of ``name`` (empty if nobody incremented it)."""
        row = self._rows.get(name)
        return {} if row is None else self._partials_of(row)

    def partial(self, name: str, replica: str) -> int:
        row = self._rows.get(name)
        number = self._numbers.get(replica)
        if row is None or number is None:
            return 0
        for ids, counts in zip(self._slot_ids, self._slot_counts):
            if row >= len(counts) or not (count := counts[row]):
                return 0
            if ids[row] == number:
                return count
        extra = self._overflow.get(row)
        return extra.get(number, 0) if extra else 0

    def value(self, name: str) -> int:
        row = self._rows.get(name)
        if row is None:
            return 0
        total = 0
        for counts in self._slot_counts:
            if row >= len(counts) or not (count := counts[row]):
                return total
            total += count
        extra = self._overflow.get(row)
        return total + sum(extra.values()) if extra else total

    def merge(self, name: str, partials: Mapping[str, int], source: str | None = None) -> Partials:
        """Merge ``partials`` into counter ``name``; ``source`` is the
        replica id of the peer whose whole state of the counter they are,
        if they are.

        Returns the entries that grew (replica -> new count); empty if the
        merge taught us nothing.
        """
        row = self._rows.get(name)
        if row is None:
            return self._merge_new(name, partials, source)
        if partials == self._partials_of(row):
            # The usual repeat (a second peer sending the same state while a
            # node catches up): nothing grows, and the source holds it.
            if source is not None:
                bit = self._source_bit(source)
                self._heard[row] |= bit
            return {}
        grown: Partials = {}
        covers = True  # whether no partial here is larger than the incoming one
        given = 0
        for replica, count in partials.items():
            if count <= 0:
                continue
            if count > MAX_COUNT:
                raise ValueError(f"a partial is at most {MAX_COUNT}, got {count}")
            given += 1
            change = self._grow(row, self._number(replica), count)
            if change > 0:
                grown[replica] = count
            elif change < 0:
                covers = False
        bit = self._source_bit(source) if source is not None and covers else 0
        if bit and given != self._width(row):
            bit = 0  # the counter has partials the source did not send
        if grown:
            self._stamp(row)
            self._heard[row] = bit
        elif bit:
            self._heard[row] |= bit
        return grown

    def _merge_new(self, name: str, partials: Mapping[str, int], source: str | None) -> Partials:
        """:meth:`merge` into a counter this table does not hold yet: its
        partials go straight into a new row's slots, as at load time (a
        node catching up creates a million rows this way, and the general
        path's per-partial slot search was half of each merge)."""
        grown: Partials = {}
        for replica, count in partials.items():
            if count > 0:
                if count > MAX_COUNT:
                    raise ValueError(f"a partial is at most {MAX_COUNT}, got {count}")
                grown[replica] = count
        if not grown:
            return grown
        row = self._add_row(name)
        self._fill_row(row, {self._number(replica): count for replica, count in grown.items()})
        self._stamp(row)
        # The state is exactly what the source sent, so the source holds it.
        bit = self._source_bit(source) if source is not None else 0
        self._heard[row] = bit
        return grown

    def load(self, entries: Iterable[tuple[str, str, int]]) -> None:
        """Bulk-load ``(counter, replica, count)`` rows at start-up.

        Rows of one counter usually come together (the store reads them in
        key order), so they are gathered and a new counter's row is written
        in one go; rows in any order give the same table, only slower.
        """
        numbers = self._numbers
        name: str | None = None
        gathered: dict[int, int] = {}  # replica number -> count, of counter ``name``
        for counter, replica, count in entries:
            if count <= 0:
                continue
            if counter != name:
                if gathered:
                    self._load_counter(name, gathered)  # type: ignore[arg-type]
                name, gathered = counter, {}
            number = numbers.get(replica)
            if number is None:
                number = self._number(replica)
            if count > gathered.get(number, 0):
                gathered[number] = count
        if gathered:
            self._load_counter(name, gathered)  # type: ignore[arg-type]

    def _load_counter(self, name: str, partials: dict[int, int]) -> None:
        row = self._rows.get(name)
        if row is not None:
            for number, count in partials.items():
                self._grow(row, number, count)
            return
        row = self._add_row(name)
        self._stamp(row)
        self._fill_row(row, partials)

    def _fill_row(self, row: int, partials: dict[int, int]) -> None:
        """Write the partials (replica number -> count > 0) of a new ``row``."""
        slot_ids, slot_counts = self._slot_ids, self._slot_counts
        for slot, (number, count) in enumerate(partials.items()):
            if slot >= self.SLOTS:
                self._overflow.setdefault(row, {})[number] = count
                continue
            if slot == len(slot_counts):
                slot_ids.append(array("i"))
                slot_counts.append(array("q"))
            counts = slot_counts[slot]
            if len(counts) == row:  # the usual case: the column ends at this new row
                slot_ids[slot].append(number)
                counts.append(count)
            else:
                self._put(slot_ids[slot], counts, row, number, count)

    def changes_since(
        self,
        since: int,
        limit: int | None = None,
        budget: int | None = None,
        cost: Callable[[str, Partials], int] | None = None,
        peer: str | None = None,
    ) -> tuple[dict[str, Partials], int, bool]:
        """The counters changed after version ``since``, oldest change first.

        Returns ``(counters, version, more)``: the changed counters with all
        their partials, the version to ask from next time, and whether the
        answer was cut short by ``limit`` counters or by ``budget`` (the sum
        of ``cost(name, partials)``; at least one counter is always given).
        With ``peer`` (the replica id asking), counters that peer is known
        to hold are left out; the answer then also stops after passing over
        ``10 * limit`` of them, so it never walks the whole table in one go.
        """
        counters: dict[str, Partials] = {}
        last, spent = since, 0
        bit, passed = 0, 0
        if peer is not None:
            if since == 0:
                self._sources.pop(peer, None)  # a new run of the peer, or a new link: assume nothing
            bit = self._source_bit(peer)
        names, heard = self._names, self._heard
        most_passed = 10 * limit if limit is not None else None
        for version, row in self._log.after(since):
            if limit is not None and len(counters) == limit:
                return counters, last, True
            if heard[row] & bit:
                passed += 1
                if most_passed is not None and passed > most_passed:
                    return counters, last, True
                last = version
                continue
            name, partials = names[row], self._partials_of(row)
            if cost is not None and budget is not None:
                spent += cost(name, partials)
                if counters and spent > budget:
                    return counters, last, True
            counters[name] = partials
            last = version
        return counters, self.version, False

    # -- the layout ------------------------------------------------------------

    def _add_row(self, name: str) -> int:
        row = self._rows[name] = len(self._names)
        self._names.append(name)
        self._stamps.append(0)
        self._heard.append(0)
        return row

    def _source_bit(self, source: str) -> int:
        """The bit of ``source`` in :attr:`_heard`. Bits are handed out in
        turn and a forgotten one is not reused; when all are taken, every
        row's bits are cleared and handing out starts again (the table
        forgets who holds what, and sends more, never less)."""
        index = self._sources.get(source)
        if index is None:
            if self._next_source >= self.SOURCES:
                self._heard = array("q", bytes(8 * len(self._heard)))
                self._sources.clear()
                self._next_source = 0
            index = self._sources[source] = self._next_source
            self._next_source += 1
        return 1 << index

    def _width(self, row: int) -> int:
        """How many partials ``row`` has."""
        width = 0
        for counts in self._slot_counts:
            if row >= len(counts) or not counts[row]:
                return width
            width += 1
        return width + len(self._overflow.get(row, ()))

    def _number(self, replica: str) -> int:
        number = self._numbers.get(replica)
        if number is None:
            number = self._numbers[replica] = len(self._ids)
            self._ids.append(replica)
        return number

    def _partials_of(self, row: int) -> Partials:
        ids_of = self._ids
        partials: Partials = {}
        for ids, counts in zip(self._slot_ids, self._slot_counts):
            if row >= len(counts) or not (count := counts[row]):
                return partials
            partials[ids_of[ids[row]]] = count
        extra = self._overflow.get(row)
        if extra:
            for number, count in extra.items():
                partials[ids_of[number]] = count
        return partials

    def _grow(self, row: int, number: int, count: int) -> int:
        """Raise replica ``number``'s partial in ``row`` to ``count`` (> 0)
        if that is larger: 1 if it grew, 0 if it was ``count``, -1 if it
        was larger."""
        slot = 0
        for ids, counts in zip(self._slot_ids, self._slot_counts):
            if row < len(counts) and (held := counts[row]):
                if ids[row] == number:
                    if count > held:
                        counts[row] = count
                        return 1
                    return 0 if count == held else -1
                slot += 1
                continue
            # The row's first free slot: the replica has no partial here.
            self._put(ids, counts, row, number, count)
            return 1
        if slot < self.SLOTS:
            self._slot_ids.append(array("i"))
            self._slot_counts.append(array("q"))
            self._put(self._slot_ids[-1], self._slot_counts[-1], row, number, count)
            return 1
        extra = self._overflow.setdefault(row, {})
        held = extra.get(number, 0)
        if count > held:
            extra[number] = count
            return 1
        return 0 if count == held else -1

    @staticmethod
    def _put(ids: array, counts: array, row: int, number: int, count: int) -> None:
        gap = row - len(counts)
        if gap < 0:
            ids[row], counts[row] = number, count
            return
        if gap:  # rows in between have nothing in this slot
            ids.frombytes(bytes(ids.itemsize * gap))
            counts.frombytes(bytes(counts.itemsize * gap))
        ids.append(number)
        counts.append(count)

    def _stamp(self, row: int) -> None:
        self.version += 1
        previous = self._stamps[row]
        self._stamps[row] = self.version
        self._log.append(self.version, row)
        if previous:
            self._log.forget(previous)


@attrs.define
class _Block:
    versions: array  # "q", ascending
    rows: array  # "i"
    stale: int = 0  # entries re-stamped since


class ChangeLog:
    """``(version, row)`` entries in ascending version order, in blocks of
    at most :attr:`BLOCK` entries, with superseded entries dropped.

    An entry is live while its row's stamp (in the table's ``stamps``
    array) is still its version. Forgetting an entry counts it stale in its
    block; a block that is half stale is rewritten (O(BLOCK)) and an empty
    one removed, so no single change ever costs more than one block's
    rewrite, and a reader skips at most about as many stale entries as it
    returns live ones.
    """

    BLOCK = 4096

    def __init__(self, stamps: array) -> None:
        self._stamps = stamps  # row -> version of its live entry
        self._blocks: list[_Block] = []
        self._firsts: list[int] = []  # first version of each block, for bisect

    def append(self, version: int, row: int) -> None:
        if not self._blocks or len(self._blocks[-1].versions) >= self.BLOCK:
            self._blocks.append(_Block(array("q"), array("i")))
            self._firsts.append(version)
        block = self._blocks[-1]
        block.versions.append(version)
        block.rows.append(row)

    def forget(self, version: int) -> None:
        """The entry of ``version`` was superseded (its row has a newer stamp)."""
        i = bisect_right(self._firsts, version) - 1
        block = self._blocks[i]
        block.stale += 1
        if block.stale * 2 >= len(block.versions):
            self._rewrite(i)

    def after(self, since: int) -> Iterator[tuple[int, int]]:
        """Live entries with a version above ``since``, oldest first. Do
        not change the log while iterating."""
        stamps = self._stamps
        i = max(0, bisect_right(self._firsts, since) - 1)
        for block in self._blocks[i:]:
            start = bisect_right(block.versions, since)
            for version, row in zip(block.versions[start:], block.rows[start:]):
                if stamps[row] == version:
                    yield version, row

    def _rewrite(self, i: int) -> None:
        block, stamps = self._blocks[i], self._stamps
        keep = [j for j, (v, row) in enumerate(zip(block.versions, block.rows)) if stamps[row] == v]
        if not keep:
            del self._blocks[i], self._firsts[i]
            return
        versions = array("q", [block.versions[j] for j in keep])
        self._blocks[i] = _Block(versions, array("i", [block.rows[j] for j in keep]))
        self._firsts[i] = versions[0]
