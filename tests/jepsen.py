"""
A Jepsen-style checker for counterdb, in the test suite (not a test module).

Pieces, each usable on its own:

- **History** (:class:`Op`, :class:`History`): every operation a client ran,
  with its process (client) id, kind, target node, start and end times
  (``time.monotonic()``) and outcome:

  - ``ok``: a 200 answer (for a read, with its value);
  - ``fail``: certainly not applied: an answer the API documents as "nothing
    changed" (400, 413, 422, 503), a refused connection (nothing was sent),
    or, for a read, a 504 (no value);
  - ``unknown``: sent, but no definite answer (client timeout, connection
    reset, cut answer, 500): an add may or may not have been counted.

  An ``add`` is ``POST /counter/<name>`` with an amount, optionally with an
  ``Idempotency-Key``; keyed adds are retried on the same node until a
  definite answer or a deadline, and count once. A ``read`` is
  ``GET /counter/<name>/consistent_value?timeout=S``.

- **Checker** (:func:`check`), as Jepsen's counter checker. For every ``ok``
  read *r*:

  - ``lower(r)`` = sum of the ``ok`` adds that ended before *r* started;
  - ``upper(r)`` = sum of the adds that started before *r* ended and did not
    definitely fail (``ok`` + ``unknown``);
  - ``lower(r) <= value(r) <= upper(r)``.

  After the faults ended and the cluster healed, every node's local
  ``/value`` must be one number in ``[sum of ok adds, sum of ok + unknown
  adds]``. ``check(history, final_values)`` is a pure function; its
  :class:`Violation` entries name the operations involved.

- **Nemesis** (:func:`generate_schedule`, :class:`Nemesis`): a seeded
  schedule of ``(time offset, fault, targets)`` events (kill -9 and restart,
  SIGSTOP and SIGCONT, a partition into two sides, a one-way partition, a
  slow node, a flaky node), at most a minority of the nodes faulted at any
  time, always healed at the end; executed by a thread that drives a
  ``counterdb.localcluster.LocalCluster``.

- **Rolling upgrade** (:data:`UPGRADE`, :data:`UPGRADE_KILL` events, carried
  out by the nemesis): a node of a cluster started on an earlier release
  (``RunConfig.python``, a virtualenv's interpreter) is stopped (SIGTERM) or
  killed (SIGKILL) and started again on this checkout's code, same data dir,
  address and port; each step is recorded as an :class:`Upgrade`.

- **Runner** (:func:`run`): a cluster, client threads, the nemesis (its
  schedule generated or given), the final heal, convergence and the check;
  the :class:`RunReport` has the figures (operations, faults, violations,
  convergence time after the heal, the availability of adds to live
  reachable nodes, add latency under faults, upgrade steps) and,
  for a failed run, everything needed to understand and replay it
  (:meth:`RunReport.explain`).

Used by ``test_jepsen.py`` (runs on real nodes) and
``test_jepsen_checker.py`` (the checker on synthetic histories).
"""

from __future__ import annotations

import bisect
import contextlib
import http.client
import itertools
import os
import random
import signal
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodes import NODE_ARGS as _NODE_ARGS
from nodes import http_request, imported_counterdb, is_refused, schema_version, wait_until

ADD = "add"
READ = "read"
OK = "ok"
FAIL = "fail"
UNKNOWN = "unknown"

#: Answers the API documents as "nothing changed": the add was not counted.
DEFINITE_FAILURES = frozenset({400, 413, 422, 503})
#: Of those, the ones a well-formed add of ours must never get: a bug if seen.
UNEXPECTED_FAILURES = frozenset({400, 413, 422})
#: The detail of an operation answered 503 by a node in its graceful stop:
#: nothing changed, and expected only while that node was being stopped
#: (checked by :func:`run` against the nemesis' down spans).
SHUTTING_DOWN = "503 shutting down"


# -- history -------------------------------------------------------------------


@dataclass
class Op:
    """One client operation, complete (it has an outcome)."""

    process: int
    kind: str  # ADD or READ
    node: str
    start: float  # time.monotonic() when the client sent the (first) request
    end: float  # when it got the answer, or gave up
    outcome: str  # OK, FAIL or UNKNOWN
    amount: int = 0  # adds
    keyed: bool = False  # adds: sent with an Idempotency-Key
    value: int | None = None  # ok reads
    detail: str = ""  # what decided the outcome: "200", "refused", "timeout", "504", ...
    attempts: int = 1  # keyed adds: requests sent
    index: int = -1  # position in the history, set by History.append

    def describe(self, t0: float = 0.0) -> str:
        what = f"add {self.amount}" + (" [keyed]" if self.keyed else "") if self.kind == ADD else "read"
        result = self.outcome + (f" {self.value}" if self.kind == READ and self.value is not None else "")
        extra = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        return (
            f"#{self.index:<6} {self.start - t0:9.3f} .. {self.end - t0:9.3f}  p{self.process:<2} "
            f"{what:<15} on {self.node:<4} -> {result:<12} ({self.detail}{extra})"
        )


class History:
    """Operations in the order they completed; thread-safe appends."""

    def __init__(self, ops: Iterable[Op] = ()) -> None:
        self._lock = threading.Lock()
        self.ops: list[Op] = []
        for op in ops:
            self.append(op)

    def append(self, op: Op) -> Op:
        with self._lock:
            op.index = len(self.ops)
            self.ops.append(op)
        return op

    def snapshot(self) -> list[Op]:
        with self._lock:
            return list(self.ops)

    def __iter__(self):
        return iter(self.snapshot())

    def __len__(self) -> int:
        with self._lock:
            return len(self.ops)

    # Builders for synthetic histories (the checker's unit tests).

    def add(
        self,
        amount: int,
        start: float,
        end: float,
        outcome: str = OK,
        node: str = "n1",
        process: int = 0,
        keyed: bool = False,
    ) -> Op:
        return self.append(Op(process, ADD, node, start, end, outcome, amount=amount, keyed=keyed, detail="synthetic"))

    def read(
        self, value: int | None, start: float, end: float, outcome: str = OK, node: str = "n1", process: int = 0
    ) -> Op:
        return self.append(Op(process, READ, node, start, end, outcome, value=value, detail="synthetic"))


# -- checker -------------------------------------------------------------------


@dataclass
class Violation:
    kind: str  # read-below-lower, read-above-upper, final-below-lower, final-above-upper, not-converged, no-final-value
    message: str
    ops: tuple[int, ...] = ()  # the ops named: the read first (if any), then the suspects
    start: float | None = None  # the time span the violation is about (for a window of ops)
    end: float | None = None

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class Result:
    violations: list[Violation]
    reads_checked: int
    adds: dict[str, int]  # outcome -> number of adds
    amounts: dict[str, int]  # outcome -> sum of their amounts
    final_lower: int
    final_upper: int
    final_value: int | None  # the converged value, if every node answered the same

    @property
    def valid(self) -> bool:
        return not self.violations


def _ops_list(history: History | Iterable[Op]) -> list[Op]:
    ops = history.snapshot() if isinstance(history, History) else list(history)
    for position, op in enumerate(ops):
        if op.index < 0:
            op.index = position
    return ops


def _suspects_missing(candidates: list[Op], deficit: int, slack: int, limit: int = 5) -> tuple[list[Op], str]:
    """Which acknowledged adds may be missing. The value is ``deficit`` short
    of the lower bound, and up to ``slack`` more (unknown or concurrent adds
    it may include) can hide a larger loss: single adds of an amount in
    ``[deficit, deficit + slack]`` first (the exact amount first, latest
    first), else the latest ones covering the deficit."""
    latest = sorted(candidates, key=lambda op: op.end, reverse=True)
    fitting = sorted(
        (op for op in latest if deficit <= op.amount <= deficit + slack), key=lambda op: op.amount != deficit
    )
    if fitting:
        return fitting[:limit], _more(len(fitting), limit)
    chosen, total = [], 0
    for op in latest:
        if total >= deficit or len(chosen) >= limit:
            break
        chosen.append(op)
        total += op.amount
    return chosen, " (no single add fits: the latest acknowledged ones)"


def _suspects_excess(
    adds: list[Op], excess: int, slack: int, before: float | None, limit: int = 5
) -> tuple[list[Op], str]:
    """Which adds may explain a value ``excess`` above the upper bound (and
    up to ``slack`` more, for the unknown or concurrent adds it may lack): a
    failed add that was applied anyway, an add counted twice, or (for a read)
    an add that began after the read ended. Exact amounts first."""
    started = [op for op in adds if before is None or op.start < before]
    later = [op for op in adds if before is not None and op.start >= before]
    groups = [
        ("a definitely failed add applied anyway", [op for op in started if op.outcome == FAIL]),
        ("an add counted twice", [op for op in started if op.outcome != FAIL]),
        ("an add that began after the read ended", later),
    ]
    for exact in (True, False):
        for why, ops in groups:
            fitting = [op for op in ops if op.amount == excess or (not exact and excess <= op.amount <= excess + slack)]
            if fitting:
                how = "is the amount" if exact else "fits the amount"
                return fitting[:limit], f"the excess {how} of {why}{_more(len(fitting), limit)}"
    failed = groups[0][1]
    if failed:
        return sorted(failed, key=lambda op: op.start)[-limit:], "no single add fits; failed adds listed"
    return [], "no single add fits"


def check(history: History | Iterable[Op], final_values: Mapping[str, Any]) -> Result:
    """Jepsen's counter checker over ``history``, plus the final check of
    ``final_values`` (node -> its local value after the heal, or whatever
    stood for "no answer": anything that is not an int)."""
    ops = _ops_list(history)
    adds = [op for op in ops if op.kind == ADD]
    reads = [op for op in ops if op.kind == READ and op.outcome == OK]
    violations: list[Violation] = []

    counts = {kind: 0 for kind in (OK, FAIL, UNKNOWN)}
    amounts = {kind: 0 for kind in (OK, FAIL, UNKNOWN)}
    for op in adds:
        counts[op.outcome] += 1
        amounts[op.outcome] += op.amount

    # lower(r): ok adds by end time, prefix sums; upper(r): ok + unknown adds
    # by start time, prefix sums. O((adds + reads) log adds).
    acked = sorted((op for op in adds if op.outcome == OK), key=lambda op: op.end)
    acked_ends = [op.end for op in acked]
    acked_sums = list(itertools.accumulate((op.amount for op in acked), initial=0))
    maybe = sorted((op for op in adds if op.outcome != FAIL), key=lambda op: op.start)
    maybe_starts = [op.start for op in maybe]
    maybe_sums = list(itertools.accumulate((op.amount for op in maybe), initial=0))

    for read in reads:
        done = bisect.bisect_left(acked_ends, read.start)  # ended strictly before the read started
        lower = acked_sums[done]
        begun = bisect.bisect_left(maybe_starts, read.end)  # started strictly before the read ended
        upper = maybe_sums[begun]
        value = read.value
        if value is None:
            violations.append(Violation("read-without-value", f"ok read #{read.index} has no value", (read.index,)))
            continue
        if value < lower:
            deficit = lower - value
            suspects, why = _suspects_missing(acked[:done], deficit, upper - lower)
            violations.append(
                Violation(
                    "read-below-lower",
                    f"read #{read.index} on {read.node} answered {value}, but adds of {lower} in total were "
                    f"acknowledged before it began (bounds [{lower}, {upper}]): "
                    f"at least {deficit} acknowledged is missing; "
                    f"suspects{why}: {_names(suspects)}",
                    (read.index, *(op.index for op in suspects)),
                    read.start,
                    read.end,
                )
            )
        elif value > upper:
            excess = value - upper
            suspects, why = _suspects_excess(adds, excess, upper - lower, read.end)
            violations.append(
                Violation(
                    "read-above-upper",
                    f"read #{read.index} on {read.node} answered {value}, but the adds begun before it ended that "
                    f"did not fail total {upper} (bounds [{lower}, {upper}]): at least {excess} too many; {why}; "
                    f"suspects {_names(suspects)}",
                    (read.index, *(op.index for op in suspects)),
                    read.start,
                    read.end,
                )
            )

    final_lower = amounts[OK]
    final_upper = amounts[OK] + amounts[UNKNOWN]
    answered = {node: v for node, v in final_values.items() if isinstance(v, int) and not isinstance(v, bool)}
    for node, v in final_values.items():
        if node not in answered:
            violations.append(Violation("no-final-value", f"{node} gave no final value: {v!r}"))
    distinct = sorted(set(answered.values()))
    if len(distinct) > 1:
        violations.append(
            Violation("not-converged", f"the nodes' final values differ: {dict(sorted(answered.items()))}")
        )
    last = max((op.end for op in ops), default=None)
    for value in distinct:
        holders = sorted(node for node, v in answered.items() if v == value)
        if value < final_lower:
            deficit = final_lower - value
            suspects, why = _suspects_missing(acked, deficit, final_upper - final_lower)
            violations.append(
                Violation(
                    "final-below-lower",
                    f"final value {value} on {holders} is below the {final_lower} acknowledged "
                    f"(bounds [{final_lower}, {final_upper}]): at least {deficit} acknowledged is lost; "
                    f"suspects{why}: {_names(suspects)}",
                    tuple(op.index for op in suspects),
                    min((op.start for op in suspects), default=last),
                    max((op.end for op in suspects), default=last),
                )
            )
        elif value > final_upper:
            excess = value - final_upper
            suspects, why = _suspects_excess(adds, excess, final_upper - final_lower, None)
            violations.append(
                Violation(
                    "final-above-upper",
                    f"final value {value} on {holders} is above {final_upper}, the sum of the adds that did not "
                    f"fail (bounds [{final_lower}, {final_upper}]): at least {excess} too many; {why}; "
                    f"suspects {_names(suspects)}",
                    tuple(op.index for op in suspects),
                    min((op.start for op in suspects), default=last),
                    max((op.end for op in suspects), default=last),
                )
            )
    return Result(
        violations=violations,
        reads_checked=len(reads),
        adds=counts,
        amounts=amounts,
        final_lower=final_lower,
        final_upper=final_upper,
        final_value=distinct[0] if len(distinct) == 1 and len(answered) == len(final_values) else None,
    )


def _more(total: int, limit: int) -> str:
    return f" ({total} adds fit, {limit} named)" if total > limit else ""


def _names(ops: Sequence[Op]) -> str:
    if not ops:
        return "none"
    return ", ".join(f"#{op.index} ({op.kind} {op.amount} on {op.node}, {op.outcome})" for op in ops)


def window(history: History | Iterable[Op], start: float, end: float, margin: float = 0.5, limit: int = 60) -> list[Op]:
    """The operations whose span meets ``[start - margin, end + margin]``,
    by start time; at most ``limit``, those nearest the span kept."""
    ops = [op for op in _ops_list(history) if op.end >= start - margin and op.start <= end + margin]
    ops.sort(key=lambda op: op.start)
    if len(ops) > limit:
        middle = (start + end) / 2
        ops = sorted(sorted(ops, key=lambda op: abs((op.start + op.end) / 2 - middle))[:limit], key=lambda op: op.start)
    return ops


# -- availability and latency ---------------------------------------------------------


@dataclass
class Availability:
    eligible: int  # adds sent to a node that was live and reachable from start to end
    acknowledged: int  # of those, ok
    missed: list[Op]  # eligible adds that were not acknowledged

    @property
    def share(self) -> float:
        return self.acknowledged / self.eligible if self.eligible else 1.0


def availability(history: History | Iterable[Op], down: Mapping[str, Sequence[tuple[float, float]]]) -> Availability:
    """Adds to nodes that were live and reachable from the client for the
    whole operation: ``down[node]`` lists the ``(begin, end)`` spans during
    which ``node`` was not (killed until ready again, paused, flaky); an add
    whose span meets one of its node's spans is not eligible."""
    eligible = acknowledged = 0
    missed: list[Op] = []
    for op in _ops_list(history):
        if op.kind != ADD:
            continue
        if any(op.start <= end and begin <= op.end for begin, end in down.get(op.node, ())):
            continue
        eligible += 1
        if op.outcome == OK:
            acknowledged += 1
        else:
            missed.append(op)
    return Availability(eligible, acknowledged, missed)


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


# -- nemesis schedule ---------------------------------------------------------------

KILL, PAUSE, PARTITION, ONEWAY, SLOW, FLAKY = "kill", "pause", "partition", "partition_oneway", "slow", "flaky"
#: SIGKILL of a node's store writer process (its child), at the fault's
#: start and again at its end; the node itself stays up and must go on
#: acknowledging every add sent to it.
KILL_WRITER = "kill_writer"
PROCESS_FAULTS = (KILL, PAUSE, KILL_WRITER)
NETWORK_FAULTS = (PARTITION, ONEWAY, SLOW, FLAKY)
ALL_FAULTS = PROCESS_FAULTS + NETWORK_FAULTS
#: The event that ends a fault of each kind.
ENDS = {
    KILL: "start",
    PAUSE: "resume",
    KILL_WRITER: "kill_writer_again",
    PARTITION: "heal",
    ONEWAY: "heal",
    SLOW: "heal",
    FLAKY: "heal",
}
#: The event that ends the run: every node running, resumed and reachable.
HEAL_ALL = "heal_all"
#: Rolling-upgrade steps (an explicit schedule, not :func:`generate_schedule`'s):
#: restart a node on this checkout's code, on its data dir, address and port,
#: after a clean stop (SIGTERM) or a crash (SIGKILL).
UPGRADE, UPGRADE_KILL = "upgrade", "upgrade_kill"
UPGRADES = (UPGRADE, UPGRADE_KILL)


@dataclass(frozen=True)
class Event:
    """One step of the nemesis: at ``at`` seconds into the run, do
    ``fault`` to ``targets`` (node names; for a partition, its sides; for a
    one-way partition, ``(src, dst)``) with ``param`` (slow: seconds of
    delay; flaky: the share of packets lost)."""

    at: float
    fault: str
    targets: tuple = ()
    param: float | None = None

    def __str__(self) -> str:
        if self.fault == PARTITION:
            what = " | ".join(",".join(side) for side in self.targets)
        elif self.fault == ONEWAY:
            what = f"{self.targets[0]} -/-> {self.targets[1]}"
        else:
            what = ",".join(self.targets)
        param = f" {self.param:g}" if self.param is not None else ""
        return f"+{self.at:6.2f}s {self.fault}{param} {what}".rstrip()


def generate_schedule(
    seed: int,
    nodes: Sequence[str],
    duration: float,
    kinds: Sequence[str] = ALL_FAULTS,
    lead_in: float = 2.0,
    fault_seconds: tuple[float, float] = (2.0, 5.0),
    gap_seconds: tuple[float, float] = (0.5, 2.0),
    slow_seconds: tuple[float, float] = (0.1, 0.4),
    flaky_loss: float = 0.2,
) -> list[Event]:
    """A seeded list of :class:`Event` over ``duration`` seconds.

    Fault kinds are dealt from a shuffled deck, refilled when empty, so every
    kind in ``kinds`` comes up before any repeats. At any time at most a
    minority (``(len(nodes) - 1) // 2``) of the nodes is faulted: killed,
    paused, slow, flaky, on the small side of a partition, or cut off from
    one peer by a one-way partition (its receiving end). At most one network
    fault is active at a time (``heal`` clears the network). The last fault
    has no end event of its own: the last event, at ``duration``, is
    :data:`HEAL_ALL`, which ends it.
    """
    unknown = set(kinds) - set(ALL_FAULTS)
    if unknown or not kinds:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; expected some of {ALL_FAULTS}")
    nodes = list(nodes)
    minority = (len(nodes) - 1) // 2
    if minority < 1:
        raise ValueError(f"a nemesis needs at least 3 nodes to fault a minority, got {nodes}")
    rng = random.Random(seed)
    events: list[Event] = []
    active: list[tuple[float, frozenset[str], bool]] = []  # (end, faulted nodes, network fault)
    deck: list[str] = []
    t = lead_in
    while True:
        if not deck:
            deck = list(kinds)
            rng.shuffle(deck)
        kind = deck.pop()
        length = rng.uniform(*fault_seconds)
        network = kind in NETWORK_FAULTS
        while True:
            active = [a for a in active if a[0] > t]
            faulted = frozenset().union(*(a[1] for a in active))
            if minority - len(faulted) >= 1 and not (network and any(a[2] for a in active)):
                break
            t = min(a[0] for a in active) + rng.uniform(*gap_seconds)
        if t + fault_seconds[0] > duration - 0.5:
            break
        # No room for another fault after this one: it lasts until the
        # final heal, which then cuts it short (convergence is measured from
        # that heal, so it must have something to heal).
        last = t + length + gap_seconds[1] + fault_seconds[0] > duration - 0.5
        budget = minority - len(faulted)
        free = [n for n in nodes if n not in faulted]
        end = round(duration if last else t + length, 2)
        start = round(t, 2)
        ends: list[Event] = []
        if kind == PARTITION:
            side = tuple(sorted(rng.sample(free, rng.randint(1, budget))))
            rest = tuple(n for n in nodes if n not in side)
            events.append(Event(start, PARTITION, (side, rest)))
            ends.append(Event(end, "heal"))
            hit = frozenset(side)
        elif kind == ONEWAY:
            dst = rng.choice(free)
            src = rng.choice([n for n in nodes if n != dst])
            events.append(Event(start, ONEWAY, (src, dst)))
            ends.append(Event(end, "heal"))
            hit = frozenset({dst})
        else:
            node = rng.choice(free)
            param = None
            if kind == SLOW:
                param = round(rng.uniform(*slow_seconds), 2)
            elif kind == FLAKY:
                param = flaky_loss
            events.append(Event(start, kind, (node,), param))
            ends.append(Event(end, ENDS[kind], (node,)))
            hit = frozenset({node})
        active.append((end, hit, network))
        if last:
            break
        events += ends
        t += rng.uniform(*gap_seconds) if minority > 1 else length + rng.uniform(*gap_seconds)
    events.append(Event(round(duration, 2), HEAL_ALL, tuple(nodes)))
    events.sort(key=lambda e: e.at)
    return events


def describe_schedule(schedule: Sequence[Event], limit: int | None = None) -> str:
    """One line: each fault with its start and end offset (the first
    ``limit`` faults, if given)."""
    parts = []
    for i, event in enumerate(schedule):
        if event.fault not in ALL_FAULTS:
            continue
        end_kind = ENDS[event.fault]
        end = next(
            (
                e.at
                for e in schedule[i + 1 :]
                if e.fault == HEAL_ALL or (e.fault == end_kind and (end_kind == "heal" or e.targets == event.targets))
            ),
            None,
        )
        text = str(event).split("s ", 1)[1]
        parts.append(f"{text} {event.at:g}-{end:g}s")
    faults = sum(event.fault in ALL_FAULTS for event in schedule)
    if limit is not None and faults > limit:
        parts = [*parts[:limit], f"... {faults - limit} more faults (the failure message lists all)"]
    parts.append(f"heal_all {schedule[-1].at:g}s" if schedule else "none")
    return "; ".join(parts)


def schedule_faults(schedule: Sequence[Event]) -> dict[str, int]:
    """How many faults of each kind ``schedule`` starts."""
    counts: dict[str, int] = {}
    for event in schedule:
        if event.fault in ALL_FAULTS:
            counts[event.fault] = counts.get(event.fault, 0) + 1
    return counts


# -- running: clients, nemesis, heal, convergence ----------------------------------------------

#: Node options for fault runs: the real-process tests' fast sync
#: (``nodes.NODE_ARGS``), so that a healed cluster converges within a second
#: or two.
NODE_ARGS = tuple(_NODE_ARGS)
#: Client timeout of one add request: no answer by then is ``unknown``.
ADD_TIMEOUT = 5.0
#: ``?timeout=`` of consistent reads (the node answers 504 after it), and the
#: client's own timeout of a read.
READ_SERVER_TIMEOUT = 2.0
READ_TIMEOUT = READ_SERVER_TIMEOUT + 3.0
#: How long a keyed add is retried on its node before it stays ``unknown``.
KEYED_DEADLINE = 15.0
#: How long a run waits for the nodes to agree after the heal before it gives
#: up (the tests assert a much smaller bound; this only ends the wait).
CONVERGENCE_LIMIT = 30.0
#: The agreed value must hold this long to count as converged.
CONVERGENCE_STABLE = 0.5
#: Adds a node acknowledges before its upgrade step (since the previous
#: step) and after it: every step runs under load, on a mixed cluster.
UPGRADE_ACKS = 100
#: Deadline of each wait of an upgrade step.
UPGRADE_WAIT = 30.0


@dataclass
class RunConfig:
    seed: int
    duration: float  # seconds from the clients' start to the final heal
    netns: bool
    size: int = 3
    clients: int = 4
    kinds: tuple[str, ...] = ALL_FAULTS
    read_share: float = 0.2  # of operations
    keyed_share: float = 0.5  # of adds
    think: float = 0.01  # a client waits uniform(0, think) s between operations
    node_args: tuple[str, ...] = NODE_ARGS
    counter: str = "jepsen"
    replay: str = ""  # the command that replays this run, for failure messages
    python: str | None = None  # the nodes' interpreter at the start (None: this checkout; else an earlier release)


@dataclass
class Upgrade:
    """One rolling-upgrade step as the nemesis carried it out (monotonic times)."""

    node: str
    how: str  # "SIGTERM" or "SIGKILL"
    before: str = ""  # the counterdb the old process imported: "<version> <path>"
    after: str = ""  # and the new one
    schema_before: int | None = None  # the data dir's store schema once the old process was gone
    files_before: tuple[str, ...] = ()  # the data dir's files then
    stopped: float = 0.0
    answering: float = 0.0  # the new process answered HTTP
    caught_up: float = 0.0  # its local value held every add acknowledged before it started

    def describe(self) -> str:
        return (
            f"{self.node} {self.how}: answering {self.answering - self.stopped:.2f} s after the stop, "
            f"caught up {self.caught_up - self.answering:.2f} s later; {self.before!r} -> {self.after!r}"
        )


@dataclass
class Applied:
    """A schedule event as the nemesis carried it out (monotonic times)."""

    event: Event
    begin: float
    end: float
    error: str | None = None


@dataclass
class RunReport:
    config: RunConfig
    schedule: list[Event]
    applied: list[Applied] = field(default_factory=list)
    history: History = field(default_factory=History)
    t0: float = 0.0  # clients started
    fault_begin: float | None = None  # first fault applied
    healed: float | None = None  # final heal done
    result: Result | None = None
    final_values: dict[str, Any] = field(default_factory=dict)
    convergence: float | None = None  # seconds from the heal until the nodes agreed
    down: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    available: Availability | None = None
    latency: dict[str, float | None] = field(default_factory=dict)  # p50, p99, max of acked adds under faults
    unexpected: list[str] = field(default_factory=list)  # answers no correct node gives
    problems: list[str] = field(default_factory=list)  # nemesis errors, crashed nodes, stuck clients
    logs: str = ""  # the nodes' log tails at the end
    base_dir: str = ""
    upgrades: list[Upgrade] = field(default_factory=list)
    final_counterdb: dict[str, str] = field(default_factory=dict)  # upgrade runs: node -> what it runs at the end

    @property
    def ok(self) -> bool:
        return (
            self.result is not None
            and self.result.valid
            and not self.unexpected
            and not self.problems
            and self.convergence is not None
        )

    def summary(self) -> str:
        c = self.config
        ops = self.history.snapshot()
        adds = [op for op in ops if op.kind == ADD]
        reads = [op for op in ops if op.kind == READ]

        def split(group: list[Op]) -> str:
            return ", ".join(f"{k} {sum(op.outcome == k for op in group)}" for k in (OK, FAIL, UNKNOWN))

        faults = schedule_faults(self.schedule)
        applied = sum(a.event.fault in ALL_FAULTS and a.error is None for a in self.applied)
        mode = "netns" if c.netns else "loopback"
        lines = [
            f"jepsen {mode} seed={c.seed}: {c.size} nodes, {c.clients} clients, {c.duration:g} s of run; "
            f"{applied} of {sum(faults.values())} faults applied "
            f"({', '.join(f'{k} {v}' for k, v in faults.items()) or 'none'})",
            f"  ops {len(ops)}: adds {len(adds)} ({split(adds)}), reads {len(reads)} ({split(reads)})",
        ]
        r = self.result
        if r is not None:
            final = f"final value {r.final_value}" if r.final_value is not None else f"final values {self.final_values}"
            lines.append(
                f"  violations {len(r.violations)}; {r.reads_checked} ok reads checked; {final}, "
                f"bounds [{r.final_lower}, {r.final_upper}]"
            )
        conv = f"{self.convergence:.2f} s" if self.convergence is not None else f"not within {CONVERGENCE_LIMIT:g} s"
        lines.append(f"  convergence after the heal: {conv}")
        if self.available is not None:
            a = self.available
            lines.append(
                f"  availability: {a.acknowledged}/{a.eligible} adds to live reachable nodes acknowledged "
                f"({100 * a.share:.3f}%)"
            )
        if self.latency:
            lines.append(
                f"  add latency under faults (acknowledged adds to live reachable nodes, {self.latency['n']:.0f}): "
                f"p50 {_ms(self.latency['p50'])}, p99 {_ms(self.latency['p99'])}, max {_ms(self.latency['max'])}"
            )
        if self.unexpected:
            lines.append(f"  unexpected answers: {len(self.unexpected)}, first: {self.unexpected[0]}")
        for problem in self.problems:
            lines.append(f"  problem: {problem}")
        for step in self.upgrades:
            lines.append(f"  upgrade {step.describe()}")
        if self.final_counterdb:
            lines.append(f"  at the end: {self.final_counterdb}")
        lines.append(f"  schedule: {describe_schedule(self.schedule, limit=15)}")
        if c.replay:
            lines.append(f"  replay: {c.replay}")
        return "\n".join(lines)

    def explain(self, max_violations: int = 3, max_missed: int = 10) -> str:
        """Everything needed to understand a failed run and replay it: the
        summary, the seed, the schedule as planned and as carried out, each
        violation with the operations around it, unexpected answers, adds to
        live nodes that were not acknowledged, and the nodes' log tails."""
        t0 = self.t0
        parts = [self.summary(), "", f"seed {self.config.seed}; times below are seconds since the clients started"]
        parts.append("schedule (planned | carried out):")
        by_event = {id(a.event): a for a in self.applied}
        for event in self.schedule:
            done = by_event.get(id(event))
            actual = (
                f"{done.begin - t0:7.2f} .. {done.end - t0:7.2f}" + (f" ERROR {done.error}" if done.error else "")
                if done
                else "not carried out"
            )
            parts.append(f"  {event}  | {actual}")
        down = {n: [f"{b - t0:.2f}..{e - t0:.2f}" for b, e in spans] for n, spans in self.down.items() if spans}
        parts.append(f"nodes not live or not reachable from the clients: {down}")
        if self.result is not None:
            reads = [v for v in self.result.violations if v.kind.startswith("read")]
            shown = reads[:max_violations] + [v for v in self.result.violations if not v.kind.startswith("read")]
            for violation in shown:
                parts += ["", f"VIOLATION {violation}"]
                start = violation.start if violation.start is not None else (self.healed or t0)
                end = violation.end if violation.end is not None else start
                parts.append(f"operations from {start - t0 - 0.5:.2f} to {end - t0 + 0.5:.2f} s:")
                named = set(violation.ops)
                for op in window(self.history, start, end):
                    parts.append(("=> " if op.index in named else "   ") + op.describe(t0))
                outside = [
                    op
                    for op in self.history.snapshot()
                    if op.index in named and not start - 0.5 <= op.start <= end + 0.5
                ]
                for op in outside:
                    parts.append("=> " + op.describe(t0) + "  (named, outside the window)")
            if len(reads) > max_violations:
                parts.append(f"... and {len(reads) - max_violations} more read violations")
        if self.unexpected:
            parts += ["", f"unexpected answers ({len(self.unexpected)}):", *("  " + u for u in self.unexpected[:20])]
        if self.available is not None and self.available.missed:
            missed = self.available.missed
            parts += ["", f"adds to live reachable nodes not acknowledged ({len(missed)}):"]
            parts += ["   " + op.describe(t0) for op in missed[:max_missed]]
        if self.logs:
            parts += ["", f"node logs under {self.base_dir}:", self.logs]
        return "\n".join(parts)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f} ms"


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", error)
    if not isinstance(reason, BaseException):
        reason = error
    if isinstance(reason, (TimeoutError,)) or "timed out" in str(reason):
        return "timeout"
    return type(reason).__name__


def _send(url: str, method: str, body: bytes | None, timeout: float, headers: dict[str, str] | None = None):
    """One request: ``(response, None)``, or ``(None, "refused")`` when
    nothing was sent, or ``(None, reason)`` when the answer is unknown."""
    try:
        return http_request(url, method, body, timeout, headers=headers), None
    except OSError as e:
        return None, "refused" if is_refused(e) else _reason(e)
    except http.client.HTTPException as e:  # a status line or body cut short
        return None, type(e).__name__


def _shutting_down(response: Any) -> bool:
    """A node's answer in its graceful stop (SIGTERM): 503, nothing changed."""
    return response.status == 503 and b"shutting down" in response.body


def _unexpected_stops(history: History, down: Mapping[str, Sequence[tuple[float, float]]]) -> list[str]:
    """Operations answered "shutting down" by a node that the nemesis was not
    stopping then."""
    return [
        f"answered shutting down while not being stopped: {op.describe()}"
        for op in history
        if SHUTTING_DOWN in op.detail and not any(b <= op.end and op.start <= e for b, e in down.get(op.node, ()))
    ]


class _Client:
    """One process (client thread): random adds and consistent reads on
    random nodes until told to stop."""

    def __init__(
        self,
        process: int,
        config: RunConfig,
        urls: dict[str, str],
        report: RunReport,
        lock: threading.Lock,
        stop: threading.Event,
    ) -> None:
        self.process = process
        self.config = config
        self.urls = urls
        self.names = sorted(urls)
        self.report = report
        self.lock = lock
        self.stop = stop
        self.rng = random.Random(f"{config.seed}-client-{process}")
        self.keys = itertools.count()
        self.path = "/counter/" + urllib.parse.quote(config.counter, safe="")

    def note(self, text: str) -> None:
        with self.lock:
            self.report.unexpected.append(text)

    def run(self) -> None:
        try:
            self.loop()
        except BaseException as e:
            with self.lock:
                self.report.problems.append(f"client p{self.process} crashed: {type(e).__name__}: {e}")
            raise

    def loop(self) -> None:
        history = self.report.history
        while not self.stop.is_set():
            node = self.rng.choice(self.names)
            if self.rng.random() < self.config.read_share:
                history.append(self.read(node))
            else:
                amount = self.rng.randint(1, 9)
                keyed = self.rng.random() < self.config.keyed_share
                history.append(self.add(node, amount, keyed))
            if self.config.think:
                self.stop.wait(self.rng.uniform(0, self.config.think))

    def read(self, node: str) -> Op:
        url = f"{self.urls[node]}{self.path}/consistent_value?timeout={READ_SERVER_TIMEOUT:g}"
        start = time.monotonic()
        response, reason = _send(url, "GET", None, READ_TIMEOUT)
        end = time.monotonic()
        op = Op(self.process, READ, node, start, end, UNKNOWN)
        if response is None:
            op.outcome, op.detail = (FAIL if reason == "refused" else UNKNOWN), reason or ""
        elif response.status == 200:
            try:
                op.outcome, op.value, op.detail = OK, int(response.text), "200"
            except ValueError:
                op.detail = f"200 {response.body[:50]!r}"
                self.note(f"read on {node}: {response!r}")
        elif response.status == 504:
            op.outcome, op.detail = FAIL, "504"
        elif _shutting_down(response):
            op.outcome, op.detail = FAIL, SHUTTING_DOWN
        else:
            op.detail = str(response.status)
            self.note(f"read on {node}: {response!r}")
        return op

    def add(self, node: str, amount: int, keyed: bool) -> Op:
        url = self.urls[node] + self.path
        body = str(amount).encode()
        headers = {"Idempotency-Key": f"jepsen-{self.config.seed}-p{self.process}-{next(self.keys)}"} if keyed else None
        start = time.monotonic()
        deadline = start + KEYED_DEADLINE
        details: list[str] = []
        outcome = UNKNOWN
        maybe_applied = False  # an earlier attempt may have been counted
        while True:
            response, reason = _send(url, "POST", body, ADD_TIMEOUT, headers)
            if response is None:
                details.append(reason or "")
                attempt = FAIL if reason == "refused" else UNKNOWN
            elif response.status == 200:
                replayed = response.headers.get("Idempotent-Replayed") == "true"
                details.append("200 replayed" if replayed else "200")
                if replayed and not maybe_applied:
                    self.note(f"add {amount} on {node}: a first attempt was answered as a replay: {response!r}")
                attempt = OK
            elif _shutting_down(response):
                details.append(SHUTTING_DOWN)
                attempt = FAIL
            elif response.status in DEFINITE_FAILURES:
                details.append(str(response.status))
                attempt = FAIL
                self.note(f"add {amount} on {node} ({details}): {response!r}")
            else:  # 500, 504, ...: no claim either way
                details.append(str(response.status))
                attempt = UNKNOWN
                self.note(f"add {amount} on {node} ({details}): {response!r}")
            if attempt == OK:
                outcome = OK
                break
            if attempt == FAIL and not maybe_applied:
                outcome = FAIL  # every attempt so far certainly failed
            else:
                maybe_applied = True
                outcome = UNKNOWN
            # Unkeyed adds are never retried; a keyed one is retried (same
            # node, same key) until it is acknowledged, or until it failed
            # for sure with nothing possibly applied before.
            if not keyed or outcome == FAIL or time.monotonic() >= deadline:
                break
            time.sleep(0.05)  # pause before the retry; the loop ends at its deadline
        end = time.monotonic()
        detail = ",".join(details) if len(details) <= 4 else f"{','.join(details[:2])},...,{details[-1]}"
        return Op(
            self.process,
            ADD,
            node,
            start,
            end,
            outcome,
            amount=amount,
            keyed=keyed,
            detail=detail,
            attempts=len(details),
        )


class Nemesis(threading.Thread):
    """Carries out a schedule on a ``counterdb.localcluster.LocalCluster``, each event
    at its offset from ``t0`` (late if the previous one took longer), and
    records when each node was not live or not reachable from the clients:
    killed (until it answers again), paused, or flaky."""

    def __init__(
        self, cluster: Any, schedule: Sequence[Event], t0: float, report: RunReport, abort: threading.Event
    ) -> None:
        super().__init__(name="nemesis", daemon=True)
        self.cluster = cluster
        self.schedule = list(schedule)
        self.t0 = t0
        self.report = report
        self.abort = abort
        self.killed: set[str] = set()
        self.paused: set[str] = set()
        self.steps_end = t0  # when the last upgrade step ended
        self.open: dict[tuple[str, str], float] = {}  # (node, why) -> since

    def _down(self, node: str, why: str, at: float) -> None:
        self.open.setdefault((node, why), at)

    def _up(self, node: str, why: str, at: float) -> None:
        since = self.open.pop((node, why), None)
        if since is not None:
            self.report.down.setdefault(node, []).append((since, at))

    def run(self) -> None:
        for event in self.schedule:
            if self.abort.wait(max(0.0, self.t0 + event.at - time.monotonic())):
                break
            begin = time.monotonic()
            error = None
            try:
                self.apply(event, begin)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            end = time.monotonic()
            self.settle(event, end)
            self.report.applied.append(Applied(event, begin, end, error))
            if (event.fault in ALL_FAULTS or event.fault in UPGRADES) and self.report.fault_begin is None:
                self.report.fault_begin = begin
            if error is not None:
                self.report.problems.append(f"nemesis: {event}: {error}")
                self.abort.set()
                break

    def apply(self, event: Event, now: float) -> None:
        c, kind, targets = self.cluster, event.fault, event.targets
        if kind == KILL:
            self._down(targets[0], KILL, now)
            c.kill(targets[0])
            self.killed.add(targets[0])
        elif kind == "start":
            c.start(targets[0])
            self.killed.discard(targets[0])
        elif kind == PAUSE:
            self._down(targets[0], PAUSE, now)
            c.pause(targets[0])
            self.paused.add(targets[0])
        elif kind == "resume":
            c.resume(targets[0])
            self.paused.discard(targets[0])
        elif kind in (KILL_WRITER, "kill_writer_again"):
            kill_writer(_pid(c, targets[0]))
        elif kind == PARTITION:
            c.partition([list(side) for side in targets])
        elif kind == ONEWAY:
            c.partition_oneway(*targets)
        elif kind == SLOW:
            c.slow(targets[0], event.param)
        elif kind == FLAKY:
            self._down(targets[0], FLAKY, now)
            c.flaky(targets[0], event.param)
        elif kind == "heal":
            c.heal()
        elif kind == HEAL_ALL:
            self.heal_all()
        elif kind in UPGRADES:
            self.upgrade(targets[0], crash=kind == UPGRADE_KILL)
        else:
            raise ValueError(f"unknown event {event}")

    def settle(self, event: Event, now: float) -> None:
        """Close the spans an event ended, once it is done."""
        kind, targets = event.fault, event.targets
        if kind == "start" and targets[0] not in self.killed:
            self._up(targets[0], KILL, now)
        elif kind == "resume" and targets[0] not in self.paused:
            self._up(targets[0], PAUSE, now)
        elif kind in ("heal", HEAL_ALL):
            for node, why in list(self.open):
                if why == FLAKY or (kind == HEAL_ALL and node not in self.killed | self.paused):
                    self._up(node, why, now)

    def upgrade(self, node: str, crash: bool) -> None:
        """One rolling-upgrade step: once ``node`` acknowledged
        :data:`UPGRADE_ACKS` adds since the previous step, stop it (SIGTERM,
        or SIGKILL with ``crash``), start it on this checkout's code, wait
        until it holds every add acknowledged before it started, and until
        it acknowledged :data:`UPGRADE_ACKS` adds itself."""
        c, step = self.cluster, Upgrade(node, "SIGKILL" if crash else "SIGTERM")
        self.report.upgrades.append(step)
        self._wait_acks(node, self.steps_end)
        step.before = imported_counterdb(_pid(c, node))
        self._down(node, KILL, time.monotonic())
        self.killed.add(node)  # heal_all starts it if this step fails midway
        problem = c.shutdown_problems.get(node)
        c.kill(node) if crash else c.stop(node)
        step.stopped = time.monotonic()
        if not crash and c.shutdown_problems.get(node) != problem:
            raise AssertionError(f"{node} did not stop cleanly on SIGTERM: {c.shutdown_problems[node]}")
        data_dir = c.data_dir(node)
        step.schema_before = schema_version(data_dir)
        step.files_before = tuple(sorted(path.name for path in data_dir.iterdir()))
        c.set_python(node, None)
        c.start(node)
        self.killed.discard(node)
        step.answering = time.monotonic()
        self._up(node, KILL, step.answering)
        step.after = imported_counterdb(_pid(c, node))
        step.caught_up = self._wait_caught_up(node, step.answering)
        self._wait_acks(node, step.answering)
        self.steps_end = time.monotonic()

    def _wait_acks(self, node: str, since: float) -> None:
        """Wait until ``node`` acknowledged :data:`UPGRADE_ACKS` adds begun since ``since``."""

        def acked() -> int:
            ops = self.report.history.snapshot()
            done = sum(op.kind == ADD and op.outcome == OK and op.node == node and op.start >= since for op in ops)
            return done >= UPGRADE_ACKS or self.abort.is_set()

        wait_until(acked, UPGRADE_WAIT, message=f"{UPGRADE_ACKS} adds acknowledged by {node}")

    def _wait_caught_up(self, node: str, started: float) -> float:
        """Wait until ``node``'s local value holds every add acknowledged
        before ``started``; return when it did."""
        ops = self.report.history.snapshot()
        target = sum(op.amount for op in ops if op.kind == ADD and op.outcome == OK and op.end < started)
        path = "/counter/" + urllib.parse.quote(self.report.config.counter, safe="")
        urls = {node: self.cluster.url(node)}

        def holds() -> bool:
            value = _local_values(urls, path)[node]
            return (isinstance(value, int) and value >= target) or self.abort.is_set()

        wait_until(holds, UPGRADE_WAIT, message=f"{node}'s value to reach {target}, acknowledged before it started")
        return time.monotonic()

    def heal_all(self) -> None:
        """Every node running, resumed and (netns) every network fault gone."""
        for node in sorted(self.paused):
            self.cluster.resume(node)
            self.paused.discard(node)
        for node in sorted(self.killed):
            self.cluster.start(node)
            self.killed.discard(node)
        if self.cluster.netns:
            self.cluster.heal()


def kill_writer(node_pid: int) -> None:
    """SIGKILL the store writer process of the node ``node_pid``: among its
    descendants (the writer is a child of the node's spawner), the one
    named ``counterdb-store``."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                name, rest = (entry / "stat").read_text().split(" (", 1)[1].rsplit(")", 1)
                parents[int(entry.name)], names[int(entry.name)] = int(rest.split()[1]), name
        except (OSError, ValueError, IndexError):
            continue
    family, grown = {node_pid}, True
    while grown:
        more = {pid for pid, parent in parents.items() if parent in family} - family
        family |= more
        grown = bool(more)
    writers = [pid for pid in family if names.get(pid) == "counterdb-store"]
    if not writers:
        raise AssertionError(f"node {node_pid} has no writer process")
    for writer in writers:
        os.kill(writer, signal.SIGKILL)


def _pid(cluster: Any, node: str) -> int:
    pid = cluster.pid(node)
    if pid is None:
        raise AssertionError(f"{node} is not running")
    return pid


def _local_values(urls: dict[str, str], path: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for node, url in sorted(urls.items()):
        response, reason = _send(f"{url}{path}/value", "GET", None, 2.0)
        if response is None:
            values[node] = f"no answer: {reason}"
        elif response.status != 200:
            values[node] = repr(response)
        else:
            try:
                values[node] = int(response.text)
            except ValueError:
                values[node] = repr(response)
    return values


def converge(
    urls: dict[str, str], path: str, since: float, limit: float = CONVERGENCE_LIMIT
) -> tuple[dict[str, Any], float | None]:
    """Poll every node's local value until all agree and stay agreed for
    :data:`CONVERGENCE_STABLE` s; return the values and the seconds from
    ``since`` to the poll that first saw the agreement (None: not within
    ``limit``)."""
    agreed_at: float | None = None
    agreed: Any = None
    while True:
        values = _local_values(urls, path)
        now = time.monotonic()
        seen = set(values.values()) if all(isinstance(v, int) for v in values.values()) else set()
        if len(seen) == 1:
            (value,) = seen
            if agreed_at is None or value != agreed:
                agreed_at, agreed = now, value
            elif now - agreed_at >= CONVERGENCE_STABLE:
                return values, agreed_at - since
        else:
            agreed_at = None
        if now - since > limit:
            return values, None
        time.sleep(0.05)  # poll interval; the limit above bounds the loop


def run(base_dir: str | os.PathLike[str], config: RunConfig, schedule: Sequence[Event] | None = None) -> RunReport:
    """One run: a cluster, ``config.clients`` client threads and the nemesis
    for ``config.duration`` s (its schedule generated from the seed, or
    ``schedule``), then the final heal; clients stop, the nodes' values
    converge (timed from the heal), each node answers one last consistent
    read, and the history is checked."""
    from counterdb.localcluster import LocalCluster  # not needed by the checker's unit tests

    names = [f"n{i}" for i in range(1, config.size + 1)]
    if schedule is None:
        schedule = generate_schedule(config.seed, names, config.duration, config.kinds)
    report = RunReport(config, list(schedule), base_dir=str(base_dir))
    lock = threading.Lock()
    stop = threading.Event()
    abort = threading.Event()
    path = "/counter/" + urllib.parse.quote(config.counter, safe="")
    cluster = LocalCluster(
        base_dir, size=config.size, netns=config.netns, node_args=config.node_args, python=config.python
    )
    with cluster:
        if list(cluster.nodes) != names:
            raise AssertionError(f"expected nodes {names}, the cluster has {cluster.nodes}")
        urls = {node: cluster.url(node) for node in names}
        clients = [_Client(p, config, urls, report, lock, stop) for p in range(config.clients)]
        threads = [
            threading.Thread(target=client.run, name=f"client-{client.process}", daemon=True) for client in clients
        ]
        report.t0 = time.monotonic()
        nemesis = Nemesis(cluster, schedule, report.t0, report, abort)
        try:
            for thread in threads:
                thread.start()
            nemesis.start()
            nemesis.join()
        finally:
            abort.set()  # a nemesis that failed, or a ^C: stop everything
            nemesis.join(60)
            if nemesis.is_alive():
                report.problems.append("the nemesis did not finish")
            elif not any(a.event.fault == HEAL_ALL and a.error is None for a in report.applied):
                try:
                    nemesis.heal_all()
                except Exception as e:
                    report.problems.append(f"final heal after the nemesis stopped: {type(e).__name__}: {e}")
                nemesis.settle(Event(config.duration, HEAL_ALL), time.monotonic())
            report.healed = time.monotonic()
            stop.set()
            for thread in threads:
                thread.join(KEYED_DEADLINE + ADD_TIMEOUT + 5)
            if any(thread.is_alive() for thread in threads):
                report.problems.append("a client thread did not stop")
        heal = next((a for a in report.applied if a.event.fault == HEAL_ALL and a.error is None), None)
        if heal is not None:
            report.healed = heal.end
        report.final_values, report.convergence = converge(urls, path, report.healed)
        # One last consistent read per node: checked with the rest.
        final = _Client(config.clients, config, urls, report, lock, stop)
        for node in names:
            report.history.append(final.read(node))
        report.result = check(report.history, report.final_values)
        for status in cluster.status():
            if status.state != "running":
                report.problems.append(f"{status.name} is {status.state} at the end of the run (pid {status.pid})")
        if report.upgrades:
            for node in names:
                with contextlib.suppress(Exception):  # a stopped node is reported above
                    report.final_counterdb[node] = imported_counterdb(_pid(cluster, node))
        report.logs = "\n".join(cluster.log_tail(node, 25) for node in names)
    report.available = availability(report.history, report.down)
    report.unexpected += _unexpected_stops(report.history, report.down)
    if report.fault_begin is not None:
        during = [
            op.end - op.start
            for op in report.history.snapshot()
            if op.kind == ADD
            and op.outcome == OK
            and report.fault_begin <= op.start <= report.healed
            and not any(op.start <= e and b <= op.end for b, e in report.down.get(op.node, ()))
        ]
        report.latency = {
            "n": float(len(during)),
            "p50": percentile(during, 50),
            "p99": percentile(during, 99),
            "max": max(during, default=None),
        }
    return report
