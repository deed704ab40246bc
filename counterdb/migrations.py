"""
Upgrades of a data dir's SQLite schema, oldest first (docs/design.md,
"Store schema history").

A store that opens a database of an older schema hands it to
:func:`upgrade`: it first writes a consistent copy next to the database
(``counterdb.sqlite3.schema-<n>.bak``), then runs every step from that
version up **in one transaction**. A step that fails rolls everything back:
the database stays as the previous release left it, and the error says
where the copy is. Each step carries its own DDL, frozen: the current
schema in store.py moves on, a step never does.

Runs before the node serves anything, on the thread that opens the store,
with the data dir locked.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from twisted.logger import Logger

log = Logger()

Step = Callable[[sqlite3.Connection], None]

#: Schema 2 (0.2.0): every table STRICT. Schema 1's INTEGER columns had
#: only an affinity: a count that arrived as text or as a non-integral
#: float would have been stored as such, and SQLite orders every TEXT
#: above every number, so ``MAX(count, excluded.count)`` would have kept
#: that value over every later increment. STRICT tables refuse the write.
_SCHEMA_2_TABLES = (
    ("meta", "key TEXT PRIMARY KEY, value TEXT NOT NULL", "key, value"),
    (
        "partials",
        "counter TEXT NOT NULL, replica TEXT NOT NULL, count INTEGER NOT NULL CHECK (count >= 0), "
        "PRIMARY KEY (counter, replica)",
        "counter, replica, count",
    ),
    (
        "idempotency",
        "key TEXT PRIMARY KEY, counter TEXT NOT NULL, amount INTEGER NOT NULL, value INTEGER NOT NULL, "
        "created REAL NOT NULL",
        "key, counter, amount, value, created",
    ),
)


def _strict_tables(db: sqlite3.Connection) -> None:
    """Schema 1 -> 2: rebuild each table as STRICT (SQLite cannot alter a
    table into one). A row that does not fit its column's type fails the
    whole upgrade instead of being changed or dropped."""
    for table, columns, names in _SCHEMA_2_TABLES:
        db.execute(f"CREATE TABLE {table}_v2 ({columns}) STRICT, WITHOUT ROWID")
        # Read in primary-key order, written in the same: appends, not random inserts.
        db.execute(f"INSERT INTO {table}_v2 ({names}) SELECT {names} FROM {table}")
        db.execute(f"DROP TABLE {table}")
        db.execute(f"ALTER TABLE {table}_v2 RENAME TO {table}")
    db.execute("CREATE INDEX idempotency_by_age ON idempotency (created)")


#: ``(from_version, step)``: the step turns schema ``from_version`` into
#: ``from_version + 1``. Append only.
STEPS: list[tuple[int, Step]] = [(1, _strict_tables)]

#: The oldest schema this code can upgrade (a data dir of release 0.1.0).
OLDEST_SCHEMA = 1


class MigrationError(Exception):
    """The upgrade failed; the message says that the database is unchanged
    and where its copy is (or why no copy could be made, and then nothing
    was touched)."""


def backup_path(db_path: Path, version: int) -> Path:
    return db_path.with_name(f"{db_path.name}.schema-{version}.bak")


def upgrade(db: sqlite3.Connection, db_path: Path, version: int, target: int) -> Path:
    """Back ``db`` (schema ``version``) up next to ``db_path``, then migrate
    it to ``target`` in one transaction; return the backup's path. Raises
    :class:`MigrationError`."""
    steps = [(start, step) for start, step in STEPS if version <= start < target]
    if [start for start, _ in steps] != list(range(version, target)):
        raise MigrationError(f"{db_path}: no way to upgrade schema {version} to {target}; nothing was changed")
    backup = _back_up(db, db_path, version)
    try:
        db.execute("BEGIN IMMEDIATE")
        for _, step in steps:
            step(db)
        db.execute(f"PRAGMA user_version = {target}")
        db.execute("COMMIT")
    except BaseException as e:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise MigrationError(
            f"{db_path}: upgrading schema {version} to {target} failed ({e}); the database is unchanged "
            f"(still schema {version}, as the previous release left it), and a copy of it is in {backup}"
        ) from e
    _compact(db, db_path)
    log.info(
        "{db}: upgraded schema {version} to {target}; the schema {version} database is kept in {backup}",
        db=str(db_path),
        version=version,
        target=target,
        backup=str(backup),
    )
    return backup


def _compact(db: sqlite3.Connection, db_path: Path) -> None:
    """Give back the pages of the tables a step replaced: without this the
    file stays twice its size until new rows fill them (measured: 352 MiB
    instead of 158 for a million counters x 3 replicas, for 1.5 s more).
    Not part of the upgrade: it is done, and a failure here is only logged."""
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.Error as e:
        log.warn(
            "{db}: upgraded, but could not compact it ({error}); it stays larger until rows fill it",
            db=str(db_path),
            error=str(e),
        )


def _back_up(db: sqlite3.Connection, db_path: Path, version: int) -> Path:
    """A consistent, self-contained copy of ``db`` (the backup API reads
    through the connection, so what is still only in the WAL is copied
    too), written to a temporary name, made durable, then renamed: a crash
    never leaves a half copy under the backup's name. An older copy of the
    same schema is replaced (it is an older state of the same data)."""
    backup = backup_path(db_path, version)
    temp = backup.with_name(backup.name + ".tmp")
    try:
        temp.unlink(missing_ok=True)
        with closing(sqlite3.connect(temp, isolation_level=None)) as target:
            db.backup(target)
            target.execute("PRAGMA journal_mode=DELETE").fetchall()
        fsync_path(temp)
        os.replace(temp, backup)
        fsync_path(backup.parent)
    except (OSError, sqlite3.Error) as e:
        temp.unlink(missing_ok=True)
        raise MigrationError(
            f"{db_path}: cannot write the copy {backup} that must exist before upgrading schema {version} ({e}); "
            "nothing was changed"
        ) from None
    return backup


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
