"""Reading FHIR R4 element values leniently: dates, codes, quantities, statuses. Pure functions."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import Any, NamedTuple

_QUANTITY_TEXT = re.compile(r"\s*([-+]?\d{1,6}(?:[.,]\d{1,6})?)\s*(\S.{0,20}?)?\s*")


class DateSpan(NamedTuple):
    """The calendar days a FHIR date, dateTime or instant can mean."""

    first: date  # the first day it can mean
    written: date  # the day as written; a partial date's first day
    last: date  # the last day it can mean


def date_span(value: Any) -> DateSpan | None:
    """The days a FHIR date, dateTime or instant can mean: the day as written; a partial date its whole year or
    month ("2025-12": 1 to 31 December); a dateTime with a time-zone offset its written day and its day in UTC
    when they differ ("2026-02-28T23:30:00-10:00": 28 February as written, 1 March in UTC). Unreadable: None."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    text = value.strip()
    try:
        if len(text) == 4:
            return DateSpan(date(int(text), 1, 1), date(int(text), 1, 1), date(int(text), 12, 31))
        if len(text) == 7:
            first = date(int(text[:4]), int(text[5:7]), 1)
            return DateSpan(first, first, (first.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1))
        written = date.fromisoformat(text[:10])
    except ValueError:
        return None
    utc_day = written
    offset = text[-6:]
    if len(text) > 16 and offset[0] in "+-" and offset[3] == ":" and offset[1:] != "00:00":  # a zone that may move the day
        try:
            utc_day = datetime.fromisoformat(text).astimezone(timezone.utc).date()
        except (ValueError, OverflowError):  # an unreadable time, or year 1 west of UTC
            pass
    return DateSpan(min(written, utc_day), written, max(written, utc_day))


def parse_date(value: Any) -> date | None:
    """The calendar date of a FHIR date, dateTime or instant as written (the patient's timeline): the day that
    durations count from. Partial dates take their first day ("2026-03" -> 2026-03-01). Unreadable: None."""
    span = date_span(value)
    return span.written if span else None


def latest_date(value: Any) -> date | None:
    """The last calendar day a FHIR date, dateTime or instant can mean (see date_span)."""
    span = date_span(value)
    return span.last if span else None


def text(value: Any) -> str | None:
    """A string element as sent, or None when the element is missing or not a string (wrong JSON type)."""
    return value if isinstance(value, str) else None


def quantity_from_text(value: Any) -> dict | None:
    """A Quantity from a number written as text with an optional unit ("38.6 C", "101.3 degF", "38,6"): some
    systems send vital signs as valueString. None for anything else (the unit is checked by the caller)."""
    if not isinstance(value, str):
        return None
    match = _QUANTITY_TEXT.fullmatch(value)
    if match is None:
        return None
    return {"value": float(match.group(1).replace(",", ".")), "unit": match.group(2)}


def period_start(period: Any) -> date | None:
    return parse_date(period.get("start")) if isinstance(period, dict) else None


def period_end(period: Any) -> date | None:
    return parse_date(period.get("end")) if isinstance(period, dict) else None


def period_start_span(period: Any) -> DateSpan | None:
    return date_span(period.get("start")) if isinstance(period, dict) else None


def period_end_span(period: Any) -> DateSpan | None:
    return date_span(period.get("end")) if isinstance(period, dict) else None


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
    text = concept.get("text") if isinstance(concept, dict) else concept  # {"text": "Resolved"}, as some EHRs send
    if isinstance(text, str) and text.strip():
        return "-".join(text.strip().lower().split())  # "Entered in error" -> entered-in-error
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


def doses_per_day(dosage: Any) -> float | None:
    """How many dose units a Dosage gives per day (doseQuantity x frequency / period), when it says so."""
    if not isinstance(dosage, dict):
        return None
    timing = dosage.get("timing")
    repeat = timing.get("repeat") if isinstance(timing, dict) else None
    rates = dosage.get("doseAndRate")
    rate = rates[0] if isinstance(rates, list) and rates and isinstance(rates[0], dict) else {}
    dose = rate.get("doseQuantity")
    if not isinstance(repeat, dict) or not isinstance(dose, dict) or not _positive(dose.get("value")):
        return None
    frequency = repeat.get("frequency", 1)
    period = duration_days({"value": repeat.get("period"), "unit": repeat.get("periodUnit")})
    if not _positive(frequency) or not period:
        return None
    return dose["value"] * frequency / period


def supply_days_from_quantity(quantity: Any, dosage: Any) -> float | None:
    """Days a dispensed quantity lasts at the prescribed dose (10 tablets at 2 a day: 5 days); None when the
    quantity, the dose or their units do not allow it. A dose given only as text ("Take 1 tablet by mouth
    once daily") is read for tablets or capsules per day, against a quantity counted in units."""
    if not isinstance(quantity, dict) or not _positive(quantity.get("value")):
        return None
    quantity_unit = quantity.get("code") or quantity.get("unit")
    per_day = doses_per_day(dosage)
    if per_day is not None:
        dose = dosage["doseAndRate"][0]["doseQuantity"]
        dose_unit = dose.get("code") or dose.get("unit")
        if quantity_unit and dose_unit and str(quantity_unit).strip().lower() != str(dose_unit).strip().lower():
            return None
        return quantity["value"] / per_day
    per_day = units_per_day_from_text(dosage.get("text") if isinstance(dosage, dict) else None)
    if per_day is None or (quantity_unit and not _COUNT_UNIT.search(str(quantity_unit))):
        return None
    return quantity["value"] / per_day


_COUNT_UNIT = re.compile(r"tab|cap|pill|each|\{tbl\}|^1$", re.IGNORECASE)
_SIG_DOSE = re.compile(r"\b(\d+(?:\.\d+)?|one|two|three|four|half)\s*(?:tab|tablet|tablets|tabs|cap|capsule|capsules|caps|pill|pills)\b", re.I)
_SIG_TIMES = [  # (pattern, doses a day); the first that matches
    (re.compile(r"\bevery\s+(\d+)\s*(?:h|hr|hrs|hours?)\b|\bq(\d+)h\b", re.I), None),
    (re.compile(r"\b(?:four times|qid|4 times)\b", re.I), 4),
    (re.compile(r"\b(?:three times|tid|3 times)\b", re.I), 3),
    (re.compile(r"\b(?:twice|bid|2 times|two times)\b", re.I), 2),
    (re.compile(r"\b(?:once|daily|every day|qd|every morning|every evening|at bedtime|nightly|a day)\b", re.I), 1),
]
_WORD_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "half": 0.5}


def units_per_day_from_text(text: Any) -> float | None:
    """Tablets or capsules a day from a prescription's sig text ("1 tablet twice daily": 2); None if unclear."""
    if not isinstance(text, str):
        return None
    dose = _SIG_DOSE.search(text)
    if dose is None:
        return None
    amount = _WORD_NUMBERS.get(dose.group(1).lower()) or float(dose.group(1))
    for pattern, times in _SIG_TIMES:
        match = pattern.search(text)
        if match:
            if times is None:
                hours = float(match.group(1) or match.group(2))
                times = 24 / hours if hours else None
            return amount * times if times else None
    return None


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


_TIME_UNITS = {
    "d": 1, "day": 1, "days": 1,
    "wk": 7, "week": 7, "weeks": 7,
    "mo": 30, "month": 30, "months": 30,
    "a": 365, "year": 365, "years": 365,
    "h": 1 / 24, "hour": 1 / 24, "hours": 1 / 24,
    "min": 1 / 1440, "minute": 1 / 1440, "minutes": 1 / 1440,
}


def date_at_age(birth_date: date | None, age: Any) -> date | None:
    """The date a person born on `birth_date` reached `age` (a FHIR Age: value with unit a, mo, wk, d...):
    the earliest day an onsetAge can mean. None without a birth date or a readable age."""
    value = age.get("value") if isinstance(age, dict) else None
    if birth_date is None or not (_positive(value) or value == 0) or isinstance(value, bool):
        return None
    unit = str(age.get("code") or age.get("unit") or "a").strip().lower()
    try:
        if unit in ("a", "year", "years", "yr", "yrs"):
            years = int(age["value"])
            try:
                return birth_date.replace(year=birth_date.year + years)
            except ValueError:  # born on 29 February
                return birth_date.replace(year=birth_date.year + years, day=28)
        days = duration_days(age)
        return None if days is None else birth_date + timedelta(days=int(days))
    except (OverflowError, ValueError):
        return None


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
