"""
Storage of a node's state.

A store persists the node's replica id, its last accepted actors list, its
own partials (durably: an increment is acknowledged only after the write's
Deferred fired) and its copies of peers' partials (may be written lazily:
they can be fetched again, but they never go backwards).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from counterdb import __version__, migrations
from counterdb.crdt import Partials

log = Logger()


#: How long, and for how many keys at most, an idempotency key is remembered.
IDEMPOTENCY_WINDOW = 24 * 3600.0
IDEMPOTENCY_MAX_KEYS = 1_000_000


def new_replica_id() -> str:
    """A fresh replica id: random, so a wiped data dir never reuses an old one."""
    return uuid.uuid4().hex


@attrs.frozen
class IdempotencyRecord:
    """An increment made under an ``Idempotency-Key`` and the answer it got."""

    key: str
    counter: str
    amount: int
    value: int
    created: float  # seconds since the epoch


@attrs.frozen
class LoadedState:
    replica_id: str
    actors: list[str] | None
    entries: Iterable[tuple[str, str, int]] = ()  # (counter, replica, count)
    idempotency: list[IdempotencyRecord] = attrs.field(factory=list)
    shared_ids: frozenset[str] = frozenset()  # ids this node left because a copy used them too
    config_version: tuple[int, str] = (0, "")  # of ``actors``: (number, replica id of the node that made it)


class Store(Protocol):
    def load(self) -> LoadedState:
        """Read everything persisted (called once, at start-up)."""

    def write_own(self, partials: dict[str, int], keys: Sequence[IdempotencyRecord] = ()) -> Deferred[None]:
        """Durably record this node's own new partials (absolute values) and
        the idempotency keys they answer, in one transaction."""

    def write_peers(self, counters: dict[str, Partials]) -> None:
        """Record partials learnt from peers (never lower than before), when
        convenient: the store retries and logs its own failures, and a peer
        row it cannot write never holds up this node's own commits."""

    def write_config(self, actors: list[str], version: tuple[int, str] = (0, "")) -> Deferred[None]:
        """Record the accepted actors list and its version."""

    def renew_identity(self) -> Deferred[str]:
        """Durably take a fresh replica id for this node's own rows from now
        on, remembering the old one as shared; fires with the new one.
        Called between commits, never during one."""

    def size_bytes(self) -> int | None:
        """What the store takes on disk, if it keeps anything there."""

    def shutdown(self) -> Deferred[None]:
        """Write what is pending and release files and threads, without
        blocking the reactor."""

    def close(self) -> None:
        """The same as :meth:`shutdown`, blocking: for start-up failures and
        offline tools, when no reactor runs."""


class MemoryStore:
    """Keeps nothing across restarts: for tests and throw-away nodes."""

    def __init__(self, replica_id: str | None = None) -> None:
        self.replica_id = replica_id or new_replica_id()
        self.actors: list[str] | None = None
        self.counters: dict[str, Partials] = {}
        self.keys: list[IdempotencyRecord] = []
        self.shared_ids: frozenset[str] = frozenset()
        self.config_version: tuple[int, str] = (0, "")

    def load(self) -> LoadedState:
        entries = list(entries_of(self.counters))
        return LoadedState(self.replica_id, self.actors, entries, list(self.keys), self.shared_ids, self.config_version)

    def write_own(self, partials: dict[str, int], keys: Sequence[IdempotencyRecord] = ()) -> Deferred[None]:
        for name, count in partials.items():
            self._raise(name, self.replica_id, count)
        self.keys.extend(keys)
        return succeed(None)

    def write_peers(self, counters: dict[str, Partials]) -> None:
        for name, partials in counters.items():
            for replica, count in partials.items():
                self._raise(name, replica, count)

    def write_config(self, actors: list[str], version: tuple[int, str] = (0, "")) -> Deferred[None]:
        self.actors, self.config_version = list(actors), version
        return succeed(None)

    def renew_identity(self) -> Deferred[str]:
        self.shared_ids |= {self.replica_id}
        self.replica_id = new_replica_id()
        return succeed(self.replica_id)

    def size_bytes(self) -> int | None:
        return None

    def shutdown(self) -> Deferred[None]:
        return succeed(None)

    def close(self) -> None:
        pass

    def _raise(self, name: str, replica: str, count: int) -> None:
        partials = self.counters.setdefault(name, {})
        partials[replica] = max(partials.get(replica, 0), count)


def entries_of(counters: dict[str, Partials]) -> Iterable[tuple[str, str, int]]:
    for name, partials in counters.items():
        for replica, count in partials.items():
            yield name, replica, count


# -- SQLite ----------------------------------------------------------------------

#: The schema this code writes; older ones down to
#: :data:`migrations.OLDEST_SCHEMA` are upgraded when opened, newer ones refused.
SCHEMA_VERSION = 2
DB_FILE = "counterdb.sqlite3"
LOCK_FILE = "counterdb.lock"
#: STRICT tables (schema 2) need this SQLite, to write and to read.
MIN_SQLITE = (3, 37, 0)

# Schema 2 (history in docs/design.md). STRICT: a value of the wrong type
# is refused, never stored as text that would sort above every count.
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT, WITHOUT ROWID;
CREATE TABLE partials (
    counter TEXT NOT NULL,
    replica TEXT NOT NULL,
    count INTEGER NOT NULL CHECK (count >= 0),
    PRIMARY KEY (counter, replica)
) STRICT, WITHOUT ROWID;
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY,
    counter TEXT NOT NULL,
    amount INTEGER NOT NULL,
    value INTEGER NOT NULL,
    created REAL NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX idempotency_by_age ON idempotency (created);
"""

# Counts only grow: a late or repeated write never lowers what is stored.
_UPSERT_PARTIAL = (
    "INSERT INTO partials (counter, replica, count) VALUES (?, ?, ?) "
    "ON CONFLICT (counter, replica) DO UPDATE SET count = MAX(count, excluded.count)"
)
#: The same for many rows in one statement: ``?`` is a JSON array of
#: ``[counter, replica, count]``. One statement is one ``sqlite3_step``, so
#: the writer thread takes the GIL back once per chunk instead of once per
#: row: with ``executemany`` a thread that gives the GIL up for every row
#: waits for the busy reactor thread each time, and 100,000 peer rows took
#: 60 s behind a busy reactor instead of 0.2 s (0.3 s this way).
_UPSERT_PARTIALS_JSON = (
    "INSERT INTO partials (counter, replica, count) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]') "
    "FROM json_each(?) WHERE true "
    "ON CONFLICT (counter, replica) DO UPDATE SET count = MAX(count, excluded.count)"
)
#: Rows per JSON statement: encoding a chunk holds the GIL (about 5 ms).
_JSON_CHUNK_ROWS = 10_000
_INSERT_KEY = "INSERT OR IGNORE INTO idempotency (key, counter, amount, value, created) VALUES (?, ?, ?, ?, ?)"

#: --durability modes: SQLite's ``synchronous`` setting for each.
DURABILITY = {
    # fsync the write-ahead log before every acknowledged commit
    "full": "FULL",
    # fsync at checkpoints (every second); a kill -9 loses nothing, a power
    # loss may lose the last second of acknowledged increments
    "fast": "NORMAL",
}


class StoreError(Exception):
    """The data dir cannot be used; the message names the file and the problem."""


@attrs.frozen
class StoreSettings:
    durability: str = "full"
    peer_flush_interval: float = 1.0  # seconds peer partials may wait in memory
    checkpoint_interval: float = 1.0  # seconds between WAL checkpoints in "fast" mode
    idempotency_window: float = IDEMPOTENCY_WINDOW
    idempotency_max_keys: int = IDEMPOTENCY_MAX_KEYS


class SqliteStore:
    """The embedded store: one SQLite file in WAL mode in the data dir.

    All writes run, one after another, on a single dedicated thread, so the
    reactor never waits for the disk and SQLite never sees two writers. The
    node's group commit hands over one batch at a time.
    """

    def __init__(self, data_dir: str, reactor: Any, settings: StoreSettings = StoreSettings()) -> None:
        if settings.durability not in DURABILITY:
            raise ValueError(f"durability must be one of {sorted(DURABILITY)}")
        self.path = Path(data_dir)
        self.reactor = reactor
        self.settings = settings
        self._lock = _lock_data_dir(self.path)
        try:
            self._db = _open_database(self.path / DB_FILE, DURABILITY[settings.durability])
        except BaseException:
            self._lock.close()
            raise
        self.replica_id = self._claim_identity(settings.durability)
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="counterdb-store")
        self._pool.start()
        self._peer_backlog: dict[tuple[str, str], int] = {}
        self._flush_call: Any = None
        self._checkpoints: LoopingCall | None = None
        self._last_prune = 0.0
        self._shared_ids: frozenset[str] = frozenset()
        self._closed = False
        if settings.durability == "fast":
            self._checkpoints = LoopingCall(self._checkpoint)
            self._checkpoints.clock = reactor
            self._checkpoints.start(settings.checkpoint_interval, now=False)

    # -- start-up --------------------------------------------------------------

    def _claim_identity(self, durability: str) -> str:
        """This run's replica id: the stored one, unless the last run of a
        "fast" node ended uncleanly. Its last second of increments may then
        be gone from disk while peers still hold them, and increments on top
        of the shorter partial would be hidden by the max-merge until they
        caught up. A fresh id (like a replaced machine) avoids that."""
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        replica_id = meta["replica_id"]
        if durability == "fast" and meta.get("clean_shutdown") == "0":
            replica_id = new_replica_id()
            log.warn(
                "{db}: the last run did not shut down cleanly and fast durability may have lost its "
                "last commits; continuing as new replica {new} (was {old})",
                db=str(self.path / DB_FILE),
                new=replica_id,
                old=meta["replica_id"],
            )
            self._set_meta("replica_id", replica_id)
        # This record must be on disk before the first increment, whatever
        # the durability mode, or a power loss right after a clean start
        # would look like a clean stop. Which release writes the store from
        # now on goes with it (for operators rolling back).
        self._set_meta_durably({"clean_shutdown": "0", "written_by": __version__})
        return replica_id

    def load(self) -> LoadedState:
        db = self._db
        meta = dict(db.execute("SELECT key, value FROM meta"))
        actors = json.loads(meta["actors"]) if "actors" in meta else None
        self._shared_ids = frozenset(json.loads(meta.get("shared_ids", "[]")))
        number, origin = json.loads(meta.get("config_version", '[0, ""]'))
        # The node stamps keys with the reactor's clock: filter with the same one.
        oldest = self.reactor.seconds() - self.settings.idempotency_window
        keys = [
            IdempotencyRecord(*row)
            for row in db.execute(
                "SELECT key, counter, amount, value, created FROM idempotency WHERE created >= ? "
                "ORDER BY created DESC LIMIT ?",
                (oldest, self.settings.idempotency_max_keys),
            )
        ]
        keys.reverse()
        entries = db.execute("SELECT counter, replica, count FROM partials")
        return LoadedState(self.replica_id, actors, entries, keys, self._shared_ids, (number, origin))

    # -- writes ------------------------------------------------------------------

    def write_own(self, partials: dict[str, int], keys: Sequence[IdempotencyRecord] = ()) -> Deferred[None]:
        # Own rows commit alone: no peer row, whatever a peer sent, can
        # make this node's own increments fail.
        own = [(name, self.replica_id, count) for name, count in partials.items()]
        return self._in_thread(self._commit, own, keys)

    def write_peers(self, counters: dict[str, Partials]) -> None:
        backlog = self._peer_backlog
        for name, partials in counters.items():
            for replica, count in partials.items():
                if count > backlog.get((name, replica), 0):
                    backlog[(name, replica)] = count
        if self._flush_call is None and not self._closed:
            self._flush_call = self.reactor.callLater(self.settings.peer_flush_interval, self._flush_peers)

    def write_config(self, actors: list[str], version: tuple[int, str] = (0, "")) -> Deferred[None]:
        values = {"actors": json.dumps(actors), "config_version": json.dumps(list(version))}
        return self._in_thread(self._set_meta_durably, values)

    def size_bytes(self) -> int | None:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += (self.path / (DB_FILE + suffix)).stat().st_size
            except OSError:
                pass
        return total

    def renew_identity(self) -> Deferred[str]:
        replica_id = new_replica_id()
        shared = sorted(self._shared_ids | {self.replica_id})
        d = self._in_thread(self._set_meta_durably, {"replica_id": replica_id, "shared_ids": json.dumps(shared)})
        d.addCallback(lambda _: setattr(self, "replica_id", replica_id))
        d.addCallback(lambda _: setattr(self, "_shared_ids", frozenset(shared)))
        d.addCallback(lambda _: replica_id)
        return d

    def flush(self) -> Deferred[None]:
        """Write peer partials now instead of at the next interval."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        peers = self._take_peer_backlog()
        if not peers:
            return succeed(None)
        d = self._in_thread(self._commit_peers, peers)
        d.addErrback(self._restore_peer_backlog, peers)
        return d

    def shutdown(self) -> Deferred[None]:
        """Write pending peer partials, mark the stop clean and checkpoint on
        the writer thread; then stop it and release the data dir."""
        if self._closed:
            return succeed(None)
        peers = self._begin_close()
        d = deferToThreadPool(self.reactor, self._pool, self._last_writes, peers)
        d.addErrback(lambda f: log.failure("could not finish the store's last writes", f))
        d.addBoth(lambda _: self._release())
        return d

    def close(self) -> None:
        """Write what is pending, stop the writer thread, release the lock."""
        if self._closed:
            return
        peers = self._begin_close()
        self._pool.stop()  # runs what was queued, then joins the thread
        try:
            self._last_writes(peers)
        except Exception:
            log.failure("could not finish the store's last writes")
        finally:
            self._release()

    def _begin_close(self) -> list[tuple[str, str, int]]:
        self._closed = True
        if self._checkpoints is not None and self._checkpoints.running:
            self._checkpoints.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        return self._take_peer_backlog()

    def _release(self) -> None:
        if not self._pool.joined:
            self._pool.stop()  # idle by now: returns at once
        self._db.close()
        self._lock.close()

    # -- on the writer thread --------------------------------------------------------

    def _commit(self, rows: list[tuple[str, str, int]], keys: Sequence[IdempotencyRecord]) -> None:
        if not keys and self._commit_in_one_statement(rows):
            return
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            self._upsert(rows)
            if keys:
                db.executemany(_INSERT_KEY, [attrs.astuple(k) for k in keys])
                self._prune_keys(keys[-1].created)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _commit_in_one_statement(self, rows: list[tuple[str, str, int]]) -> bool:
        """Upsert ``rows`` as one statement outside BEGIN/COMMIT, which
        SQLite makes its own transaction (all rows or none), durable before
        ``execute`` returns. The writer thread then takes the GIL back from
        the busy reactor once, not three times (BEGIN, upsert, COMMIT) or
        once per row: 9 % more single increments/s at 32 connections
        (docs/design.md). False, having done nothing, for rows the JSON
        statement cannot carry."""
        if len(rows) == 1:
            self._db.execute(_UPSERT_PARTIAL, rows[0])
            return True
        if len(rows) > _JSON_CHUNK_ROWS or any("\x00" in row[0] for row in rows):
            return False
        self._db.execute(_UPSERT_PARTIALS_JSON, (json.dumps(rows, ensure_ascii=False),))
        return True

    def _commit_peers(self, rows: list[tuple[str, str, int]]) -> None:
        """Commit peer rows; a row the database refuses for what it is (not
        for a full or failing disk) is logged and dropped, never retried
        forever, and the other rows are still written."""
        try:
            self._commit(rows, ())
        except sqlite3.OperationalError:
            raise  # the disk, not the data: the caller keeps them for later
        except Exception:
            self._commit_rows_one_by_one(rows)

    def _upsert(self, rows: list[tuple[str, str, int]]) -> None:
        """Upsert ``rows`` inside the caller's transaction, a JSON statement
        per chunk. SQLite's JSON reads a NUL character as the end of the
        string, so a counter name holding one goes through ``executemany``
        (names are checked UTF-8 otherwise; replica ids are plain ASCII)."""
        db = self._db
        plain = [row for row in rows if "\x00" not in row[0]]
        for start in range(0, len(plain), _JSON_CHUNK_ROWS):
            chunk = json.dumps(plain[start : start + _JSON_CHUNK_ROWS], ensure_ascii=False)
            db.execute(_UPSERT_PARTIALS_JSON, (chunk,))
        if len(plain) != len(rows):
            db.executemany(_UPSERT_PARTIAL, [row for row in rows if "\x00" in row[0]])

    def _commit_rows_one_by_one(self, rows: list[tuple[str, str, int]]) -> None:
        for row in rows:
            try:
                self._commit([row], ())
            except sqlite3.OperationalError:
                raise
            except Exception as e:
                log.error("dropped a peer partial the store cannot hold ({row!r}): {error}", row=row[:2], error=e)

    def _last_writes(self, peers: list[tuple[str, str, int]]) -> None:
        # Each step on its own: the clean-stop marker must be written even
        # if the peer rows cannot be.
        try:
            if peers:
                self._commit_peers(peers)
        except Exception:
            log.failure("could not write peer partials at shutdown; peers will send them again")
        self._set_meta("clean_shutdown", "1")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _prune_keys(self, now: float) -> None:
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        self._db.execute("DELETE FROM idempotency WHERE created < ?", (now - self.settings.idempotency_window,))
        self._db.execute(
            "DELETE FROM idempotency WHERE key IN "
            "(SELECT key FROM idempotency ORDER BY created DESC LIMIT -1 OFFSET ?)",
            (self.settings.idempotency_max_keys,),
        )

    def _set_meta(self, key: str, value: str) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _set_meta_durably(self, values: dict[str, str]) -> None:
        """Set meta entries in one transaction, with an fsync whatever the
        durability mode."""
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", values.items())
        finally:
            self._db.execute(f"PRAGMA synchronous={DURABILITY[self.settings.durability]}")

    def _checkpoint(self) -> Deferred[None]:
        d = self._in_thread(self._run_checkpoint)
        d.addErrback(lambda f: log.failure("WAL checkpoint failed", f))
        return d

    def _run_checkpoint(self) -> None:
        # Read the result here: a statement left open on the shared
        # connection would make the next COMMIT fail.
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    # -- helpers -----------------------------------------------------------------------

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._closed:
            return fail(StoreError("the store is closed"))
        return deferToThreadPool(self.reactor, self._pool, f, *args)

    def _flush_peers(self) -> None:
        self._flush_call = None
        self.flush()

    def _take_peer_backlog(self) -> list[tuple[str, str, int]]:
        backlog, self._peer_backlog = self._peer_backlog, {}
        return [(name, replica, count) for (name, replica), count in backlog.items()]

    def _restore_peer_backlog(self, failure: Any, peers: list[tuple[str, str, int]]) -> None:
        log.failure("could not store {n} peer partials; will retry", failure, n=len(peers))
        if not self._closed:
            self.write_peers({name: {replica: count} for name, replica, count in peers})


def _lock_data_dir(path: Path) -> Any:
    """Create the data dir if needed, check it is writable, and lock it so
    that two nodes never share one."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{path}: cannot create the data directory: {e.strerror or e}") from None
    lock_path = path / LOCK_FILE
    try:
        lock = open(lock_path, "a+")
    except OSError as e:
        raise StoreError(f"{lock_path}: data directory is not writable: {e.strerror or e}") from None
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise StoreError(
            f"{lock_path}: the data directory is in use by another running counterdb (pid {holder})"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _open_database(db_path: Path, synchronous: str) -> sqlite3.Connection:
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        needed = ".".join(map(str, MIN_SQLITE))
        found = sqlite3.sqlite_version
        raise StoreError(f"{db_path}: needs SQLite {needed} or newer (STRICT tables); this Python has {found}")
    existed = db_path.exists()
    try:
        db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise StoreError(f"{db_path}: cannot open the database: {e}") from None
    try:
        _create_or_upgrade(db, db_path)
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{db_path}: cannot switch to WAL mode (got {mode!r})")
        db.execute(f"PRAGMA synchronous={synchronous}")
        _read_ahead(db_path)
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise StoreError(f"{db_path}: the database is corrupt: {'; '.join(problems[:3])}")
    except sqlite3.DatabaseError as e:
        db.close()
        what = "is corrupt or not a counterdb database" if existed else "cannot be created"
        raise StoreError(f"{db_path}: {what}: {e}") from None
    except BaseException:
        db.close()
        raise
    return db


def _read_ahead(db_path: Path) -> None:
    """Read the file once, sequentially: the integrity check and the load
    that follow then find it in the page cache instead of reading it page by
    page (measured: 0.4 s instead of 4-5 s for 180 MiB not yet cached)."""
    with open(db_path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


def _create_or_upgrade(db: sqlite3.Connection, db_path: Path) -> None:
    """Leave ``db`` at :data:`SCHEMA_VERSION`: create it if empty, upgrade
    it if older, refuse it if newer (a downgrade would misread it)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if version == 0 and tables == 0:
        _create_schema(db)
    elif version > SCHEMA_VERSION:
        raise StoreError(
            f"{db_path}: schema version {version} is newer than this counterdb ({__version__}) reads "
            f"(up to {SCHEMA_VERSION}): a newer release wrote it; run that release, or restore the "
            f"{migrations.backup_path(db_path, SCHEMA_VERSION).name} that it made when upgrading (docs/operations.md)"
        )
    elif version < migrations.OLDEST_SCHEMA:
        raise StoreError(
            f"{db_path}: unknown schema version {version} (this counterdb reads versions "
            f"{migrations.OLDEST_SCHEMA} to {SCHEMA_VERSION}); refusing to touch it"
        )
    elif version < SCHEMA_VERSION:
        try:
            migrations.upgrade(db, db_path, version, SCHEMA_VERSION)
        except migrations.MigrationError as e:
            raise StoreError(str(e)) from None


def _create_schema(db: sqlite3.Connection) -> None:
    db.execute("BEGIN IMMEDIATE")
    for statement in _SCHEMA.strip().split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT INTO meta (key, value) VALUES ('replica_id', ?)", (new_replica_id(),))
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    db.execute("COMMIT")
