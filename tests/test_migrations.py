"""Store schema upgrades: a data dir of counterdb 0.1.0 (schema 1) opened by this release."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from counterdb import migrations
from counterdb.admin import main as admin
from counterdb.store import DB_FILE, SCHEMA_VERSION, IdempotencyRecord, SqliteStore, StoreError

FIXTURE = Path(__file__).parent / "fixtures" / "schema-1" / DB_FILE
#: What tests/fixtures/make_schema_1.py wrote with 0.1.0 (the replica ids are those of the committed file).
OWN, SHARED = "66ae3570f63b4dc4ab24a3f073b157dd", "eb5e0f3ecf1f470dbfa28de6011dcea8"
PEER_A, PEER_B = "a" * 32, "b" * 32
BIG = 2**53 + 1  # a float would round it
ENTRIES = {
    ("visits", OWN, 4),
    ("visits", SHARED, 5),
    ("visits", PEER_A, 7),
    ("visits", PEER_B, 1),
    ("orders", SHARED, 2),
    ("orders", PEER_B, 4),
    ("big", OWN, BIG),
    ("páginas ✓", OWN, 1),
    ("only-peers", PEER_A, 9),
}
KEYS = [
    IdempotencyRecord("key-1", "visits", 3, 3, 4102444800.0),
    IdempotencyRecord("key-2", "big", BIG, BIG, 4102444801.0),
]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A copy of the 0.1.0 data dir."""
    directory = tmp_path / "data"
    directory.mkdir()
    shutil.copyfile(FIXTURE, directory / DB_FILE)
    return directory


@pytest.fixture
def opened() -> Iterator[list[SqliteStore]]:
    stores: list[SqliteStore] = []
    yield stores
    for store in stores:
        store.close()


def open_store(stores: list[SqliteStore], directory: Path) -> SqliteStore:
    store = SqliteStore(str(directory), reactor)
    stores.append(store)
    return store


def _read_only(path: Path) -> sqlite3.Connection:
    # The committed fixture is opened as immutable: a read-only connection
    # to a WAL-mode file would still leave -wal and -shm files beside it.
    immutable = "&immutable=1" if path == FIXTURE else ""
    return sqlite3.connect(f"file:{path}?mode=ro{immutable}", uri=True)


def query(path: Path, sql: str) -> list[Any]:
    with closing(_read_only(path)) as db:
        return db.execute(sql).fetchall()


def dump(path: Path) -> list[str]:
    with closing(_read_only(path)) as db:
        return list(db.iterdump())


def test_the_fixture_is_a_schema_1_data_dir() -> None:
    assert query(FIXTURE, "PRAGMA user_version") == [(1,)]
    assert not list(FIXTURE.parent.glob(f"{DB_FILE}-*"))  # nothing left in a WAL, nothing written beside it
    assert "STRICT" not in str(query(FIXTURE, "SELECT sql FROM sqlite_master"))
    assert set(query(FIXTURE, "SELECT counter, replica, count FROM partials")) == ENTRIES


@pytest_twisted.ensureDeferred
async def test_a_0_1_0_data_dir_is_backed_up_upgraded_in_place_and_served(
    data_dir: Path, opened: list[SqliteStore]
) -> None:
    store = open_store(opened, data_dir)
    loaded = store.load()
    assert loaded.replica_id == OWN
    assert set(loaded.entries) == ENTRIES
    assert loaded.idempotency == KEYS
    assert loaded.actors == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert loaded.config_version == (3, PEER_A)
    assert loaded.shared_ids == frozenset({SHARED})
    db = data_dir / DB_FILE
    assert query(db, "PRAGMA user_version") == [(2,)] and SCHEMA_VERSION == 2
    tables = dict(query(db, "SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    assert set(tables) == {"meta", "partials", "idempotency"}
    assert all("STRICT" in sql for sql in tables.values())
    assert query(db, "SELECT name FROM sqlite_master WHERE type = 'index'") == [("idempotency_by_age",)]
    assert query(db, "SELECT value FROM meta WHERE key = 'written_by'") == [("0.2.0",)]
    # The backup is the 0.1.0 database as it was: schema 1, same rows, and
    # the same bytes past the 100-byte file header (in which SQLite's backup
    # notes its own journal mode and a new schema cookie).
    backup = data_dir / f"{DB_FILE}.schema-1.bak"
    assert query(backup, "PRAGMA user_version") == [(1,)]
    assert dump(backup) == dump(FIXTURE)
    assert backup.read_bytes()[100:] == FIXTURE.read_bytes()[100:]
    # It serves: writes go into the new tables and survive a restart.
    await store.write_own({"visits": 10})
    store.close()
    stamp = backup.stat().st_mtime_ns
    again = open_store(opened, data_dir).load()
    assert ("visits", OWN, 10) in set(again.entries)
    assert backup.stat().st_mtime_ns == stamp  # not migrated (nor copied) a second time
    assert query(backup, "PRAGMA user_version") == [(1,)]


def test_the_second_open_does_not_migrate_again(
    data_dir: Path, opened: list[SqliteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    open_store(opened, data_dir).close()

    def no_second_time(*args: Any) -> None:
        raise AssertionError("migrated twice")

    monkeypatch.setattr(migrations, "upgrade", no_second_time)
    assert set(open_store(opened, data_dir).load().entries) == ENTRIES


def _fail_halfway(db: sqlite3.Connection) -> None:
    db.execute("DROP TABLE partials")
    db.execute("UPDATE meta SET value = 'x' WHERE key = 'replica_id'")
    raise sqlite3.OperationalError("disk I/O error (in this test)")


def test_a_failed_migration_leaves_schema_1_untouched_and_says_where_the_backup_is(
    data_dir: Path, opened: list[SqliteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(migrations, "STEPS", [(1, _fail_halfway)])
    backup = data_dir / f"{DB_FILE}.schema-1.bak"
    with pytest.raises(StoreError) as error:
        open_store(opened, data_dir)
    message = str(error.value)
    assert "upgrading schema 1 to 2 failed (disk I/O error (in this test))" in message
    assert "the database is unchanged (still schema 1" in message and str(backup) in message
    db = data_dir / DB_FILE
    assert query(db, "PRAGMA user_version") == [(1,)]
    assert dump(db) == dump(FIXTURE)
    assert dump(backup) == dump(FIXTURE)
    # The data dir is released, and opens once the upgrade works.
    monkeypatch.undo()
    assert set(open_store(opened, data_dir).load().entries) == ENTRIES


def test_a_row_of_the_wrong_type_fails_the_upgrade_instead_of_being_changed(
    data_dir: Path, opened: list[SqliteStore]
) -> None:
    # Schema 1 took this (its CHECK passes: SQLite sorts text above numbers)
    # and MAX(count, ...) would have kept it above any later increment.
    with closing(sqlite3.connect(data_dir / DB_FILE)) as db:
        db.execute("INSERT INTO partials VALUES ('broken', ?, 'lots')", (PEER_A,))
        db.commit()
    before = dump(data_dir / DB_FILE)
    with pytest.raises(StoreError, match=r"cannot store TEXT value in INTEGER column partials_v2\.count"):
        open_store(opened, data_dir)
    assert dump(data_dir / DB_FILE) == before


def test_schema_2_refuses_a_count_of_the_wrong_type(tmp_path: Path, opened: list[SqliteStore]) -> None:
    open_store(opened, tmp_path).close()
    with closing(sqlite3.connect(tmp_path / DB_FILE)) as db:
        with pytest.raises(sqlite3.IntegrityError, match="cannot store TEXT value in INTEGER column"):
            db.execute("INSERT INTO partials VALUES ('c', 'r', 'lots')")
        with pytest.raises(sqlite3.IntegrityError, match="cannot store REAL value in INTEGER column"):
            db.execute("INSERT INTO partials VALUES ('c', 'r', 1.5)")


def test_no_upgrade_without_a_backup(data_dir: Path, opened: list[SqliteStore]) -> None:
    (data_dir / f"{DB_FILE}.schema-1.bak").mkdir()  # the backup cannot be written
    with pytest.raises(StoreError, match=r"cannot write the copy .* nothing was changed"):
        open_store(opened, data_dir)
    assert query(data_dir / DB_FILE, "PRAGMA user_version") == [(1,)]
    assert not list(data_dir.glob("*.tmp"))


def test_a_0_1_0_backup_restores_and_is_upgraded_when_opened(tmp_path: Path, opened: list[SqliteStore]) -> None:
    backup = tmp_path / "counterdb-0.1.0.sqlite3"  # a copy: reading a WAL-mode file leaves files beside it
    shutil.copyfile(FIXTURE, backup)
    assert admin(["restore", str(backup), str(tmp_path / "data")]) == 0
    loaded = open_store(opened, tmp_path / "data").load()
    assert loaded.replica_id not in (OWN, SHARED)  # a restore takes a new replica id
    assert ENTRIES <= set(loaded.entries)
    assert query(tmp_path / "data" / DB_FILE, "PRAGMA user_version") == [(2,)]
