"""Dialects: the only place where SQLite and PostgreSQL differ; the database URL that picks one
(``_dialect_for``, ``redact_url``); and the connection pool both share."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
from contextlib import closing, contextmanager
from datetime import datetime
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg

from .records import StoreError, _utc

POOL_WAIT_S = 10.0  # PostgreSQL: longest wait for a free pooled connection before StoreError (503)

log = logging.getLogger("cds_service.store")


class _Dialect:
    name: str
    column_types: dict[str, str]
    begin_write: str | None  # statement that opens a write transaction (None: implicit)
    begin_read: str | None
    migration_lock: str | None  # serialises concurrent migrations (workers starting together)
    pool_size: int
    unavailable: tuple[type[BaseException], ...]  # driver errors that mean "database unavailable"

    def sql(self, text: str) -> str:
        """Our SQL is written with ``?`` placeholders and ``{id}``/``{ts}`` column types."""
        return text.format(**self.column_types)

    def ts(self, value: datetime) -> Any:
        raise NotImplementedError

    def read_ts(self, value: Any) -> datetime:
        raise NotImplementedError

    def wait_s(self) -> float:
        """How long one transaction may wait in all, for a pooled connection and for locks."""
        return POOL_WAIT_S

    def connect(self, wait_s: float) -> Any:
        """A new connection; ``wait_s``: what is left of the transaction's wait."""
        raise NotImplementedError

    def limit_lock_wait(self, conn: Any, wait_s: float) -> None:
        """Make the next statements give up waiting for another writer's lock after ``wait_s``."""

    def usable(self, conn: Any) -> bool:
        """Can this connection serve again after the transaction that just ended?"""
        return True

    def reuse(self, conn: Any, wait_s: float) -> Any:
        """The connection to hand out for ``conn``, an idle one taken from the pool: ``conn`` itself
        or a new one (then ``conn`` is closed). If this raises, ``conn`` is untouched and goes back
        to the pool."""
        return conn


class _SQLiteConnection(sqlite3.Connection):
    """A connection that remembers the file it opened: (st_dev, st_ino)."""

    file_id: tuple[int, int] | None = None


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


class _SQLite(_Dialect):
    name = "sqlite"
    column_types = {"id": "INTEGER PRIMARY KEY", "ts": "TEXT"}
    begin_write = "BEGIN IMMEDIATE"  # take the write lock first: no deadlock on lock upgrade
    begin_read = "BEGIN"
    migration_lock = None  # BEGIN IMMEDIATE already serialises writers
    pool_size = 1  # one connection per process, shared under the pool's lock
    unavailable = (sqlite3.Error,)

    def __init__(self, path: str, busy_timeout_s: float) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s

    def describe(self) -> str:
        return f"sqlite:///{self.path}"

    def ts(self, value: datetime) -> str:
        # Fixed-width ISO 8601 in UTC: text order is time order.
        return _utc(value).isoformat(timespec="microseconds")

    def read_ts(self, value: Any) -> datetime:
        return datetime.fromisoformat(value)

    def wait_s(self) -> float:
        # One budget for the pool and the lock: with one shared connection, a request queued
        # behind the audit writer's locked batch must not wait two busy timeouts.
        return self.busy_timeout_s

    def connect(self, wait_s: float) -> _SQLiteConnection:
        conn = sqlite3.connect(self.path, timeout=wait_s, isolation_level=None, check_same_thread=False,
                               factory=_SQLiteConnection)
        try:
            if self.path != ":memory:":
                mode = self._switch_to_wal(conn, wait_s)
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"cannot switch to WAL journal mode (got {mode})")
                conn.file_id = _file_id(self.path)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def reuse(self, conn: _SQLiteConnection, wait_s: float) -> _SQLiteConnection:
        """``conn`` while the file at ``path`` is still the one it opened (one os.stat); otherwise a
        connection to the file now at ``path``, so that nothing is written into a deleted file.

        File deleted (with its -wal and -shm): ``conn`` still has them open, so the sqlite3 backup
        API copies everything committed, WAL content included, into a new file at ``path``. File
        replaced: the new file is used as it is, without re-running the migrations: they would run
        inside a transaction of this pool, and on an empty file they would create a new random
        patient-key secret, silently starting a new series of keys. A file without the schema makes
        every transaction fail as StoreError (503, feedback retried by the EHR) until the service is
        restarted, which migrates; restart after replacing the file in any case, as the store keeps
        the patient-key secret it read at start.

        ``conn`` is closed only once the new connection is open. Closing it leaves the new file alone:
        SQLite skips the checkpoint (and the deletion of ``<path>-wal`` and ``<path>-shm``) when a
        connection's file was unlinked or renamed. Limit with several workers: a transaction another
        worker commits while this one copies the file still goes to the deleted file."""
        if self.path == ":memory:":
            return conn
        now = _file_id(self.path)
        if now is not None and now == conn.file_id:
            return conn
        # First empty conn's WAL into conn's own file: a -wal and -shm left at the path are conn's,
        # and a new connection would read their frames as pages of the new file.
        if conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
            raise StoreError(f"database {self.describe()}: the file was {'deleted' if now is None else 'replaced'}"
                             " and another connection still reads the old one")
        restored = now is None and self._restore(conn)
        if restored:
            log.warning("store %s: the database file was missing; restored it from the open connection",
                        self.describe())
        fresh = self.connect(wait_s)  # if this fails: StoreError for the caller, conn goes on waiting
        if not restored:
            log.warning("store %s: the database file was replaced; using the new file", self.describe())
        _close_quietly(conn)
        return fresh

    def _restore(self, conn: sqlite3.Connection) -> bool:
        """Copy ``conn``'s database into a new file at ``path``, linked there only once complete;
        False if a file appeared there meanwhile (another worker restored it first)."""
        directory, name = os.path.split(os.path.abspath(self.path))
        copy = None
        try:
            fd, copy = tempfile.mkstemp(prefix=f"{name}.restore-", dir=directory)
            os.close(fd)
            with closing(sqlite3.connect(copy, isolation_level=None)) as target:
                target.execute("PRAGMA synchronous=FULL")
                conn.backup(target)
            try:
                os.link(copy, self.path)  # all at once, and never over a file another worker put there
            except FileExistsError:
                return False
            dir_fd = os.open(directory, os.O_RDONLY)  # make the new name durable
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            return True
        except OSError as exc:
            raise StoreError(f"database {self.describe()}: the file was deleted and cannot be restored: "
                             f"{exc.strerror or type(exc).__name__}") from None
        finally:
            if copy is not None:
                try:
                    os.unlink(copy)
                except OSError:
                    pass

    def limit_lock_wait(self, conn: sqlite3.Connection, wait_s: float) -> None:
        conn.execute(f"PRAGMA busy_timeout = {max(1, int(wait_s * 1000))}")

    def _switch_to_wal(self, conn: sqlite3.Connection, wait_s: float) -> str:
        """PRAGMA journal_mode=WAL, retried until the busy timeout: several workers opening a new
        database at once race for the exclusive lock the switch needs, and SQLite answers "locked"
        at once rather than through the busy handler."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)


class _Postgres(_Dialect):
    name = "postgresql"
    column_types = {"id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "ts": "TIMESTAMPTZ"}
    begin_write = None  # psycopg opens a transaction on the first statement
    begin_read = None
    migration_lock = "SELECT pg_advisory_xact_lock(7242017)"
    pool_size = 4
    unavailable = (psycopg.Error,)

    def __init__(self, url: str, connect_timeout_s: float) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s

    def describe(self) -> str:
        return redact_url(self.url)

    def sql(self, text: str) -> str:
        return super().sql(text).replace("?", "%s")

    def ts(self, value: datetime) -> datetime:
        return _utc(value)

    def read_ts(self, value: Any) -> datetime:
        return value

    def connect(self, wait_s: float) -> psycopg.Connection:
        # A server that goes away must not hang a request: TCP keepalives and a user timeout end a dead
        # connection (a server that accepts bytes and never answers is bounded by the app's store timeout).
        return psycopg.connect(
            self.url,
            connect_timeout=max(1, round(self.connect_timeout_s)),
            autocommit=False,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=2,
            tcp_user_timeout=int(self.connect_timeout_s * 1000),
        )

    def usable(self, conn: psycopg.Connection) -> bool:
        return not (conn.closed or conn.broken)


def _dialect_for(database_url: str, busy_timeout_s: float, connect_timeout_s: float) -> _Dialect:
    if database_url.startswith("sqlite:///"):
        path = database_url[len("sqlite:///"):]
        if not path:
            raise StoreError("sqlite URL without a path: use sqlite:///file.db, sqlite:////abs/path or sqlite:///:memory:")
        return _SQLite(path, busy_timeout_s)
    if database_url.startswith(("postgresql://", "postgres://")):
        return _Postgres(database_url, connect_timeout_s)
    raise StoreError(f"unsupported database URL {redact_url(database_url)!r}: use sqlite:///... or postgresql://...")


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
    except ValueError:
        return re.sub(r"//[^@/]*@", "//***@", url)


def _error_text(exc: BaseException) -> str:
    """A driver error without stored values: PostgreSQL's primary message (not its DETAIL, which
    can quote row values), SQLite's message; never a password."""
    diag = getattr(exc, "diag", None)
    text = getattr(diag, "message_primary", None) if diag is not None else None
    if not text:
        lines = str(exc).strip().splitlines()
        text = lines[0] if lines else "no message"
    text = re.sub(r"password=\S+", "password=***", text.strip())
    return f"{type(exc).__name__}: {text}"


# ---------------------------------------------------------------------------------------------
# Connections: a tiny blocking pool. Size 1 for SQLite (a lock around one connection), a few for
# PostgreSQL. A connection that failed is closed and replaced on next use.
# ---------------------------------------------------------------------------------------------


class _Pool:
    def __init__(self, dialect: _Dialect) -> None:
        self._dialect = dialect
        self._idle: list[Any] = []
        self._open = 0
        self._closed = False
        self._cond = threading.Condition()

    @contextmanager
    def connection(self, deadline: float) -> Iterator[Any]:
        """A connection, waited for until ``deadline`` (time.monotonic) at most."""
        conn = self._acquire(deadline)
        try:
            yield conn
        finally:
            self._release(conn, self._dialect.usable(conn))

    def _acquire(self, deadline: float) -> Any:
        idle = None
        with self._cond:
            while True:
                if self._closed:
                    raise StoreError("the store is closed")
                if self._idle:
                    idle = self._idle.pop()
                    break
                if self._open < self._dialect.pool_size:
                    self._open += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(timeout=left):
                    raise StoreError("no database connection became free in time")
        if idle is not None:
            try:
                return self._dialect.reuse(idle, max(deadline - time.monotonic(), 0.001))
            except BaseException:
                self._release(idle, True)
                raise
        try:
            return self._dialect.connect(max(deadline - time.monotonic(), 0.001))
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _release(self, conn: Any, usable: bool) -> None:
        with self._cond:
            if usable and not self._closed:
                self._idle.append(conn)
            else:
                self._open -= 1
                _close_quietly(conn)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for conn in self._idle:
                _close_quietly(conn)
            self._open -= len(self._idle)
            self._idle.clear()
            self._cond.notify_all()


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail too
        pass


def _rollback_quietly(conn: Any) -> None:
    try:
        conn.rollback()
    except Exception:  # noqa: BLE001 - the connection is discarded anyway
        pass
