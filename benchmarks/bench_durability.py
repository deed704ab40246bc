#!/usr/bin/env python3
"""
What durability and restarts cost a counterdb node.

[1] the disk: append 4 KiB and ``fsync``, then ``fdatasync``, 200 times
    each, next to the data dirs (``$TMPDIR``); a ``--durability full``
    commit waits for one of these.
[2] restart: one node (:class:`counterdb.localcluster.LocalCluster`,
    ``twistd`` on 127.0.0.2) on an empty data dir, then on one holding
    200,000 counters x 3 replicas (``--counters 1000000`` for a bigger
    one), with the database file's pages dropped from the page cache and
    cached: seconds from process start until it answers (``start()``
    returns), its RSS, and seconds from SIGTERM to exit.
[3] the store alone, in this process, no HTTP: ``Node.increment`` over
    ``MemoryStore`` and ``SqliteStore`` (``full``, ``fast``) with N = 1,
    16, 256 increments outstanding (N workers, one counter each, each
    issuing its next increment when the last is acknowledged): incr/s,
    commits/s and increments per commit (``node.stats``), latency p50/p99,
    and this process's CPU per increment.

Full vs fast over HTTP is [1] of ``bench_cluster.py``.

Usage::

    python benchmarks/bench_durability.py --quick   # about 20 s
    python benchmarks/bench_durability.py           # about 40 s
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's counterdb
from bench_cluster import percentile  # same directory: one definition for both scripts
from common import cpu_seconds, fill, partial, replica_id

from counterdb.localcluster import LocalCluster
from counterdb.node import Node
from counterdb.store import DB_FILE, MemoryStore, SqliteStore, StoreSettings


def fsync_latency(directory: Path, rounds: int = 200) -> None:
    block = os.urandom(4096)
    fd, name = tempfile.mkstemp(dir=directory)
    try:
        for sync in (os.fsync, os.fdatasync):
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                os.write(fd, block)
                sync(fd)
                times.append((time.perf_counter() - t0) * 1000)
            print(
                f"    {sync.__name__:<10} mean {sum(times) / rounds:.3f}  p50 {percentile(times, 50):.3f}  "
                f"p99 {percentile(times, 99):.3f}  max {max(times):.3f} ms"
            )
    finally:
        os.close(fd)
        os.unlink(name)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def restart(root: Path, counters: int) -> None:
    with LocalCluster(root / "restart", 1) as cluster:
        data = cluster.data_dir("n1")
        cluster.stop("n1")
        for label in ("empty data dir", "pages dropped", "pages cached"):
            if label == "pages dropped":
                t0 = time.perf_counter()
                db_path = data / DB_FILE
                fill(db_path, counters, [replica_id(db_path), uuid.uuid4().hex, uuid.uuid4().hex])
                size = sum(f.stat().st_size for f in data.iterdir()) / 2**20
                print(
                    f"    {counters:,} counters x 3 replicas: {size:.0f} MiB on disk, "
                    f"built in {time.perf_counter() - t0:.1f} s"
                )
                drop_cache(data / DB_FILE)
            t0 = time.perf_counter()
            cluster.start("n1", timeout=300)
            ready = time.perf_counter() - t0
            probe = min(123, counters - 1)
            with urllib.request.urlopen(f"{cluster.url('n1')}/counter/counter-{probe}/value", timeout=10) as answer:
                value = int(answer.read())
            expected = 0 if label == "empty data dir" else sum(partial(probe, k) for k in range(3))
            pid = cluster.status()[0].pid
            rss = (
                next(
                    int(line.split()[1])
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS:")
                )
                / 1024
            )
            t0 = time.perf_counter()
            cluster.stop("n1")
            stopped = time.perf_counter() - t0
            print(
                f"    {label:<16} ready {ready:6.2f} s   RSS {rss:4.0f} MiB   SIGTERM to exit {stopped:.2f} s"
                f"{'' if value == expected else f'   WRONG VALUE {value}, expected {expected}'}"
            )


async def store_case(reactor: object, root: Path, kind: str, n: int, seconds: float) -> None:
    from twisted.internet.defer import ensureDeferred, gatherResults

    data = tempfile.mkdtemp(dir=root)
    store = MemoryStore() if kind == "memory" else SqliteStore(data, reactor, StoreSettings(durability=kind))
    node = Node(store, reactor)
    latencies: list[float] = []

    async def worker(i: int, until: float) -> None:
        while (t0 := time.perf_counter()) < until:
            await node.increment(f"c{i}", 1)
            latencies.append(time.perf_counter() - t0)

    async def run(duration: float) -> None:
        until = time.perf_counter() + duration
        await gatherResults([ensureDeferred(worker(i, until)) for i in range(n)])

    try:
        await run(min(0.5, seconds / 4))  # warm-up
        latencies.clear()
        commits0, done0 = node.stats.commits, node.stats.committed_increments
        # This process and the store's writer process, while it runs.
        cpu0, t0 = cpu_seconds(os.getpid()), time.perf_counter()
        await run(seconds)
        cpu, elapsed = cpu_seconds(os.getpid()) - cpu0, time.perf_counter() - t0
    finally:
        await store.shutdown()
        shutil.rmtree(data, ignore_errors=True)
    commits, done = node.stats.commits - commits0, node.stats.committed_increments - done0
    print(
        f"    {kind:<7} {n:>4} {len(latencies) / elapsed:>9,.0f} {commits / elapsed:>10,.0f} "
        f"{done / max(1, commits):>12.1f} {percentile(latencies, 50) * 1000:>8.3f} "
        f"{percentile(latencies, 99) * 1000:>8.3f} {cpu / max(1, len(latencies)) * 1e6:>8.1f}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 s per store case instead of 3 s")
    parser.add_argument("--counters", type=int, default=200_000, help="counters for [2] (default 200,000)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 256])
    args = parser.parse_args()
    if not 1 <= args.counters <= 5_000_000 or not all(1 <= n <= 4096 for n in args.concurrency):
        parser.error("1 to 5,000,000 counters, 1 to 4096 outstanding increments")
    seconds = 1.0 if args.quick else 3.0
    root = Path(tempfile.mkdtemp(prefix="counterdb-durability-"))
    print(
        f"counterdb durability benchmark, {time.strftime('%Y-%m-%d')}, nproc {os.cpu_count()}, "
        f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, load average {os.getloadavg()[0]:.2f},"
        f" data under {root}"
    )
    try:
        print("\n[1] disk: 4 KiB append + sync, 200 times each")
        fsync_latency(root)
        print("\n[2] restart of one twistd node")
        restart(root, args.counters)
        print(f"\n[3] store alone: Node.increment in this process, N outstanding, {seconds:g} s each")
        print("    store      N    incr/s  commits/s  incr/commit  p50 ms   p99 ms  CPU us/incr")

        from twisted.internet.defer import ensureDeferred
        from twisted.internet.task import react

        async def stores(reactor: object) -> None:
            for kind in ("memory", "full", "fast"):
                for n in args.concurrency:
                    await store_case(reactor, root, kind, n, seconds)

        react(lambda reactor: ensureDeferred(stores(reactor)))  # exits; `finally` still runs
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
