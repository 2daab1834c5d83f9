"""Audit and feedback storage: one small interface, two real back-ends (SQLite and PostgreSQL).

    store = open_store("sqlite:///cds_service.db")      # or postgresql://user@host:5432/db
    store.record_decision(record)                       # the audit of one hook call (usually via AuditWriter)
    store.record_feedback("lumbar-imaging-order-sign", items)
    store.report(since, until)                          # raw counts; cds_service.report shapes them

Database URLs
    sqlite:///cds_service.db       a file in the working directory (the default)
    sqlite:////var/lib/cds/cds.db  an absolute path (four slashes: "sqlite:///" + "/var/...")
    sqlite:///:memory:             a private in-memory database (tests)
    postgresql://user:password@host:5432/dbname?options=-csearch_path%3Dcds   (psycopg 3 conninfo URL)

Both back-ends run the same SQL. Everything that differs between the dialects lives in the two
``_Dialect`` objects at the end of the "Dialects" section: placeholders, column types, how a
transaction starts, how a timestamp is bound, how connections are opened and which errors mean
"the database is unavailable".

Durability: a write method returns only after COMMIT. SQLite runs in WAL mode with
synchronous=FULL (the commit is fsynced); PostgreSQL commits with its default synchronous_commit.
Several uvicorn workers can share one SQLite file: WAL lets readers and one writer work together,
write transactions start with BEGIN IMMEDIATE and wait up to ``busy_timeout_s`` for the lock.

Patient keys: the audit never stores a patient id, only ``patient_key(id, secret)``, an HMAC-SHA256
truncated to 128 bits. The secret is CDS_AUDIT_KEY when set; otherwise a random per-database secret
created by the first migration and kept in the ``store_meta`` table (``Store.patient_key``). That
makes keys stable across restarts and workers sharing the database, but anyone who can read the
database can recompute the key of a patient id they already know: it is pseudonymisation, not
anonymisation. Set CDS_AUDIT_KEY (the same value on every replica) to keep the secret out of the
database; changing it starts a new series of keys.

Errors: every method raises ``StoreError`` when the database is unavailable, locked or broken, with
a message that names the database without its password and never contains stored values.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import re
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import psycopg

log = logging.getLogger(__name__)

UTC = timezone.utc
POOL_WAIT_S = 10.0  # longest wait for a free pooled connection before StoreError (503)


class StoreError(Exception):
    """The database is unavailable, locked or refused the operation; the app answers 503."""


@dataclass(frozen=True)
class CardRecord:
    uuid: str
    card_type: str  # source.topic.code: imaging-not-indicated | imaging-indicated | cauda-equina-emergency | ...
    indicator: str
    rule: str  # e.g. "W1", "R1", "C3", "F1"
    order_ref: str | None  # e.g. "ServiceRequest/abc"
    fact_ids: tuple[str, ...]  # e.g. ("RF-CANCER",)
    fact_refs: tuple[str, ...]  # FHIR references behind the facts, e.g. ("Condition/12",)
    suggestion_uuids: tuple[str, ...]
    shown: bool = True  # False when held back in silent mode


@dataclass(frozen=True)
class DecisionRecord:
    hook_instance: str
    service_id: str
    hook: str
    evaluated_at: datetime  # UTC (a naive datetime is taken as UTC)
    patient_key: str | None  # patient_key() of the patient id, never the id
    mode: str  # live | silent
    knowledge_version: str
    status: int  # HTTP status answered (200, 412, ...)
    cards: tuple[CardRecord, ...]


@dataclass(frozen=True)
class FeedbackResult:
    stored: int  # new rows
    duplicates: int  # items already stored (same natural key)
    unknown_cards: int  # of the new rows, those whose card uuid is not in the audit (stored with linked=false)


def patient_key(patient_id: str, secret: str | bytes) -> str:
    """The keyed hash stored instead of a patient id: HMAC-SHA256(secret, id), first 32 hex digits."""
    if not secret:
        raise ValueError("patient_key needs a secret: CDS_AUDIT_KEY or Store.audit_secret")
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Schema: numbered migrations, applied in order at open, each in its own transaction together
# with its row in schema_version. {id} and {ts} are replaced by the dialect's column types.
# A step is SQL text or a function (cursor, dialect) for what SQL alone cannot do.
# Never edit a released migration: append a new one.
# ---------------------------------------------------------------------------------------------


def _create_audit_secret(cur: Any, dialect: "_Dialect") -> None:
    cur.execute(
        dialect.sql("INSERT INTO store_meta (key, value) VALUES ('patient_key_secret', ?)"),
        (secrets.token_hex(32),),
    )


MIGRATIONS: list[tuple[int, str, tuple[str | Callable[[Any, "_Dialect"], None], ...]]] = [
    (
        1,
        "audit of decisions and cards; per-database patient key secret",
        (
            "CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            _create_audit_secret,
            """CREATE TABLE decisions (
                id {id},
                hook_instance TEXT NOT NULL,
                service_id TEXT NOT NULL,
                hook TEXT NOT NULL,
                evaluated_at {ts} NOT NULL,
                iso_week TEXT NOT NULL,
                patient_key TEXT,
                mode TEXT NOT NULL,
                knowledge_version TEXT NOT NULL,
                status INTEGER NOT NULL
            )""",
            "CREATE INDEX decisions_evaluated_at ON decisions (evaluated_at)",
            """CREATE TABLE cards (
                card_uuid TEXT PRIMARY KEY,
                decision_id BIGINT NOT NULL REFERENCES decisions (id),
                card_type TEXT NOT NULL,
                indicator TEXT NOT NULL,
                rule TEXT NOT NULL,
                order_ref TEXT,
                fact_ids TEXT NOT NULL,
                fact_refs TEXT NOT NULL,
                shown BOOLEAN NOT NULL
            )""",
            "CREATE INDEX cards_decision_id ON cards (decision_id)",
            """CREATE TABLE card_suggestions (
                suggestion_uuid TEXT PRIMARY KEY,
                card_uuid TEXT NOT NULL REFERENCES cards (card_uuid),
                position INTEGER NOT NULL
            )""",
            "CREATE INDEX card_suggestions_card_uuid ON card_suggestions (card_uuid)",
        ),
    ),
    (
        2,
        "feedback (CDS Hooks 2.0), idempotent on a natural key",
        (
            """CREATE TABLE feedback (
                id {id},
                natural_key TEXT NOT NULL UNIQUE,
                service_id TEXT NOT NULL,
                card_uuid TEXT NOT NULL,
                outcome TEXT NOT NULL,
                outcome_at {ts} NOT NULL,
                reason_system TEXT,
                reason_code TEXT,
                reason_display TEXT,
                user_comment TEXT,
                linked BOOLEAN NOT NULL,
                received_at {ts} NOT NULL
            )""",
            "CREATE INDEX feedback_card_uuid ON feedback (card_uuid)",
            "CREATE INDEX feedback_received_at ON feedback (received_at)",
            """CREATE TABLE feedback_suggestions (
                feedback_id BIGINT NOT NULL REFERENCES feedback (id),
                suggestion_uuid TEXT NOT NULL,
                PRIMARY KEY (feedback_id, suggestion_uuid)
            )""",
        ),
    ),
    (
        3,
        "JWT jti replay cache shared by workers and replicas",
        (
            "CREATE TABLE jti_seen (key TEXT PRIMARY KEY, expires_at DOUBLE PRECISION NOT NULL)",
            "CREATE INDEX jti_seen_expires_at ON jti_seen (expires_at)",
        ),
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


# ---------------------------------------------------------------------------------------------
# Dialects: the only place where SQLite and PostgreSQL differ.
# ---------------------------------------------------------------------------------------------


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

    def connect(self) -> Any:
        raise NotImplementedError

    def usable(self, conn: Any) -> bool:
        """Can this connection serve again after the transaction that just ended?"""
        return True


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

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            if self.path != ":memory:":
                mode = self._switch_to_wal(conn)
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"cannot switch to WAL journal mode (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
        return conn


    def _switch_to_wal(self, conn: sqlite3.Connection) -> str:
        """PRAGMA journal_mode=WAL, retried until the busy timeout: several workers opening a new
        database at once race for the exclusive lock the switch needs, and SQLite answers "locked"
        at once rather than through the busy handler."""
        deadline = time.monotonic() + self.busy_timeout_s
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

    def connect(self) -> psycopg.Connection:
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
    def connection(self) -> Iterator[Any]:
        conn = self._acquire()
        try:
            yield conn
        finally:
            self._release(conn, self._dialect.usable(conn))

    def _acquire(self) -> Any:
        with self._cond:
            while True:
                if self._closed:
                    raise StoreError("the store is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self._dialect.pool_size:
                    self._open += 1
                    break
                if not self._cond.wait(timeout=POOL_WAIT_S):
                    raise StoreError("no database connection became free in time")
        try:
            return self._dialect.connect()
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


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class Store:
    """Audit, feedback and the jti replay cache. Thread-safe; open it with ``open_store``."""

    def __init__(self, dialect: _Dialect) -> None:
        self._dialect = dialect
        self._pool = _Pool(dialect)
        self.audit_secret = ""

    @property
    def dialect(self) -> str:
        return self._dialect.name

    def __repr__(self) -> str:
        return f"<Store {self._dialect.describe()}>"

    # -- transactions -----------------------------------------------------------------------

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[Any]:
        """A cursor inside one transaction: committed on success, rolled back on any error.
        Driver errors become StoreError (message without stored values)."""
        d = self._dialect
        try:
            with self._pool.connection() as conn:
                cur = conn.cursor()
                begin = d.begin_write if write else d.begin_read
                if begin:
                    cur.execute(begin)
                try:
                    yield cur
                    conn.commit()
                except BaseException:
                    _rollback_quietly(conn)
                    raise
                finally:
                    cur.close()
        except d.unavailable as exc:
            raise StoreError(f"database {d.describe()} unavailable: {_error_text(exc)}") from None

    def _execute(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self._dialect.sql(sql), tuple(params))
        return cur

    # -- schema -----------------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply the migrations not yet applied; returns their numbers. Safe to run again and
        from several processes at once."""
        d = self._dialect
        applied: list[int] = []
        with self._transaction() as cur:
            if d.migration_lock:
                cur.execute(d.migration_lock)
            self._execute(
                cur,
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at {ts} NOT NULL)",
            )
        for version, description, steps in MIGRATIONS:
            with self._transaction() as cur:
                if d.migration_lock:
                    cur.execute(d.migration_lock)
                done = self._execute(cur, "SELECT 1 FROM schema_version WHERE version = ?", (version,)).fetchone()
                if done:
                    continue
                for step in steps:
                    if callable(step):
                        step(cur, d)
                    else:
                        self._execute(cur, step)
                self._execute(
                    cur,
                    "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                    (version, description, d.ts(_now())),
                )
                applied.append(version)
        with self._transaction(write=False) as cur:
            row = self._execute(cur, "SELECT value FROM store_meta WHERE key = 'patient_key_secret'").fetchone()
            self.audit_secret = row[0]
        if applied:
            log.info("store %s: applied migrations %s", d.describe(), applied)
        return applied

    def schema_versions(self) -> list[int]:
        with self._transaction(write=False) as cur:
            return [row[0] for row in self._execute(cur, "SELECT version FROM schema_version ORDER BY version")]

    def patient_key(self, patient_id: str, secret: str | None = None) -> str:
        """patient_key() with CDS_AUDIT_KEY when given, else this database's own random secret."""
        return patient_key(patient_id, secret or self.audit_secret)

    # -- audit ------------------------------------------------------------------------------

    def record_decision(self, record: DecisionRecord) -> None:
        self.record_decisions([record])

    def record_decisions(self, records: Iterable[DecisionRecord]) -> None:
        """Store several decisions in one transaction (what AuditWriter calls)."""
        d = self._dialect
        with self._transaction() as cur:
            for record in records:
                evaluated_at = _utc(record.evaluated_at)
                year, week, _ = evaluated_at.isocalendar()
                decision_id = self._execute(
                    cur,
                    "INSERT INTO decisions (hook_instance, service_id, hook, evaluated_at, iso_week, patient_key,"
                    " mode, knowledge_version, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (
                        record.hook_instance,
                        record.service_id,
                        record.hook,
                        d.ts(evaluated_at),
                        f"{year}-W{week:02d}",
                        record.patient_key,
                        record.mode,
                        record.knowledge_version,
                        record.status,
                    ),
                ).fetchone()[0]
                for card in record.cards:
                    inserted = self._execute(
                        cur,
                        "INSERT INTO cards (card_uuid, decision_id, card_type, indicator, rule, order_ref, fact_ids,"
                        " fact_refs, shown) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                        " ON CONFLICT (card_uuid) DO NOTHING RETURNING card_uuid",
                        (
                            card.uuid,
                            decision_id,
                            card.card_type,
                            card.indicator,
                            card.rule,
                            card.order_ref,
                            json.dumps(list(card.fact_ids)),
                            json.dumps(list(card.fact_refs)),
                            bool(card.shown),
                        ),
                    ).fetchone()
                    if not inserted:
                        continue  # the same card audited twice: keep the first
                    for position, suggestion_uuid in enumerate(card.suggestion_uuids, start=1):
                        self._execute(
                            cur,
                            "INSERT INTO card_suggestions (suggestion_uuid, card_uuid, position) VALUES (?, ?, ?)"
                            " ON CONFLICT (suggestion_uuid) DO NOTHING",
                            (suggestion_uuid, card.uuid, position),
                        )
                    # Feedback can overtake the (batched) audit of its card: link it now.
                    self._execute(
                        cur, "UPDATE feedback SET linked = ? WHERE card_uuid = ? AND NOT linked", (True, card.uuid)
                    )

    # -- feedback ---------------------------------------------------------------------------

    def record_feedback(self, service_id: str, items: list[dict]) -> FeedbackResult:
        """Store CDS Hooks 2.0 feedback items (already validated by the protocol layer).

        Idempotent: an item is identified by card uuid + outcome + outcomeTimestamp + override
        reason (system, code) + accepted suggestion ids; a repeat is counted, not stored. An item
        whose card is not in the audit is stored with linked=false. All items are committed in one
        transaction before this returns. Raises ValueError for an item without card uuid, outcome
        or a readable outcomeTimestamp (nothing is stored then)."""
        rows = [_feedback_row(item) for item in items]
        d = self._dialect
        stored = duplicates = unknown = 0
        received_at = d.ts(_now())
        with self._transaction() as cur:
            for row in rows:
                known = self._execute(cur, "SELECT 1 FROM cards WHERE card_uuid = ?", (row.card_uuid,)).fetchone()
                inserted = self._execute(
                    cur,
                    "INSERT INTO feedback (natural_key, service_id, card_uuid, outcome, outcome_at, reason_system,"
                    " reason_code, reason_display, user_comment, linked, received_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (natural_key) DO NOTHING RETURNING id",
                    (
                        row.natural_key,
                        service_id,
                        row.card_uuid,
                        row.outcome,
                        d.ts(row.outcome_at),
                        row.reason_system,
                        row.reason_code,
                        row.reason_display,
                        row.user_comment,
                        bool(known),
                        received_at,
                    ),
                ).fetchone()
                if not inserted:
                    duplicates += 1
                    continue
                stored += 1
                unknown += 0 if known else 1
                for suggestion_uuid in row.accepted_ids:
                    self._execute(
                        cur,
                        "INSERT INTO feedback_suggestions (feedback_id, suggestion_uuid) VALUES (?, ?)",
                        (inserted[0], suggestion_uuid),
                    )
        return FeedbackResult(stored=stored, duplicates=duplicates, unknown_cards=unknown)

    # -- JWT replay cache -------------------------------------------------------------------

    def remember_jti(self, key: str, expires_at: float) -> bool:
        """True if ``key`` (e.g. issuer + jti) is new or its earlier use has expired; False if it
        was seen and has not expired (a replay). Atomic across workers and replicas."""
        with self._transaction() as cur:
            self._execute(cur, "DELETE FROM jti_seen WHERE key = ? AND expires_at <= ?", (key, time.time()))
            inserted = self._execute(
                cur,
                "INSERT INTO jti_seen (key, expires_at) VALUES (?, ?) ON CONFLICT (key) DO NOTHING RETURNING key",
                (key, float(expires_at)),
            ).fetchone()
        return inserted is not None

    # -- retention --------------------------------------------------------------------------

    def purge(self, retention_days: int) -> int:
        """Delete decisions (with their cards) evaluated, and feedback received, more than
        ``retention_days`` ago, and every expired jti; returns the number of rows removed."""
        if retention_days < 0:
            raise ValueError("retention_days must be 0 or more")
        cutoff = self._dialect.ts(_now() - timedelta(days=retention_days))
        old_cards = "SELECT c.card_uuid FROM cards c JOIN decisions d ON d.id = c.decision_id WHERE d.evaluated_at < ?"
        steps = [
            (f"DELETE FROM card_suggestions WHERE card_uuid IN ({old_cards})", (cutoff,)),
            ("DELETE FROM cards WHERE decision_id IN (SELECT id FROM decisions WHERE evaluated_at < ?)", (cutoff,)),
            ("DELETE FROM decisions WHERE evaluated_at < ?", (cutoff,)),
            (
                "DELETE FROM feedback_suggestions WHERE feedback_id IN (SELECT id FROM feedback WHERE received_at < ?)",
                (cutoff,),
            ),
            ("DELETE FROM feedback WHERE received_at < ?", (cutoff,)),
            ("DELETE FROM jti_seen WHERE expires_at <= ?", (time.time(),)),
        ]
        removed = 0
        with self._transaction() as cur:
            for sql, params in steps:
                removed += self._execute(cur, sql, params).rowcount
        return removed

    # -- report -----------------------------------------------------------------------------

    def report(self, since: date | None = None, until: date | None = None) -> dict:
        """Raw counts for the override report (cds_service.report.build_report shapes them).

        Cards, and the feedback about them, are selected by the day their decision was evaluated
        (UTC), ``since`` and ``until`` both included. Feedback about cards not in the audit is
        selected by its outcomeTimestamp."""
        d = self._dialect
        start = d.ts(datetime.combine(since, datetime.min.time(), UTC) if since else datetime(1970, 1, 1, tzinfo=UTC))
        end = d.ts(datetime.combine(until + timedelta(days=1), datetime.min.time(), UTC) if until and until < date(9999, 1, 1) else datetime(9999, 1, 1, tzinfo=UTC))
        in_range = "d.evaluated_at >= ? AND d.evaluated_at < ?"
        has_feedback = "EXISTS (SELECT 1 FROM feedback f WHERE f.card_uuid = c.card_uuid{})"
        overridden = has_feedback.format(" AND f.outcome = 'overridden'")
        accepted = has_feedback.format(" AND f.outcome = 'accepted'")
        cards_from = f"FROM cards c JOIN decisions d ON d.id = c.decision_id WHERE {in_range}"
        counts = (
            "COUNT(*), SUM(CASE WHEN c.shown THEN 1 ELSE 0 END),"
            f" SUM(CASE WHEN c.shown AND {overridden} THEN 1 ELSE 0 END),"
            f" SUM(CASE WHEN c.shown AND {accepted} THEN 1 ELSE 0 END),"
            f" SUM(CASE WHEN c.shown AND NOT {has_feedback.format('')} THEN 1 ELSE 0 END)"
        )
        count_names = ("cards", "shown", "overridden", "accepted", "no_feedback")
        feedback_from = (
            "FROM feedback f JOIN cards c ON c.card_uuid = f.card_uuid JOIN decisions d ON d.id = c.decision_id"
            f" WHERE {in_range}"
        )
        window = (start, end)
        with self._transaction(write=False) as cur:

            def rows(sql: str, params: Sequence[Any] = window) -> list[tuple]:
                return list(self._execute(cur, sql, params).fetchall())

            by_rule = [
                dict(zip(("card_type", "rule", *count_names), row))
                for row in rows(f"SELECT c.card_type, c.rule, {counts} {cards_from} GROUP BY c.card_type, c.rule")
            ]
            by_week = [
                dict(zip(("week", "card_type", *count_names), row))
                for row in rows(f"SELECT d.iso_week, c.card_type, {counts} {cards_from} GROUP BY d.iso_week, c.card_type")
            ]
            reasons = [
                dict(zip(("card_type", "system", "code", "display", "cards"), row))
                for row in rows(
                    "SELECT c.card_type, f.reason_system, f.reason_code, MAX(f.reason_display), COUNT(DISTINCT c.card_uuid)"
                    f" {feedback_from} AND f.outcome = 'overridden' GROUP BY c.card_type, f.reason_system, f.reason_code"
                )
            ]
            accepted_suggestions = [
                dict(zip(("card_type", "position", "accepted"), row))
                for row in rows(
                    "SELECT c.card_type, cs.position, COUNT(*) FROM feedback_suggestions fs"
                    " JOIN feedback f ON f.id = fs.feedback_id"
                    " JOIN card_suggestions cs ON cs.suggestion_uuid = fs.suggestion_uuid AND cs.card_uuid = f.card_uuid"
                    " JOIN cards c ON c.card_uuid = f.card_uuid JOIN decisions d ON d.id = c.decision_id"
                    f" WHERE {in_range} GROUP BY c.card_type, cs.position"
                )
            ]
            unmatched_suggestions = rows(
                "SELECT COUNT(*) FROM feedback_suggestions fs JOIN feedback f ON f.id = fs.feedback_id"
                f" JOIN cards c ON c.card_uuid = f.card_uuid JOIN decisions d ON d.id = c.decision_id WHERE {in_range}"
                " AND NOT EXISTS (SELECT 1 FROM card_suggestions cs"
                " WHERE cs.suggestion_uuid = fs.suggestion_uuid AND cs.card_uuid = f.card_uuid)"
            )[0][0]
            comments = [
                {
                    "card_type": card_type,
                    "outcome": outcome,
                    "outcome_timestamp": d.read_ts(outcome_at).astimezone(UTC).isoformat(),
                    "reason_code": reason_code,
                    "comment": comment,
                }
                for card_type, outcome, outcome_at, reason_code, comment in rows(
                    "SELECT c.card_type, f.outcome, f.outcome_at, f.reason_code, f.user_comment FROM feedback f"
                    " LEFT JOIN cards c ON c.card_uuid = f.card_uuid LEFT JOIN decisions d ON d.id = c.decision_id"
                    " WHERE f.user_comment IS NOT NULL AND f.user_comment <> ''"
                    " AND (f.reason_code IS NULL OR f.reason_code = 'other')"
                    " AND COALESCE(d.evaluated_at, f.outcome_at) >= ? AND COALESCE(d.evaluated_at, f.outcome_at) < ?"
                    " ORDER BY f.outcome_at, f.id"
                )
            ]
            unlinked_feedback = rows(
                "SELECT COUNT(*) FROM feedback f WHERE f.outcome_at >= ? AND f.outcome_at < ?"
                " AND NOT EXISTS (SELECT 1 FROM cards c WHERE c.card_uuid = f.card_uuid)"
            )[0][0]
            decisions_by_status = {
                int(status): count
                for status, count in rows(
                    f"SELECT d.status, COUNT(*) FROM decisions d WHERE {in_range} GROUP BY d.status"
                )
            }
        return {
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "decisions_by_status": decisions_by_status,
            "cards_by_rule": [_ints(row) for row in by_rule],
            "cards_by_week": [_ints(row) for row in by_week],
            "override_reasons": reasons,
            "accepted_suggestions": accepted_suggestions,
            "unmatched_suggestions": unmatched_suggestions,
            "comments": comments,
            "unlinked_feedback": unlinked_feedback,
        }

    # -- health -----------------------------------------------------------------------------

    def ping(self) -> bool:
        """True when the database answers; never raises."""
        try:
            with self._transaction(write=False) as cur:
                self._execute(cur, "SELECT 1").fetchone()
            return True
        except StoreError:
            return False

    def close(self) -> None:
        self._pool.close()


def open_store(database_url: str, *, busy_timeout_s: float = 5.0, connect_timeout_s: float = 5.0) -> Store:
    """Open the store named by ``database_url`` and bring its schema up to date.

    ``busy_timeout_s``: how long SQLite waits for another process's write lock before StoreError.
    ``connect_timeout_s``: how long PostgreSQL connection attempts may take.
    Raises StoreError (the URL in the message has no password)."""
    dialect = _dialect_for(database_url, busy_timeout_s, connect_timeout_s)
    store = Store(dialect)
    try:
        store.migrate()
    except StoreError as exc:
        store.close()
        raise StoreError(f"cannot open the store: {exc}") from None
    return store


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


# ---------------------------------------------------------------------------------------------
# Audit writer: the hook hot path hands records to a queue; one thread writes them in batches.
# ---------------------------------------------------------------------------------------------


class AuditWriter:
    """Background batching of ``Store.record_decisions``.

    ``submit`` never blocks and never raises: when the queue is full, or when a batch cannot be
    written (database down or locked), the records are dropped, counted in ``dropped`` and
    logged (counts only, no patient data); cards keep being served."""

    def __init__(self, store: Store, *, max_queue: int = 10_000, batch_size: int = 200, max_delay_s: float = 0.2):
        self._store = store
        self._queue: queue.Queue[DecisionRecord] = queue.Queue(maxsize=max_queue)
        self._batch_size = batch_size
        self._max_delay_s = max_delay_s
        self._pending = 0  # submitted and not yet written or dropped
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._hurry = threading.Event()  # set by flush/close: write what is queued without waiting for more
        self.written = 0
        self.dropped = 0
        self.batches = 0
        self._last_drop_log = float("-inf")
        self._thread = threading.Thread(target=self._run, name="cds-audit-writer", daemon=True)
        self._thread.start()

    def submit(self, record: DecisionRecord) -> bool:
        """Queue a record; False when it was dropped (queue full or writer closed)."""
        try:
            if not self._stopping.is_set():
                with self._cond:
                    self._queue.put_nowait(record)
                    self._pending += 1
                return True
        except queue.Full:
            pass
        except Exception:  # noqa: BLE001 - the hot path must never fail because of the audit
            log.exception("audit submit failed")
        self._count_dropped(1, "audit queue full or writer closed")
        return False

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._pending > 0:
                self._hurry.set()
            while self._pending > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Flush, then stop the thread. Later submits are dropped. False if the flush timed out."""
        flushed = self.flush(timeout)
        self._stopping.set()
        self._thread.join(timeout=max(self._max_delay_s * 2, 0.5))
        return flushed

    def _run(self) -> None:
        while not (self._stopping.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._write(self._gather(first))

    def _gather(self, first: DecisionRecord) -> list[DecisionRecord]:
        """A batch: up to batch_size records, waiting at most max_delay_s for more (no wait when
        a flush is waiting)."""
        batch = [first]
        deadline = time.monotonic() + self._max_delay_s
        while len(batch) < self._batch_size:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0 or self._hurry.is_set():
                    batch.append(self._queue.get_nowait())
                else:
                    batch.append(self._queue.get(timeout=min(remaining, 0.05)))
            except queue.Empty:
                if remaining <= 0 or self._hurry.is_set():
                    break
        return batch

    def _write(self, batch: list[DecisionRecord]) -> None:
        try:
            self._store.record_decisions(batch)
            written, dropped = len(batch), 0
        except Exception as exc:  # noqa: BLE001 - StoreError or a bad record: drop, count, go on
            written = 0
            self._count_dropped(len(batch), f"audit batch not written ({type(exc).__name__})")
        with self._cond:
            self.written += written
            self.batches += 1
            self._pending -= len(batch)
            if self._pending == 0:
                self._hurry.clear()
            self._cond.notify_all()

    def _count_dropped(self, count: int, why: str) -> None:
        """Count dropped records; log the first drop and then at most one line per 10 seconds
        (counts and error classes only: a record holds clinical data, its text is never logged)."""
        with self._cond:
            self.dropped += count
            total = self.dropped
            now = time.monotonic()
            if now - self._last_drop_log < 10.0:
                return
            self._last_drop_log = now
        log.warning("%s: %d decision record(s) dropped, %d in total", why, count, total)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FeedbackRow:
    natural_key: str
    card_uuid: str
    outcome: str
    outcome_at: datetime
    reason_system: str | None
    reason_code: str | None
    reason_display: str | None
    user_comment: str | None
    accepted_ids: tuple[str, ...]


def _feedback_row(item: dict) -> _FeedbackRow:
    card = item.get("card")
    card_uuid = card.get("uuid") if isinstance(card, dict) else card  # {"uuid": ...} or the uuid itself
    outcome = item.get("outcome")
    if not card_uuid or not outcome:
        raise ValueError("feedback item without card uuid or outcome")
    try:
        outcome_at = _utc(datetime.fromisoformat(str(item["outcomeTimestamp"])))
    except (KeyError, ValueError):
        raise ValueError("feedback item without a readable outcomeTimestamp") from None
    override = item.get("overrideReason") or {}
    reason = override.get("reason") or {}
    accepted_ids = tuple(sorted({s["id"] for s in item.get("acceptedSuggestions") or () if s.get("id")}))
    key_parts = [
        str(card_uuid),
        str(outcome),
        outcome_at.isoformat(timespec="microseconds"),
        reason.get("system"),
        reason.get("code"),
        list(accepted_ids),
    ]
    return _FeedbackRow(
        natural_key=hashlib.sha256(json.dumps(key_parts).encode()).hexdigest(),
        card_uuid=str(card_uuid),
        outcome=str(outcome),
        outcome_at=outcome_at,
        reason_system=reason.get("system"),
        reason_code=reason.get("code"),
        reason_display=reason.get("display"),
        user_comment=override.get("userComment"),
        accepted_ids=accepted_ids,
    )


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _now() -> datetime:
    return datetime.now(UTC)


def _ints(row: dict) -> dict:
    """SUM() is NULL over no rows and NUMERIC in PostgreSQL: make counts plain ints."""
    return {k: (int(v or 0) if k in ("cards", "shown", "overridden", "accepted", "no_feedback") else v) for k, v in row.items()}


def _rollback_quietly(conn: Any) -> None:
    try:
        conn.rollback()
    except Exception:  # noqa: BLE001 - the connection is discarded anyway
        pass


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
