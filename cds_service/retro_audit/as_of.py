"""The record as it stood on an order's date: which resources count, and Conditions that resolved later
read as active (the rules are in the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Callable, Iterable

from fhir_mappings import fhir_values as fv


@dataclass(frozen=True)
class Moment:
    day: date
    instant: datetime | None  # timezone-aware when the value carried a time and a zone


def moment(value: Any) -> Moment | None:
    day = fv.parse_date(value)
    if day is None:
        return None
    instant = None
    if isinstance(value, str) and len(value) > 10 and "T" in value:
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            instant = parsed if parsed.tzinfo is not None else None
        except ValueError:
            instant = None
    return Moment(day, instant)


def is_after(when: Moment, order: Moment) -> bool:
    """Whether `when` is after the order: by calendar date; on the same day by instant when both have one."""
    if when.day != order.day:
        return when.day > order.day
    if when.instant is not None and order.instant is not None:
        return when.instant > order.instant
    return False


def _start(period: Any) -> Any:
    return period.get("start") if isinstance(period, dict) else None


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def record_dates(resource: dict) -> list[Any]:
    """The dates that say when a resource entered the record (raw FHIR values; None where absent)."""
    kind = resource.get("resourceType")
    if kind == "Condition":
        return [resource.get("onsetDateTime"), _start(resource.get("onsetPeriod")), resource.get("recordedDate")]
    if kind == "Observation":
        return [resource.get("effectiveDateTime"), _start(resource.get("effectivePeriod")), resource.get("effectiveInstant"),
                resource.get("issued")]
    if kind in ("MedicationRequest", "MedicationStatement"):
        dates = [resource.get("authoredOn"), resource.get("dateAsserted"), resource.get("effectiveDateTime"),
                 _start(resource.get("effectivePeriod"))]
        dispense = resource.get("dispenseRequest")
        if isinstance(dispense, dict):
            dates.append(_start(dispense.get("validityPeriod")))
        for dosage in _list(resource.get("dosageInstruction")) + _list(resource.get("dosage")):
            timing = dosage.get("timing") if isinstance(dosage, dict) else None
            repeat = timing.get("repeat") if isinstance(timing, dict) else None
            if isinstance(repeat, dict):
                dates.append(_start(repeat.get("boundsPeriod")))
        return dates
    if kind == "Procedure":
        return [resource.get("performedDateTime"), _start(resource.get("performedPeriod"))]
    if kind == "ServiceRequest":
        return [resource.get("authoredOn"), resource.get("occurrenceDateTime"), _start(resource.get("occurrencePeriod"))]
    return []


UNDATED_TYPES = ("Patient", "Medication")


@dataclass
class AsOfStats:
    used: int = 0
    after_order: int = 0
    undated_used: int = 0
    undated_dropped: int = 0
    reactivated: int = 0


def dated(resources: Iterable[dict]) -> list[tuple[dict, list[Moment] | None]]:
    """Each resource with the moments it entered the record: None for the undated-by-nature types."""
    return [(r, None if r.get("resourceType") in UNDATED_TYPES else [m for m in map(moment, record_dates(r)) if m is not None])
            for r in resources]


def record_as_of(resources: Iterable[dict] | list[tuple[dict, list[Moment] | None]], order: Moment, undated: str = "include",
                 skip: Callable[[dict], bool] | None = None) -> tuple[list[dict], AsOfStats]:
    """The resources as they stood on the order's date (see the package docstring for the rules).

    `resources` are FHIR resources, or the output of `dated()` (parsed once per patient)."""
    items = resources if isinstance(resources, list) and resources and isinstance(resources[0], tuple) else dated(resources)
    record: list[dict] = []
    stats = AsOfStats()
    for resource, moments in items:
        if skip is not None and skip(resource):
            continue
        if moments is None:
            record.append(resource)
            continue
        if not moments:
            if undated == "exclude":
                stats.undated_dropped += 1
                continue
            stats.undated_used += 1
        elif any(is_after(m, order) for m in moments):
            stats.after_order += 1
            continue
        if resource.get("resourceType") == "Condition":
            resource, reactivated = _status_on(resource, order)
            stats.reactivated += reactivated
        record.append(resource)
    stats.used = len(record)
    return record, stats


def _status_on(condition: dict, order: Moment) -> tuple[dict, bool]:
    """A Condition that abated after the order was current on the order's date: read it as active."""
    abatement = moment(condition.get("abatementDateTime")) or moment(_start(condition.get("abatementPeriod")))
    if abatement is None or not is_after(abatement, order):
        return condition, False
    status = fv.status_code(condition.get("clinicalStatus"))
    if status not in (None, "resolved", "inactive", "remission"):
        return condition, False
    updated = {k: v for k, v in condition.items() if k not in ("abatementDateTime", "abatementPeriod", "abatementAge",
                                                                 "abatementRange", "abatementString")}
    updated["clinicalStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}
    return updated, True
