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
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.task import Cooperator, LoopingCall
from twisted.logger import Logger

from counterdb import __version__, migrations
from counterdb.crdt import Partials
from counterdb.writer import WriterError, WriterProcess
from counterdb.writes import Writes

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

    def write_problem(self) -> str | None:
        """Why the store can write nothing more until the node restarts, or
        None (a full disk is not such a problem: it passes)."""

    @property
    def writer_restarts(self) -> int:
        """Writer processes that died and were replaced so far."""

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

    def write_problem(self) -> str | None:
        return None

    writer_restarts = 0

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

#: Peer rows per write handed to the writer process (one transaction each).
PEER_ROWS_PER_WRITE = 5_000

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

    All writes run, one after another, in the store's writer process
    (:mod:`counterdb.writer`), so the reactor never waits for the disk, a
    commit never waits for the reactor's GIL, and SQLite never sees two
    writers. The node's group commit hands over one batch at a time. This
    process's own connection reads the file at start-up and writes only
    when the store closes without a reactor (:meth:`close`).
    """

    def __init__(self, data_dir: str, reactor: Any, settings: StoreSettings = StoreSettings()) -> None:
        if settings.durability not in DURABILITY:
            raise ValueError(f"durability must be one of {sorted(DURABILITY)}")
        self.path = Path(data_dir)
        self.reactor = reactor
        self.settings = settings
        synchronous = self._synchronous = DURABILITY[settings.durability]
        key_limits = (settings.idempotency_window, settings.idempotency_max_keys)
        self._lock = _lock_data_dir(self.path)
        self._db: sqlite3.Connection | None = None
        self._writer: WriterProcess | None = None
        try:
            # Forked first: an SQLite connection must not cross a fork.
            try:
                self._writer = WriterProcess(
                    reactor, self.path / DB_FILE, synchronous, *key_limits, before_fork=self._close_reader
                )
            except WriterError as e:
                raise StoreError(f"{self.path}: {e}") from None
            self._db = _open_database(self.path / DB_FILE, synchronous)
            self.replica_id = self._claim_identity(settings.durability)
        except BaseException:
            if self._writer is not None:
                self._writer.stop_now()
            self._release()
            raise
        self._peer_backlog: dict[tuple[str, str], int] = {}
        self._unsent: Iterator[tuple[tuple[str, str], int]] = iter(())  # of the flush under way
        self._cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        self._flush_call: Any = None
        self._checkpoints: LoopingCall | None = None
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
        meta = dict(self._reader().execute("SELECT key, value FROM meta"))
        replica_id = meta["replica_id"]
        # The clean-stop record must be on disk before the first increment,
        # whatever the durability mode, or a power loss right after a clean
        # start would look like a clean stop. Which release writes the store
        # from now on goes with it (for operators rolling back).
        record = {"clean_shutdown": "0", "written_by": __version__}
        if durability == "fast" and meta.get("clean_shutdown") == "0":
            replica_id = record["replica_id"] = new_replica_id()
            log.warn(
                "{db}: the last run did not shut down cleanly and fast durability may have lost its "
                "last commits; continuing as new replica {new} (was {old})",
                db=str(self.path / DB_FILE),
                new=replica_id,
                old=meta["replica_id"],
            )
        self._writes_here().set_meta_durably(record)
        return replica_id

    def load(self) -> LoadedState:
        db = self._reader()
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
        return self._in_writer("commit", own, [attrs.astuple(key) for key in keys])

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
        return self._in_writer("set_meta_durably", values)

    def size_bytes(self) -> int | None:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += (self.path / (DB_FILE + suffix)).stat().st_size
            except OSError:
                pass
        return total

    def write_problem(self) -> str | None:
        return self._writer.problem if self._writer is not None else None

    @property
    def writer_restarts(self) -> int:
        return self._writer.restarts if self._writer is not None else 0

    def renew_identity(self) -> Deferred[str]:
        replica_id = new_replica_id()
        shared = sorted(self._shared_ids | {self.replica_id})
        d = self._in_writer("set_meta_durably", {"replica_id": replica_id, "shared_ids": json.dumps(shared)})
        d.addCallback(lambda _: setattr(self, "replica_id", replica_id))
        d.addCallback(lambda _: setattr(self, "_shared_ids", frozenset(shared)))
        d.addCallback(lambda _: replica_id)
        return d

    def flush(self) -> Deferred[None]:
        """Write peer partials now instead of at the next interval.

        They go to the writer in chunks of :data:`PEER_ROWS_PER_WRITE`,
        each its own transaction, as many per reactor turn as fit in about
        10 ms: handing a million rows over at once (a node catching up)
        held the reactor for half a second to pickle them."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        backlog, self._peer_backlog = self._peer_backlog, {}
        if not backlog:
            return succeed(None)
        unsent = self._unsent = iter(backlog.items())
        written: list[Deferred[None]] = []

        def send_chunks() -> Iterator[None]:
            while chunk := _rows(islice(unsent, PEER_ROWS_PER_WRITE)):
                d = self._in_writer("commit_peers", chunk)
                d.addErrback(self._restore_peer_backlog, chunk)
                written.append(d)
                yield None

        d = self._cooperator.cooperate(send_chunks()).whenDone()
        d.addCallback(lambda _: gatherResults(written))
        d.addCallback(lambda _: None)
        return d

    def shutdown(self) -> Deferred[None]:
        """Write pending peer partials, mark the stop clean and checkpoint in
        the writer process; then stop it and release the data dir."""
        if self._closed:
            return succeed(None)
        writer = self._writer
        assert writer is not None
        peers = self._begin_close()
        d = writer.call("last_writes", peers)
        d.addCallbacks(lambda _: writer.stop(), self._last_writes_here_instead, errbackArgs=(writer, peers))
        d.addBoth(lambda _: self._release())
        return d

    def _last_writes_here_instead(self, failure: Any, writer: WriterProcess, peers: list[tuple[str, str, int]]) -> Any:
        """The writer could not make the last writes (it gave up): stop it
        and make them from this process, so that the stop is still marked
        clean. Blocking, once, at shutdown."""
        log.failure("the store's writer could not make the last writes; making them from the node", failure)
        d = writer.stop()
        d.addCallback(lambda _: self._last_writes_here(peers))
        return d

    def close(self) -> None:
        """Stop the writer process (what it had not acknowledged is not
        waited for: nobody was told it was written), then write what is
        pending from here and release the lock."""
        if self._closed:
            return
        peers = self._begin_close()
        assert self._writer is not None
        self._writer.stop_now()
        try:
            self._last_writes_here(peers)
        finally:
            self._release()

    def _last_writes_here(self, peers: list[tuple[str, str, int]]) -> None:
        """The last writes on this process's connection, once no writer
        process runs."""
        writes = None
        try:
            writes = self._writes_here()
            writes.last_writes(peers)
        except Exception:
            log.failure("could not finish the store's last writes")
        for warning in writes.warnings if writes is not None else ():
            log.warn("store: {warning}", warning=warning)

    def _begin_close(self) -> list[tuple[str, str, int]]:
        self._closed = True
        if self._checkpoints is not None and self._checkpoints.running:
            self._checkpoints.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        # Rows a flush had not handed over yet go with the last writes.
        return self._take_peer_backlog() + _rows(self._unsent)

    def _release(self) -> None:
        self._close_reader()
        self._lock.close()

    # -- this process's own connection ----------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        """This process's connection: for start-up, :meth:`load`, and the
        writes of :meth:`close` once the writer process has ended."""
        if self._db is None:
            self._db = sqlite3.connect(self.path / DB_FILE, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA synchronous={self._synchronous}")
        return self._db

    def _writes_here(self) -> Writes:
        s = self.settings
        return Writes(self._reader(), self._synchronous, s.idempotency_window, s.idempotency_max_keys)

    def _close_reader(self) -> None:
        """Close this process's connection (before a new writer is forked;
        it is opened again when needed)."""
        db, self._db = self._db, None
        if db is not None:
            db.close()

    # -- helpers -----------------------------------------------------------------------

    def _in_writer(self, operation: str, *args: Any) -> Deferred[Any]:
        if self._closed or self._writer is None:
            return fail(StoreError("the store is closed"))
        return self._writer.call(operation, *args)

    def _checkpoint(self) -> Deferred[None]:
        d = self._in_writer("checkpoint")
        d.addErrback(lambda f: log.failure("WAL checkpoint failed", f))
        return d

    def _flush_peers(self) -> None:
        self._flush_call = None
        self.flush()

    def _take_peer_backlog(self) -> list[tuple[str, str, int]]:
        backlog, self._peer_backlog = self._peer_backlog, {}
        return _rows(backlog.items())

    def _restore_peer_backlog(self, failure: Any, peers: list[tuple[str, str, int]]) -> None:
        log.failure("could not store {n} peer partials; will retry", failure, n=len(peers))
        if not self._closed:
            self.write_peers({name: {replica: count} for name, replica, count in peers})


def _rows(backlog: Iterable[tuple[tuple[str, str], int]]) -> list[tuple[str, str, int]]:
    """Peer backlog entries as the writer's rows: (counter, replica, count)."""
    return [(name, replica, count) for (name, replica), count in backlog]


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
