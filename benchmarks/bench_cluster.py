#!/usr/bin/env python3
"""
Throughput, latency and replication of real counterdb nodes on loopback.

Nodes are started by :class:`counterdb.localcluster.LocalCluster` (``twistd``
processes on 127.0.0.2-4, data dirs in a temporary directory, all stopped
by ``down()`` whatever happens). Counts come from the nodes' own ``GET
/status``. Measured:

[1] one node, ``--durability full`` and ``fast``: increments/s and p50/p99
    latency of ``POST /counter/<name>`` with 1, 8 and 32 keep-alive
    clients; the node's CPU; increments per group commit (the deltas of
    ``committed_increments`` / ``commits``).
[2] a 3-node cluster (default 1 s poll interval): ack-to-peer convergence,
    from the 200 of a ``POST`` on A to the first ``GET .../value`` on B, and
    on C, that shows it (p50/p99 ms).
[3] the same cluster: 32 clients increment on A for the run's duration;
    A's rate, and from A's peer stats the pushes to each peer, increments
    per push and pushed bytes per increment.

Load: ``wrk`` (``apt-get install wrk``) when installed, else N threads
with one ``http.client`` keep-alive connection each, timing every request
(slower per request than wrk: compare figures of one generator only).

Usage::

    python benchmarks/bench_cluster.py --quick   # about 30 s
    python benchmarks/bench_cluster.py           # about 1 minute
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's counterdb
from common import (  # same directory: what every benchmark measures with
    connect,
    cpu_seconds,
    cpu_used,
    log_problems,
    percentile,
    request,
    status,
    value,
    visibility,
)

from counterdb.localcluster import LocalCluster


def thread_load(url: str, path: str, clients: int, seconds: float) -> dict:
    """``clients`` threads POST to ``path`` back to back for ``seconds``."""
    stop_at = time.monotonic() + seconds
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()

    def client() -> None:
        conn = connect(url)
        try:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                code, _ = request(conn, "POST", path)
                if code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[str(code)] += 1
        except OSError as e:
            errors[type(e).__name__] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    elapsed = time.perf_counter() - t0
    return {
        "ok": len(latencies),
        "rps": len(latencies) / elapsed,
        "errors": dict(errors),
        "p50": percentile(latencies, 50) * 1000,
        "p99": percentile(latencies, 99) * 1000,
    }


def wrk_load(url: str, path: str, clients: int, seconds: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write('wrk.method = "POST"\n')
        script.flush()
        out = subprocess.run(
            ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency", "-s", script.name, url + path],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=True,
        ).stdout
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def ms(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * scale[m.group(2)] if m else float("nan")

    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    errors = {"non-2xx": int(bad.group(1))} if bad else {}
    if sock:
        errors["socket"] = sock.group(1).strip()
    return {
        "ok": total - errors.get("non-2xx", 0),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "errors": errors,
        "p50": ms("50"),
        "p99": ms("99"),
    }


def one_node(root: Path, durability: str, args: argparse.Namespace, use_wrk: bool, problems: list[str]) -> list[dict]:
    rows = []
    with LocalCluster(root / f"one-{durability}", 1, node_args=["--durability", durability]) as cluster:
        url, pid = cluster.url("n1"), cluster.status()[0].pid
        for clients in args.clients:
            path = f"/counter/c{clients}"
            load = wrk_load if use_wrk else thread_load
            load(url, path, clients, args.warmup)
            s0, cpu0, t0 = status(url)["stats"], cpu_seconds(pid), time.perf_counter()
            r = load(url, path, clients, args.seconds)
            s1, cpu1, t1 = status(url)["stats"], cpu_seconds(pid), time.perf_counter()
            commits = s1["commits"] - s0["commits"]
            r.update(
                durability=durability,
                clients=clients,
                cpu=(cpu1 - cpu0) / (t1 - t0),
                per_commit=(s1["committed_increments"] - s0["committed_increments"]) / max(1, commits),
            )
            if s1["failed_commits"] > s0["failed_commits"]:
                r["errors"]["failed commits"] = s1["failed_commits"] - s0["failed_commits"]
            rows.append(r)
            print(f"    {durability:<4} {clients:>3} clients: {r['rps']:>6.0f} incr/s", flush=True)
        problems += log_problems(cluster)
    return rows


def burst(cluster: LocalCluster, clients: int, seconds: float, use_wrk: bool) -> dict:
    a, *peers = cluster.nodes
    url = cluster.url(a)
    s0 = status(url)
    r = (wrk_load if use_wrk else thread_load)(url, "/counter/burst", clients, seconds)
    final, converged = value(url, "burst"), True
    deadline = time.monotonic() + 10.0
    for p in peers:  # every push has landed once both peers show A's value
        while (seen := value(cluster.url(p), "burst")) < final and time.monotonic() < deadline:
            time.sleep(0.01)
        converged &= seen >= final
    s1 = status(url)
    r["increments"] = s1["stats"]["increments"] - s0["stats"]["increments"]
    r["peers"] = {}
    for peer, after in s1["peers"].items():
        before = s0["peers"][peer]["stats"]
        r["peers"][peer] = {k: after["stats"][k] - before[k] for k in after["stats"]}
    r["converged"] = converged
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per load run, 100 convergence samples")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--durability", default="full,fast", help="modes for [1] (default full,fast)")
    parser.add_argument(
        "--loadgen", choices=["auto", "threads"], default="auto", help="auto = wrk if installed, else threads"
    )
    args = parser.parse_args()
    args.seconds, args.warmup, args.samples = (2.0, 0.5, 100) if args.quick else (5.0, 1.0, 500)
    if not all(1 <= c <= 256 for c in args.clients):
        parser.error("1 to 256 clients")
    use_wrk = args.loadgen == "auto" and shutil.which("wrk") is not None
    if not use_wrk:
        print("load from threads (wrk not used; apt-get install wrk)", flush=True)
    commit = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    root = Path(tempfile.mkdtemp(prefix="counterdb-bench-"))
    (machine0, own0), started = cpu_used(), time.monotonic()
    try:
        print("[1] one node ...", flush=True)
        problems: list[str] = []
        single = [r for d in args.durability.split(",") for r in one_node(root, d, args, use_wrk, problems)]
        print("[2] and [3] three nodes ...", flush=True)
        with LocalCluster(root / "three", 3) as cluster:
            conv = visibility(cluster, args.samples, counter="convergence")
            bur = burst(cluster, 32, args.seconds, use_wrk)
            problems += log_problems(cluster)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    machine1, own1 = cpu_used()
    others = max(0.0, (machine1 - machine0) - (own1 - own0)) / (time.monotonic() - started)

    print(
        f"\ncounterdb {commit}, {time.strftime('%Y-%m-%d')}, nproc {os.cpu_count()}, Python "
        f"{sys.version.split()[0]}, wall {time.monotonic() - started:.0f} s; CPU used by other processes during"
        f" the run: {others:.2f} cores{'  <- contended: figures low' if others > 0.25 else ''}"
    )
    print(f"\n[1] one node, POST /counter/<name>, {'wrk' if use_wrk else 'threads'}, {args.seconds:g} s per run")
    print("    durability clients   incr/s  p50 ms  p99 ms  node CPU  incr/commit  errors")
    for r in single:
        print(
            f"    {r['durability']:<10} {r['clients']:>7} {r['rps']:>8.0f} {r['p50']:>7.2f} {r['p99']:>7.2f} "
            f"{r['cpu']:>8.0%} {r['per_commit']:>12.1f}  {r['errors'] or 0}"
        )
    print(
        f"\n[2] convergence, 3 nodes, 1 s polls: ack on A to value seen on B, and on C;"
        f" {args.samples} increments, {conv['n']} samples"
    )
    print(
        f"    p50 {conv['p50']:.2f} ms, p99 {conv['p99']:.2f} ms, max {conv['max']:.2f} ms, "
        f"timeouts (> 5 s) {conv['timeouts']}"
    )
    n = bur["increments"]
    print(
        f"\n[3] burst on A of a 3-node cluster, 32 clients, {args.seconds:g} s: {n:,} increments,"
        f" {bur['rps']:.0f} incr/s, p50 {bur['p50']:.2f} ms, p99 {bur['p99']:.2f} ms, errors {bur['errors'] or 0},"
        f" peers converged: {bur['converged']}"
    )
    for peer, d in bur["peers"].items():
        print(
            f"    to {peer}: {d['pushes']} pushes ({n / max(1, d['pushes']):.1f} incr/push), "
            f"{d['push_bytes'] / n:.1f} bytes/incr, {d['push_bytes'] / max(1, d['pushes']):.0f} bytes/push, "
            f"failures {d['push_failures']}, refused {d['refused']}, polls {d['polls']}"
        )
    if problems:
        print(f"\nnode logs: {problems}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
