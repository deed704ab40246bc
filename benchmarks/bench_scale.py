#!/usr/bin/env python3
"""
A million counters with three replicas each (issue 10): memory, idle CPU,
restart, and a new node catching up while its feeders answer reads.

On loopback, with real ``twistd counterdb`` nodes of a
:class:`counterdb.localcluster.LocalCluster` (default options):

1. Four nodes start empty; n1, n2 and n3 get the actors list of the three
   (posted to n1, it spreads) and all four stop. Each of the three data
   dirs then gets the same counters ``counter-0`` .. ``counter-<N-1>``,
   each with a partial under each of the three nodes' own replica ids (read
   from their ``meta`` tables, so each node keeps its own identity: written
   once with sqlite3 and copied, then each copy's replica id set back to
   its node's). The three start, as in a cluster that has been running.
2. Once their start-up exchanges are over (each restarted node is polled
   from version 0 by its peers), each node's RSS, and its CPU over an idle
   window of 10 s (5 s with ``--quick``) with the default 1 s polls.
3. n1 restarts (SIGTERM, then start): seconds from starting the process
   until it answers HTTP, and its RSS then.
4. n4 starts empty and the four-node list is posted to n1 (it spreads);
   seconds until n4's ``/status`` shows all N counters, sampled for the
   catch-up curve, while a thread reads ``GET /counter/<name>/value`` on
   n1, n2 and n3 in turn (about 100 reads/s in all) and records the read
   latency. At the end, a sample of n4's values is checked.

``--quick`` shortens the idle window and the waits, not the table: both
use N = 1,000,000 (``--counters`` to change it).

    python benchmarks/bench_scale.py --quick
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402
    LocalCluster,
    connect,
    cpu_seconds,
    fill,
    log_problems,
    node_pids,
    partial,
    percentile,
    replica_id,
    request,
    rss_mib,
    status,
    value,
)

from counterdb.store import DB_FILE  # noqa: E402

TITLE = "A million counters: memory, idle CPU, restart and catch-up"
COUNTERS = 1_000_000
FEEDERS = ("n1", "n2", "n3")
NEW = "n4"
#: Issue 10's targets.
TARGETS = {"rss_mib": 500, "idle_cpu_percent": 2, "restart_s": 10, "catchup_s": 30, "read_ms": 100}


def _post(url: str, path: str, body: dict) -> None:
    conn = connect(url)
    try:
        code, answer = request(conn, "POST", path, json.dumps(body).encode())
    finally:
        conn.close()
    if code != 200:
        raise RuntimeError(f"POST {url}{path} answered {code}: {answer[:300]!r}")


def _wait(check: object, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g} s waiting until {what}")


def _cpu_percent(pids: dict[str, int], seconds: float) -> dict[str, float]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    return {name: (cpu_seconds(pid) - before[name]) / seconds * 100 for name, pid in pids.items()}


def _settle(cluster: LocalCluster, nodes: tuple[str, ...], timeout: float) -> float:
    """Wait until every node of ``nodes`` uses under 5 % CPU over a second
    (their start-up exchanges are over); the seconds it took."""
    start = time.monotonic()
    pids = {name: pid for name, pid in node_pids(cluster).items() if name in nodes}
    while time.monotonic() - start < timeout:
        if max(_cpu_percent(pids, 1.0).values()) < 5:
            break
    return time.monotonic() - start


def _entries(cluster: LocalCluster, nodes: tuple[str, ...]) -> list[str]:
    return [f"{cluster.address(node)}:{cluster.port}" for node in nodes]


def _build(cluster: LocalCluster, counters: int) -> dict:
    """The three feeders' data dirs, each with every counter and three
    replicas' partials, under each node's own replica id."""
    paths = {node: cluster.data_dir(node) / DB_FILE for node in FEEDERS}
    ids = {node: replica_id(path) for node, path in paths.items()}
    t0 = time.perf_counter()
    first = paths[FEEDERS[0]]
    fill(first, counters, [ids[node] for node in FEEDERS])
    for node in FEEDERS[1:]:
        shutil.copyfile(first, paths[node])
        db = sqlite3.connect(paths[node], isolation_level=None)
        try:
            db.execute("UPDATE meta SET value = ? WHERE key = 'replica_id'", (ids[node],))
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            db.close()
    return {"build_s": time.perf_counter() - t0, "db_mib": first.stat().st_size / 2**20}


class Reader(threading.Thread):
    """Reads counter values on the feeders in turn, about ``rate`` per
    second in all, and keeps each read's latency (ms) per node."""

    def __init__(self, urls: dict[str, str], counters: int, rate: float = 100) -> None:
        super().__init__(daemon=True)
        self.urls, self.counters, self.interval = urls, counters, 1 / rate
        self.latencies: dict[str, list[float]] = {node: [] for node in urls}
        self.errors = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        conns = {node: connect(url) for node, url in self.urls.items()}
        rng = random.Random(1)
        try:
            while not self.stopping.is_set():
                for node, conn in conns.items():
                    path = f"/counter/counter-{rng.randrange(self.counters)}/value"
                    t0 = time.perf_counter()
                    try:
                        code, _ = request(conn, "GET", path)
                    except OSError:
                        code = 0
                        conn.close()
                    elapsed = (time.perf_counter() - t0) * 1000
                    if code == 200:
                        self.latencies[node].append(elapsed)
                    else:
                        self.errors += 1
                    self.stopping.wait(max(0.0, self.interval - elapsed / 1000))
        finally:
            for conn in conns.values():
                conn.close()


def _summary(values: list[float]) -> dict:
    return {
        "reads": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values, default=float("nan")),
    }


def _catch_up(cluster: LocalCluster, counters: int, timeout: float) -> dict:
    urls = {node: cluster.url(node) for node in FEEDERS}
    new_url = cluster.url(NEW)
    cluster.start(NEW)
    pid = node_pids(cluster)[NEW]
    empty_rss = rss_mib(pid)
    reader = Reader(urls, counters)
    reader.start()
    time.sleep(1)  # a second of reads before, for comparison
    before = {node: list(lat) for node, lat in reader.latencies.items()}
    curve: list[tuple[float, int]] = []
    t0 = time.monotonic()
    _post(urls["n1"], "/config", {"actors": _entries(cluster, (*FEEDERS, NEW))})
    elapsed = None
    while time.monotonic() - t0 < timeout:
        try:
            known = status(new_url)["counters"]
        except OSError:
            known = curve[-1][1] if curve else 0
        curve.append((round(time.monotonic() - t0, 3), known))
        if known >= counters:
            elapsed = curve[-1][0]
            break
        time.sleep(0.25)
    reader.stopping.set()
    reader.join()
    during = {node: lat[len(before[node]) :] for node, lat in reader.latencies.items()}
    every = [x for lat in during.values() for x in lat]
    rng = random.Random(2)
    sample = [rng.randrange(counters) for _ in range(20)]
    wrong = [i for i in sample if value(new_url, f"counter-{i}") != sum(partial(i, k) for k in range(3))]
    return {
        "seconds": elapsed,
        "timeout": timeout,
        "curve": curve,
        "reads": _summary(every),
        "reads_per_node": {node: _summary(lat) for node, lat in during.items()},
        "reads_before": _summary([x for lat in before.values() for x in lat]),
        "read_errors": reader.errors,
        "empty_rss_mib": empty_rss,
        "rss_mib": rss_mib(pid),
        "feeder_rss_mib": {node: rss_mib(p) for node, p in node_pids(cluster).items() if node in FEEDERS},
        "wrong_values": wrong,
    }


def run(quick: bool, counters: int = COUNTERS) -> dict:
    idle_seconds = 5.0 if quick else 10.0
    root = Path(tempfile.mkdtemp(prefix="counterdb-scale-"))
    results: dict = {"counters": counters, "replicas": 3, "idle_seconds": idle_seconds}
    try:
        cluster = LocalCluster(root / "cluster", 4)
        cluster.up(configure=False)  # the lists are posted below
        try:
            _post(cluster.url("n1"), "/config", {"actors": _entries(cluster, FEEDERS)})
            _wait(
                lambda: all(len(status(cluster.url(n))["actors"]) == len(FEEDERS) for n in FEEDERS),
                30,
                "the three feeders have the list",
            )
            for node in (*FEEDERS, NEW):
                cluster.stop(node)
            results.update(_build(cluster, counters))
            starts = {}
            for node in FEEDERS:
                t0 = time.perf_counter()
                cluster.start(node, timeout=120)
                starts[node] = time.perf_counter() - t0
            results["first_start_s"] = starts
            results["settle_s"] = _settle(cluster, FEEDERS, 90 if quick else 180)
            pids = {n: p for n, p in node_pids(cluster).items() if n in FEEDERS}
            results["rss_mib"] = {node: rss_mib(pid) for node, pid in pids.items()}
            results["idle_cpu_percent"] = _cpu_percent(pids, idle_seconds)

            t0 = time.perf_counter()
            cluster.stop("n1")
            results["stop_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            cluster.start("n1", timeout=120)
            results["restart_s"] = time.perf_counter() - t0
            results["restart_rss_mib"] = rss_mib(node_pids(cluster)["n1"])
            results["restart_value_ok"] = value(cluster.url("n1"), "counter-123") == sum(
                partial(123, k) for k in range(3)
            )
            results["resettle_s"] = _settle(cluster, FEEDERS, 90 if quick else 180)

            results["catchup"] = _catch_up(cluster, counters, 120 if quick else 300)
            results["log_problems"] = log_problems(cluster)
        finally:
            cluster.down()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def report(results: dict, img_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = results["counters"]
    c = results["catchup"]
    curve = c["curve"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([t for t, _ in curve], [k / 1e6 for _, k in curve], marker=".", markersize=3, label="new node n4")
    ax.axvline(TARGETS["catchup_s"], color="grey", linestyle="--", linewidth=1, label="target: 30 s")
    ax.axhline(n / 1e6, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("seconds since the 4-node list was posted")
    ax.set_ylabel("counters known (millions)")
    ax.set_title(f"Catch-up of an empty node from 3 nodes holding {n:,} counters")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(img_dir / "catchup.png", dpi=110)
    plt.close(fig)

    rss = max(results["rss_mib"].values())
    cpu = max(results["idle_cpu_percent"].values())
    reads = c["reads"]
    per_counter = (rss - c["empty_rss_mib"]) * 2**20 / n
    caught = f"{c['seconds']:.1f} s" if c["seconds"] is not None else f"not within {c['timeout']:g} s"
    rows = [
        ("RSS per node (largest of 3)", f"{rss:.0f} MiB", f"< {TARGETS['rss_mib']} MiB"),
        (
            "of which per counter (RSS less an empty node's)",
            f"{per_counter:.0f} bytes",
            "(was about 470)",
        ),
        (f"idle CPU per node over {results['idle_seconds']:g} s (largest)", f"{cpu:.1f} %", "< 2 %"),
        ("restart of n1 until it answers", f"{results['restart_s']:.1f} s", "< 10 s"),
        ("RSS of n1 after the restart", f"{results['restart_rss_mib']:.0f} MiB", f"< {TARGETS['rss_mib']} MiB"),
        ("empty n4 knows every counter", caught, "< 30 s"),
        ("reads on n1-n3 during the catch-up, p50", f"{_fmt(reads['p50'], '.2f')} ms", "< 100 ms"),
        ("... p99", f"{_fmt(reads['p99'], '.2f')} ms", "< 100 ms"),
        ("... max", f"{_fmt(reads['max'], '.1f')} ms", "< 100 ms"),
        ("RSS of n4 after the catch-up", f"{c['rss_mib']:.0f} MiB", f"< {TARGETS['rss_mib']} MiB"),
    ]
    per_node = ", ".join(
        f"{node} {s['p50']:.2f} / {s['p99']:.2f} / {s['max']:.1f}" for node, s in c["reads_per_node"].items()
    )
    before = c["reads_before"]
    lines = [
        f"Three nodes of a `LocalCluster` (real `twistd` processes on loopback, default options) each hold"
        f" **{n:,} counters with three replicas' partials** (written straight into each data dir with"
        f" sqlite3, under each node's own replica id; {results['db_mib']:.0f} MiB of SQLite per node). After"
        " their start-up exchanges, each node's RSS and its CPU over an idle window with the default 1 s"
        " polls; then n1 restarts (SIGTERM, start, timed until it answers HTTP). Then an empty fourth node"
        " starts and the four-node list is posted to n1: the curve below is the new node's `/status`"
        ' "counters", sampled every 0.25 s, while a thread reads `GET /counter/<name>/value` on n1, n2 and n3'
        " in turn (about 100 reads/s in all).",
        "",
        "| figure | measured | target |",
        "|---|---:|---:|",
        *(f"| {a} | {b} | {t} |" for a, b, t in rows),
        "",
        f"Reads per feeder during the catch-up (p50 / p99 / max ms): {per_node}; {reads['reads']:,} reads,"
        f" {c['read_errors']} errors; in the second before it: p50 {_fmt(before['p50'], '.2f')} ms,"
        f" p99 {_fmt(before['p99'], '.2f')} ms. Each feeder's RSS after the catch-up: "
        + ", ".join(f"{node} {v:.0f} MiB" for node, v in c["feeder_rss_mib"].items())
        + ". First starts on the filled data dirs: "
        + ", ".join(f"{v:.1f} s" for v in results["first_start_s"].values())
        + f"; start-up exchanges over after {results['settle_s']:.0f} s (and {results['resettle_s']:.0f} s"
        f" after the restart). Values checked on n4 after the catch-up: "
        + ("all right" if not c["wrong_values"] else f"**{len(c['wrong_values'])} wrong**")
        + ("" if results.get("restart_value_ok", True) else "; **a wrong value after the restart**")
        + ".",
        "",
        "![catch-up curve: counters known by the new node against seconds](img/catchup.png)",
    ]
    if results.get("log_problems"):
        lines += ["", "Problems in the node logs: " + "; ".join(results["log_problems"])]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 5 s idle window and shorter waits")
    parser.add_argument("--counters", type=int, default=COUNTERS)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    results = run(args.quick, args.counters)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    img = Path(tempfile.mkdtemp(prefix="counterdb-scale-img-"))
    print(report(results, img))
    print(f"\n(plot in {img / 'catchup.png'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
