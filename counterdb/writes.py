"""
Every write to a node's SQLite file, and the writer process that runs them.

A node's writes run in a child process of their own (forked by
:mod:`counterdb.writer`, then running :func:`main`): the reactor hands a batch over a socket
and reads the answer as one more readable descriptor, so a commit never
waits for the GIL of a busy reactor (docs/design.md, "The request path").
The parent runs the same :class:`Writes` on its own connection only when it
stops without a reactor (:meth:`counterdb.store.SqliteStore.close`).

The child uses nothing from Twisted: it shares no lock with the reactor's
threads. Every operation is idempotent (counts are absolute and only grow, keys are
inserted once, meta values are set), so the parent may send one again to a
new child when the previous one died before answering.

Frames, both ways: a 4-byte big-endian length and a pickle. Requests are
``(operation, args)``; answers are ``(error, result, warnings)``, ``error``
being ``None`` or ``(exception type name, message)``. Pickle is safe here: each
end is the other's own code, never a peer's bytes.
"""

from __future__ import annotations

import json
import pickle
import signal
import socket
import sqlite3
import struct
from collections.abc import Sequence
from typing import Any

# Counts only grow: a late or repeated write never lowers what is stored.
UPSERT_PARTIAL = (
    "INSERT INTO partials (counter, replica, count) VALUES (?, ?, ?) "
    "ON CONFLICT (counter, replica) DO UPDATE SET count = MAX(count, excluded.count)"
)
#: The same for many rows in one statement: ``?`` is a JSON array of
#: ``[counter, replica, count]``. One statement is one ``sqlite3_step``:
#: with ``executemany`` a writer thread gave the GIL up for every row and
#: waited for the busy reactor each time (100,000 peer rows took 60 s
#: instead of 0.3 s). In the writer process that no longer costs a wait,
#: but one statement is still several times faster than one per row.
UPSERT_PARTIALS_JSON = (
    "INSERT INTO partials (counter, replica, count) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]') "
    "FROM json_each(?) WHERE true "
    "ON CONFLICT (counter, replica) DO UPDATE SET count = MAX(count, excluded.count)"
)
#: Rows per JSON statement.
JSON_CHUNK_ROWS = 10_000
INSERT_KEY = "INSERT OR IGNORE INTO idempotency (key, counter, amount, value, created) VALUES (?, ?, ?, ?, ?)"
_SET_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"

Row = tuple[str, str, int]  # (counter, replica, count)
KeyRow = tuple[str, str, int, int, float]  # an IdempotencyRecord as a tuple

_HEADER = struct.Struct(">I")


class Writes:
    """The writes to one SQLite connection, in the order they are asked for.

    Problems that do not fail the operation (a peer row dropped) are
    appended to :attr:`warnings` for the caller to log."""

    def __init__(self, db: sqlite3.Connection, synchronous: str, key_window: float, max_keys: int) -> None:
        self.db = db
        self.synchronous = synchronous
        self.key_window = key_window
        self.max_keys = max_keys
        self.warnings: list[str] = []
        self._last_prune = 0.0

    def commit(self, rows: list[Row], keys: Sequence[KeyRow] = ()) -> None:
        """Upsert ``rows`` and insert ``keys`` in one transaction."""
        if not keys and self._commit_in_one_statement(rows):
            return
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            self._upsert(rows)
            if keys:
                db.executemany(INSERT_KEY, keys)
                self._prune_keys(keys[-1][4])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def commit_peers(self, rows: list[Row]) -> None:
        """Commit peer rows; a row the database refuses for what it is (not
        for a full or failing disk) is dropped with a warning, never retried
        forever, and the other rows are still written."""
        try:
            self.commit(rows)
        except sqlite3.OperationalError:
            raise  # the disk, not the data: the caller keeps them for later
        except Exception:
            self._commit_rows_one_by_one(rows)

    def set_meta_durably(self, values: dict[str, str]) -> None:
        """Set meta entries in one transaction, with an fsync whatever the
        durability mode."""
        self.db.execute("PRAGMA synchronous=FULL")
        try:
            with self.db:
                self.db.executemany(_SET_META, values.items())
        finally:
            self.db.execute(f"PRAGMA synchronous={self.synchronous}")

    def checkpoint(self) -> None:
        # Read the result: a statement left open would make the next COMMIT fail.
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def last_writes(self, peers: list[Row]) -> None:
        """Pending peer rows, the clean-stop marker and a final checkpoint;
        each on its own, so the marker is written even if the rows are not."""
        try:
            if peers:
                self.commit_peers(peers)
        except Exception as e:
            self.warnings.append(f"could not write peer partials at shutdown ({e}); peers will send them again")
        with self.db:
            self.db.execute(_SET_META, ("clean_shutdown", "1"))
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def cap_pages(self, pages: int) -> None:
        """Fault injection for tests: refuse to grow the file past ``pages``
        pages, as a full disk would (SQLITE_FULL)."""
        self.db.execute(f"PRAGMA max_page_count = {int(pages)}").fetchall()

    def page_count(self) -> int:
        """For tests: the file's size in pages."""
        return int(self.db.execute("PRAGMA page_count").fetchone()[0])

    # -- helpers -------------------------------------------------------------

    def _commit_in_one_statement(self, rows: list[Row]) -> bool:
        """Upsert ``rows`` as one statement outside BEGIN/COMMIT, which
        SQLite makes its own transaction (all rows or none), durable before
        ``execute`` returns. False, having done nothing, for rows the JSON
        statement cannot carry."""
        if len(rows) == 1:
            self.db.execute(UPSERT_PARTIAL, rows[0])
            return True
        if len(rows) > JSON_CHUNK_ROWS or any("\x00" in row[0] for row in rows):
            return False
        self.db.execute(UPSERT_PARTIALS_JSON, (json.dumps(rows, ensure_ascii=False),))
        return True

    def _upsert(self, rows: list[Row]) -> None:
        """Upsert ``rows`` inside the caller's transaction, a JSON statement
        per chunk. SQLite's JSON reads a NUL character as the end of the
        string, so a counter name holding one goes through ``executemany``
        (names are checked UTF-8 otherwise; replica ids are plain ASCII)."""
        plain = [row for row in rows if "\x00" not in row[0]]
        for start in range(0, len(plain), JSON_CHUNK_ROWS):
            chunk = json.dumps(plain[start : start + JSON_CHUNK_ROWS], ensure_ascii=False)
            self.db.execute(UPSERT_PARTIALS_JSON, (chunk,))
        if len(plain) != len(rows):
            self.db.executemany(UPSERT_PARTIAL, [row for row in rows if "\x00" in row[0]])

    def _commit_rows_one_by_one(self, rows: list[Row]) -> None:
        for row in rows:
            try:
                self.commit([row])
            except sqlite3.OperationalError:
                raise
            except Exception as e:
                self.warnings.append(f"dropped a peer partial the store cannot hold ({row[:2]!r}): {e}")

    def _prune_keys(self, now: float) -> None:
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        self.db.execute("DELETE FROM idempotency WHERE created < ?", (now - self.key_window,))
        self.db.execute(
            "DELETE FROM idempotency WHERE key IN "
            "(SELECT key FROM idempotency ORDER BY created DESC LIMIT -1 OFFSET ?)",
            (self.max_keys,),
        )


#: What a parent may ask of the writer process.
OPERATIONS = frozenset(
    {"commit", "commit_peers", "set_meta_durably", "checkpoint", "last_writes", "cap_pages", "page_count"}
)


def frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def split_frames(buffer: bytearray) -> list[Any]:
    """Take every whole frame off the front of ``buffer``."""
    messages = []
    while len(buffer) >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buffer)
        if len(buffer) < _HEADER.size + size:
            break
        messages.append(pickle.loads(bytes(buffer[_HEADER.size : _HEADER.size + size])))
        del buffer[: _HEADER.size + size]
    return messages


def run(writes: Writes, operation: str, args: tuple[Any, ...]) -> tuple[Any, Any, list[str]]:
    """One request's answer: ``(error, result, warnings)``."""
    error, result = None, None
    try:
        if operation not in OPERATIONS:
            raise ValueError(f"unknown writer operation {operation!r}")
        result = getattr(writes, operation)(*args)
    except Exception as e:
        error = (type(e).__name__, str(e))
    warnings, writes.warnings = writes.warnings, []
    return error, result, warnings


def main(connection: socket.socket, db_path: str, synchronous: str, key_window: float, max_keys: int) -> None:
    """The writer process, once forked: open the database at the first
    request (the parent creates or upgrades it after the fork) and answer
    until the parent closes its end."""
    leave_the_nodes_signals_to_the_node()
    connection.setblocking(True)
    reader = connection.makefile("rb")
    request: Any = _read_frame(reader)
    if request is None:
        return
    try:
        db = _open(db_path, synchronous)
    except sqlite3.Error as e:
        # Every request gets the reason (the node logs it with the failed
        # write) rather than a dead writer and a bare exit status.
        error = (type(e).__name__, f"the store's writer process cannot open {db_path}: {e}")
        while request is not None:
            connection.sendall(frame((error, None, [])))
            request = _read_frame(reader)
        return
    try:
        writes = Writes(db, synchronous, key_window, max_keys)
        while request is not None:
            connection.sendall(frame(run(writes, *request)))
            request = _read_frame(reader)
    finally:
        db.close()


def _open(db_path: str, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute(f"PRAGMA synchronous={synchronous}")
        # The parent reads at start-up and writes only after this process
        # ended; wait rather than fail if it still holds a lock.
        db.execute("PRAGMA busy_timeout = 10000")
    except sqlite3.Error:
        db.close()
        raise
    return db


#: Signals sent to every process of a node (systemd's default for ``stop``
#: and ``kill``, a terminal's Ctrl-C to the process group) that are the
#: node's business: the writer stays until the node closes the socket,
#: after its last writes, and must not rotate the node's log a second time.
NODE_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2})


def leave_the_nodes_signals_to_the_node() -> None:
    """Ignore :data:`NODE_SIGNALS`, and drop every other handler the
    forked node had installed (twistd's, the reactor's)."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
            if sig in NODE_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            elif callable(handler):
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            continue  # SIGKILL, SIGSTOP and the like


def _read_frame(reader: Any) -> Any:
    """The next request, or None once the parent closed its end."""
    header = reader.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    payload = reader.read(size)
    if len(payload) < size:
        return None
    return pickle.loads(payload)
