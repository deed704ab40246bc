"""
The Jepsen-style checker of ``jepsen.py`` on synthetic histories: fast, no
processes. A valid history passes; a lost acknowledged add, an add counted
twice, a read below its lower bound and a read above its upper bound each
give a violation that names the operations involved. Also the nemesis
schedule generator (seeded, minority only, healed at the end) and the
availability figure.
"""

from __future__ import annotations

import jepsen
import pytest
from jepsen import FAIL, OK, UNKNOWN, History


def valid_history() -> History:
    """Three processes on three nodes; concurrent adds of every outcome and
    reads that see some of the concurrent ones."""
    h = History()
    h.add(5, 0.0, 1.0, OK, "n1", 0)  # #0
    h.add(7, 0.5, 1.5, OK, "n2", 1)  # #1
    h.add(100, 1.2, 3.0, FAIL, "n3", 2)  # #2: refused, never counted
    h.read(12, 2.0, 2.5, OK, "n1", 0)  # #3: [12, 12]
    h.add(3, 2.2, 4.0, UNKNOWN, "n2", 1)  # #4: timed out, maybe counted
    h.read(15, 2.4, 2.6, OK, "n3", 2)  # #5: concurrent with #4: [12, 15]
    h.add(20, 4.5, 5.0, OK, "n3", 2, keyed=True)  # #6
    h.read(None, 4.6, 5.5, FAIL, "n2", 0)  # #7: 504, no value, no constraint
    h.read(9999, 4.6, 5.5, UNKNOWN, "n1", 1)  # #8: unknown reads are not checked
    h.read(32, 6.0, 6.1, OK, "n2", 0)  # #9: [32, 35]: #4 not applied (yet)
    h.read(35, 6.2, 6.3, OK, "n1", 1)  # #10: #4 applied after all
    return h


def test_a_valid_history_passes() -> None:
    h = valid_history()
    result = jepsen.check(h, {"n1": 35, "n2": 35, "n3": 35})
    assert result.valid, [str(v) for v in result.violations]
    assert result.reads_checked == 4
    assert (result.final_lower, result.final_upper, result.final_value) == (32, 35, 35)
    assert result.adds == {OK: 3, FAIL: 1, UNKNOWN: 1}
    assert result.amounts == {OK: 32, FAIL: 100, UNKNOWN: 3}
    # Either fate of the unknown add is fine.
    assert jepsen.check(h.snapshot()[:-1], {"n1": 32, "n2": 32, "n3": 32}).valid


def test_an_empty_history_with_zero_everywhere_passes() -> None:
    assert jepsen.check(History(), {"n1": 0, "n2": 0}).valid


def test_a_lost_acknowledged_add_is_named() -> None:
    h = valid_history()
    result = jepsen.check(h, {"n1": 15, "n2": 15, "n3": 15})  # the 20 of #6 is gone
    (violation,) = result.violations
    assert violation.kind == "final-below-lower"
    assert violation.ops == (6,)
    assert "#6 (add 20 on n3, ok)" in violation.message and "at least 17 acknowledged is lost" in violation.message


def test_a_double_counted_add_is_named() -> None:
    h = valid_history()
    result = jepsen.check(h, {"n1": 42, "n2": 42, "n3": 42})  # 7 (#1) counted twice
    (violation,) = result.violations
    assert violation.kind == "final-above-upper"
    assert violation.ops == (1,)
    assert "counted twice" in violation.message and "#1 (add 7 on n2, ok)" in violation.message


def test_a_failed_add_that_was_applied_is_named() -> None:
    h = valid_history()
    result = jepsen.check(h, {"n1": 135, "n2": 135, "n3": 135})
    (violation,) = result.violations
    assert violation.kind == "final-above-upper" and violation.ops == (2,)
    assert "failed add applied anyway" in violation.message


def test_a_read_below_its_lower_bound_is_named() -> None:
    h = valid_history()
    stale = h.read(5, 1.6, 1.8, OK, "n3", 2)  # #0 and #1 were acknowledged: lower bound 12
    result = jepsen.check(h, {"n1": 35, "n2": 35, "n3": 35})
    (violation,) = result.violations
    assert violation.kind == "read-below-lower"
    assert violation.ops[0] == stale.index
    assert violation.ops[1:] == (1,)  # the missing 7 is exactly #1
    assert (violation.start, violation.end) == (1.6, 1.8)
    assert f"read #{stale.index} on n3 answered 5" in violation.message and "[12, 12]" in violation.message


def test_a_read_above_its_upper_bound_is_named() -> None:
    h = valid_history()
    h.add(50, 7.0, 7.5, OK, "n1", 0)  # #11: begins after the read below ends
    early = h.read(85, 6.5, 6.9, OK, "n3", 2)  # may see at most 35
    result = jepsen.check(h, {"n1": 85, "n2": 85, "n3": 85})
    (violation,) = result.violations
    assert violation.kind == "read-above-upper"
    assert violation.ops == (early.index, 11)
    assert "began after the read ended" in violation.message and "[32, 35]" in violation.message


def test_bounds_are_strict_about_time() -> None:
    """An add that ends exactly when a read starts is concurrent with it,
    not before it; an add that starts exactly when it ends is not before it."""
    h = History()
    h.add(4, 0.0, 1.0)
    h.read(0, 1.0, 2.0)  # concurrent with the add: 0 is allowed
    h.add(6, 2.0, 3.0)
    h.read(4, 1.5, 2.0)  # the 6 started as it ended: 10 would be too much
    assert jepsen.check(h, {"n1": 10}).valid
    h.read(10, 1.5, 2.0)
    (violation,) = jepsen.check(h, {"n1": 10}).violations
    assert violation.kind == "read-above-upper" and violation.ops == (4, 2)


def test_diverging_and_missing_final_values_are_violations() -> None:
    h = valid_history()
    result = jepsen.check(h, {"n1": 35, "n2": 32, "n3": TimeoutError("timed out")})
    kinds = sorted(v.kind for v in result.violations)
    assert kinds == ["no-final-value", "not-converged"]
    assert result.final_value is None


def test_window_shows_the_ops_around_a_violation() -> None:
    h = valid_history()
    ops = jepsen.window(h, 2.0, 2.5, margin=0.1)
    assert [op.index for op in ops] == [2, 3, 4, 5]
    text = ops[0].describe()
    assert "add 100" in text and "fail" in text and "n3" in text


def test_availability_counts_adds_to_live_reachable_nodes() -> None:
    h = History()
    h.add(1, 0.0, 0.1, OK, "n1")
    h.add(1, 1.0, 6.0, UNKNOWN, "n2")  # overlaps n2's pause: not eligible
    h.add(1, 7.0, 7.1, FAIL, "n2")  # n2 live again, refused: counts against
    h.add(1, 2.0, 2.1, OK, "n3")
    h.read(1, 3.0, 3.1, OK, "n2")  # reads are not adds
    figures = jepsen.availability(h, {"n2": [(2.0, 5.0)]})
    assert (figures.eligible, figures.acknowledged) == (3, 2)
    assert [op.index for op in figures.missed] == [2]
    assert figures.share == pytest.approx(2 / 3)


def test_percentile() -> None:
    assert jepsen.percentile([], 99) is None
    values = list(range(1, 101))
    assert jepsen.percentile(values, 50) == 50
    assert jepsen.percentile(values, 99) == 99
    assert jepsen.percentile([3.0], 99) == 3.0


# -- nemesis schedule ----------------------------------------------------------------


def faulted_at(schedule: list[jepsen.Event], t: float) -> set[str]:
    """Nodes faulted at time ``t`` according to the schedule."""
    down: set[str] = set()  # killed or paused
    network: set[str] = set()  # slow, flaky, small side, receiving end of a one-way cut
    for event in schedule:
        if event.at > t:
            break
        if event.fault in (jepsen.KILL, jepsen.PAUSE):
            down.add(event.targets[0])
        elif event.fault in ("start", "resume"):
            down.discard(event.targets[0])
        elif event.fault in (jepsen.SLOW, jepsen.FLAKY):
            network = {event.targets[0]}
        elif event.fault == jepsen.PARTITION:
            network = set(event.targets[0])
        elif event.fault == jepsen.ONEWAY:
            network = {event.targets[1]}
        elif event.fault == "heal":
            network = set()
        elif event.fault == jepsen.HEAL_ALL:
            down, network = set(), set()
    return down | network


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("seed", range(20))
def test_schedules_fault_a_minority_and_heal_at_the_end(seed: int, size: int) -> None:
    nodes = [f"n{i}" for i in range(1, size + 1)]
    schedule = jepsen.generate_schedule(seed, nodes, 50.0)
    assert schedule == jepsen.generate_schedule(seed, nodes, 50.0), "not reproducible from the seed"
    assert schedule[-1] == jepsen.Event(50.0, jepsen.HEAL_ALL, tuple(nodes))
    assert [e.at for e in schedule] == sorted(e.at for e in schedule)
    # Every kind comes up before any repeats: 50 s holds all seven.
    assert set(jepsen.schedule_faults(schedule)) == set(jepsen.ALL_FAULTS)
    for event in schedule:
        for t in (event.at, event.at + 0.001):
            assert len(faulted_at(schedule, t)) <= (size - 1) // 2, (t, [str(e) for e in schedule])
        if event.fault == jepsen.PARTITION:
            small, large = event.targets
            assert sorted(small + large) == nodes and len(small) < len(large)


def test_schedules_use_only_the_kinds_asked_for() -> None:
    schedule = jepsen.generate_schedule(7, ["n1", "n2", "n3"], 30.0, kinds=jepsen.PROCESS_FAULTS)
    assert set(jepsen.schedule_faults(schedule)) == set(jepsen.PROCESS_FAULTS)
    assert jepsen.generate_schedule(8, ["n1", "n2", "n3"], 30.0) != jepsen.generate_schedule(
        9, ["n1", "n2", "n3"], 30.0
    )
    with pytest.raises(ValueError):
        jepsen.generate_schedule(1, ["n1", "n2"], 30.0)
    with pytest.raises(ValueError):
        jepsen.generate_schedule(1, ["n1", "n2", "n3"], 30.0, kinds=["meteor"])


def test_a_shutting_down_answer_is_expected_only_while_the_nemesis_stops_that_node() -> None:
    history = History()
    during = history.read(None, 10.0, 10.1, FAIL, node="n1")
    elsewhere = history.read(None, 10.0, 10.1, FAIL, node="n2")
    later = history.add(3, 20.0, 20.1, FAIL, node="n1")
    for op in (during, elsewhere, later):
        op.detail = jepsen.SHUTTING_DOWN
    history.read(None, 30.0, 30.1, FAIL, node="n3").detail = "504"
    unexpected = jepsen._unexpected_stops(history, {"n1": [(9.5, 11.0)]})
    assert [line.split(": ", 1)[1] for line in unexpected] == [elsewhere.describe(), later.describe()]
