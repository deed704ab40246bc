#!/usr/bin/env python3
"""
Group commit through a writer thread against a writer process: the
experiment behind "The request path" in docs/design.md (issue 10's p99).

Each mode is a minimal twisted.web server on 127.0.0.9 that answers
``POST /`` only after an fsynced SQLite upsert (WAL, ``synchronous=FULL``),
one commit in flight and the requests that arrive meanwhile in the next
batch, as a counterdb node does:

* ``thread``: the commit runs in a one-thread pool (``deferToThread``), as
  counterdb's store does today; the writer needs the GIL back from the
  busy reactor after each SQLite call;
* ``process``: the commit runs in a child process fed over a pipe; the
  acknowledgement is one byte the reactor reads like any other socket, and
  no commit waits for the GIL.

    python benchmarks/writer_prototype.py [--rounds 3] [--seconds 4]

Rounds are interleaved (thread, process, thread, ...); wrk, 32 connections.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import wrk  # noqa: E402

HOST, PORT = "127.0.0.9", 19_100
UPSERT = "INSERT INTO p VALUES (?, ?, ?) ON CONFLICT (c, r) DO UPDATE SET n = MAX(n, excluded.n)"
SCHEMA = "CREATE TABLE IF NOT EXISTS p (c TEXT, r TEXT, n INTEGER, PRIMARY KEY (c, r)) WITHOUT ROWID"


def open_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(SCHEMA)
    return db


def writer_child(path: str) -> None:
    """The writer process: a line ``<count>`` in, an fsynced upsert, one byte out."""
    db = open_db(path)
    for line in sys.stdin.buffer:
        db.execute(UPSERT, ("single", "me", int(line)))
        os.write(1, b"k")


def serve(mode: str, path: str) -> None:
    """A server whose answers wait for a group commit through ``mode``."""
    from twisted.internet import protocol, reactor, threads
    from twisted.internet.defer import Deferred
    from twisted.web import resource, server

    if mode == "thread":
        db = open_db(path)
        reactor.suggestThreadPoolSize(1)

        def commit(count: int) -> Deferred[object]:
            return threads.deferToThread(db.execute, UPSERT, ("single", "me", count))

    else:

        class Writer(protocol.ProcessProtocol):
            def __init__(self) -> None:
                self.waiting: list[Deferred[None]] = []

            def outReceived(self, data: bytes) -> None:
                for _ in data:
                    self.waiting.pop(0).callback(None)

        writer = Writer()
        reactor.spawnProcess(writer, sys.executable, [sys.executable, __file__, "--child", path], env=os.environ)

        def commit(count: int) -> Deferred[object]:
            d: Deferred[None] = Deferred()
            writer.waiting.append(d)
            writer.transport.write(b"%d\n" % count)
            return d

    queue: list[server.Request] = []
    state = {"count": 0, "committing": False}

    def next_batch() -> None:
        if state["committing"] or not queue:
            return
        batch = queue[:]
        del queue[:]
        state["count"] += len(batch)
        state["committing"] = True
        commit(state["count"]).addCallback(answer, batch, state["count"])

    def answer(_: object, batch: list[server.Request], count: int) -> None:
        state["committing"] = False
        for request in batch:
            if not request.channel:  # wrk left at the end of a run
                continue
            request.write(b"%d" % count)
            request.finish()
        next_batch()

    class Increment(resource.Resource):
        isLeaf = True

        def render_POST(self, request: server.Request) -> object:
            queue.append(request)
            next_batch()
            return server.NOT_DONE_YET

    site = server.Site(Increment())
    site.log = lambda request: None  # no access log, as counterdb's default
    reactor.listenTCP(PORT, site, interface=HOST)
    reactor.run()


def measure(mode: str, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="counterdb-writer-") as tmp:
        process = subprocess.Popen([sys.executable, __file__, "--serve", mode, str(Path(tmp) / "db")])
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    wrk(f"http://{HOST}:{PORT}/", 32, 1)  # also the warm-up
                    break
                except subprocess.CalledProcessError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            return wrk(f"http://{HOST}:{PORT}/", 32, seconds)
        finally:
            process.terminate()
            process.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        writer_child(args.child)
        return 0
    if args.serve:
        serve(args.serve, args.path)
        return 0
    runs: dict[str, list[dict]] = {"thread": [], "process": []}
    for _ in range(args.rounds):
        for mode in runs:
            runs[mode].append(measure(mode, args.seconds))
    print("| writer | requests/s (median) | p50 ms | p99 ms | p99 of each round |")
    print("|---|---:|---:|---:|---|")
    for mode, results in runs.items():
        rps = statistics.median(r["rps"] for r in results)
        p50 = statistics.median(r["p50"] for r in results)
        p99 = statistics.median(r["p99"] for r in results)
        rounds = ", ".join(f"{r['p99']:.1f}" for r in results)
        print(f"| {mode} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {rounds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
