#!/usr/bin/env python3
"""
What durability and restarts cost a counterdb node, and print the figures.

Not a test (pytest does not collect it, nothing asserts on the figures).
Measured:

1. the store in isolation, in-process, no HTTP: increments/s through
   ``Node.increment`` with ``MemoryStore`` and ``SqliteStore`` in
   ``--durability full`` and ``fast``, with N increments outstanding at all
   times (N closed-loop workers, each on its own counter, each issuing its
   next increment as soon as the previous one is acknowledged), with the
   mean number of increments per commit (``store.write_own`` calls are
   counted by wrapping the method) and the process CPU per increment;
2. over HTTP, one real twistd node: increments/s and p50/p99 latency with
   ``--durability full`` and ``fast`` at 1, 8 and 32 clients (the load
   generators of ``bench_cluster.py``: wrk when installed, else its Python
   one);
3. restart with 1,000,000 counters x 3 replicas stored (100,000 with
   ``--quick``): (a) in-process, ``SqliteStore`` open (with its
   ``PRAGMA quick_check``) and ``Node(store)`` (``CounterTable.load``)
   times and peak RSS, with the file's pages cached and after dropping them
   (``posix_fadvise(DONTNEED)`` on the database file only); (b) a real
   twistd node on that data dir: time from process start until
   ``GET /counter/counter-123/value`` answers the right value, its RSS, and
   the same on an empty data dir for comparison; the on-disk size;
4. the fsync latency of the disk holding the data dirs (4 KiB append +
   fsync / fdatasync, 200 times), to relate "full" durability to the disk.

Usage::

    python benchmarks/bench_durability.py --quick   # about 35 s
    python benchmarks/bench_durability.py           # about 2 minutes

In-process measurements run in child processes of this script (a fresh
interpreter each: the reactor runs once per process, and peak RSS is per
process), importing counterdb from ``--code`` (default: this checkout).
Every child and node is stopped in a ``finally`` block (SIGTERM, then
SIGKILL) and the temporary data dirs are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cluster as bc  # noqa: E402  (same directory; stdlib-only imports)

HOST = "127.0.0.2"
PROBE = 123  # restart readiness reads counter-123
REPLICAS = 3
RESTART_DEADLINE = 180.0  # seconds for a node on the big data dir to answer
CHILD_DEADLINE = 600.0  # seconds for any in-process child
FSYNC_ROUNDS = 200


#: Prepended to the twistd command of the [2] nodes: counts Node.increment
#: and SqliteStore.write_own calls (one per group commit) by wrapping both
#: methods, and writes the counts to ./bench-counts.json on SIGUSR2. Costs a
#: Python call per increment and per commit; changes nothing else.
COUNTING_PREAMBLE = """
import json, os, signal
import counterdb.node, counterdb.store
_counts = {"seq": 0, "increments": 0, "commits": 0}
_increment = counterdb.node.Node.increment
_write_own = counterdb.store.SqliteStore.write_own
def increment(self, *args, **kwargs):
    _counts["increments"] += 1
    return _increment(self, *args, **kwargs)
def write_own(self, *args, **kwargs):
    _counts["commits"] += 1
    return _write_own(self, *args, **kwargs)
counterdb.node.Node.increment = increment
counterdb.store.SqliteStore.write_own = write_own
def _dump(signum, frame):
    _counts["seq"] += 1
    with open("bench-counts.json.tmp", "w") as f:
        json.dump(_counts, f)
    os.replace("bench-counts.json.tmp", "bench-counts.json")
signal.signal(signal.SIGUSR2, _dump)
"""


# ---------------------------------------------------------------------------
# Helpers shared by the parent and the children
# ---------------------------------------------------------------------------


def stored_count(i: int, replica_index: int) -> int:
    """The partial stored for counter-<i> by the replica_index'th replica."""
    return 1 + (i * 31 + replica_index * 17) % 1000


def expected_value(i: int) -> int:
    return sum(stored_count(i, r) for r in range(REPLICAS))


def vm_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB from /proc/PID/status."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def drop_file_cache(path: Path) -> None:
    """Evict ``path``'s pages from the page cache (this file only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------------------
# Child 1: the store in isolation (Node.increment, reactor running)
# ---------------------------------------------------------------------------


async def _store_case(reactor: Any, kind: str, n: int, duration: float, warmup: float, root: str) -> dict[str, Any]:
    from twisted.internet.defer import Deferred

    from counterdb.node import Node
    from counterdb.store import MemoryStore, SqliteStore, StoreSettings

    data_dir = None
    if kind == "memory":
        store: Any = MemoryStore()
    else:
        data_dir = tempfile.mkdtemp(prefix=f"store-{kind}-{n}-", dir=root)
        store = SqliteStore(data_dir, reactor, StoreSettings(durability=kind))
    try:
        node = Node(store, reactor)
        commit_sizes: list[int] = []
        st: dict[str, Any] = {"measuring": False, "stop": False, "pumping": False, "outstanding": 0,
                              "acks": 0, "errors": 0, "first_error": ""}
        latencies: list[float] = []
        issued_at = [0.0] * n
        names = [f"bench-{i}" for i in range(n)]
        ready = list(range(n))
        done: Deferred[None] = Deferred()
        clock = time.perf_counter
        t_measure = clock() + warmup
        t_end = t_measure + duration
        window: dict[str, float] = {}

        original_write_own = store.write_own

        def counting_write_own(partials: dict[str, int], keys: list[Any] = []) -> Any:
            if st["measuring"]:
                commit_sizes.append(len(partials))  # one counter per worker: = increments
            return original_write_own(partials, keys)

        store.write_own = counting_write_own  # the Node calls self.store.write_own

        def issue(i: int) -> None:
            st["outstanding"] += 1
            issued_at[i] = clock()
            node.increment(names[i], 1).addCallbacks(acked, failed, callbackArgs=(i,), errbackArgs=(i,))

        def acked(_: object, i: int) -> None:
            st["outstanding"] -= 1
            if st["measuring"]:
                st["acks"] += 1
                latencies.append(clock() - issued_at[i])
            again(i)

        def failed(f: Any, i: int) -> None:
            st["outstanding"] -= 1
            st["errors"] += 1
            st["first_error"] = st["first_error"] or f.getErrorMessage()
            again(i)

        def again(i: int) -> None:
            now = clock()
            if not st["measuring"] and not st["stop"] and now >= t_measure:
                st["measuring"] = True
                window.update(t0=now, cpu0=cpu_self())
            if not st["stop"] and now >= t_end:
                st["stop"] = True
                st["measuring"] = False
                window.update(t1=now, cpu1=cpu_self())
            if st["stop"]:
                finish()
                return
            if st["pumping"]:
                ready.append(i)  # acknowledged synchronously: the pump loop reissues it
            else:
                issue(i)  # acknowledged from the reactor: reissue now, it joins the next commit

        def pump() -> None:
            # A synchronous store (MemoryStore) acknowledges inside
            # Node.increment; reissuing from that callback would nest one
            # commit inside the other without bound (docs/benchmarks.md,
            # "Durability and restarts", finding 4), so this loop
            # reissues instead. An asynchronous store returns at once.
            st["pumping"] = True
            try:
                while ready and not st["stop"]:
                    issue(ready.pop())
            finally:
                st["pumping"] = False
            if st["stop"]:
                finish()

        def finish() -> None:
            # From the reactor, not from inside this case's call stack.
            if st["outstanding"] == 0 and not st.get("finishing"):
                st["finishing"] = True
                reactor.callLater(0, done.callback, None)

        pump()
        watchdog = reactor.callLater(warmup + duration + 60, lambda: done.called or done.errback(
            RuntimeError(f"{kind} n={n}: increments still outstanding 60 s after the end")))
        try:
            await done
        finally:
            if watchdog.active():
                watchdog.cancel()
        elapsed = window["t1"] - window["t0"]
        latencies.sort()
        commits = len(commit_sizes)
        commit_sizes.sort()
        return {
            "store": kind,
            "n": n,
            "acks": st["acks"],
            "errors": st["errors"],
            "first_error": st["first_error"],
            "elapsed": elapsed,
            "rate": st["acks"] / elapsed,
            "commits": commits,
            "commits_per_s": commits / elapsed,
            "per_commit_mean": sum(commit_sizes) / commits if commits else float("nan"),
            "per_commit_p50": bc._percentile(commit_sizes, 50) if commits else float("nan"),
            "per_commit_min": commit_sizes[0] if commits else 0,
            "per_commit_max": commit_sizes[-1] if commits else 0,
            "cpu_us_per_incr": (window["cpu1"] - window["cpu0"]) / st["acks"] * 1e6 if st["acks"] else float("nan"),
            "cpu_share": (window["cpu1"] - window["cpu0"]) / elapsed,
            "latency": bc._summary(latencies),
        }
    finally:
        store.close()
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)


def child_store(spec: dict[str, Any]) -> None:
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    results: list[dict[str, Any]] = []

    async def main(reactor: Any) -> None:
        for kind in spec["stores"]:
            for n in spec["concurrency"]:
                r = await _store_case(reactor, kind, n, spec["duration"], spec["warmup"], spec["root"])
                results.append(r)
                print(f"    {kind:<6} N={n:<4} {r['rate']:>9.0f} incr/s  {r['per_commit_mean']:>6.1f} incr/commit",
                      file=sys.stderr, flush=True)
        print(json.dumps(bc._no_nan(results)), flush=True)

    react(lambda reactor: ensureDeferred(main(reactor)))  # exits the process


# ---------------------------------------------------------------------------
# Child 2: build a data dir with many counters
# ---------------------------------------------------------------------------


def child_build(spec: dict[str, Any]) -> None:
    import uuid

    from twisted.internet import reactor

    from counterdb.store import DB_FILE, SqliteStore, StoreSettings

    data_dir = Path(spec["data_dir"])
    counters = spec["counters"]
    t0 = time.perf_counter()
    store = SqliteStore(str(data_dir), reactor, StoreSettings())  # schema, replica id, WAL mode
    own = store.replica_id
    store.close()
    replicas = [own] + [uuid.uuid4().hex for _ in range(REPLICAS - 1)]  # own first: index 0
    order = sorted(range(REPLICAS), key=lambda r: replicas[r])
    names = sorted((f"counter-{i}", i) for i in range(counters))  # primary-key order: a fast append

    def rows() -> Any:
        for name, i in names:
            for r in order:
                yield name, replicas[r], stored_count(i, r)

    db = sqlite3.connect(data_dir / DB_FILE, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=OFF")
        db.execute("BEGIN")
        db.executemany("INSERT INTO partials (counter, replica, count) VALUES (?, ?, ?)", rows())
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # as a cleanly stopped node leaves it
        stored = db.execute("SELECT count(*) FROM partials").fetchone()[0]
    finally:
        db.close()
    drop_file_cache(data_dir / DB_FILE)  # also fsyncs it
    print(json.dumps({"rows": stored, "replica_id": own, "seconds": time.perf_counter() - t0}), flush=True)


# ---------------------------------------------------------------------------
# Child 3: restart in-process (SqliteStore open + Node load)
# ---------------------------------------------------------------------------


def child_load(spec: dict[str, Any]) -> None:
    from twisted.internet import reactor

    from counterdb.node import Node
    from counterdb.store import DB_FILE, SqliteStore, StoreSettings

    data_dir = Path(spec["data_dir"])
    db_path = data_dir / DB_FILE
    if spec["cold"]:
        drop_file_cache(db_path)
    base = vm_status()
    t0 = time.perf_counter()
    store = SqliteStore(str(data_dir), reactor, StoreSettings())
    t1 = time.perf_counter()
    try:
        node = Node(store, reactor)
        t2 = time.perf_counter()
        loaded = vm_status()
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        value = node.value(f"counter-{PROBE}")
        counters = len(node.table)
        del node
    finally:
        t3 = time.perf_counter()
        store.close()
        t4 = time.perf_counter()
    # Parts of the above, each alone (pages now cached): the integrity
    # check, and reading every row into Python without building the table.
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        q0 = time.perf_counter()
        check = [row[0] for row in db.execute("PRAGMA quick_check")]
        q1 = time.perf_counter()
        rows = 0
        for _ in db.execute("SELECT counter, replica, count FROM partials"):
            rows += 1
        q2 = time.perf_counter()
    finally:
        db.close()
    print(json.dumps({
        "cold": spec["cold"],
        "open_s": t1 - t0,
        "node_s": t2 - t1,
        "total_s": t2 - t0,
        "close_s": t4 - t3,
        "rss_before_kib": base.get("VmRSS"),
        "rss_after_kib": loaded.get("VmRSS"),
        "peak_rss_kib": peak_kib,
        "counters": counters,
        "value": value,
        "expected": expected_value(PROBE),
        "quick_check_s": q1 - q0,
        "quick_check": check[:3],
        "scan_s": q2 - q1,
        "scan_rows": rows,
    }), flush=True)


# ---------------------------------------------------------------------------
# Parent: orchestration
# ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, registry: bc.Registry, root: Path) -> None:
        self.args = args
        self.registry = registry
        self.root = root
        self.problems: list[str] = []

    def child(self, spec: dict[str, Any]) -> Any:
        """Run this script in a child mode; return the JSON of its last line."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(bc.CODE), env.get("PYTHONPATH")]))
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)]
        proc = self.registry.popen(cmd, stdout=subprocess.PIPE, stderr=None, stdin=subprocess.DEVNULL, env=env,
                                   cwd=self.root)
        try:
            out, _ = proc.communicate(timeout=CHILD_DEADLINE)
        finally:
            self.registry.stop([proc])
        if proc.returncode in (130, -signal.SIGINT):
            raise KeyboardInterrupt
        lines = out.decode(errors="replace").strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"child {spec['mode']} failed ({proc.returncode}): {out[-2000:]!r}")
        return json.loads(lines[-1])

    # [1] -------------------------------------------------------------------

    def store_costs(self) -> list[dict[str, Any]]:
        a = self.args
        return self.child({"mode": "store", "stores": ["memory", "full", "fast"], "concurrency": a.concurrency,
                           "duration": a.store_duration, "warmup": a.store_warmup, "root": str(self.root)})

    # [2] -------------------------------------------------------------------

    def http(self) -> list[dict[str, Any]]:
        a = self.args
        out = []
        for durability in ("full", "fast"):
            port = bc.pick_port((HOST,))
            workdir = self.root / f"http-{durability}"
            workdir.mkdir()
            plain = bc.TWISTD
            bc.TWISTD = COUNTING_PREAMBLE + plain  # read by NodeProc when it builds the command
            try:
                node = bc.NodeProc(self.registry, HOST, port, 1.0, workdir, ["--durability", durability])
            finally:
                bc.TWISTD = plain
            try:
                asyncio.run(node.wait_ready(time.monotonic() + bc.START_DEADLINE))
                for clients in a.clients:
                    before = self.counts(node)
                    r = bc.load(self.registry, self.root, node, a.generator, path=f"/counter/http-{clients}",
                                clients=clients, duration=a.http_duration, max_requests=None, warmup=a.http_warmup)
                    after = self.counts(node)
                    increments = after["increments"] - before["increments"]
                    commits = after["commits"] - before["commits"]
                    r.update(durability=durability, clients=clients, increments=increments, commits=commits,
                             per_commit=increments / commits if commits else float("nan"))
                    out.append(r)
                    print(f"    {durability} c={clients}: {r['rps']:.0f} incr/s, p99 {r['latency']['p99']:.2f} ms, "
                          f"{r['per_commit']:.1f} incr/commit", file=sys.stderr, flush=True)
            finally:
                self.stop_node(node)
        return out

    @staticmethod
    def counts(node: bc.NodeProc) -> dict[str, int]:
        """The node's increment and commit counts so far (COUNTING_PREAMBLE)."""
        path = node.workdir / "bench-counts.json"
        seq = json.loads(path.read_text())["seq"] if path.exists() else 0
        node.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if path.exists():
                counts = json.loads(path.read_text())
                if counts["seq"] > seq:
                    return counts
            time.sleep(0.01)
        raise RuntimeError(f"node {node.base} wrote no counts after SIGUSR2:\n{node.log_tail()}")

    def stop_node(self, node: bc.NodeProc) -> float:
        t0 = time.perf_counter()
        self.registry.stop([node.proc])
        stopped = time.perf_counter() - t0
        text = node.log_text()
        node.close_log()
        for marker in ("Traceback", "Unhandled", "CRITICAL", "#critical]", "#error]", "#warn]"):
            if text.count(marker):
                self.problems.append(f"{node.base}: {text.count(marker)} log line(s) with {marker!r} ({node.log_path})")
        if node.proc.returncode not in (0, -signal.SIGTERM):
            self.problems.append(f"{node.base}: exited with {node.proc.returncode} after SIGTERM ({node.log_path})")
        return stopped

    # [3] -------------------------------------------------------------------

    def restart(self) -> dict[str, Any]:
        from counterdb.store import DB_FILE  # only a constant; children do the real work

        a = self.args
        data_dir = self.root / "big" / "counterdb-data"
        data_dir.parent.mkdir()
        print(f"    building {a.counters:,} counters x {REPLICAS} replicas ...", file=sys.stderr, flush=True)
        built = self.child({"mode": "build", "data_dir": str(data_dir), "counters": a.counters})
        db_file = data_dir / DB_FILE
        size = sum(p.stat().st_size for p in data_dir.iterdir() if p.name.startswith(DB_FILE))
        result: dict[str, Any] = {"counters": a.counters, "build": built, "bytes": size,
                                  "db_bytes": db_file.stat().st_size}
        result["inprocess"] = [self.child({"mode": "load", "data_dir": str(data_dir), "cold": cold})
                               for cold in (True, False)]
        twistd = [self.twistd_start("empty data dir", self.root / "empty" / "counterdb-data", 0)]
        twistd.append(self.twistd_start("page cache dropped", data_dir, expected_value(PROBE), drop=db_file))
        twistd.append(self.twistd_start("page cache warm", data_dir, expected_value(PROBE)))
        result["twistd"] = twistd
        return result

    def twistd_start(self, label: str, data_dir: Path, expected: int, drop: Path | None = None) -> dict[str, Any]:
        data_dir.parent.mkdir(exist_ok=True)
        if drop is not None:
            drop_file_cache(drop)
        port = bc.pick_port((HOST,))
        workdir = data_dir.parent
        t0 = time.perf_counter()
        node = bc.NodeProc(self.registry, HOST, port, 1.0, workdir, ["--data-dir", str(data_dir)])
        try:
            answered, polls = asyncio.run(self.first_answer(node, expected, t0))
            mem = vm_status(node.proc.pid)
        finally:
            stop_s = self.stop_node(node)
        return {"label": label, "ready_s": answered, "polls": polls, "rss_kib": mem.get("VmRSS"),
                "peak_rss_kib": mem.get("VmHWM"), "stop_s": stop_s}

    @staticmethod
    async def first_answer(node: bc.NodeProc, expected: int, t0: float) -> tuple[float, int]:
        """Seconds from t0 until GET /counter/counter-PROBE/value answers ``expected``."""
        path = f"/counter/counter-{PROBE}/value"
        polls = 0
        deadline = t0 + RESTART_DEADLINE
        while True:
            if node.proc.poll() is not None:
                raise RuntimeError(f"node {node.base} exited with {node.proc.returncode}:\n{node.log_tail()}")
            polls += 1
            try:
                status, body = await bc.http_once(node.host, node.port, "GET", path, timeout=5.0)
                if status == 200 and int(body) == expected:
                    return time.perf_counter() - t0, polls
                if status == 200:
                    raise RuntimeError(f"{node.base}{path} answered {body!r}, expected {expected}")
            except (OSError, bc.HTTPError, asyncio.TimeoutError):
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError(f"node {node.base} did not answer within {RESTART_DEADLINE:g} s:\n{node.log_tail()}")
            await asyncio.sleep(0.01)


# [4] -----------------------------------------------------------------------


def fsync_latency(directory: Path, rounds: int = FSYNC_ROUNDS) -> dict[str, Any]:
    """Append 4 KiB and fsync (then fdatasync), ``rounds`` times each."""
    block = os.urandom(4096)
    out = {}
    fd, name = tempfile.mkstemp(prefix="fsync-", dir=directory)
    try:
        for label, sync in (("fsync", os.fsync), ("fdatasync", os.fdatasync)):
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                os.write(fd, block)
                sync(fd)
                times.append(time.perf_counter() - t0)
            summary = bc._summary(times)
            summary["mean"] = sum(times) / len(times) * 1000
            out[label] = summary
    finally:
        os.close(fd)
        os.unlink(name)
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.0f}"


def print_report(facts: dict[str, Any], res: dict[str, Any], args: argparse.Namespace) -> None:
    f = bc._fmt
    line = "=" * 96
    print(f"\n{line}\ncounterdb durability and restart benchmark ({'quick' if args.quick else 'full'} run)\n{line}")
    print(f"date {facts['date']}   nproc {facts['nproc']}   {facts['implementation']} {facts['python']}   "
          f"SQLite {facts['sqlite']}   Twisted {facts['twisted']}")
    print(f"code {facts['code']} at {facts['commit']}")
    print(f"data dirs on {facts['data_fs']}")
    print(f"cpu  {facts['cpu']}\nos   {facts['platform']}")
    other = facts.get("other_cpu")
    if other is not None:
        print(f"CPU used by processes other than this benchmark during the run: {other:.2f} cores on average"
              + ("   <- contended: figures may be low" if other > 0.25 else ""))

    fs = res.get("fsync")
    if fs:
        print(f"\n[4] disk sync latency, 4 KiB append + sync, {FSYNC_ROUNDS} times each (ms)")
        print(f"    {'call':<10} {'mean':>7} {'p50':>7} {'p99':>7} {'max':>7}")
        for call, s in fs.items():
            print(f"    {call:<10} {s['mean']:>7.3f} {s['p50']:>7.3f} {s['p99']:>7.3f} {s['max']:>7.3f}")

    store = res.get("store")
    if store:
        print(f"\n[1] store in isolation: Node.increment in-process, N increments outstanding (closed loop, one counter "
              f"per worker), {args.store_duration:g} s each")
        print(f"    {'store':<7} {'N':>4} {'incr/s':>9} {'commits/s':>10} {'incr/commit':>12} {'(p50, max)':>11} "
              f"{'lat p50 ms':>11} {'lat p99 ms':>11} {'CPU us/incr':>12} {'CPU':>5} {'errors':>6}")
        for r in store:
            spread = f"({f(r['per_commit_p50'], '.0f')}, {r['per_commit_max']})"
            print(f"    {r['store']:<7} {r['n']:>4} {f(r['rate'], '.0f'):>9} {f(r['commits_per_s'], '.0f'):>10} "
                  f"{f(r['per_commit_mean'], '.1f'):>12} {spread:>11} {f(r['latency']['p50'], '.3f'):>11} "
                  f"{f(r['latency']['p99'], '.3f'):>11} {f(r['cpu_us_per_incr'], '.1f'):>12} "
                  f"{bc._pct(r['cpu_share']):>5} {r['errors']:>6}")
        errs = [r for r in store if r["errors"]]
        for r in errs:
            print(f"    {r['store']} N={r['n']}: first error: {r['first_error']}")
        print("    CPU: this process (reactor + SQLite writer thread) per acknowledged increment, and share of one core")

    http = res.get("http")
    if http:
        print(f"\n[2] one twistd node over HTTP, POST /counter/<name> (one counter), keep-alive, "
              f"{args.http_duration:g} s each, generator {args.generator}")
        print(f"    {'durability':<10} {'clients':>7} {'requests':>9} {'errors':>7} {'incr/s':>9} "
              f"{'p50 ms':>8} {'p99 ms':>8} {'node CPU':>9} {'commits/s':>10} {'incr/commit':>12}")
        for r in http:
            print(f"    {r['durability']:<10} {r['clients']:>7} {r['ok']:>9} {bc._errors(r['errors']):>7} "
                  f"{f(r['rps'], '.0f'):>9} {f(r['latency']['p50'], '.2f'):>8} {f(r['latency']['p99'], '.2f'):>8} "
                  f"{bc._pct(r['node_cpu']):>9} {f(r['rps'] / r['per_commit'], '.0f'):>10} "
                  f"{f(r['per_commit'], '.1f'):>12}")
        print("    incr/commit: Node.increment calls / SqliteStore.write_own calls in the node (both wrapped by the")
        print("    benchmark, warm-up included); commits/s = incr/s / incr/commit")

    rs = res.get("restart")
    if rs:
        n = rs["counters"]
        print(f"\n[3] restart with {n:,} counters x {REPLICAS} replicas ({rs['build']['rows']:,} rows in partials; "
              f"built in {rs['build']['seconds']:.1f} s)")
        print(f"    on disk: {rs['bytes'] / 2**20:.1f} MiB ({rs['bytes'] / n:.0f} bytes per counter); "
              f"database file {rs['db_bytes'] / 2**20:.1f} MiB, WAL empty (checkpointed)")
        print("    (a) in-process: SqliteStore(...) then Node(store)")
        print(f"    {'file pages':<14} {'open s':>7} {'Node() s':>9} {'total s':>8} {'close s':>8} "
              f"{'RSS before':>11} {'RSS after':>10} {'peak RSS':>9}  MiB   value ok")
        for r in rs["inprocess"]:
            ok = "yes" if r["value"] == r["expected"] and r["counters"] == n else f"NO ({r['value']}, {r['counters']})"
            print(f"    {'dropped' if r['cold'] else 'cached':<14} {r['open_s']:>7.2f} {r['node_s']:>9.2f} "
                  f"{r['total_s']:>8.2f} {r['close_s']:>8.2f} {_mib(r['rss_before_kib']):>11} "
                  f"{_mib(r['rss_after_kib']):>10} {_mib(r['peak_rss_kib']):>9}        {ok}")
        warm = rs["inprocess"][-1]
        print(f"    parts, pages cached: PRAGMA quick_check alone {warm['quick_check_s']:.2f} s "
              f"({', '.join(warm['quick_check'])}); SELECT of all {warm['scan_rows']:,} rows into Python "
              f"{warm['scan_s']:.2f} s; table memory {_mib(warm['rss_after_kib'] - warm['rss_before_kib'])} MiB "
              f"= {(warm['rss_after_kib'] - warm['rss_before_kib']) * 1024 / n:.0f} bytes per counter")
        print(f"    (b) twistd node: process start until GET /counter/counter-{PROBE}/value answers "
              f"{expected_value(PROBE)}")
        print(f"    {'data dir':<28} {'ready s':>8} {'RSS MiB':>8} {'peak MiB':>9} {'SIGTERM to exit s':>18}")
        for r in rs["twistd"]:
            print(f"    {r['label']:<28} {r['ready_s']:>8.2f} {_mib(r['rss_kib']):>8} {_mib(r['peak_rss_kib']):>9} "
                  f"{r['stop_s']:>18.2f}")

    if res.get("problems"):
        print("\nnode log lines worth a look:")
        for p in res["problems"]:
            print(f"    {p}")
    print(line)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run, 100,000 counters (about 30-40 s)")
    parser.add_argument("--counters", type=int, help="counters stored for [3] (default 1,000,000; quick 100,000)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 256],
                        help="outstanding increments for [1] (default 1,16,256)")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32],
                        help="HTTP clients for [2] (default 1,8,32)")
    parser.add_argument("--loadgen", choices=["auto", "python", "wrk"], default="auto",
                        help="HTTP load generator: auto = wrk if installed, else python")
    parser.add_argument("--only", default="4,1,2,3", help="comma-separated parts to run (default all: 4,1,2,3)")
    parser.add_argument("--code", type=Path, default=bc.REPO,
                        help="directory counterdb is imported from (PYTHONPATH); default: this checkout")
    parser.add_argument("--json", type=Path, help="also write the raw results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (data dirs, node logs)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        spec = json.loads(args._child)
        try:
            {"store": child_store, "build": child_build, "load": child_load}[spec["mode"]](spec)
        except KeyboardInterrupt:
            return 130
        return 0

    bc.CODE = args.code.resolve()
    if not (bc.CODE / "counterdb" / "__init__.py").exists():
        parser.error(f"--code {args.code}: no counterdb package there")
    sys.path.insert(0, str(bc.CODE))  # the parent only reads a constant from counterdb.store
    if args.counters is None:
        args.counters = 100_000 if args.quick else 1_000_000
    args.store_duration, args.store_warmup = (1.0, 0.2) if args.quick else (3.0, 0.5)
    args.http_duration, args.http_warmup = (2.0, 0.5) if args.quick else (5.0, 1.0)
    if args.loadgen == "auto":
        args.generator = "wrk" if shutil.which("wrk") else "python"
    else:
        args.generator = args.loadgen
        if args.generator == "wrk" and not shutil.which("wrk"):
            parser.error("--loadgen wrk: wrk is not installed")
    parts = {p.strip() for p in args.only.split(",")}
    if not 1 <= args.counters <= 5_000_000:
        parser.error("--counters: 1 to 5,000,000")
    if not all(1 <= n <= 4096 for n in args.concurrency) or not all(1 <= c <= 256 for c in args.clients):
        parser.error("bounds: 1-4096 outstanding increments, 1-256 clients")

    facts = bc.machine_facts()
    facts["sqlite"] = sqlite3.sqlite_version
    print(f"counterdb durability benchmark: nproc {facts['nproc']}, Python {facts['python']}, "
          f"SQLite {facts['sqlite']}, code {bc.CODE} at {facts['commit']}", flush=True)
    registry = bc.Registry()
    root = Path(tempfile.mkdtemp(prefix="counterdb-durability-"))
    bench = Bench(args, registry, root)
    res: dict[str, Any] = {}

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.monotonic()
    busy0, own0 = bc.machine_busy_seconds(), bc.own_cpu_seconds()
    try:
        if "4" in parts:
            print("[4] fsync latency ...", flush=True)
            res["fsync"] = fsync_latency(root)
        if "1" in parts:
            print("[1] store in isolation ...", flush=True)
            res["store"] = bench.store_costs()
        if "2" in parts:
            print("[2] one node over HTTP ...", flush=True)
            res["http"] = bench.http()
        if "3" in parts:
            print(f"[3] restart with {args.counters:,} counters ...", flush=True)
            res["restart"] = bench.restart()
    except KeyboardInterrupt:
        print("\ninterrupted; stopping children and nodes", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        registry.stop_all()
        res["problems"] = bench.problems
        if args.keep or bench.problems:
            print(f"temporary files kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    busy1, own1 = bc.machine_busy_seconds(), bc.own_cpu_seconds()
    if busy0 is not None and busy1 is not None:
        facts["other_cpu"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / (time.monotonic() - started)
    facts["data_fs"] = bc.filesystem_of(Path(tempfile.gettempdir()))
    res["machine"] = facts
    res["wall_seconds"] = time.monotonic() - started
    print_report(facts, res, args)
    print(f"wall time {res['wall_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(bc._no_nan(res), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
