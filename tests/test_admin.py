"""counterdb-admin: online backup, and restore under a new replica id."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from counterdb.admin import main
from counterdb.node import Node
from counterdb.store import SqliteStore


@pytest_twisted.ensureDeferred
async def test_backup_of_a_running_node_restores_under_a_new_identity(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "live"), reactor)
    try:
        node = Node(store)
        await node.increment("c", 5, key="paid-once")
        node.merge({"c": {"peer": 2}})
        await store.flush()
        assert main(["backup", str(tmp_path / "live"), str(tmp_path / "backup.sqlite3")]) == 0
    finally:
        store.close()
    assert main(["restore", str(tmp_path / "backup.sqlite3"), str(tmp_path / "restored")]) == 0
    restored_store = SqliteStore(str(tmp_path / "restored"), reactor)
    try:
        restored = Node(restored_store)
        assert restored.replica_id != node.replica_id
        # The old replica's partial is kept as a retired replica's.
        assert restored.partials("c") == {node.replica_id: 5, "peer": 2}
        # New increments count on top, under the new id...
        assert (await restored.increment("c", 1)).value == 8
        # ...and a retry of a request the old node answered is not counted again.
        assert (await restored.increment("c", 5, key="paid-once")).replayed
    finally:
        restored_store.close()


def test_restore_refuses_a_data_dir_that_has_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    SqliteStore(str(tmp_path / "a"), reactor).close()
    assert main(["backup", str(tmp_path / "a"), str(tmp_path / "b.sqlite3")]) == 0
    assert main(["restore", str(tmp_path / "b.sqlite3"), str(tmp_path / "a")]) == 1
    assert "restore into an empty one" in capsys.readouterr().err


def test_backup_of_a_dir_without_a_database_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backup", str(tmp_path), str(tmp_path / "x.sqlite3")]) == 1
    assert "no counterdb database here" in capsys.readouterr().err
