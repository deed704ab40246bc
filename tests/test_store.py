"""The SQLite store: round trips, schema versions, refusals and disk errors."""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from counterdb.node import Node, StoreUnavailable
from counterdb.store import DB_FILE, PEER_ROWS_PER_WRITE, IdempotencyRecord, SqliteStore, StoreError, StoreSettings


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[list[SqliteStore]]:
    """Stores opened by a test; closed afterwards whatever happens."""
    stores: list[SqliteStore] = []
    yield stores
    for store in stores:
        store.close()


def open_store(stores: list[SqliteStore], path: Path, **settings: Any) -> SqliteStore:
    store = SqliteStore(str(path), reactor, StoreSettings(**settings))
    stores.append(store)
    return store


@pytest_twisted.ensureDeferred
async def test_round_trip_of_everything_persisted(tmp_path: Path, opened: list[SqliteStore]) -> None:
    store = open_store(opened, tmp_path / "data")
    replica = store.load().replica_id
    await store.write_own({"a": 3, "b": 1}, [IdempotencyRecord("k", "a", 3, 3, 1e10)])
    store.write_peers({"a": {"peer": 7}})
    await store.write_config(["10.0.0.1", "10.0.0.2"])
    store.close()

    loaded = open_store(opened, tmp_path / "data").load()
    assert loaded.replica_id == replica
    assert loaded.actors == ["10.0.0.1", "10.0.0.2"]
    assert set(loaded.entries) == {("a", "peer", 7), ("a", replica, 3), ("b", replica, 1)}
    assert loaded.idempotency == [IdempotencyRecord("k", "a", 3, 3, 1e10)]


@pytest_twisted.ensureDeferred
async def test_own_rows_without_keys_round_trip_alone_and_many_at_once(
    tmp_path: Path, opened: list[SqliteStore]
) -> None:
    store = open_store(opened, tmp_path)
    await store.write_own({"a": 1})
    many = {f"n{i}": i + 1 for i in range(300)} | {'quote"\\': 5, "é☃": 6, "nul\x00name": 7}
    await store.write_own(many)
    await store.write_own({"a": 9, "n0": 4})
    store.close()
    loaded = {name: count for name, _, count in open_store(opened, tmp_path).load().entries}
    assert loaded == many | {"a": 9, "n0": 4}


@pytest_twisted.ensureDeferred
async def test_own_rows_commit_all_or_none(tmp_path: Path, opened: list[SqliteStore]) -> None:
    """A batch the database refuses in part (here a count STRICT tables
    refuse) stores none of its rows."""
    store = open_store(opened, tmp_path)
    for bad in ({"good": 1, "bad": "x"}, {"bad": "x"}):
        with pytest.raises(sqlite3.Error):
            await store.write_own(bad)  # type: ignore[dict-item]
    store.close()
    assert list(open_store(opened, tmp_path).load().entries) == []


@pytest_twisted.ensureDeferred
async def test_stored_counts_never_go_backwards(tmp_path: Path, opened: list[SqliteStore]) -> None:
    store = open_store(opened, tmp_path)
    store.write_peers({"a": {"peer": 7}})
    await store.flush()
    store.write_peers({"a": {"peer": 5}})  # a late, older copy
    await store.flush()
    store.close()
    assert list(open_store(opened, tmp_path).load().entries) == [("a", "peer", 7)]


def test_a_new_data_dir_gets_a_new_replica_id(tmp_path: Path, opened: list[SqliteStore]) -> None:
    first = open_store(opened, tmp_path / "one").load().replica_id
    second = open_store(opened, tmp_path / "two").load().replica_id
    assert first != second and len(first) == 32


def test_a_locked_data_dir_is_refused(tmp_path: Path, opened: list[SqliteStore]) -> None:
    open_store(opened, tmp_path)
    with pytest.raises(StoreError, match=r"counterdb.lock: .*in use by another running counterdb \(pid \d+\)"):
        open_store(opened, tmp_path)


def test_a_corrupt_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(b"this is not an sqlite database, it is garbage" * 100)
    with pytest.raises(StoreError, match=f"{DB_FILE}: is corrupt or not a counterdb database"):
        SqliteStore(str(tmp_path), reactor)


def test_a_newer_schema_version_is_refused_and_left_alone(tmp_path: Path, opened: list[SqliteStore]) -> None:
    open_store(opened, tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    before = (tmp_path / DB_FILE).read_bytes()
    with pytest.raises(StoreError, match=r"schema version 99 is newer than this counterdb \(0.2.0\) reads \(up to 2\)"):
        SqliteStore(str(tmp_path), reactor)
    assert (tmp_path / DB_FILE).read_bytes() == before
    assert not list(tmp_path.glob("*.bak"))  # a downgrade is not attempted


def test_a_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.execute("CREATE TABLE something_else (x)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="unknown schema version 0"):
        SqliteStore(str(tmp_path), reactor)


def test_a_data_dir_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError, match="cannot create the data directory"):
        SqliteStore(str(tmp_path / "file" / "data"), reactor)


def test_a_refused_data_dir_releases_its_lock(tmp_path: Path, opened: list[SqliteStore]) -> None:
    (tmp_path / DB_FILE).write_bytes(b"garbage" * 1000)
    with pytest.raises(StoreError):
        SqliteStore(str(tmp_path), reactor)
    (tmp_path / DB_FILE).unlink()
    open_store(opened, tmp_path)  # not "in use by another counterdb"


@pytest_twisted.ensureDeferred
async def test_a_full_disk_fails_the_increment_and_recovers(tmp_path: Path, opened: list[SqliteStore]) -> None:
    store = open_store(opened, tmp_path)
    node = Node(store)
    await node.increment("warm-up", 1)
    # Cap the writer's database at its current size: the next new rows do
    # not fit, exactly as on a full disk (SQLITE_FULL).
    await store._writer.call("cap_pages", await store._writer.call("page_count"))
    with pytest.raises(StoreUnavailable, match="full"):
        for i in range(200):
            await node.increment(f"counter-with-a-long-name-{i:04}" + "x" * 200, 1)
    filled = sum(node.value(f"counter-with-a-long-name-{i:04}" + "x" * 200) for i in range(200))
    await store._writer.call("cap_pages", 1073741823)  # space again
    ack = await node.increment("after", 2)
    assert ack.value == 2
    store.close()
    # Only what was acknowledged was stored; the failed increment left nothing.
    entries = list(open_store(opened, tmp_path).load().entries)
    stored = sum(count for name, _, count in entries if name.startswith("counter-with-a-long-name-"))
    assert stored == filled and filled < 200


@pytest_twisted.ensureDeferred
async def test_fast_durability_mode_still_round_trips(tmp_path: Path, opened: list[SqliteStore]) -> None:
    store = open_store(opened, tmp_path, durability="fast")
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    await Node(store).increment("c", 4)
    store.close()
    assert Node(open_store(opened, tmp_path)).value("c") == 4


def test_default_durability_fsyncs_every_commit(tmp_path: Path, opened: list[SqliteStore]) -> None:
    store = open_store(opened, tmp_path)
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest_twisted.ensureDeferred
async def test_idempotency_keys_survive_a_restart(tmp_path: Path, opened: list[SqliteStore]) -> None:
    node = Node(open_store(opened, tmp_path))
    await node.increment("c", 3, key="retry-1")
    opened[0].close()
    restarted = Node(open_store(opened, tmp_path))
    ack = await restarted.increment("c", 3, key="retry-1")
    assert ack.replayed and ack.value == 3 and restarted.value("c") == 3


@pytest_twisted.ensureDeferred
async def test_fast_mode_checkpoints_never_break_commits(tmp_path: Path, opened: list[SqliteStore]) -> None:
    store = open_store(opened, tmp_path, durability="fast")
    node = Node(store)
    for i in range(30):
        await store._checkpoint()
        ack = await node.increment("c", 1)
        assert ack.value == i + 1


def crash(store: SqliteStore) -> None:
    """Leave the data dir as kill -9 would: no clean-shutdown record."""
    assert store._writer.pid is not None
    os.kill(store._writer.pid, signal.SIGKILL)
    store._writer.stop_now()
    store._release()
    store._closed = True


@pytest_twisted.ensureDeferred
async def test_full_durability_keeps_its_identity_after_a_crash(tmp_path: Path, opened: list[SqliteStore]) -> None:
    store = open_store(opened, tmp_path)
    await Node(store).increment("c", 2)
    crash(store)
    restarted = open_store(opened, tmp_path)
    assert restarted.replica_id == store.replica_id
    assert Node(restarted).value("c") == 2


@pytest_twisted.ensureDeferred
async def test_fast_durability_takes_a_new_identity_after_a_crash_only(
    tmp_path: Path, opened: list[SqliteStore]
) -> None:
    store = open_store(opened, tmp_path, durability="fast")
    await Node(store).increment("c", 2)
    store.close()
    clean = open_store(opened, tmp_path, durability="fast")
    assert clean.replica_id == store.replica_id  # a clean restart keeps it
    crash(clean)
    after_crash = open_store(opened, tmp_path, durability="fast")
    assert after_crash.replica_id != store.replica_id
    node = Node(after_crash)
    assert node.partials("c") == {store.replica_id: 2}  # the old partial still counts
    assert (await node.increment("c", 1)).value == 3


class _ReactorAt:
    """The real reactor, but its clock reads ``now`` (a node on another clock)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def seconds(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


@pytest_twisted.ensureDeferred
async def test_idempotency_keys_are_kept_or_dropped_by_the_nodes_own_clock(
    tmp_path: Path, opened: list[SqliteStore]
) -> None:
    """Keys are stamped with the node's clock; loading filtered them with
    time.time(), so a node whose clock is not the wall clock lost them."""
    at = _ReactorAt(1_000_000.0)
    store = SqliteStore(str(tmp_path), at, StoreSettings())
    opened.append(store)
    await Node(store, at).increment("c", 3, key="k")
    store.close()
    at.now += 3600  # an hour later on that clock: well inside the 24 h window
    again = SqliteStore(str(tmp_path), at, StoreSettings())
    opened.append(again)
    assert [r.key for r in again.load().idempotency] == ["k"]


@pytest_twisted.ensureDeferred
async def test_a_peer_row_the_database_refuses_never_blocks_own_commits(
    tmp_path: Path, opened: list[SqliteStore]
) -> None:
    """A replica id SQLite cannot encode (a lone surrogate) once failed every
    later commit of the node. Whatever gets past validation, own increments
    commit alone, the bad row is dropped, and the good peer rows are kept."""
    store = open_store(opened, tmp_path)
    node = Node(store)
    node.merge({"c": {"\ud800": 5, "good": 7}})
    await store.flush()
    assert (await node.increment("c", 1)).value == 13
    await store.flush()
    store.close()
    loaded = set(open_store(opened, tmp_path).load().entries)
    assert loaded == {("c", "good", 7), ("c", store.replica_id, 1)}


def test_close_marks_a_clean_stop_even_when_peer_rows_fail(tmp_path: Path, opened: list[SqliteStore]) -> None:
    store = open_store(opened, tmp_path, durability="fast")
    store.write_peers({"c": {"\ud800": 5}})
    store.close()
    assert open_store(opened, tmp_path, durability="fast").replica_id == store.replica_id


@pytest_twisted.ensureDeferred
async def test_shutdown_releases_the_data_dir_without_blocking(tmp_path: Path, opened: list[SqliteStore]) -> None:
    store = open_store(opened, tmp_path)
    await Node(store).increment("c", 4)
    store.write_peers({"c": {"peer": 2}})
    processes = [store._writer.pid, store._writer.spawner_pid]
    await store.shutdown()
    for pid in processes:  # the writer and its spawner exited, and no zombie is left
        assert not Path(f"/proc/{pid}").exists()
    again = open_store(opened, tmp_path)  # the lock is free
    assert set(again.load().entries) == {("c", store.replica_id, 4), ("c", "peer", 2)}


@pytest_twisted.ensureDeferred
async def test_a_new_identity_is_durable_and_the_shared_id_is_remembered(
    tmp_path: Path, opened: list[SqliteStore]
) -> None:
    """A node that found its replica id in use elsewhere goes on under a new
    one; after a restart it still uses the new one, keeps the old partial,
    and still knows the old id was shared (so it keeps refusing it)."""
    store = open_store(opened, tmp_path)
    node = Node(store)
    await node.increment("c", 2)
    old = node.replica_id
    node.renew_identity("a test")
    assert (await node.increment("c", 3)).value == 5
    assert node.replica_id != old and node.partials("c") == {old: 2, node.replica_id: 3}
    store.close()
    restarted = Node(open_store(opened, tmp_path))
    assert restarted.replica_id == node.replica_id
    assert restarted.partials("c") == {old: 2, node.replica_id: 3}
    assert restarted.shared_ids == {old}


@pytest_twisted.ensureDeferred
async def test_peer_rows_written_in_bulk_read_back_exactly(tmp_path: Path, opened: list[SqliteStore]) -> None:
    """Peer rows go to SQLite as JSON, a statement per chunk of rows; every
    name comes back as it was sent (quotes, backslashes, control and
    non-ASCII characters; a NUL, which SQLite's JSON would cut, takes the
    row-by-row path), counts up to 2^63-1, and never lower than stored."""
    names = ['q"uote', "back\\slash", "tab\tnew\nline", "ümlaut €", "astral \U0001f600", "nul\x00byte", "\x7f\x01"]
    names += [f"counter-{i}" for i in range(25_000)]  # more than one chunk
    store = open_store(opened, tmp_path)
    store.write_peers({name: {"p": 2**63 - 1, "q.r-s_t": i + 1} for i, name in enumerate(names)})
    await store.flush()
    store.write_peers({names[0]: {"p": 1, "q.r-s_t": 100}, "nul\x00byte": {"p": 3}})
    await store.flush()
    store.close()
    loaded = {(name, replica): count for name, replica, count in open_store(opened, tmp_path).load().entries}
    expected = {(name, "p"): 2**63 - 1 for name in names}
    expected.update({(name, "q.r-s_t"): i + 1 for i, name in enumerate(names)})
    expected[(names[0], "q.r-s_t")] = 100
    assert loaded == expected


def peer_writes_of(store: SqliteStore) -> list[int]:
    """The sizes of the peer-row writes ``store`` hands its writer from now on."""
    sizes: list[int] = []
    call = store._writer.call  # type: ignore[union-attr]

    def recording(operation: str, *args: object) -> object:
        if operation == "commit_peers":
            sizes.append(len(args[0]))  # type: ignore[arg-type]
        return call(operation, *args)

    store._writer.call = recording  # type: ignore[method-assign,union-attr]
    return sizes


@pytest_twisted.ensureDeferred
async def test_a_large_peer_backlog_goes_to_the_writer_in_chunks(tmp_path: Path, opened: list[SqliteStore]) -> None:
    """A node catching up gathers hundreds of thousands of peer rows a
    second; handing them over in one piece held the reactor for half a
    second per million. They go in chunks, one transaction each, and all
    arrive."""
    store = open_store(opened, tmp_path)
    sizes = peer_writes_of(store)
    store.write_peers({f"c{i}": {"p": i + 1} for i in range(PEER_ROWS_PER_WRITE * 2 + 7)})
    await store.flush()
    assert sizes == [PEER_ROWS_PER_WRITE, PEER_ROWS_PER_WRITE, 7]
    store.close()
    assert len(list(open_store(opened, tmp_path).load().entries)) == PEER_ROWS_PER_WRITE * 2 + 7


@pytest_twisted.ensureDeferred
async def test_a_shutdown_during_a_flush_still_writes_every_peer_row(tmp_path: Path, opened: list[SqliteStore]) -> None:
    store = open_store(opened, tmp_path)
    sent = peer_writes_of(store)
    rows = PEER_ROWS_PER_WRITE * 40
    store.write_peers({f"c{i}": {"p": 1} for i in range(rows)})
    flushing = store.flush()
    await deferLater(reactor, 0, lambda: None)  # a first turn of chunks, not all of them
    assert 0 < sum(sent) < rows
    await store.shutdown()
    await flushing
    assert len(list(open_store(opened, tmp_path).load().entries)) == rows
