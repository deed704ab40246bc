"""
Jepsen-style fault runs on real nodes (``counterdb.localcluster.LocalCluster``), checked
by ``jepsen.py``: client threads add (half of them with an
``Idempotency-Key``, retried on the same node) and read
``consistent_value`` on random nodes while a seeded nemesis kills, pauses,
partitions, slows and disturbs a minority of the nodes; then everything is
healed and the history is checked.

Every run asserts:

- no violation: every ok consistent read lies within Jepsen's counter bounds,
  and after the heal every node's local value is one number within
  ``[sum of acknowledged adds, sum of acknowledged + unknown adds]``;
- the nodes agree within :data:`CONVERGENCE_BOUND` seconds of the heal (the
  goal is 2 s; the measured time is printed);
- availability: every add sent to a node that was live and reachable from the
  client for the whole request (running, not paused, not flaky; partitions
  are between nodes only, the client reaches every node) was acknowledged;
- no answer that a correct node never gives (400, 413, 422 or 5xx to a
  well-formed add, a first attempt answered as a replay, ...).

Each run prints a summary (operations, faults, violations, convergence time,
availability, p50/p99 add latency under faults) in plain ``pytest`` output.
A failing run prints the seed, the schedule, each violation with the
operations around it, and the replay command. See docs/testing.md.

- ``test_faults_netns``: CI, netns mode, 3 nodes, 4 clients, 50 s, every
  fault kind (kill -9, SIGSTOP, partition into halves, one-way partition,
  slow, flaky).
- ``test_process_faults_loopback``: CI, loopback mode, kill -9 and SIGSTOP.
- ``test_soak``: ``-m soak`` only; seed from the clock unless ``JEPSEN_SEED``
  is set, ``JEPSEN_DURATION`` seconds (default 600), ``JEPSEN_NODES`` nodes
  (default 3), ``JEPSEN_CLIENTS`` clients (default 4); netns mode when
  possible.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jepsen
import pytest

#: The CI runs' seed; ``JEPSEN_SEED`` replaces it (and the soak run's).
CI_SEED = 20261182
#: Seconds from the clients' start to the final heal.
CI_DURATION = 50.0
LOOPBACK_DURATION = 20.0
#: Goal for convergence after the heal, and the bound CI asserts.
CONVERGENCE_GOAL = 2.0
CONVERGENCE_BOUND = 5.0


def env_seed(default: int) -> int:
    text = os.environ.get("JEPSEN_SEED", "").strip()
    return int(text) if text else default


def env_number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    return float(text) if text else default


def netns_problem() -> str | None:
    """Why netns mode cannot run here, or None."""
    if sys.platform != "linux":
        return "netns mode needs Linux"
    if os.geteuid() != 0:
        return "netns mode needs root"
    for tool in ("ip", "iptables-restore"):
        if shutil.which(tool) is None and not any(Path(d, tool).exists() for d in ("/usr/sbin", "/sbin")):
            return f"netns mode needs `{tool}` (iproute2, iptables)"
    return None


def require_netns() -> None:
    problem = netns_problem()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{problem}; .ci/run installs iproute2 and iptables and runs as root")
    pytest.skip(problem)


def assert_run(report: jepsen.RunReport) -> None:
    """Every assertion of a fault run, each failing with the whole story."""
    assert not report.problems, report.explain()
    assert report.result is not None, report.explain()
    assert report.result.valid, report.explain()
    assert report.convergence is not None and report.convergence <= CONVERGENCE_BOUND, (
        f"the nodes agreed {report.convergence} s after the heal, bound {CONVERGENCE_BOUND:g} s\n" + report.explain()
    )
    assert report.available is not None and report.available.share == 1.0, report.explain()
    assert not report.unexpected, report.explain()
    # The run did something: faults were applied and ops of every outcome kind ran.
    ops = report.history.snapshot()
    assert sum(op.kind == jepsen.ADD and op.outcome == jepsen.OK for op in ops) > 100, report.explain()
    assert report.result.reads_checked > 20, report.explain()


def test_faults_netns(tmp_path: Path, show: Callable[[jepsen.RunReport], None]) -> None:
    """CI: every fault kind on a 3-node netns cluster."""
    require_netns()
    seed = env_seed(CI_SEED)
    config = jepsen.RunConfig(
        seed=seed,
        duration=CI_DURATION,
        netns=True,
        replay=f"JEPSEN_SEED={seed} pytest tests/test_jepsen.py -k test_faults_netns",
    )
    schedule = jepsen.generate_schedule(seed, ["n1", "n2", "n3"], config.duration, config.kinds)
    assert set(jepsen.schedule_faults(schedule)) == set(jepsen.ALL_FAULTS), jepsen.describe_schedule(schedule)
    report = jepsen.run(tmp_path / "cluster", config)
    show(report)
    assert_run(report)
    applied = {a.event.fault for a in report.applied if a.error is None}
    assert applied >= set(jepsen.ALL_FAULTS), report.explain()


def test_process_faults_loopback(tmp_path: Path, show: Callable[[jepsen.RunReport], None]) -> None:
    """CI: kill -9 and SIGSTOP on a loopback cluster (no root needed)."""
    seed = env_seed(CI_SEED)
    config = jepsen.RunConfig(
        seed=seed,
        duration=LOOPBACK_DURATION,
        netns=False,
        kinds=jepsen.PROCESS_FAULTS,
        replay=f"JEPSEN_SEED={seed} pytest tests/test_jepsen.py -k test_process_faults_loopback",
    )
    report = jepsen.run(tmp_path / "cluster", config)
    show(report)
    assert_run(report)
    applied = {a.event.fault for a in report.applied if a.error is None}
    assert applied >= {jepsen.KILL, jepsen.PAUSE}, report.explain()


@pytest.mark.soak
def test_soak(tmp_path: Path, show: Callable[[jepsen.RunReport], None]) -> None:
    """Long randomized run: ``pytest -m soak`` (not in CI)."""
    seed = env_seed(time.time_ns() % 1_000_000_007)
    duration = env_number("JEPSEN_DURATION", 600.0)
    size = int(env_number("JEPSEN_NODES", 3))
    clients = int(env_number("JEPSEN_CLIENTS", 4))
    netns = netns_problem() is None
    config = jepsen.RunConfig(
        seed=seed,
        duration=duration,
        netns=netns,
        size=size,
        clients=clients,
        kinds=jepsen.ALL_FAULTS if netns else jepsen.PROCESS_FAULTS,
        replay=(
            f"JEPSEN_SEED={seed} JEPSEN_DURATION={duration:g} JEPSEN_NODES={size} JEPSEN_CLIENTS={clients} "
            "pytest -m soak tests/test_jepsen.py"
        ),
    )
    report = jepsen.run(tmp_path / "cluster", config)
    show(report)
    assert_run(report)
