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
