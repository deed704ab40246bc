"""Merge laws (hypothesis) and the delta bookkeeping of the counter table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from counterdb.crdt import MAX_COUNT, CounterTable, InvalidState, merge, validate_counters, value

replicas = st.sampled_from(["r1", "r2", "r3", "r4", "r5"])
states = st.dictionaries(replicas, st.integers(min_value=0, max_value=MAX_COUNT), max_size=5)


@given(states, states)
def test_merge_is_commutative(a: dict[str, int], b: dict[str, int]) -> None:
    assert merge(a, b) == merge(b, a)


@given(states, states, states)
def test_merge_is_associative(a: dict[str, int], b: dict[str, int], c: dict[str, int]) -> None:
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


def canonical(state: dict[str, int]) -> dict[str, int]:
    """A missing replica and a replica at 0 are the same state."""
    return {replica: count for replica, count in state.items() if count > 0}


@given(states)
def test_merge_is_idempotent(a: dict[str, int]) -> None:
    assert merge(a, a) == canonical(a)
    assert merge(merge(a, a), a) == merge(a, a)


@given(states, states)
def test_merge_never_decreases_any_partial(a: dict[str, int], b: dict[str, int]) -> None:
    merged = merge(a, b)
    for replica in set(a) | set(b):
        assert merged.get(replica, 0) == max(a.get(replica, 0), b.get(replica, 0))
    assert value(merged) >= max(value(a), value(b))


@given(st.lists(states, min_size=1, max_size=6), st.randoms())
def test_any_delivery_order_and_duplication_converges(deliveries: list[dict[str, int]], rnd: object) -> None:
    """Replicas that saw the same updates, in any order and any number of
    times, agree: nothing is lost and nothing is counted twice."""
    shuffled = deliveries * 2
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    in_order: dict[str, int] = {}
    for s in deliveries:
        in_order = merge(in_order, s)
    any_order: dict[str, int] = {}
    for s in shuffled:
        any_order = merge(any_order, s)
    assert any_order == in_order


@given(st.lists(st.tuples(st.sampled_from("abc"), states), max_size=20))
def test_table_merge_matches_pure_merge(updates: list[tuple[str, dict[str, int]]]) -> None:
    table = CounterTable()
    expected: dict[str, dict[str, int]] = {}
    for name, state in updates:
        table.merge(name, state)
        expected[name] = merge(expected.get(name, {}), state)
    for name in "abc":
        assert table.partials(name) == {r: c for r, c in expected.get(name, {}).items() if c > 0}
        assert table.value(name) == value(expected.get(name, {}))


@given(st.lists(st.tuples(st.sampled_from("abcdef"), replicas, st.integers(1, 100)), max_size=40), st.data())
def test_changes_since_returns_exactly_what_changed_after_a_version(
    updates: list[tuple[str, str, int]], data: st.DataObject
) -> None:
    table = CounterTable()
    history: list[tuple[int, str]] = []  # (version after, counter)
    for name, replica, count in updates:
        if table.merge(name, {replica: table.partial(name, replica) + count}):
            history.append((table.version, name))
    since = data.draw(st.integers(0, table.version))
    counters, version, more = table.changes_since(since)
    assert set(counters) == {n for v, n in history if v > since}
    assert version == table.version and not more
    for name, partials in counters.items():
        assert partials == table.partials(name)


@given(st.lists(st.tuples(st.sampled_from("abc"), replicas, st.integers(0, 100)), max_size=30))
def test_bulk_load_equals_merging_row_by_row(rows: list[tuple[str, str, int]]) -> None:
    loaded, merged = CounterTable(), CounterTable()
    loaded.load(rows)
    for name, replica, count in rows:
        merged.merge(name, {replica: count})
    for name in "abc":
        assert loaded.partials(name) == merged.partials(name)
    assert set(loaded.changes_since(0)[0]) == set(merged.changes_since(0)[0])


def test_changes_since_pages_in_version_order() -> None:
    table = CounterTable()
    for name in "abcde":
        table.merge(name, {"r": 1})
    table.merge("a", {"r": 2})  # a moves behind e
    page, version, more = table.changes_since(0, limit=3)
    assert list(page) == ["b", "c", "d"] and more
    page, version, more = table.changes_since(version, limit=3)
    assert list(page) == ["e", "a"] and not more and page["a"] == {"r": 2}


def test_merge_reports_only_entries_that_grew() -> None:
    table = CounterTable()
    assert table.merge("c", {"r1": 3, "r2": 0}) == {"r1": 3}
    assert table.merge("c", {"r1": 2}) == {}
    assert table.version == 1
    assert len(table) == 1


def test_validate_counters_rejects_bad_names_and_counts() -> None:
    for bad in ({"": {"r": 1}}, {"x" * 256: {"r": 1}}, {"c": {"r": -1}}, {"c": []}, []):
        try:
            validate_counters(bad)
        except InvalidState:
            continue
        raise AssertionError(f"accepted {bad!r}")
    assert validate_counters({"c": {"r": MAX_COUNT}}) == {"c": {"r": MAX_COUNT}}


changes = st.lists(st.tuples(st.integers(0, 40), st.integers(1, 10**6)), max_size=300)


@given(changes, st.integers(1, 7), st.integers(0, 300))
def test_paging_after_any_version_returns_exactly_the_counters_changed_since(
    updates: list[tuple[int, int]], page: int, since_step: int
) -> None:
    """Paging with any limit from any version yields each counter changed
    after that version exactly once, with its latest state, whatever was
    re-stamped in between (the change log drops superseded entries)."""
    table = CounterTable()
    table._log.BLOCK = 4  # tiny blocks: splits, rewrites and removals happen
    stamps: dict[str, int] = {}
    for i, (counter, count) in enumerate(updates):
        if table.merge(f"c{counter}", {"r": count + i * 10**6}):
            stamps[f"c{counter}"] = table.version
    since = min(since_step, table.version)
    seen: list[str] = []
    cursor, more = since, True
    while more:
        counters, cursor, more = table.changes_since(cursor, page)
        assert len(counters) <= page
        seen.extend(counters)
    assert sorted(seen) == sorted(name for name, version in stamps.items() if version > since)
    assert len(seen) == len(set(seen))


def test_a_page_stops_at_its_budget_but_always_holds_one_counter() -> None:
    table = CounterTable()
    for i in range(10):
        table.merge(f"c{i}", {"r": 1})
    page, version, more = table.changes_since(0, limit=100, budget=25, cost=lambda name, partials: 10)
    assert (list(page), more) == (["c0", "c1"], True)
    page, _, more = table.changes_since(version, limit=100, budget=5, cost=lambda name, partials: 10)
    assert (list(page), more) == (["c2"], True)


def test_a_state_with_more_than_a_thousand_replicas_is_refused() -> None:
    with pytest.raises(InvalidState, match="at most 1000"):
        validate_counters({"c": {f"r{i}": 1 for i in range(1001)}})


# -- the compact layout: slots, overflow, interned replica ids ---------------------

many_replicas = st.sampled_from([f"r{i}" for i in range(12)])
wide_states = st.dictionaries(many_replicas, st.integers(min_value=0, max_value=MAX_COUNT), max_size=12)


@given(st.sampled_from([1, 2, 8]), st.lists(st.tuples(st.sampled_from("abcdef"), wide_states), max_size=30))
def test_table_matches_pure_merge_whatever_the_slots_and_replicas(
    slots: int, updates: list[tuple[str, dict[str, int]]]
) -> None:
    """Counters with more replicas than slots keep the rest in the overflow;
    rows with fewer leave gaps in the columns. Reads see the same state."""
    table = CounterTable()
    table.SLOTS = slots
    expected: dict[str, dict[str, int]] = {}
    for name, state in updates:
        before = expected.get(name, {})
        grown = table.merge(name, state)
        expected[name] = merge(before, state)
        assert grown == {r: c for r, c in state.items() if c > before.get(r, 0)}
    for name in "abcdef":
        want = expected.get(name, {})
        assert table.partials(name) == want
        assert table.value(name) == value(want)
        for i in range(12):
            assert table.partial(name, f"r{i}") == want.get(f"r{i}", 0)
    assert table.replica_ids() == {r for state in expected.values() for r in state}
    assert len(table) == len(expected) - sum(1 for state in expected.values() if not state)


@given(
    st.sampled_from([1, 3, 8]),
    st.lists(st.tuples(st.sampled_from("abcd"), many_replicas, st.integers(0, 10**6)), max_size=40),
)
def test_loading_rows_in_any_order_equals_merging_them(slots: int, rows: list[tuple[str, str, int]]) -> None:
    loaded, merged = CounterTable(), CounterTable()
    loaded.SLOTS = merged.SLOTS = slots
    loaded.load(rows)
    for name, replica, count in rows:
        merged.merge(name, {replica: count})
    for name in "abcd":
        assert loaded.partials(name) == merged.partials(name)
        assert loaded.value(name) == merged.value(name)
    assert set(loaded.changes_since(0)[0]) == set(merged.changes_since(0)[0])


def test_a_counter_with_a_thousand_replicas_keeps_them_all() -> None:
    table = CounterTable()
    state = {f"r{i}": i + 1 for i in range(1000)}
    assert table.merge("c", state) == state
    assert table.partials("c") == state and table.value("c") == sum(state.values())
    assert table.merge("c", {"r999": 5000, "r0": 1}) == {"r999": 5000}  # in the overflow
    assert table.merge("c", {"r1": 7}) == {"r1": 7}  # in a slot
    assert table.partial("c", "r999") == 5000 and table.partial("c", "r1") == 7
    # Other counters pay nothing for it.
    table.merge("d", {"r5": 1})
    assert table.partials("d") == {"r5": 1} and table.value("d") == 1


def test_replica_ids_are_interned_once_for_the_whole_table() -> None:
    table = CounterTable()
    ids = ["a" * 32, "b" * 32, "c" * 32]
    table.load((f"counter-{i}", "".join(r), i + 1) for i in range(100) for r in ids)  # fresh strings each row
    assert table.replica_ids() == set(ids)
    assert len(table._ids) == 3
    assert table.partials("counter-7") == {r: 8 for r in ids}


def test_totals_past_64_bits_stay_exact() -> None:
    table = CounterTable()
    table.merge("big", {"r1": MAX_COUNT, "r2": MAX_COUNT})
    table.load([("big", "r3", MAX_COUNT)])
    assert table.value("big") == 3 * MAX_COUNT == 27670116110564327421
    assert table.partials("big") == {"r1": MAX_COUNT, "r2": MAX_COUNT, "r3": MAX_COUNT}
    with pytest.raises(ValueError, match="at most"):
        table.merge("big", {"r4": MAX_COUNT + 1})
    assert table.partials("big") == {"r1": MAX_COUNT, "r2": MAX_COUNT, "r3": MAX_COUNT}


def test_a_million_counters_take_far_less_than_a_dict_of_dicts() -> None:
    """The point of the layout: a counter of three replicas takes about 120
    bytes besides its name (about 60 more), where dicts took about 370."""
    import tracemalloc

    ids = [f"{i:032x}" for i in range(3)]
    names = [f"counter-{i}" for i in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        table = CounterTable()
        table.load((name, r, 1000 + i) for i, name in enumerate(names) for r in ids)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_counter = used / len(names)
    assert per_counter < 160, per_counter  # the names themselves are built outside


# -- what a peer is known to hold is not sent back to it ----------------------------


def test_a_peer_is_not_sent_back_the_states_it_sent() -> None:
    table = CounterTable()
    table.merge("a", {"p": 1, "q": 2}, source="p")  # p's whole state: p holds it
    table.merge("b", {"p": 1}, source="p")
    table.merge("b", {"x": 5})  # b now has more than p sent
    table.merge("c", {"q": 3}, source="q")
    table.merge("c", {"q": 3}, source="p")  # nothing new, but p holds it too
    assert set(table.changes_since(0, peer="p")[0]) == {"a", "b", "c"}  # from 0: a new run of p, nothing assumed
    table.merge("a", {"p": 1, "q": 2}, source="p")
    table.merge("c", {"q": 3}, source="p")
    counters, version, more = table.changes_since(1, peer="p")
    assert set(counters) == {"b"} and version == table.version and not more
    assert set(table.changes_since(1, peer="q")[0]) == {"b"}  # q sent c
    assert set(table.changes_since(1)[0]) == {"b", "c"}


def test_a_page_passes_over_a_bounded_number_of_counters_the_peer_holds() -> None:
    table = CounterTable()
    table.merge("first", {"x": 1})
    for i in range(100):
        table.merge(f"c{i}", {"p": 1}, source="p")
    table.merge("last", {"x": 1})
    cursor, seen, pages = 1, [], 0
    more = True
    while more:
        counters, cursor, more = table.changes_since(cursor, limit=2, peer="p")
        seen += counters
        pages += 1
    assert seen == ["last"] and pages == 5  # 20 passed over per page at most


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("local"), st.sampled_from("abcd"), replicas, st.integers(1, 50)),
            st.tuples(st.just("push"), st.sampled_from("abcd"), replicas, st.integers(1, 50)),
            st.tuples(st.just("poll"), st.integers(1, 3)),
            st.tuples(st.just("crash"), st.integers(0, 3)),
        ),
        max_size=40,
    )
)
def test_a_peer_that_polls_to_the_end_holds_everything_even_after_losing_state(ops: list[tuple]) -> None:
    """A model peer p pushes its whole states, polls with a cursor, and may
    restart having lost some of its copies (it then polls from 0). However
    these interleave, once p polls to the end it holds at least what the
    table holds: leaving out what p sent never hides anything from it."""
    table = CounterTable()
    table.SOURCES = 2  # bits run out and are handed out again
    peer: dict[str, dict[str, int]] = {}
    cursor = 0

    def poll(limit: int) -> bool:
        nonlocal cursor
        counters, cursor, more = table.changes_since(cursor, limit=limit, peer="p")
        for name, partials in counters.items():
            peer[name] = merge(peer.get(name, {}), partials)
        return more

    for op in ops:
        if op[0] == "local":
            table.merge(op[1], {op[2]: table.partial(op[1], op[2]) + op[3]})
        elif op[0] == "push":
            peer[op[1]] = merge(peer.get(op[1], {}), {op[2]: op[3]})
            table.merge(op[1], peer[op[1]], source="p")
            table.merge(op[1], {}, source=f"other{op[3] % 3}")  # other sources take bits too
        elif op[0] == "poll":
            poll(op[1])
        else:
            for name in sorted(peer)[: op[1]]:  # lost copies
                del peer[name]
            cursor = 0
    while poll(2):
        pass
    for name in "abcd":
        assert merge(peer.get(name, {}), table.partials(name)) == peer.get(name, {})


# -- checking a batch: each distinct replica id is matched once ----------------


def test_a_bad_replica_id_is_refused_after_good_ones_were_seen_in_the_batch() -> None:
    """Validation remembers the ids that passed within a batch; an id it has
    not seen is still checked, wherever in the batch it comes."""
    good = {"r1": 1, "r2": 2}
    batch = {f"c{i}": dict(good) for i in range(50)}
    batch["c25"] = {"r1": 1, "r 2": 2}
    with pytest.raises(InvalidState, match="replica ids must be 1 to 128 characters"):
        validate_counters(batch)
    with pytest.raises(InvalidState, match="replica ids must be"):
        validate_counters({"a": {"r1": 1}, "b": {"r1": 1, "x" * 129: 1}})


@pytest.mark.parametrize("count", [True, False, 1.0, "1", None, -1, MAX_COUNT + 1])
def test_a_bad_count_is_refused_after_good_ones_were_seen_in_the_batch(count: object) -> None:
    batch = {"a": {"r": 1}, "b": {"r": count}}
    with pytest.raises(InvalidState, match="count for replica 'r' must be"):
        validate_counters(batch)


def test_valid_batches_come_back_whole_with_non_ascii_names() -> None:
    batch = {"ä/x".replace("/", ""): {"r": 0, "s": MAX_COUNT}, "z" * 255: {"r": 3}, "é" * 127: {"r": 1}}
    assert validate_counters(batch) == batch
    for bad in ("é" * 128, "a/b", "\ud800"):
        with pytest.raises(InvalidState):
            validate_counters({bad: {"r": 1}})


# -- merging: new counters and repeated states --------------------------------------


def test_a_new_counter_from_a_source_is_not_sent_back_to_it() -> None:
    table = CounterTable()
    table.merge("first", {"a": 1})
    assert table.merge("c", {"a": 2, "b": 0, "z": 5}, source="a") == {"a": 2, "z": 5}
    assert table.partials("c") == {"a": 2, "z": 5} and table.version == 2
    assert table.changes_since(1, 10, peer="a")[0] == {}
    assert table.changes_since(1, 10, peer="b")[0] == {"c": {"a": 2, "z": 5}}
    assert table.changes_since(0, 10, peer="a")[0] == {"first": {"a": 1}, "c": {"a": 2, "z": 5}}  # a new run of a


def test_a_counter_of_zeros_only_makes_no_row() -> None:
    table = CounterTable()
    assert table.merge("c", {"a": 0}, source="a") == {}
    assert "c" not in table and table.version == 0


def test_a_repeated_state_marks_its_source_without_a_new_version() -> None:
    table = CounterTable()
    table.merge("c", {"a": 2, "b": 3}, source="a")
    table.changes_since(0, 10, peer="b")  # b's link starts: it gets a bit
    assert table.merge("c", {"b": 3, "a": 2}, source="b") == {}
    assert table.version == 1
    assert table.changes_since(0, 10, peer="x")[0] == {"c": {"a": 2, "b": 3}}
    assert table.changes_since(1, 10, peer="b")[0] == {}  # b holds it
    # A smaller or partial state is not the counter's: its source does not hold it.
    table.merge("d", {"a": 2, "b": 3})
    assert table.merge("d", {"a": 2}, source="b") == {}
    assert table.changes_since(1, 10, peer="b")[0] == {"d": {"a": 2, "b": 3}}
