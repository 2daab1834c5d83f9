"""What goes into and comes out of the store: the records of one hook call (DecisionRecord with
its CardRecords), the result of storing feedback (FeedbackResult), the keyed patient hash
(patient_key), the row a CDS Hooks feedback item becomes (_feedback_row), and StoreError, which
every part of the store raises."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime, timezone

UTC = timezone.utc


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
