"""Audit and feedback storage: one small interface, two real back-ends (SQLite and PostgreSQL).

    store = open_store("sqlite:///cds_service.db")      # or postgresql://user@host:5432/db
    store.record_decision(record)                       # the audit of one hook call (usually via AuditWriter)
    store.record_feedback("lumbar-imaging-order-sign", items)
    store.report(since, until)                          # raw counts; cds_service.report shapes them

Modules
    records.py       StoreError, CardRecord, DecisionRecord, FeedbackResult, patient_key; feedback item -> row
    migrations.py    the numbered schema migrations (MIGRATIONS, SCHEMA_VERSION)
    dialects.py      SQLite and PostgreSQL dialects, database URLs (redact_url), the connection pool
    audit_writer.py  AuditWriter: the background thread that writes decision records in batches
    __init__.py      Store (audit, feedback, jti replay cache, purge, report) and open_store
Everything is importable from ``cds_service.store``.

Database URLs
    sqlite:///cds_service.db       a file in the working directory (the default)
    sqlite:////var/lib/cds/cds.db  an absolute path (four slashes: "sqlite:///" + "/var/...")
    sqlite:///:memory:             a private in-memory database (tests)
    postgresql://user:password@host:5432/dbname?options=-csearch_path%3Dcds   (psycopg 3 conninfo URL)

Both back-ends run the same SQL. Everything that differs between the dialects lives in the two
``_Dialect`` objects of ``dialects.py``: placeholders, column types, how a transaction starts, how a
timestamp is bound, how connections are opened and which errors mean "the database is unavailable".

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

import json
import logging
import time
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from typing import Any, Iterable, Iterator, Sequence

from .audit_writer import AuditWriter  # noqa: F401 - re-exported
from .dialects import (  # noqa: F401 - re-exported (the private names too: the module was one file)
    POOL_WAIT_S,
    _close_quietly,
    _Dialect,
    _dialect_for,
    _error_text,
    _Pool,
    _Postgres,
    _rollback_quietly,
    _SQLite,
    redact_url,
)
from .migrations import MIGRATIONS, SCHEMA_VERSION, _create_audit_secret  # noqa: F401 - re-exported
from .records import (  # noqa: F401 - re-exported
    UTC,
    CardRecord,
    DecisionRecord,
    FeedbackResult,
    StoreError,
    _feedback_row,
    _FeedbackRow,
    _utc,
    patient_key,
)

log = logging.getLogger(__name__)

# Store and open_store live here, not in a submodule: Store's methods look up _now in this module,
# so monkeypatching cds_service.store._now (as the tests do) moves the store's clock.


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
        deadline = time.monotonic() + d.wait_s()
        try:
            with self._pool.connection(deadline) as conn:
                d.limit_lock_wait(conn, max(deadline - time.monotonic(), 0.001))
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
        """Store several decisions in one transaction (what AuditWriter calls).

        One INSERT per decision (its id is needed), then the cards, their suggestions and the feedback links
        of the whole batch in three executemany calls: a batch costs a handful of driver calls, not five per
        decision, so the writer thread keeps up under load (each call is a GIL hand-over)."""
        d = self._dialect
        card_rows: list[tuple] = []
        suggestion_rows: list[tuple] = []
        seen: set[str] = set()
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
                    if card.uuid in seen:
                        continue  # the same card twice in one batch: keep the first
                    seen.add(card.uuid)
                    card_rows.append((
                        card.uuid,
                        decision_id,
                        card.card_type,
                        card.indicator,
                        card.rule,
                        card.order_ref,
                        json.dumps(list(card.fact_ids)),
                        json.dumps(list(card.fact_refs)),
                        bool(card.shown),
                    ))
                    # suggestion uuids derive from the card uuid: a card audited again brings the same ones
                    suggestion_rows.extend(
                        (suggestion_uuid, card.uuid, position)
                        for position, suggestion_uuid in enumerate(card.suggestion_uuids, start=1)
                    )
            if card_rows:
                # a card already stored (the same hook call audited again) keeps its first row
                cur.executemany(d.sql(
                    "INSERT INTO cards (card_uuid, decision_id, card_type, indicator, rule, order_ref, fact_ids,"
                    " fact_refs, shown) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (card_uuid) DO NOTHING"
                ), card_rows)
            if suggestion_rows:
                cur.executemany(d.sql(
                    "INSERT INTO card_suggestions (suggestion_uuid, card_uuid, position) VALUES (?, ?, ?)"
                    " ON CONFLICT (suggestion_uuid) DO NOTHING"
                ), suggestion_rows)
            if card_rows:
                # Feedback can overtake the (batched) audit of its card: link it now.
                cur.executemany(d.sql("UPDATE feedback SET linked = ? WHERE card_uuid = ? AND NOT linked"),
                                [(True, row[0]) for row in card_rows])

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


def _now() -> datetime:
    return datetime.now(UTC)


def _ints(row: dict) -> dict:
    """SUM() is NULL over no rows and NUMERIC in PostgreSQL: make counts plain ints."""
    return {k: (int(v or 0) if k in ("cards", "shown", "overridden", "accepted", "no_feedback") else v) for k, v in row.items()}
