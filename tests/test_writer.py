"""The store's writer process: replaced when it dies, deaf to the signals
meant for its node, gone with its node, and holding nothing of the node's."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from counterdb import writes
from counterdb.node import Node, StoreUnavailable
from counterdb.store import SqliteStore, StoreError, StoreSettings
from counterdb.writer import MAX_RESTARTS

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def reopened(path: Path, durability: str = "full") -> Iterator[SqliteStore]:
    """The store at ``path`` opened again, as after a restart; closed afterwards."""
    store = SqliteStore(str(path), reactor, StoreSettings(durability=durability))
    try:
        yield store
    finally:
        store.close()


def writer_pid(store: SqliteStore) -> int:
    assert store._writer is not None and store._writer.pid is not None
    return store._writer.pid


def gone(pid: int) -> bool:
    """``pid`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def armed(marker: Path, broken: Any, working: Any) -> Any:
    """``broken`` once ``marker`` exists, ``working`` before. Writers are
    forked by the store's spawner, forked when the store opened: a patch
    must be in place before that, and armed later, by the marker."""

    def choose(*args: Any, **kwargs: Any) -> Any:
        return (broken if marker.exists() else working)(*args, **kwargs)

    return choose


def exit_at_once(*args: Any) -> None:
    os._exit(3)


def wait_until(condition: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not true within {seconds} s: {condition}"
        time.sleep(0.01)  # poll again until the deadline


@pytest_twisted.ensureDeferred
async def test_a_killed_writer_is_replaced_and_the_commit_it_held_is_acknowledged(tmp_path: Path) -> None:
    """kill -9 of the writer (the OOM killer, an operator) while it holds a
    commit: a new writer gets the commit again, the client gets its
    acknowledgement, and nothing is counted twice."""
    store = SqliteStore(str(tmp_path), reactor)
    try:
        node = Node(store)
        await node.increment("c", 1)
        first = writer_pid(store)
        os.kill(first, signal.SIGSTOP)  # it cannot answer: the next commit stays outstanding
        pending = node.increment("c", 2)
        os.kill(first, signal.SIGKILL)
        ack = await pending
        assert ack.value == 3
        assert writer_pid(store) != first
        assert (await node.increment("c", 4)).value == 7
    finally:
        store.close()
    with reopened(tmp_path) as again:
        assert Node(again).value("c") == 7


@pytest_twisted.ensureDeferred
async def test_a_writer_that_keeps_dying_fails_increments_and_reads_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writes, "main", exit_at_once)
    store = SqliteStore(str(tmp_path), reactor)
    try:
        node = Node(store)
        with pytest.raises(StoreUnavailable, match=f"it exited {MAX_RESTARTS + 1} times in a row"):
            await node.increment("c", 1)
        assert node.value("c") == 0  # nothing was counted, and reads still answer
        with pytest.raises(StoreUnavailable, match="until the node restarts"):
            await node.increment("c", 1)  # it stays failed rather than restarting forever
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_the_writer_outlives_the_signals_meant_for_its_node(tmp_path: Path) -> None:
    """systemd's SIGTERM (and `systemctl kill -s USR1`, twistd's log
    rotation) goes to every process of the unit, a terminal's Ctrl-C to
    the whole process group: the writer must stay to make the node's last
    writes, so a fast-durability restart is still clean."""
    store = SqliteStore(str(tmp_path), reactor, StoreSettings(durability="fast"))
    node = Node(store)
    await node.increment("c", 1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        os.kill(writer_pid(store), sig)
    assert (await node.increment("c", 1)).value == 2
    await store.shutdown()
    with reopened(tmp_path, "fast") as again:
        assert again.replica_id == store.replica_id  # the stop was recorded clean
        assert Node(again).value("c") == 2


@pytest_twisted.ensureDeferred
async def test_the_writer_holds_no_descriptor_of_its_node(tmp_path: Path) -> None:
    """A forked writer that kept the node's listening socket would keep
    its port taken after the node died."""
    store = SqliteStore(str(tmp_path), reactor)
    try:
        await store.write_own({"c": 1})  # the writer has opened the database
        pid = writer_pid(store)
        sockets = [
            fd
            for fd in os.listdir(f"/proc/{pid}/fd")
            if stat.S_ISSOCK(os.stat(f"/proc/{pid}/fd/{fd}").st_mode) and int(fd) > 2
        ]
        assert len(sockets) == 1  # its end of the pair, nothing else
        files = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert not any(name.endswith("counterdb.lock") for name in files)
    finally:
        store.close()


def test_the_writer_exits_when_its_node_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from twisted.internet import reactor
        from counterdb.store import SqliteStore
        store = SqliteStore({str(tmp_path)!r}, reactor)
        print(store._writer.pid, store._writer.spawner_pid, flush=True)
        signal.pause()  # until the test kills it
        """
    )
    node = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        writer, spawner = map(int, node.stdout.readline().split())
        assert not gone(writer) and not gone(spawner)
    finally:
        node.kill()
        node.wait()
    wait_until(lambda: gone(writer) and gone(spawner))


def test_frames_reassemble_whatever_the_reads_cut() -> None:
    messages = [("commit", ([("c", "r", 1)], [])), ("checkpoint", ()), ("x" * 70_000, (None,))]
    stream = b"".join(writes.frame(m) for m in messages)
    for cut in (1, 3, 4, 5, 4096):
        buffer, got = bytearray(), []
        for start in range(0, len(stream), cut):
            buffer += stream[start : start + cut]
            got += writes.split_frames(buffer)
        assert got == messages and not buffer


def test_operators_can_tell_the_writer_from_its_node(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path), reactor)
    try:
        comm = Path(f"/proc/{writer_pid(store)}/comm")
        wait_until(lambda: comm.read_text().strip() == "counterdb-store")
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_a_writer_that_cannot_be_replaced_fails_writes_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of processes or memory when the writer must be replaced (in the
    spawner, then in the node): the commit it held fails (503), it does
    not wait forever."""

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    marker = tmp_path / "armed"
    monkeypatch.setattr(os, "fork", armed(marker, no_fork, os.fork))
    store = SqliteStore(str(tmp_path / "data"), reactor)
    try:
        node = Node(store)
        await node.increment("c", 1)
        marker.touch()
        os.kill(writer_pid(store), signal.SIGSTOP)
        pending = node.increment("c", 1)
        os.kill(writer_pid(store), signal.SIGKILL)
        with pytest.raises(StoreUnavailable, match="cannot start the store's writer process"):
            await pending
        assert node.value("c") == 1
    finally:
        store.close()


def test_a_store_whose_writer_cannot_start_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(StoreError, match="cannot start the store's writer process"):
        SqliteStore(str(tmp_path), reactor)
    monkeypatch.undo()
    SqliteStore(str(tmp_path), reactor).close()  # and the data dir was released


@pytest_twisted.ensureDeferred
async def test_replacements_are_counted_and_a_store_that_gave_up_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What /ready and /metrics read: a replaced writer is counted; a
    store that can write nothing more gives the reason (GET /ready then
    answers 503 with it, so load balancers stop sending increments)."""
    marker = tmp_path / "armed"
    monkeypatch.setattr(writes, "main", armed(marker, exit_at_once, writes.main))
    store = SqliteStore(str(tmp_path / "data"), reactor)
    try:
        node = Node(store)
        await node.increment("c", 1)
        assert store.writer_restarts == 0 and store.write_problem() is None
        os.kill(writer_pid(store), signal.SIGKILL)
        assert (await node.increment("c", 1)).value == 2
        assert store.writer_restarts == 1 and store.write_problem() is None
        marker.touch()
        os.kill(writer_pid(store), signal.SIGKILL)
        with pytest.raises(StoreUnavailable):
            await node.increment("c", 1)
        problem = store.write_problem()
        assert problem is not None and "until the node restarts" in problem
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_a_commit_made_by_a_writer_that_died_before_answering_counts_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst moment to die: after SQLite's commit, before the answer.
    The new writer is sent the same absolute partials again; the counter
    must not move twice, now or after a restart."""
    marker, died_once = tmp_path / "armed", tmp_path / "died-once"
    commit = writes.Writes.commit

    def commit_then_die_once(self: writes.Writes, rows: list[writes.Row], keys: object = ()) -> None:
        commit(self, rows, keys)  # type: ignore[arg-type]
        if rows and rows[0][0] == "c" and not died_once.exists():
            died_once.touch()
            os._exit(9)

    monkeypatch.setattr(writes.Writes, "commit", armed(marker, commit_then_die_once, commit))
    store = SqliteStore(str(tmp_path / "data"), reactor)
    try:
        node = Node(store)
        await node.increment("c", 5)
        marker.touch()
        ack = await node.increment("c", 2, key="k")
        assert died_once.exists() and ack.value == 7
        assert (await node.increment("c", 2, key="k")).replayed
        assert node.value("c") == 7
    finally:
        store.close()
    with reopened(tmp_path / "data") as again:
        node = Node(again)
        assert node.value("c") == 7
        assert (await node.increment("c", 2, key="k")).replayed and node.value("c") == 7


@pytest_twisted.ensureDeferred
async def test_a_writer_that_cannot_open_the_database_says_why_with_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors, a file made unreadable: the reason goes with the
    failed write into the node's log and its 503, not into a dead child's
    stderr (which a daemon sends nowhere)."""

    def cannot_open(db_path: str, synchronous: str) -> object:
        raise sqlite3.OperationalError("unable to open database file")

    marker = tmp_path / "armed"
    monkeypatch.setattr(writes, "_open", armed(marker, cannot_open, writes._open))
    store = SqliteStore(str(tmp_path / "data"), reactor)
    try:
        node = Node(store)
        await node.increment("c", 1)
        marker.touch()
        os.kill(writer_pid(store), signal.SIGKILL)
        with pytest.raises(StoreUnavailable, match=r"writer process cannot open .*unable to open database file"):
            await node.increment("c", 1)
        assert store.write_problem() is None  # it answers: not a writer that keeps dying
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_a_store_whose_writer_gave_up_still_stops_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last writes (peer rows, the clean-stop record) are made from the
    node itself when no writer can make them: a fast-durability node then
    keeps its replica id, and the peer rows are kept."""
    marker = tmp_path / "armed"
    monkeypatch.setattr(writes, "main", armed(marker, exit_at_once, writes.main))
    store = SqliteStore(str(tmp_path / "data"), reactor, StoreSettings(durability="fast"))
    node = Node(store)
    await node.increment("c", 1)
    marker.touch()
    os.kill(writer_pid(store), signal.SIGKILL)
    with pytest.raises(StoreUnavailable):
        await node.increment("c", 1)
    assert store.write_problem() is not None
    store.write_peers({"c": {"peer": 4}})
    await store.shutdown()
    marker.unlink()
    with reopened(tmp_path / "data", "fast") as again:
        assert again.replica_id == store.replica_id  # the stop was recorded clean
        assert Node(again).partials("c") == {store.replica_id: 1, "peer": 4}


def children_named(name: str) -> list[int]:
    """This process's children (zombies included) whose name is ``name``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            comm, rest = (entry / "stat").read_text().split(" (", 1)[1].rsplit(")", 1)
        except (OSError, ValueError):
            continue
        if comm == name and int(rest.split()[1]) == os.getpid():
            found.append(int(entry.name))
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest_twisted.ensureDeferred
async def test_writers_come_from_the_spawner_and_from_the_node_once_it_is_gone(tmp_path: Path) -> None:
    """Forked from a node holding its counters, a writer would keep a copy
    of every page the node changes (half its memory within minutes at a
    million counters): writers are forked by the spawner, forked before the
    node loaded anything. Without the spawner, the node forks them itself."""
    store = SqliteStore(str(tmp_path), reactor)
    try:
        node = Node(store)
        await node.increment("c", 1)
        spawner = store._writer.spawner_pid  # type: ignore[union-attr]
        assert spawner is not None and parent_of(spawner) == os.getpid()
        assert parent_of(writer_pid(store)) == spawner
        wait_until(lambda: Path(f"/proc/{spawner}/comm").read_text().strip() == "counterdb-spawn")
        os.kill(writer_pid(store), signal.SIGKILL)
        assert (await node.increment("c", 1)).value == 2
        assert parent_of(writer_pid(store)) == spawner  # the replacement too
        os.kill(spawner, signal.SIGKILL)
        os.kill(writer_pid(store), signal.SIGKILL)
        assert (await node.increment("c", 1)).value == 3
        assert parent_of(writer_pid(store)) == os.getpid()  # forked from the node, logged
        assert store._writer.spawner_pid is None  # type: ignore[union-attr]
    finally:
        store.close()
    with reopened(tmp_path) as again:
        assert Node(again).value("c") == 3


@pytest_twisted.ensureDeferred
async def test_the_spawner_holds_nothing_of_the_node_and_leaves_with_the_store(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path), reactor)
    spawner = store._writer.spawner_pid  # type: ignore[union-attr]
    assert spawner is not None

    def descriptors() -> list[int]:
        return [int(fd) for fd in os.listdir(f"/proc/{spawner}/fd") if int(fd) > 2]

    wait_until(lambda: len(descriptors()) == 1)  # once it closed what it inherited
    assert stat.S_ISSOCK(os.stat(f"/proc/{spawner}/fd/{descriptors()[0]}").st_mode)
    await store.shutdown()
    assert gone(spawner) and gone(writer_pid(store))


def test_a_store_whose_spawner_cannot_fork_a_writer_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spawner starts, but neither it nor the node can fork a writer
    (out of processes): the store refuses to open, with the reason, and
    leaves nothing running."""
    real_fork, forks = os.fork, []

    def only_the_first_fork() -> int:
        forks.append(1)  # each process counts its own forks from here
        if len(forks) > 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork()

    monkeypatch.setattr(os, "fork", only_the_first_fork)
    with pytest.raises(StoreError, match="cannot start the store's writer process"):
        SqliteStore(str(tmp_path), reactor)
    monkeypatch.undo()
    assert not children_named("counterdb-spawn")  # the spawner was stopped and reaped
    SqliteStore(str(tmp_path), reactor).close()  # the data dir was released
