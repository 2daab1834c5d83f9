"""Schema: numbered migrations, applied in order at open (``Store.migrate``), each in its own
transaction together with its row in schema_version. {id} and {ts} are replaced by the dialect's
column types. A step is SQL text or a function (cursor, dialect) for what SQL alone cannot do.
Never edit a released migration: append a new one."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .dialects import _Dialect


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
