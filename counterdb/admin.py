"""
``counterdb-admin``: offline chores on a data dir.

- ``backup DATA_DIR DEST``: a consistent copy of a node's database, taken
  with SQLite's online backup API while the node keeps running.
- ``restore BACKUP DATA_DIR``: start a node from a backup *under a new
  replica id*. The backup's own partials become those of a retired replica,
  so nothing it held is lost, and the new node's increments can never be
  hidden behind the larger count its peers remember for the old id.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from counterdb.store import DB_FILE, SCHEMA_VERSION, StoreError, new_replica_id


def backup(data_dir: Path, dest: Path) -> None:
    source_path = data_dir / DB_FILE
    if not source_path.exists():
        raise StoreError(f"{source_path}: no counterdb database here")
    if dest.exists():
        raise StoreError(f"{dest}: already exists; choose a new file name")
    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)
    target = sqlite3.connect(dest)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


def restore(backup_file: Path, data_dir: Path) -> str:
    """Lay ``backup_file`` into an empty ``data_dir``; return the new replica id."""
    target_path = data_dir / DB_FILE
    if target_path.exists():
        raise StoreError(f"{target_path}: the data dir already holds a database; restore into an empty one")
    data_dir.mkdir(parents=True, exist_ok=True)
    source = sqlite3.connect(f"file:{backup_file}?mode=ro", uri=True)
    target = sqlite3.connect(target_path)
    try:
        version = source.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise StoreError(f"{backup_file}: not a counterdb backup of schema version {SCHEMA_VERSION}")
        source.backup(target)
        replica_id = new_replica_id()
        with target:
            target.execute("UPDATE meta SET value = ? WHERE key = 'replica_id'", (replica_id,))
            # Idempotency keys stay: their increments are in the old
            # replica's partial, so a retry is answered, not counted again.
        return replica_id
    except sqlite3.DatabaseError as e:
        target.close()
        target_path.unlink(missing_ok=True)
        raise StoreError(f"{backup_file}: cannot read the backup: {e}") from None
    finally:
        target.close()
        source.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="counterdb-admin", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("backup", help="copy a node's database while it runs")
    b.add_argument("data_dir", type=Path)
    b.add_argument("dest", type=Path)
    r = commands.add_parser("restore", help="start a new data dir from a backup, under a new replica id")
    r.add_argument("backup", type=Path)
    r.add_argument("data_dir", type=Path)
    args = parser.parse_args(argv)
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
