"""counterdb-admin: online backup, and restore under a new replica id."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from counterdb.admin import main
from counterdb.node import Node
from counterdb.store import SCHEMA_VERSION, SqliteStore

REPO_ROOT = Path(__file__).resolve().parent.parent


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


# -- a failed restore leaves nothing behind ------------------------------------------


def _sqlite_file(path: Path, user_version: int, statements: tuple[str, ...] = ()) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        for statement in statements:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {user_version}")
        db.commit()


def _bad_backup(tmp_path: Path, kind: str) -> Path:
    """A file (or not) that ``restore`` must refuse, of the given kind."""
    path = tmp_path / f"bad-{kind}"
    if kind == "directory":
        path.mkdir()
    elif kind == "not-sqlite":
        path.write_text("hello, not a database\n")
    elif kind == "empty":
        path.touch()
    elif kind == "foreign-sqlite":  # some other program's database
        _sqlite_file(path, 0, ("CREATE TABLE t (x)", "INSERT INTO t VALUES (1)"))
    elif kind == "foreign-same-version":  # user_version 1, but not our tables
        _sqlite_file(path, SCHEMA_VERSION, ("CREATE TABLE t (x)",))
    elif kind == "newer-schema":
        _sqlite_file(path, SCHEMA_VERSION + 1, ("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",))
    elif kind == "older-schema":
        _sqlite_file(path, 0, ("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",))
    else:
        assert kind == "missing"
    return path


def _snapshot(directory: Path) -> list[str] | None:
    """What ``directory`` holds (None if it does not exist)."""
    if not directory.exists():
        return None
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _good_backup(tmp_path: Path) -> Path:
    SqliteStore(str(tmp_path / "source"), reactor).close()
    assert main(["backup", str(tmp_path / "source"), str(tmp_path / "good.sqlite3")]) == 0
    return tmp_path / "good.sqlite3"


BAD_KINDS = [
    "missing",
    "directory",
    "not-sqlite",
    "empty",
    "foreign-sqlite",
    "foreign-same-version",
    "newer-schema",
    "older-schema",
]


@pytest.mark.parametrize("data_dir_exists", [False, True], ids=["new-data-dir", "empty-data-dir"])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_failed_restore_says_why_in_one_line_and_leaves_the_data_dir_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, data_dir_exists: bool
) -> None:
    bad = _bad_backup(tmp_path, kind)
    data_dir = tmp_path / "data"
    if data_dir_exists:
        data_dir.mkdir()
    before = _snapshot(data_dir)
    capsys.readouterr()
    assert main(["restore", str(bad), str(data_dir)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("counterdb-admin: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert str(bad) in err, err
    assert _snapshot(data_dir) == before
    # ...so the retry with a good backup is not told the dir already holds one.
    assert main(["restore", str(_good_backup(tmp_path)), str(data_dir)]) == 0, capsys.readouterr().err


def test_restore_of_a_missing_file_exits_1_with_one_line(tmp_path: Path) -> None:
    """The real command line: exit status 1 and one line, no traceback."""
    missing = tmp_path / "no-such-backup.sqlite3"
    result = subprocess.run(
        [sys.executable, "-m", "counterdb.admin", "restore", str(missing), str(tmp_path / "data")],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result
    assert result.stderr == f"counterdb-admin: {missing}: no such file\n", result
    assert result.stdout == ""
    assert not (tmp_path / "data").exists()


def _restore_as_nobody(backup: Path, data_dir: Path) -> tuple[int, str]:
    """``main(["restore", ...])`` in a forked child without root's power to
    read anything (root cannot be refused a read); its status and stderr."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 2
        try:
            os.dup2(write_end, 2)
            sys.stderr = os.fdopen(2, "w")
            os.setgid(grp.getgrnam("nogroup").gr_gid)
            os.setuid(pwd.getpwnam("nobody").pw_uid)
            status = main(["restore", str(backup), str(data_dir)])
        finally:
            sys.stderr.flush()
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        err = pipe.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


def test_restore_of_an_unreadable_backup_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        backup = _good_backup(tmp_path)
        backup.chmod(0)
        status = main(["restore", str(backup), str(tmp_path / "data")])
        err = capsys.readouterr().err
        data_dir = tmp_path / "data"
    else:  # nobody, in a directory of its own (pytest's tmp_path is root's only)
        base = Path(tempfile.mkdtemp(prefix="counterdb-admin-test-"))
        try:
            os.chown(base, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
            backup = base / "backup.sqlite3"
            _good_backup(tmp_path).rename(backup)
            backup.chmod(0)
            data_dir = base / "data"
            status, err = _restore_as_nobody(backup, data_dir)
            assert not data_dir.exists()
        finally:
            shutil.rmtree(base)
    assert status == 1, err
    assert err == f"counterdb-admin: {backup}: permission denied\n"
    assert not data_dir.exists()


# -- help for a terminal --------------------------------------------------------------


@pytest.mark.parametrize(
    "command, words",
    [
        ([], ["backup", "restore", "new replica id"]),
        (["backup"], ["DATA_DIR", "DEST"]),
        (["restore"], ["BACKUP", "new replica id"]),
    ],
)
def test_help_is_plain_text(command: list[str], words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main([*command, "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for word in ["counterdb-admin", *words]:
        assert word in text, text
    for markup in ("``", ":class:", ":func:", "*"):
        assert markup not in text, text


def test_backup_that_cannot_be_written_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    SqliteStore(str(tmp_path / "a"), reactor).close()
    dest = tmp_path / "no-such-dir" / "b.sqlite3"
    assert main(["backup", str(tmp_path / "a"), str(dest)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"counterdb-admin: {dest}: cannot back up") and err.count("\n") == 1, err


def test_a_backup_is_one_self_contained_file(tmp_path: Path) -> None:
    """Not in WAL mode: restoring it needs no ``-shm`` beside it (a
    read-only backup directory is fine) and nothing but the file to copy."""
    SqliteStore(str(tmp_path / "a"), reactor).close()
    assert main(["backup", str(tmp_path / "a"), str(tmp_path / "b.sqlite3")]) == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "b.sqlite3")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
