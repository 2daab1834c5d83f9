"""Reading FHIR R4 element values leniently: dates, codes, quantities, statuses. Pure functions."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any


def parse_date(value: Any) -> date | None:
    """The calendar date of a FHIR date, dateTime or instant, as written (the patient's timeline).

    Partial dates take their first day ("2026-03" -> 2026-03-01). Anything unreadable is None.
    """
    if not isinstance(value, str) or len(value) < 4:
        return None
    text = value.strip()
    try:
        if len(text) == 4:
            return date(int(text), 1, 1)
        if len(text) == 7:
            return date(int(text[:4]), int(text[5:7]), 1)
        return date.fromisoformat(text[:10])
    except ValueError:
        return None


def text(value: Any) -> str | None:
    """A string element as sent, or None when the element is missing or not a string (wrong JSON type)."""
    return value if isinstance(value, str) else None


def period_start(period: Any) -> date | None:
    return parse_date(period.get("start")) if isinstance(period, dict) else None


def period_end(period: Any) -> date | None:
    return parse_date(period.get("end")) if isinstance(period, dict) else None


def codings(concept: Any) -> list[dict]:
    if not isinstance(concept, dict):
        return []
    items = concept.get("coding")
    return [c for c in items if isinstance(c, dict)] if isinstance(items, list) else []


def concept_display(concept: Any, preferred: dict | None = None) -> str:
    """A human label for a CodeableConcept: the matched coding's display, the text, or system|code."""
    if isinstance(preferred, dict):
        if isinstance(preferred.get("display"), str) and preferred["display"].strip():
            return preferred["display"].strip()
    if isinstance(concept, dict) and isinstance(concept.get("text"), str) and concept["text"].strip():
        return concept["text"].strip()
    for coding in ([preferred] if preferred else []) + codings(concept):
        if isinstance(coding, dict) and isinstance(coding.get("display"), str) and coding["display"].strip():
            return coding["display"].strip()
    for coding in ([preferred] if preferred else []) + codings(concept):
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            return coding["code"]
    return "(uncoded)"


def status_code(concept: Any) -> str | None:
    """The code of a status CodeableConcept (Condition.clinicalStatus, verificationStatus)."""
    for coding in codings(concept):
        if isinstance(coding.get("code"), str):
            return coding["code"].strip().lower()
    if isinstance(concept, str):
        return concept.strip().lower()
    return None


def reference_of(resource: dict) -> str | None:
    resource_id = resource.get("id")
    if isinstance(resource_id, str) and resource_id:
        return f"{resource.get('resourceType')}/{resource_id}"
    return None


def duration_days(duration: Any) -> float | None:
    """A FHIR Duration/Quantity of time in days (UCUM d, wk, mo, a, h, min and their spelled-out forms)."""
    if not isinstance(duration, dict) or not isinstance(duration.get("value"), (int, float)):
        return None
    unit = str(duration.get("code") or duration.get("unit") or "d").strip().lower()
    factor = _TIME_UNITS.get(unit)
    if factor is None:
        return None
    return float(duration["value"]) * factor


_TIME_UNITS = {
    "d": 1, "day": 1, "days": 1,
    "wk": 7, "week": 7, "weeks": 7,
    "mo": 30, "month": 30, "months": 30,
    "a": 365, "year": 365, "years": 365,
    "h": 1 / 24, "hour": 1 / 24, "hours": 1 / 24,
    "min": 1 / 1440, "minute": 1 / 1440, "minutes": 1 / 1440,
}


def age_in_years(birth_date: date | None, today: date) -> int | None:
    if birth_date is None:
        return None
    years = today.year - birth_date.year - ((today.month, today.day) < (birth_date.month, birth_date.day))
    return max(years, 0)


def days_between(earlier: date, later: date) -> int:
    return (later - earlier).days


MAX_DAYS = 200 * 365  # longer durations (typos, 1e12 "days") are read as "for the foreseeable future"


def add_days(start: date, days: float) -> date:
    """start + days, never raising: negative or NaN durations add nothing, huge ones are capped."""
    if days != days:  # NaN
        return start
    whole = MAX_DAYS if days > MAX_DAYS else max(int(round(days)), 0)
    try:
        return start + timedelta(days=whole)
    except OverflowError:
        return date.max
