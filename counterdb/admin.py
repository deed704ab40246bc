"""
``counterdb-admin``: offline chores on a data dir.

- ``backup DATA_DIR DEST``: a consistent copy of a node's database, taken
  with SQLite's online backup API while the node keeps running.
- ``restore BACKUP DATA_DIR``: start a node from a backup *under a new
  replica id*. The backup's own partials become those of a retired replica,
  so nothing it held is lost, and the new node's increments can never be
  hidden behind the larger count its peers remember for the old id.

A failed restore leaves the data dir as it was: the database is written to a
temporary file in the data dir, made durable, and renamed into place only
once it is complete. The ``--help`` texts below are plain text for a
terminal; this docstring is for readers of the code.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from counterdb.migrations import OLDEST_SCHEMA, fsync_path
from counterdb.store import DB_FILE, SCHEMA_VERSION, StoreError, new_replica_id

DESCRIPTION = "Offline chores on a counterdb data dir: back up a running node, restore a backup."
EPILOG = 'Run "counterdb-admin COMMAND --help" for the details of a command.'
BACKUP_DESCRIPTION = """\
Copy the database of the node using DATA_DIR to the new file DEST. The node
may keep running: the copy is consistent (SQLite online backup). DEST must
not exist yet.
"""
RESTORE_DESCRIPTION = """\
Start DATA_DIR, which must hold no database, from the backup file BACKUP. The
restored node gets a new replica id: the backup's partials stay as those of a
retired replica, so nothing they counted is lost, and the node's new
increments cannot hide behind what its peers remember for the old id.
Idempotency keys are kept. If the restore fails, DATA_DIR is left as it was.
Run it before starting the node.
"""

#: The first bytes of every SQLite 3 database file.
SQLITE_HEADER = b"SQLite format 3\x00"


# -- backup --------------------------------------------------------------------------


def backup(data_dir: Path, dest: Path) -> None:
    source_path = data_dir / DB_FILE
    if not source_path.exists():
        raise StoreError(f"{source_path}: no counterdb database here")
    if dest.exists():
        raise StoreError(f"{dest}: already exists; choose a new file name")
    try:
        with closing(sqlite3.connect(_read_only_uri(source_path), uri=True)) as source:
            _copy_database(source, dest)
    except sqlite3.Error as e:
        dest.unlink(missing_ok=True)
        raise StoreError(f"{dest}: cannot back up {source_path}: {e}") from None


def _copy_database(source: sqlite3.Connection, dest: Path) -> None:
    """Copy ``source`` into the new file ``dest``, as one self-contained file
    (no ``-wal`` beside it, whatever the source's journal mode)."""
    with closing(sqlite3.connect(dest, isolation_level=None)) as target:
        source.backup(target)
        target.execute("PRAGMA journal_mode=DELETE").fetchall()


# -- restore -------------------------------------------------------------------------


def restore(backup_file: Path, data_dir: Path) -> str:
    """Lay ``backup_file`` into an empty ``data_dir``; return the new replica id."""
    target_path = data_dir / DB_FILE
    if target_path.exists():
        raise StoreError(f"{target_path}: the data dir already holds a database; restore into an empty one")
    _check_readable(backup_file)
    try:
        with closing(sqlite3.connect(_read_only_uri(backup_file), uri=True)) as source:
            _check_schema(source, backup_file)
            with _created_dirs(data_dir):
                return _restore_into(source, target_path)
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{backup_file}: cannot restore this backup: {e}") from None


def _check_readable(path: Path) -> None:
    """Refuse, in one line, a backup that cannot be read as an SQLite file."""
    try:
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise StoreError(f"{path}: is a directory, not a backup file") from None
    except PermissionError:
        raise StoreError(f"{path}: permission denied") from None
    except OSError as e:
        raise StoreError(f"{path}: cannot read: {e.strerror or e}") from None
    if header != SQLITE_HEADER:
        raise StoreError(f"{path}: not an SQLite database, so not a counterdb backup")


def _check_schema(source: sqlite3.Connection, path: Path) -> None:
    version = source.execute("PRAGMA user_version").fetchone()[0]
    # An older schema is upgraded (after a copy) when the node opens it.
    if not OLDEST_SCHEMA <= version <= SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema version {version}, not a counterdb backup of schema version "
            f"{OLDEST_SCHEMA} to {SCHEMA_VERSION}"
        )
    try:
        row = source.execute("SELECT value FROM meta WHERE key = 'replica_id'").fetchone()
    except sqlite3.OperationalError:  # no such table
        row = None
    if row is None:
        raise StoreError(f"{path}: not a counterdb database (it has no replica id)")


@contextmanager
def _created_dirs(directory: Path) -> Iterator[None]:
    """Create ``directory`` and its missing parents; remove what was created
    if the block fails."""
    missing = [d for d in [directory, *directory.parents] if not d.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{directory}: cannot create the data directory: {e.strerror or e}") from None
    try:
        yield
    except BaseException:
        for created in missing:  # deepest first
            try:
                created.rmdir()
            except OSError:
                break
        raise


def _restore_into(source: sqlite3.Connection, target_path: Path) -> str:
    """Write the copy under a new replica id to a temporary file in the data
    dir, make it durable, then rename it to ``target_path``."""
    temp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(dir=target_path.parent, prefix=f".{DB_FILE}.restore-", suffix=".tmp")
        os.close(fd)
        temp = Path(name)
        replica_id = _copy_under_new_identity(source, temp)
        fsync_path(temp)
        if target_path.exists():
            raise StoreError(f"{target_path}: a database appeared while restoring; left it alone")
        temp.rename(target_path)
        fsync_path(target_path.parent)
        return replica_id
    except OSError as e:
        raise StoreError(f"{target_path.parent}: cannot write the restored database: {e.strerror or e}") from None
    finally:
        if temp is not None:
            for leftover in (temp, *(temp.with_name(temp.name + s) for s in ("-journal", "-wal", "-shm"))):
                leftover.unlink(missing_ok=True)


def _copy_under_new_identity(source: sqlite3.Connection, temp: Path) -> str:
    _copy_database(source, temp)
    replica_id = new_replica_id()
    with closing(sqlite3.connect(temp, isolation_level=None)) as target:
        target.execute("UPDATE meta SET value = ? WHERE key = 'replica_id'", (replica_id,))
        # Idempotency keys stay: their increments are in the old replica's
        # partial, so a retry is answered, not counted again.
        problems = [row[0] for row in target.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise sqlite3.DatabaseError(f"the copy is corrupt: {'; '.join(problems[:3])}")
    return replica_id


def _read_only_uri(path: Path) -> str:
    """An SQLite URI opening ``path`` read-only (any characters in the name)."""
    return f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro"


# -- command line --------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    plain = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="counterdb-admin", description=DESCRIPTION, epilog=EPILOG, formatter_class=plain
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = commands.add_parser(
        "backup", help="copy a node's database while it runs", description=BACKUP_DESCRIPTION, formatter_class=plain
    )
    b.add_argument("data_dir", metavar="DATA_DIR", type=Path, help="the node's data dir")
    b.add_argument("dest", metavar="DEST", type=Path, help="the backup file to create")
    r = commands.add_parser(
        "restore",
        help="start an empty data dir from a backup, under a new replica id",
        description=RESTORE_DESCRIPTION,
        formatter_class=plain,
    )
    r.add_argument("backup", metavar="BACKUP", type=Path, help="a file written by counterdb-admin backup")
    r.add_argument("data_dir", metavar="DATA_DIR", type=Path, help="the data dir to start (holding no database)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "backup":
            backup(args.data_dir, args.dest)
            sys.stdout.write(f"backed up {args.data_dir / DB_FILE} to {args.dest}\n")
        else:
            replica_id = restore(args.backup, args.data_dir)
            sys.stdout.write(f"restored {args.backup} into {args.data_dir} as replica {replica_id}\n")
    except StoreError as e:
        sys.stderr.write(f"counterdb-admin: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
