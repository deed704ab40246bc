#!/usr/bin/env python3
"""
What upgrading a data dir from store schema 1 (counterdb 0.1.0) costs.

A schema 1 database (0.1.0's tables, copied below) with N counters x 3
replicas, left as a clean 0.1.0 stop leaves it, is then:

[1] upgraded alone (``migrations.upgrade``: the backup copy, then the
    rebuild of every table as STRICT in one transaction): seconds for each;
[2] opened by this release's ``SqliteStore`` (the same, plus what every
    start does: read-ahead and ``quick_check``), and loaded: seconds until
    the node could serve;

with the sizes of the database before and after, and of its backup.

Usage::

    python benchmarks/bench_migration.py                  # 1,000,000 counters, about a minute
    python benchmarks/bench_migration.py --counters 100000
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's counterdb
from common import fill

from counterdb import migrations
from counterdb.store import DB_FILE, SqliteStore

#: counterdb 0.1.0's store schema (store.py at d106578), as it created it.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE partials (
    counter TEXT NOT NULL,
    replica TEXT NOT NULL,
    count INTEGER NOT NULL CHECK (count >= 0),
    PRIMARY KEY (counter, replica)
) WITHOUT ROWID;
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY,
    counter TEXT NOT NULL,
    amount INTEGER NOT NULL,
    value INTEGER NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX idempotency_by_age ON idempotency (created);
"""


def schema_1_database(path: Path, counters: int) -> None:
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL").fetchall()
        db.executescript(SCHEMA_1)
        db.execute("INSERT INTO meta VALUES ('replica_id', ?), ('clean_shutdown', '1')", (uuid.uuid4().hex,))
        db.execute("PRAGMA user_version = 1")
    fill(path, counters, [uuid.uuid4().hex for _ in range(3)])


def mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.0f} MiB" if path.exists() else "none"


def timed(name: str, timings: dict[str, float]) -> Callable[[], None]:
    """Time every call of ``migrations.<name>`` into ``timings``; returns the undo."""
    original = getattr(migrations, name)

    def wrapper(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args)
        finally:
            timings[name] = time.perf_counter() - t0

    setattr(migrations, name, wrapper)
    return lambda: setattr(migrations, name, original)


def upgrade_alone(source: Path, work: Path) -> None:
    directory = work / "alone"
    directory.mkdir()
    db_path = directory / DB_FILE
    shutil.copyfile(source, db_path)
    timings: dict[str, float] = {}
    undo = [timed("_back_up", timings), timed("_compact", timings)]
    try:
        with closing(sqlite3.connect(db_path, isolation_level=None)) as db:
            t0 = time.perf_counter()
            migrations.upgrade(db, db_path, 1, 2)
            total = time.perf_counter() - t0
    finally:
        for restore in undo:
            restore()
    rebuild = total - timings["_back_up"] - timings["_compact"]
    print(
        f"[1] upgrade alone: {total:.1f} s = backup {timings['_back_up']:.1f} s + rebuild as STRICT in one "
        f"transaction {rebuild:.1f} s + compaction {timings['_compact']:.1f} s; database {mib(db_path)}, "
        f"backup {mib(migrations.backup_path(db_path, 1))}"
    )


def open_with_store(source: Path, work: Path) -> None:
    from twisted.internet import reactor

    directory = work / "store"
    directory.mkdir()
    shutil.copyfile(source, directory / DB_FILE)
    t0 = time.perf_counter()
    store = SqliteStore(str(directory), reactor)
    opened = time.perf_counter() - t0
    rows = sum(1 for _ in store.load().entries)
    loaded = time.perf_counter() - t0
    store.close()
    print(
        f"[2] SqliteStore: opened (backup, upgrade, read-ahead, quick_check) in {opened:.1f} s, "
        f"{rows:,} partials loaded at {loaded:.1f} s; after a clean stop the database is "
        f"{mib(directory / DB_FILE)}"
    )
    t0 = time.perf_counter()
    store = SqliteStore(str(directory), reactor)
    opened = time.perf_counter() - t0
    sum(1 for _ in store.load().entries)
    loaded = time.perf_counter() - t0
    store.close()
    print(f"[3] the next start, no upgrade: opened in {opened:.1f} s, loaded at {loaded:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counters", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        work = Path(name)
        source = work / "schema-1.sqlite3"
        t0 = time.perf_counter()
        schema_1_database(source, args.counters)
        print(
            f"schema 1 database: {args.counters:,} counters x 3 replicas, {mib(source)}, "
            f"built in {time.perf_counter() - t0:.1f} s; SQLite {sqlite3.sqlite_version}"
        )
        upgrade_alone(source, work)
        open_with_store(source, work)


if __name__ == "__main__":
    main()
