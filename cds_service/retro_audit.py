"""`python -m cds_service audit SOURCE`: the service's rules applied to past lumbar imaging orders.

SOURCE is a FHIR Bulk Data export folder (NDJSON files, one resource per line, any file names:
Patient.ndjson, Condition-1.ndjson, 1.Observation.ndjson, *.ndjson.gz) or a FHIR R4 server base URL.
Every past order (a ServiceRequest coded as lumbar spine MRI, CT or X-ray, not draft or
entered-in-error, intent an order) is evaluated by `cards.engine.Engine.evaluate`, the same call as the
HTTP service, with today = the order's date (authoredOn), the order as the draft order, and the
patient's record as it was on that date:

- A resource counts only if none of its dates is after the order: Condition onset and recordedDate,
  Observation effective and issued, MedicationRequest authoredOn, MedicationStatement dateAsserted and
  effective, the start of any period or dosage bounds, Procedure performed, ServiceRequest authoredOn.
  Dates are compared as calendar dates as written; on the order's own day, a resource whose date
  carries a time and zone counts only if it is not later than the order's authoredOn (an MRI finding
  coded two hours after the order does not justify it). A date without a time counts on that day.
- A Condition resolved after the order (abatement after the order date) was current on that date:
  it is read as active. Other status changes cannot be dated from an export (no history) and are
  taken as exported.
- Undated resources (none of those dates) are included by default (`--undated include`): undated
  entries are mostly migrated problem-list history (a cancer, an operation) that was in the chart
  when the order was placed; the engine already treats an unknown date as "not recent" for every
  windowed criterion; and including them can only add red flags, so the audit never overstates the
  orders that would have been warned against. `--undated exclude` drops them. Either way the number
  used is reported per order (undated_used) and in the summary.
- Patient (birth date) and Medication (a catalogue, referenced by medicationReference) are undated
  by nature and always used.

Outputs: a summary on the terminal; per-order results (--out, CSV when the name ends in .csv, else
NDJSON); an HTML report with inline SVG charts (--html, no script, no CDN); the summary as JSON
(--summary-json). The per-order file holds patient and order ids from the source: handle it as the
export itself. The HTML report and the summary are aggregate counts without identifiers.

How an export is grouped by patient with flat memory, on all cores:

  pass 1 (partition)  the files are cut into line-aligned byte ranges; worker processes read them,
                      decode only resourceType / id / subject of each line (msgspec), and append the
                      raw line to the worker's own SQLite shard, keyed by (crc32(patient id), patient
                      id); Medication lines go to a side table. Lines of other types are skipped.
  index               each shard is indexed by (hash, patient): SQLite's external sort, bounded memory.
  pass 2 (evaluate)   the hash space is cut into ranges (partitions of ~256 patients); for each range a
                      worker merges the shards' index-ordered cursors (heapq.merge), so one patient's
                      lines arrive together, evaluates that patient, and drops it. Results return per
                      partition, in partition order: the output is sorted by (hash, patient id) whatever
                      the number of workers.

Memory is one patient's record per worker plus one partition's result rows; disk is about the size of
the export. A byte-offset index per patient would avoid the copy but needs the index itself on disk and
random reads across every file; the SQLite shards are the same external sort, written in parallel.
`audit_patient` is the unit of work: given one patient's resources it returns that patient's rows and
counts, with no I/O; it is what a Dask or Spark job would map over patient partitions.

The FHIR server source pages through `ServiceRequest?code=<lumbar imaging codes>`, and for each new
patient runs the service's own prefetch queries (services.yaml) through `FhirClient`: the allow-list
(CDS_FHIR_SERVER_ALLOWLIST, loopback only when unset), no redirects, size caps, `next` links only on
the same server, the token in the Authorization header only, never logged. A query that fails makes its
resource type unreadable for that patient, exactly as in a hook call (imaging-data-incomplete).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import heapq
import html
import io
import json
import math
import multiprocessing
import os
import re
import resource as _resource
import sqlite3
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import msgspec

from cards.engine import Engine
from fhir_mappings import fhir_values as fv
from fhir_mappings.facts import extract_facts, read_orders
from fhir_mappings.knowledge import Knowledge

CES = "cauda-equina-emergency"
INDICATED = "imaging-indicated"
NOT_INDICATED = "imaging-not-indicated"
INCOMPLETE = "imaging-data-incomplete"
NO_CARD = "no card"
CARD_LABELS = {
    CES: "Cauda equina emergency (critical)",
    NOT_INDICATED: "Imaging not indicated (warning)",
    INDICATED: "Imaging indicated (info)",
    INCOMPLETE: "Imaging data incomplete (info)",
    NO_CARD: "No card",
}
CARD_ORDER = (CES, NOT_INDICATED, INDICATED, INCOMPLETE, NO_CARD)
CARD_COLOURS = {CES: "#b3261e", NOT_INDICATED: "#c77700", INDICATED: "#1a5fb4", INCOMPLETE: "#6b6b6b", NO_CARD: "#b8bec6"}

# The resource types the engine reads, and the catalogue type they reference.
PATIENT_TYPES = ("Patient", "Condition", "Observation", "MedicationRequest", "MedicationStatement", "Procedure", "ServiceRequest")
REFERENCED_TYPES = ("Medication",)
NOT_PLACED_STATUSES = ("draft", "entered-in-error")  # never signed, or never real
NOT_PERFORMED_STATUSES = ("revoked",)  # placed (the hook fired), then withdrawn: not imaging for the HEDIS-style rate
NOT_ORDER_INTENTS = ("proposal", "plan", "directive", "option")
EPISODE_GROUP = "LBP_EPISODE"

HEDIS_NEGATIVE_HISTORY_DAYS = 180
HEDIS_WINDOW_DAYS = 28
HEDIS_AGES = (18, 75)
EPISODE_BINS = ((0, 7, "0-7 d"), (8, 14, "8-14 d"), (15, 28, "15-28 d"), (29, 41, "29-41 d"), (42, 90, "6-12 wk"),
                (91, 180, "3-6 mo"), (181, None, "> 6 mo"))

CSV_COLUMNS = (
    "patient_id", "order_id", "order_date", "order_status", "order_system", "order_code", "order_display", "modality",
    "ordered_contrast", "card_type", "indicator", "rule", "reason", "summary", "facts", "red_flags", "ces_features",
    "modifiers", "recommended_modality", "recommended_contrast", "order_matches_recommendation", "warned", "age",
    "episode_start", "episode_days", "conservative_care_days", "new_lbp_diagnosis", "hedis_counted", "unread",
    "resources_used", "resources_after_order", "undated_used", "reactivated_conditions",
)

PATIENTS_PER_PARTITION = 256
CHUNK_BYTES = 32 * 1024 * 1024
PARALLEL_PARTITION_BYTES = 64 * 1024 * 1024
INSERT_BATCH = 2000
HASH_SPACE = 1 << 32


class AuditError(Exception):
    """The audit cannot run (bad source, refused server): the message is for the user."""


# -- the record as it was on the order's date --------------------------------------------------------


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
    """The resources as they stood on the order's date (see the module docstring for the rules).

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


# -- one patient ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditPolicy:
    undated: str = "include"  # include | exclude
    data_end: date | None = None  # the export's date: HEDIS-style windows that end after it are left out
    since: date | None = None  # orders on or after
    until: date | None = None  # orders on or before


def new_summary() -> dict[str, Counter]:
    return {name: Counter() for name in (
        "counts", "card_types", "rules", "red_flags", "ces_features", "modifiers", "by_month", "by_modality",
        "episode_days", "skipped_orders", "skipped_lines", "hedis")}


def merge_summary(total: dict[str, Counter], part: dict[str, Counter]) -> None:
    for name, counter in part.items():
        total.setdefault(name, Counter()).update(counter)


@dataclass
class PatientAudit:
    rows: list[dict] = field(default_factory=list)
    summary: dict[str, Counter] = field(default_factory=new_summary)


def _patient_id(resources: list[dict]) -> str | None:
    for resource in resources:
        if resource.get("resourceType") == "Patient" and isinstance(resource.get("id"), str):
            return resource["id"]
    for resource in resources:
        reference = patient_reference(resource)
        if reference:
            return reference
    return None


def patient_reference(resource: dict) -> str | None:
    """The patient id a resource belongs to: Patient.id, or subject/patient references to a Patient."""
    if resource.get("resourceType") == "Patient":
        return resource.get("id") if isinstance(resource.get("id"), str) else None
    for name in ("subject", "patient"):
        value = resource.get(name)
        reference = value.get("reference") if isinstance(value, dict) else None
        if isinstance(reference, str):
            return _patient_id_of(reference)
    return None


def _patient_id_of(reference: str) -> str | None:
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    return None


def _as_draft(order: dict) -> dict:
    draft = dict(order)
    draft["status"] = "draft"  # the order as it stood when it was placed
    return draft


def _draft_bundle(order: dict) -> dict:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]}


@dataclass
class _PastOrder:
    resource: dict
    when: Moment
    imaging: Any  # fhir_mappings.facts.ImagingOrder


def _lbp_diagnosis_dates(resources: list[dict], knowledge: Knowledge) -> list[date]:
    dates = set()
    excluded = set(knowledge.criteria["status"]["condition"]["excluded_verification"])
    for resource in resources:
        if resource.get("resourceType") != "Condition":
            continue
        if fv.status_code(resource.get("verificationStatus")) in excluded:
            continue
        if EPISODE_GROUP not in knowledge.codes.concept_groups(resource.get("code")):
            continue
        when = fv.parse_date(resource.get("recordedDate")) or fv.parse_date(resource.get("onsetDateTime")) \
            or fv.period_start(resource.get("onsetPeriod"))
        if when is not None:
            dates.add(when)
    return sorted(dates)


def _new_diagnoses(dates: list[date]) -> list[date]:
    """Index episode start dates (IESD): diagnoses with no other back pain diagnosis in the 180 days before."""
    new = []
    previous = None
    for when in dates:
        if previous is None or (when - previous).days > HEDIS_NEGATIVE_HISTORY_DAYS:
            new.append(when)
        previous = when
    return new


def audit_patient(resources: list[dict], engine: Engine, policy: AuditPolicy = AuditPolicy(),
                  unreadable: dict[str, str] | None = None) -> PatientAudit:
    """Every past lumbar imaging order of one patient, evaluated on the record as it was that day. Pure.

    `resources` is the patient's whole record (any order); `unreadable` names resource types that
    could not be read (FHIR server source), as in a hook call.
    """
    knowledge = engine.knowledge
    audit = PatientAudit()
    counts, summary = audit.summary["counts"], audit.summary
    resources = _unique(r for r in resources if isinstance(r, dict) and isinstance(r.get("resourceType"), str))
    patient_id = _patient_id(resources) or ""
    counts["patients"] += 1
    if not any(r["resourceType"] == "Patient" for r in resources):
        counts["patients_without_patient_resource"] += 1

    orders: list[_PastOrder] = []
    for resource in resources:
        if resource["resourceType"] != "ServiceRequest":
            continue
        in_scope, _ = read_orders(_draft_bundle(_as_draft(resource)), None, knowledge)
        if not in_scope:
            continue
        status, intent = fv.text(resource.get("status")), fv.text(resource.get("intent"))
        when = moment(resource.get("authoredOn"))
        if status in NOT_PLACED_STATUSES:
            summary["skipped_orders"][f"status {status}"] += 1
        elif intent in NOT_ORDER_INTENTS:
            summary["skipped_orders"][f"intent {intent}"] += 1
        elif when is None:
            summary["skipped_orders"]["no authoredOn"] += 1
        else:
            orders.append(_PastOrder(resource, when, in_scope[0]))
    orders.sort(key=lambda o: (o.when.day, o.when.instant or datetime.min.replace(tzinfo=timezone.utc), str(o.resource.get("id"))))

    timeline = dated(resources)
    diagnosis_dates = _lbp_diagnosis_dates(resources, knowledge)
    episodes = _hedis_episodes(resources, timeline, diagnosis_dates, orders, engine, policy, summary)

    in_range = [o for o in orders if (policy.since is None or o.when.day >= policy.since)
                and (policy.until is None or o.when.day <= policy.until)]
    if len(in_range) < len(orders):
        summary["skipped_orders"]["outside --since/--until"] += len(orders) - len(in_range)
    if in_range:
        counts["patients_with_orders"] += 1
    for order in in_range:
        audit.rows.append(_audit_order(order, timeline, patient_id, engine, policy, unreadable, episodes, summary))
    return audit


def _unique(resources: Iterable[dict]) -> list[dict]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for resource in resources:
        resource_id = resource.get("id")
        if isinstance(resource_id, str) and resource_id:
            key = (resource["resourceType"], resource_id)
            if key in seen:
                continue
            seen.add(key)
        unique.append(resource)
    return unique


def _hedis_episodes(resources: list[dict], timeline: list, diagnosis_dates: list[date], orders: list[_PastOrder], engine: Engine,
                    policy: AuditPolicy, summary: dict[str, Counter]) -> dict[date, bool]:
    """HEDIS-style index episodes: IESD -> counted in the denominator (adult 18-75, window complete, no red flag)."""
    hedis = summary["hedis"]
    episodes: dict[date, bool] = {}
    patient = next((r for r in resources if r["resourceType"] == "Patient"), None)
    birth = fv.parse_date(patient.get("birthDate")) if patient else None
    for iesd in _new_diagnoses(diagnosis_dates):
        window_end = iesd + timedelta(days=HEDIS_WINDOW_DAYS)
        age = fv.age_in_years(birth, iesd)
        if policy.since is not None and iesd < policy.since or policy.until is not None and iesd > policy.until:
            continue
        hedis["new_diagnoses"] += 1
        if age is None or not HEDIS_AGES[0] <= age <= HEDIS_AGES[1]:
            hedis["outside_ages"] += 1
            episodes[iesd] = False
            continue
        if policy.data_end is not None and window_end > policy.data_end:
            hedis["window_not_complete"] += 1
            episodes[iesd] = False
            continue
        record, _ = record_as_of(timeline, Moment(window_end, None), policy.undated)
        facts = extract_facts(record, {}, None, window_end, engine.knowledge)
        if facts.ces or facts.red_flags:
            hedis["excluded_red_flag"] += 1
            episodes[iesd] = False
            continue
        imaged = any(iesd <= o.when.day <= window_end and fv.text(o.resource.get("status")) not in NOT_PERFORMED_STATUSES
                     for o in orders)
        hedis["denominator"] += 1
        hedis["imaged_within_28_days"] += imaged
        episodes[iesd] = True
    return episodes


def _audit_order(order: _PastOrder, timeline: list, patient_id: str, engine: Engine, policy: AuditPolicy,
                 unreadable: dict[str, str] | None, episodes: dict[date, bool], summary: dict[str, Counter]) -> dict:
    today = order.when.day
    record, stats = record_as_of(timeline, order.when, policy.undated, skip=lambda r: r is order.resource)
    draft = _as_draft(order.resource)
    evaluation = engine.evaluate(record, _draft_bundle(draft), today, f"retro-audit|{patient_id}|{order.resource.get('id')}",
                                 unreadable=unreadable)
    facts = evaluation.facts
    assessment = evaluation.assessments[0]
    card = evaluation.cards[0] if evaluation.cards else None
    card_type = assessment.card_type or NO_CARD
    red_flags = [f.id for f in facts.red_flags]
    ces = [f.id for f in facts.ces]
    protocol = assessment.protocol
    iesd = max((d for d in episodes if d <= today <= d + timedelta(days=HEDIS_WINDOW_DAYS)), default=None)
    hedis_counted = bool(iesd is not None and episodes.get(iesd) and fv.text(order.resource.get("status")) not in NOT_PERFORMED_STATUSES)
    coding = order.imaging.coding
    row = {
        "patient_id": patient_id,
        "order_id": order.resource.get("id"),
        "order_date": today.isoformat(),
        "order_status": order.resource.get("status"),
        "order_system": coding.get("system"),
        "order_code": coding.get("code"),
        "order_display": order.imaging.display,
        "modality": order.imaging.modality,
        "ordered_contrast": order.imaging.contrast,
        "card_type": "" if card_type == NO_CARD else card_type,
        "indicator": card["indicator"] if card else "",
        "rule": assessment.rule,
        "reason": assessment.reason,
        "summary": card["summary"] if card else "",
        "facts": [f.id for f in assessment.findings + assessment.also],
        "red_flags": red_flags,
        "ces_features": ces,
        "modifiers": [m.id for m in facts.modifiers],
        "recommended_modality": protocol.modality if protocol else None,
        "recommended_contrast": protocol.contrast if protocol else None,
        "order_matches_recommendation": protocol.order_is_fine if protocol else None,
        "warned": card_type == NOT_INDICATED,
        "age": facts.age,
        "episode_start": facts.episode.start.isoformat() if facts.episode and facts.episode.start else None,
        "episode_days": facts.episode_days,
        "conservative_care_days": facts.conservative_care_days,
        "new_lbp_diagnosis": iesd.isoformat() if iesd else None,
        "hedis_counted": hedis_counted,
        "unread": sorted(assessment.unread),
        "resources_used": stats.used,
        "resources_after_order": stats.after_order,
        "undated_used": stats.undated_used,
        "reactivated_conditions": stats.reactivated,
    }
    counts = summary["counts"]
    counts["orders"] += 1
    counts["warned"] += card_type == NOT_INDICATED
    counts["orders_with_red_flag"] += bool(red_flags)
    counts["orders_with_ces_feature"] += bool(ces)
    counts["protocol_differs"] += bool(protocol and not protocol.order_is_fine)
    counts["resources_after_order"] += stats.after_order
    counts["undated_used"] += stats.undated_used
    counts["undated_dropped"] += stats.undated_dropped
    counts["reactivated_conditions"] += stats.reactivated
    counts["orders_revoked"] += fv.text(order.resource.get("status")) in NOT_PERFORMED_STATUSES
    summary["card_types"][card_type] += 1
    summary["rules"][f"{card_type}|{assessment.rule}"] += 1
    summary["red_flags"].update(red_flags)
    summary["ces_features"].update(ces)
    summary["modifiers"].update(row["modifiers"])
    summary["by_month"][f"{today.isoformat()[:7]}|{card_type}"] += 1
    summary["by_modality"][f"{order.imaging.modality}|{card_type}"] += 1
    summary["episode_days"][f"{_episode_bin(facts.episode_days)}|{card_type}"] += 1
    return row


def _episode_bin(days: int | None) -> str:
    if days is None:
        return "no dated episode"
    for low, high, label in EPISODE_BINS:
        if days >= low and (high is None or days <= high):
            return label
    return "no dated episode"


# -- the export folder: pass 1 (partition by patient into SQLite shards) --------------------------------


class _Head(msgspec.Struct):
    resourceType: Any = None
    id: Any = None
    subject: Any = None
    patient: Any = None


_HEAD = msgspec.json.Decoder(_Head)
_NAME_TYPE = re.compile(r"^(?:\d+[._-])?([A-Z][A-Za-z]+)(?:[._-]\d+)*\.ndjson(?:\.gz)?$")
_worker: dict[str, Any] = {}


def export_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    files = sorted(p for p in source.iterdir() if p.is_file() and (p.name.endswith(".ndjson") or p.name.endswith(".ndjson.gz")))
    if not files:
        raise AuditError(f"{source}: no .ndjson files (a FHIR Bulk Data export folder was expected)")
    return files


def plan_chunks(files: list[Path], chunk_bytes: int = CHUNK_BYTES) -> tuple[list[tuple[str, int, int]], Counter]:
    """Line-aligned byte ranges of every file that may hold a type the audit reads; skipped files by type."""
    chunks: list[tuple[str, int, int]] = []
    skipped: Counter = Counter()
    for path in files:
        named = _NAME_TYPE.match(path.name)
        if named and named.group(1) in _KNOWN_OTHER_TYPES:  # one type per file (Bulk Data): not read at all
            skipped[named.group(1)] += path.stat().st_size
            continue
        size = path.stat().st_size
        if path.name.endswith(".gz") or size <= chunk_bytes:
            chunks.append((str(path), 0, size))
            continue
        start = 0
        with open(path, "rb") as handle:
            while start < size:
                handle.seek(min(start + chunk_bytes, size))
                if handle.tell() < size:
                    handle.readline()
                end = min(handle.tell(), size)
                chunks.append((str(path), start, end))
                start = end
    return chunks, skipped


# Types a Bulk export commonly holds that the audit never reads: their files are skipped unread.
_KNOWN_OTHER_TYPES = frozenset((
    "Encounter", "AllergyIntolerance", "CarePlan", "CareTeam", "Claim", "Coverage", "Device", "DiagnosticReport",
    "DocumentReference", "ExplanationOfBenefit", "Goal", "ImagingStudy", "Immunization", "Location", "MedicationAdministration",
    "MedicationDispense", "Organization", "Practitioner", "PractitionerRole", "Provenance", "RelatedPerson", "Group",
    "Specimen", "SupplyDelivery", "Media", "QuestionnaireResponse", "Appointment", "Communication", "Consent",
    "FamilyMemberHistory", "Flag", "List", "NutritionOrder", "RiskAssessment", "Schedule", "Slot", "Task",
))


def _shard_writer(tmp_dir: str) -> sqlite3.Connection:
    conn = _worker.get("writer")
    if conn is None:
        path = Path(tmp_dir) / f"shard-{os.getpid()}.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("CREATE TABLE IF NOT EXISTS lines (h INTEGER NOT NULL, patient TEXT NOT NULL, line BLOB NOT NULL)")
        conn.execute("CREATE TABLE IF NOT EXISTS refs (type TEXT NOT NULL, id TEXT NOT NULL, line BLOB NOT NULL)")
        _worker["writer"] = conn
    return conn


def patient_hash(patient_id: str) -> int:
    return zlib.crc32(patient_id.encode("utf-8"))


def partition_chunk(task: tuple[str, int, int, str]) -> dict[str, Any]:
    """Pass 1 on one byte range: each line of a type the audit reads into this worker's shard."""
    path, start, end, tmp_dir = task
    cpu_started = time.process_time()
    conn = _shard_writer(tmp_dir)
    stats: dict[str, Any] = {"bytes": end - start, "lines": 0, "patients": 0, "skipped": Counter()}
    rows: list[tuple[int, str, bytes]] = []
    refs: list[tuple[str, str, bytes]] = []
    conn.execute("BEGIN")
    try:
        for line in _read_lines(path, start, end):
            stats["lines"] += 1
            try:
                head = _HEAD.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                stats["skipped"]["not a FHIR resource (JSON error)"] += 1
                continue
            kind = head.resourceType
            if not isinstance(kind, str):
                stats["skipped"]["no resourceType"] += 1
                continue
            if kind in REFERENCED_TYPES:
                if isinstance(head.id, str) and head.id:
                    refs.append((kind, head.id, line))
                    if len(refs) >= INSERT_BATCH:
                        conn.executemany("INSERT INTO refs VALUES (?, ?, ?)", refs)
                        refs.clear()
                continue
            if kind not in PATIENT_TYPES:
                stats["skipped"][kind] += 1
                continue
            if kind == "Patient":
                patient = head.id if isinstance(head.id, str) and head.id else None
                stats["patients"] += patient is not None
            else:
                patient = _head_patient(head)
            if patient is None:
                stats["skipped"][f"{kind} without a Patient reference"] += 1
                continue
            rows.append((patient_hash(patient), patient, line))
            if len(rows) >= INSERT_BATCH:
                conn.executemany("INSERT INTO lines VALUES (?, ?, ?)", rows)
                rows.clear()
        if rows:
            conn.executemany("INSERT INTO lines VALUES (?, ?, ?)", rows)
        if refs:
            conn.executemany("INSERT INTO refs VALUES (?, ?, ?)", refs)
        conn.execute("COMMIT")
    except BaseException:
        try:
            conn.execute("ROLLBACK")  # the shard is temporary: a failed chunk fails the whole audit anyway
        except sqlite3.Error:
            pass
        raise
    stats["peak_rss_mb"] = peak_rss_mb()
    stats["cpu_seconds"] = time.process_time() - cpu_started
    return stats


def _head_patient(head: _Head) -> str | None:
    for value in (head.subject, head.patient):
        if isinstance(value, dict) and isinstance(value.get("reference"), str):
            return _patient_id_of(value["reference"])
    return None


def _read_lines(path: str, start: int, end: int) -> Iterator[bytes]:
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as handle:
            for line in handle:
                if line.strip():
                    yield line.strip()
        return
    with open(path, "rb") as handle:
        handle.seek(start)
        position = start
        while position < end:
            line = handle.readline()
            if not line:
                break
            position += len(line)
            line = line.strip()
            if line:
                yield line


def index_shard(path: str) -> str:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("CREATE INDEX IF NOT EXISTS lines_by_patient ON lines (h, patient)")
        conn.execute("CREATE INDEX IF NOT EXISTS refs_by_id ON refs (type, id)")
    finally:
        conn.close()
    return path


# -- the export folder: pass 2 (evaluate each hash range) ------------------------------------------------


def _init_evaluator(shards: list[str], criteria_file: str | None, policy: AuditPolicy) -> None:
    _worker["readers"] = [sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True) for path in shards]
    _worker["engine"] = Engine(Knowledge.load(criteria_file))
    _worker["policy"] = policy
    _worker["medications"] = {}


def audit_partition(bounds: tuple[int, int]) -> tuple[list[dict], dict[str, Counter], float, float]:
    """Pass 2 on one hash range: merge the shards' patient-ordered lines, audit one patient at a time.
    Returns the rows, the counts, this worker's peak RSS (MB) and the CPU seconds spent."""
    low, high = bounds
    cpu_started = time.process_time()
    readers: list[sqlite3.Connection] = _worker["readers"]
    engine: Engine = _worker["engine"]
    policy: AuditPolicy = _worker["policy"]
    cursors = [conn.execute("SELECT h, patient, line FROM lines WHERE h >= ? AND h < ? ORDER BY h, patient", (low, high))
               for conn in readers]
    merged = heapq.merge(*cursors, key=lambda row: (row[0], row[1]))
    rows: list[dict] = []
    summary = new_summary()
    for _, group in groupby(merged, key=lambda row: (row[0], row[1])):
        resources = []
        for _, _, line in group:
            try:
                resources.append(msgspec.json.decode(line))
            except msgspec.DecodeError:
                summary["skipped_lines"]["not JSON"] += 1
        resources.extend(_referenced_medications(resources, readers))
        result = audit_patient(resources, engine, policy)
        rows.extend(result.rows)
        merge_summary(summary, result.summary)
    return rows, summary, peak_rss_mb(), time.process_time() - cpu_started


def _referenced_medications(resources: list[dict], readers: list[sqlite3.Connection]) -> list[dict]:
    cache: dict[str, dict | None] = _worker["medications"]
    found = []
    for resource in resources:
        if resource.get("resourceType") not in ("MedicationRequest", "MedicationStatement"):
            continue
        reference = resource.get("medicationReference")
        target = reference.get("reference") if isinstance(reference, dict) else None
        if not isinstance(target, str) or target.startswith("#"):
            continue
        medication_id = target.rstrip("/").split("/")[-1]
        if medication_id not in cache:
            if len(cache) > 10_000:
                cache.clear()
            cache[medication_id] = None
            for conn in readers:
                hit = conn.execute("SELECT line FROM refs WHERE type = 'Medication' AND id = ? LIMIT 1", (medication_id,)).fetchone()
                if hit:
                    cache[medication_id] = msgspec.json.decode(hit[0])
                    break
        if cache[medication_id] is not None:
            found.append(cache[medication_id])
    return _unique(found)


def hash_ranges(partitions: int) -> list[tuple[int, int]]:
    step = math.ceil(HASH_SPACE / partitions)
    return [(low, min(low + step, HASH_SPACE)) for low in range(0, HASH_SPACE, step)]


# -- running an audit ---------------------------------------------------------------------------------


@dataclass
class AuditRun:
    summary: dict[str, Counter]
    meta: dict[str, Any]


class ResultWriter:
    """Per-order rows to CSV (name ends in .csv) or NDJSON, streamed."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.count = 0
        self._handle = None
        self._csv = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "w", encoding="utf-8", newline="")
        if path.suffix.lower() == ".csv":
            self._csv = csv.DictWriter(self._handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            self._csv.writeheader()

    def write(self, rows: list[dict]) -> None:
        self.count += len(rows)
        if self._handle is None:
            return
        for row in rows:
            if self._csv is not None:
                self._csv.writerow({k: _csv_value(v) for k, v in row.items()})
            else:
                self._handle.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _csv_value(value: Any) -> Any:
    if isinstance(value, list):
        return ";".join(map(str, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


def _progress(quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet or not console.is_terminal,
                    transient=False)


def _pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()):
    # spawn: workers start clean (no inherited threads or locks), whatever the caller runs.
    return multiprocessing.get_context("spawn").Pool(workers, initializer=initializer, initargs=initargs)


def _map(pool, function: Callable, tasks: list, ordered: bool = True) -> Iterator:
    if pool is None:
        return map(function, tasks)
    return pool.imap(function, tasks) if ordered else pool.imap_unordered(function, tasks)


def audit_export(source: Path, writer: ResultWriter, policy: AuditPolicy, workers: int, criteria_file: str | None = None,
                 tmp_dir: str | None = None, quiet: bool = True, chunk_bytes: int = CHUNK_BYTES) -> AuditRun:
    files = export_files(source)
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = new_summary()
    chunks, skipped_files = plan_chunks(files, chunk_bytes)
    for kind, size in skipped_files.items():
        summary["skipped_lines"][f"{kind} (file not read, bytes)"] += size
    total_bytes = sum(end - start for _, start, end in chunks)
    meta: dict[str, Any] = {"source": str(source), "files": len(files), "bytes": total_bytes, "workers": workers}
    with tempfile.TemporaryDirectory(prefix="lumbar-audit-", dir=tmp_dir) as work:
        tasks = [(path, start, end, work) for path, start, end in chunks]
        patients_seen = 0
        worker_peak = 0.0
        cpu: Counter = Counter()
        progress = _progress(quiet)
        # A pool costs ~0.4 s to start: partitioning runs in this process below PARALLEL_PARTITION_BYTES.
        pool = _pool(workers) if workers > 1 and len(tasks) > 1 and total_bytes >= PARALLEL_PARTITION_BYTES else None
        try:
            with progress:
                task = progress.add_task("Partitioning by patient", total=total_bytes or 1, unit="bytes")
                for stats in _map(pool, partition_chunk, tasks, ordered=False):
                    if pool is not None:
                        worker_peak = max(worker_peak, stats["peak_rss_mb"])
                    if pool is not None:
                        cpu["workers"] += stats["cpu_seconds"]
                    summary["counts"]["lines_read"] += stats["lines"]
                    summary["skipped_lines"].update(stats["skipped"])
                    patients_seen += stats["patients"]
                    progress.advance(task, stats["bytes"])
                if pool is None:
                    _close_writer()
                shards = sorted(str(p) for p in Path(work).glob("shard-*.db"))
                task = progress.add_task("Indexing", total=len(shards) or 1, unit="shards")
                for _ in _map(pool, index_shard, shards, ordered=False):
                    progress.advance(task)
        except BaseException:
            _stop(pool, failed=True)
            _close_writer()
            raise
        _stop(pool)
        _close_writer()
        partition_started = time.perf_counter()
        meta["partition_seconds"] = round(partition_started - started, 3)
        partitions = max(workers * 4, math.ceil(patients_seen / PATIENTS_PER_PARTITION), 1)
        ranges = hash_ranges(partitions)
        progress = _progress(quiet)
        if workers > 1 and shards:
            pool = _pool(workers, _init_evaluator, (shards, criteria_file, policy))
        else:
            pool = None
            _init_evaluator(shards, criteria_file, policy)
        try:
            with progress:
                task = progress.add_task("Evaluating orders", total=max(patients_seen, 1), unit="patients")
                for rows, part, peak, cpu_seconds in (_map(pool, audit_partition, ranges) if shards else ()):
                    if pool is not None:
                        cpu["workers"] += cpu_seconds
                    if pool is not None:
                        worker_peak = max(worker_peak, peak)
                    writer.write(rows)
                    merge_summary(summary, part)
                    progress.update(task, completed=min(summary["counts"]["patients"], max(patients_seen, 1)))
        except BaseException:
            _stop(pool, failed=True)
            raise
        finally:
            for conn in _worker.pop("readers", []):
                conn.close()
        _stop(pool)
        meta["evaluate_seconds"] = round(time.perf_counter() - partition_started, 3)
        meta["partitions"] = partitions
        meta["worker_peak_rss_mb"] = worker_peak
        cpu["main"] = time.process_time() - cpu_started  # reading, partitioning and evaluating when not in a pool; writing
        meta["cpu_seconds"] = {name: round(value, 3) for name, value in sorted(cpu.items())}
        meta["temp_bytes"] = sum(Path(s).stat().st_size for s in shards)
    meta["seconds"] = round(time.perf_counter() - started, 3)
    return AuditRun(summary, meta)


def _stop(pool, failed: bool = False) -> None:
    if pool is None:
        return
    if failed:
        pool.terminate()  # an error or Ctrl-C: do not wait for the queued work
    else:
        pool.close()
    pool.join()


def default_workers() -> int:
    """The cores this process may run on (the affinity mask in a container), else the machine's count."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _close_writer() -> None:
    conn = _worker.pop("writer", None)
    if conn is not None:
        conn.close()


# -- the FHIR server source ----------------------------------------------------------------------------


def audit_fhir_server(base_url: str, writer: ResultWriter, policy: AuditPolicy, token: str | None = None,
                      criteria_file: str | None = None, quiet: bool = True, concurrency: int = 8,
                      settings: Any = None, transport: Any = None) -> AuditRun:
    return asyncio.run(_audit_fhir_server(base_url, writer, policy, token, criteria_file, quiet, concurrency, settings, transport))


async def _audit_fhir_server(base_url: str, writer: ResultWriter, policy: AuditPolicy, token: str | None,
                             criteria_file: str | None, quiet: bool, concurrency: int, settings: Any, transport: Any) -> AuditRun:
    import httpx

    from .discovery import fill_template, load_services
    from .fhir_client import FhirClient, _place, _search_page
    from .settings import Settings

    started = time.perf_counter()
    base_url = base_url.rstrip("/")
    settings = settings or Settings.from_env()
    # Bulk reading: longer per-request limits than a hook call's (the allow-list and caps stay).
    settings = settings.with_overrides(fhir_timeout_s=max(settings.fhir_timeout_s, 30.0),
                                       fhir_deadline_s=max(settings.fhir_deadline_s, 300.0),
                                       fhir_max_pages=max(settings.fhir_max_pages, 100))
    knowledge = Knowledge.load(criteria_file or settings.criteria_file)
    engine = Engine(knowledge)
    service = load_services(knowledge.codes)["lumbar-imaging-order-sign"]
    client = FhirClient(settings, transport=transport)
    summary = new_summary()
    meta: dict[str, Any] = {"source": _redact(base_url), "workers": 1, "concurrency": concurrency}
    if not client.is_allowed(base_url):
        await client.aclose()
        raise AuditError(f"{_redact(base_url)} is not an allowed FHIR server (CDS_FHIR_SERVER_ALLOWLIST; loopback only when unset)")
    headers = {"Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    tokens = ",".join(f"{c['system']}|{c['code']}" for group in knowledge.criteria["orders"]["groups"]
                      for c in knowledge.codes.group_codes(group))
    url = f"{base_url}/ServiceRequest?code={tokens}&_count=100"
    base_place = _place(base_url)
    seen_pages: set[str] = set()
    done: set[str] = set()
    semaphore = asyncio.Semaphore(concurrency)

    async def one_patient(patient_id: str) -> tuple[list[dict], dict[str, Counter]]:
        async with semaphore:
            context = {"patientId": patient_id, "userId": "Device/retro-audit"}
            queries = {key: fill_template(template, context) for key, template in service.prefetch.items()}
            results = await client.fetch_all(base_url, {k: q for k, q in queries.items() if q}, token)
            resources: list[dict] = []
            unreadable: dict[str, str] = {}
            for key, result in results.items():
                resources.extend(result.resources or ())
                if result.resources is None or result.error or result.partial:
                    unreadable[service.resource_type(key)] = result.error or "incomplete"
            medications = {_medication_id(r) for r in resources} - {None} - {r.get("id") for r in resources if r.get("resourceType") == "Medication"}
            if medications:
                reads = await client.fetch_all(base_url, {f"medication-{i}": f"Medication/{m}" for i, m in enumerate(sorted(medications))}, token)
                for result in reads.values():
                    resources.extend(result.resources or ())
                    if result.error:
                        unreadable["MedicationRequest"] = "a referenced Medication could not be read"
        audit = audit_patient(resources, engine, policy, unreadable or None)
        return audit.rows, audit.summary

    progress = _progress(quiet)
    try:
        with progress:
            task = progress.add_task("Evaluating orders", total=None, unit="patients")
            pages = 0
            while url:
                seen_pages.add(url)
                try:
                    body = await client._get_json(url, headers)
                    orders, next_url = _search_page(body)
                except Exception as exc:  # the reason only: never the URL (patient ids) or the token
                    raise AuditError(f"the ServiceRequest search failed after {pages} page(s): {getattr(exc, 'reason', type(exc).__name__)}") from None
                pages += 1
                new_patients = []
                for order in orders:
                    patient_id = patient_reference(order)
                    if patient_id and patient_id not in done:
                        done.add(patient_id)
                        new_patients.append(patient_id)
                for rows, part in await asyncio.gather(*(one_patient(p) for p in new_patients)):
                    writer.write(rows)
                    merge_summary(summary, part)
                progress.update(task, completed=len(done))
                url = None
                if next_url:
                    absolute = str(httpx.URL(base_url + "/").join(next_url))
                    place = _place(absolute)
                    if place is None or base_place is None or not place.is_under(base_place) or not client.is_allowed(absolute):
                        raise AuditError("the ServiceRequest search's next link leaves the FHIR server")
                    if absolute in seen_pages:
                        raise AuditError("the ServiceRequest search's next links loop")
                    url = absolute
    finally:
        await client.aclose()
    meta["pages"] = pages
    meta["seconds"] = round(time.perf_counter() - started, 3)
    meta["evaluate_seconds"] = meta["seconds"]
    return AuditRun(summary, meta)


def _medication_id(resource: dict) -> str | None:
    if resource.get("resourceType") not in ("MedicationRequest", "MedicationStatement"):
        return None
    reference = resource.get("medicationReference")
    target = reference.get("reference") if isinstance(reference, dict) else None
    if not isinstance(target, str) or target.startswith("#"):
        return None
    parts = target.rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "Medication" else None


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url)


# -- summary, terminal table, HTML report ---------------------------------------------------------------


def summary_json(run: AuditRun, knowledge_version: str, policy: AuditPolicy) -> dict[str, Any]:
    s = run.summary
    counts = s["counts"]
    orders = counts["orders"]
    hedis = s["hedis"]
    denominator, numerator = hedis["denominator"], hedis["imaged_within_28_days"]
    patients = counts["patients"]
    evaluate_seconds = run.meta.get("evaluate_seconds") or 0
    workers = run.meta.get("workers") or 1
    return {
        "source": run.meta.get("source"),
        "knowledge_version": knowledge_version,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "policy": {"undated": policy.undated, "data_end": policy.data_end.isoformat() if policy.data_end else None,
                   "since": policy.since.isoformat() if policy.since else None,
                   "until": policy.until.isoformat() if policy.until else None},
        "patients": patients,
        "patients_with_orders": counts["patients_with_orders"],
        "patients_without_patient_resource": counts["patients_without_patient_resource"],
        "orders_in_scope": orders,
        "orders_revoked": counts["orders_revoked"],
        "orders_skipped": dict(sorted(s["skipped_orders"].items())),
        "card_types": {t: s["card_types"][t] for t in CARD_ORDER if s["card_types"][t]},
        "rules": {k: v for k, v in sorted(s["rules"].items(), key=lambda kv: _rule_order(kv[0]))},
        "orders_with_red_flag": counts["orders_with_red_flag"],
        "orders_with_ces_feature": counts["orders_with_ces_feature"],
        "red_flags": dict(s["red_flags"].most_common()),
        "ces_features": dict(s["ces_features"].most_common()),
        "modifiers": dict(s["modifiers"].most_common()),
        "warned": counts["warned"],
        "warned_share": round(counts["warned"] / orders, 4) if orders else None,
        "protocol_differs": counts["protocol_differs"],
        "hedis_style": {
            "new_lbp_diagnoses": hedis["new_diagnoses"],
            "outside_ages_18_75": hedis["outside_ages"],
            "window_not_complete": hedis["window_not_complete"],
            "excluded_red_flag": hedis["excluded_red_flag"],
            "denominator": denominator,
            "imaged_within_28_days": numerator,
            "imaging_rate": round(numerator / denominator, 4) if denominator else None,
            "inverted_rate": round(1 - numerator / denominator, 4) if denominator else None,
        },
        "as_of": {"resources_after_order_ignored": counts["resources_after_order"], "undated_used": counts["undated_used"],
                  "undated_dropped": counts["undated_dropped"], "conditions_active_on_order_date": counts["reactivated_conditions"]},
        "by_month": _nested(s["by_month"]),
        "by_modality": _nested(s["by_modality"]),
        "episode_days": _nested(s["episode_days"]),
        "lines_read": counts["lines_read"],
        "skipped": dict(sorted(s["skipped_lines"].items())),
        "run": {**run.meta,
                "patients_per_second": round(patients / run.meta["seconds"], 1) if run.meta.get("seconds") else None,
                "patients_per_second_per_worker_evaluating": round(patients / evaluate_seconds / workers, 1) if evaluate_seconds else None,
                # Per core, from CPU time (this process and the workers): unaffected by other load on the machine.
                "patients_per_cpu_second": round(patients / cpu_total, 1) if (cpu_total := sum(run.meta.get("cpu_seconds", {}).values())) else None,
                "peak_rss_mb": {"main": peak_rss_mb(), "largest_worker": run.meta.get("worker_peak_rss_mb", 0.0)}},
    }


def _nested(counter: Counter) -> dict[str, dict[str, int]]:
    nested: dict[str, dict[str, int]] = {}
    for key, value in sorted(counter.items()):
        outer, inner = key.split("|", 1)
        nested.setdefault(outer, {})[inner] = value
    return nested


def _rule_order(key: str) -> tuple:
    """'card|rule' in card order, then rules naturally: C1..C7, F1, R1..R13, W1, N-..."""
    card_type, rule = key.split("|", 1)
    number = re.search(r"\d+$", rule)
    return _card_rank(card_type), re.sub(r"\d+$", "", rule), int(number.group()) if number else 0, rule


def _card_rank(card_type: str) -> int:
    return CARD_ORDER.index(card_type) if card_type in CARD_ORDER else len(CARD_ORDER)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM on Linux (reset by exec, unlike ru_maxrss, which a
    child started by fork and exec inherits from its parent), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    per_mb = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return round(_resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss / per_mb, 1)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def render_summary(report: dict[str, Any], width: int = 100) -> str:
    from rich.console import Console
    from rich.table import Table

    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    orders = report["orders_in_scope"]
    run = report["run"]
    console.print(f"Retrospective audit of {report['source']}: {report['patients']} patients, {orders} lumbar imaging orders "
                  f"in {run['seconds']:.1f} s ({run['workers']} worker(s))")
    table = Table(title="Summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_column("share", justify="right")
    table.add_row("Patients read", str(report["patients"]), "")
    table.add_row("Patients with lumbar imaging orders", str(report["patients_with_orders"]), "")
    table.add_row("Orders in scope", str(orders), "")
    for card_type in CARD_ORDER:
        n = report["card_types"].get(card_type, 0)
        table.add_row(f"  {CARD_LABELS[card_type]}", str(n), _pct(n, orders))
    table.add_row("Orders with a red flag", str(report["orders_with_red_flag"]), _pct(report["orders_with_red_flag"], orders))
    table.add_row("Orders with a cauda equina feature", str(report["orders_with_ces_feature"]), _pct(report["orders_with_ces_feature"], orders))
    table.add_row("Would have been warned against", str(report["warned"]), _pct(report["warned"], orders))
    table.add_row("Ordered protocol differs from the recommendation", str(report["protocol_differs"]), _pct(report["protocol_differs"], orders))
    h = report["hedis_style"]
    table.add_row("HEDIS-style: new LBP diagnoses, 18-75, no red flag", str(h["denominator"]), "")
    table.add_row("  imaged within 28 days (rate; lower is better)", str(h["imaged_within_28_days"]),
                  _pct(h["imaged_within_28_days"], h["denominator"]))
    table.add_row("  inverted rate (HEDIS reports this; higher is better)", "",
                  "-" if h["inverted_rate"] is None else f"{100 * h['inverted_rate']:.1f}%")
    skipped = sum(report["orders_skipped"].values())
    table.add_row("Orders not evaluated (draft, entered-in-error, no date, ...)", str(skipped), "")
    table.add_row("Resources dated after their order, ignored", str(report["as_of"]["resources_after_order_ignored"]), "")
    table.add_row(f"Undated resources {'used' if report['policy']['undated'] == 'include' else 'dropped'}",
                  str(report["as_of"]["undated_used"] or report["as_of"]["undated_dropped"]), "")
    console.print(table)
    if report["red_flags"] or report["ces_features"]:
        flags = Table(title="Red flags and cauda equina features found (orders)")
        flags.add_column("fact")
        flags.add_column("orders", justify="right")
        for name, n in list(report["ces_features"].items()) + list(report["red_flags"].items()):
            flags.add_row(name, str(n))
        console.print(flags)
    rules = Table(title="Rules that decided")
    rules.add_column("card")
    rules.add_column("rule")
    rules.add_column("orders", justify="right")
    for key, n in report["rules"].items():
        card_type, rule = key.split("|", 1)
        rules.add_row(CARD_LABELS.get(card_type, card_type), rule, str(n))
    console.print(rules)
    return out.getvalue()


# -- HTML ----------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _hbar_chart(title: str, items: list[tuple[str, int, str]], total: int | None = None) -> str:
    if not items:
        return f"<p class='empty'>{_e(title)}: none.</p>"
    label_width, bar_width, row = 300, 380, 26
    height = row * len(items) + 10
    top = max(v for _, v, _ in items) or 1
    parts = [f"<svg role='img' aria-label='{_e(title)}' viewBox='0 0 {label_width + bar_width + 110} {height}' "
             f"width='{label_width + bar_width + 110}' height='{height}' xmlns='http://www.w3.org/2000/svg'><title>{_e(title)}</title>"]
    for i, (label, value, colour) in enumerate(items):
        y = 5 + i * row
        width = max(round(bar_width * value / top), 1 if value else 0)
        share = f" ({100 * value / total:.1f}%)" if total else ""
        parts.append(f"<text x='{label_width - 8}' y='{y + 16}' text-anchor='end' class='lbl'>{_e(label)}</text>"
                     f"<rect x='{label_width}' y='{y + 3}' width='{width}' height='{row - 8}' fill='{colour}'>"
                     f"<title>{_e(label)}: {value}{share}</title></rect>"
                     f"<text x='{label_width + width + 6}' y='{y + 16}' class='val'>{value}{_e(share)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _stacked_columns(title: str, categories: list[str], series: list[tuple[str, str, list[int]]]) -> str:
    if not categories:
        return f"<p class='empty'>{_e(title)}: none.</p>"
    left, plot_h, bottom, top_pad = 44, 220, 100, 10
    column = max(min(46, 860 // max(len(categories), 1)), 8)
    width = left + column * len(categories) + 70
    totals = [sum(values[i] for _, _, values in series) for i in range(len(categories))]
    top = max(totals) or 1
    parts = [f"<svg role='img' aria-label='{_e(title)}' viewBox='0 0 {width} {plot_h + bottom + top_pad}' width='{width}' "
             f"height='{plot_h + bottom + top_pad}' xmlns='http://www.w3.org/2000/svg'><title>{_e(title)}</title>"]
    for fraction in (0, 0.5, 1):
        y = top_pad + plot_h - plot_h * fraction
        parts.append(f"<line x1='{left}' x2='{width - 60}' y1='{y:.1f}' y2='{y:.1f}' class='grid'/>"
                     f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end' class='val'>{round(top * fraction)}</text>")
    for i, category in enumerate(categories):
        x = left + i * column + 2
        y = top_pad + plot_h
        for name, colour, values in series:
            value = values[i]
            if not value:
                continue
            h = plot_h * value / top
            y -= h
            parts.append(f"<rect x='{x}' y='{y:.1f}' width='{column - 4}' height='{h:.1f}' fill='{colour}'>"
                         f"<title>{_e(category)}, {_e(name)}: {value}</title></rect>")
        parts.append(f"<text transform='translate({x + column / 2 - 2},{top_pad + plot_h + 8}) rotate(50)' class='tick'>{_e(category)}</text>")
    parts.append("</svg>")
    legend = "".join(f"<span class='key'><i style='background:{colour}'></i>{_e(name)}</span>" for name, colour, _ in series)
    return "".join(parts) + f"<div class='legend'>{legend}</div>"


def _table(headers: list[str], rows: list[list[Any]], caption: str) -> str:
    head = "".join(f"<th scope='col'>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><caption>{_e(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d1d1f;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
.tiles{display:flex;flex-wrap:wrap;gap:.8rem}.tile{border:1px solid #ddd;border-radius:6px;padding:.6rem .9rem;min-width:150px}
.tile b{display:block;font-size:1.5rem}.tile span{color:#555;font-size:.85rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
td:first-child,th:first-child{text-align:left;white-space:nowrap}caption{text-align:left;font-weight:600;padding:.3rem 0}
svg{max-width:100%;height:auto}.lbl,.val,.tick{font-size:12px;fill:#333}.grid{stroke:#e3e3e3}
.legend{font-size:.85rem;margin:.3rem 0 .8rem}.key{margin-right:1rem}.key i{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:-1px}
.note{color:#444;font-size:.9rem}.empty{color:#666}details{margin:.5rem 0}
"""


def render_html(report: dict[str, Any]) -> str:
    orders = report["orders_in_scope"]
    h = report["hedis_style"]
    run = report["run"]
    tiles = [
        ("Orders in scope", orders),
        ("Would have been warned against", f"{report['warned']} ({_pct(report['warned'], orders)})"),
        ("Red flag found", f"{report['orders_with_red_flag']} ({_pct(report['orders_with_red_flag'], orders)})"),
        ("Cauda equina emergency", report["card_types"].get(CES, 0)),
        ("HEDIS-style imaging ≤ 28 d", "-" if h["imaging_rate"] is None else f"{100 * h['imaging_rate']:.1f}% of {h['denominator']}"),
    ]
    cards = [(CARD_LABELS[t], report["card_types"].get(t, 0), CARD_COLOURS[t]) for t in CARD_ORDER]
    rule_rows = [[CARD_LABELS.get(k.split("|")[0], k.split("|")[0]), k.split("|")[1], n, _pct(n, orders)] for k, n in report["rules"].items()]
    months = sorted(report["by_month"])
    month_series = [(CARD_LABELS[t], CARD_COLOURS[t], [report["by_month"][m].get(t, 0) for m in months]) for t in CARD_ORDER
                    if any(report["by_month"][m].get(t, 0) for m in months)]
    bins = [label for _, _, label in EPISODE_BINS] + ["no dated episode"]
    bins = [b for b in bins if b in report["episode_days"]]
    bin_series = [(CARD_LABELS[t], CARD_COLOURS[t], [report["episode_days"][b].get(t, 0) for b in bins]) for t in CARD_ORDER
                  if any(report["episode_days"][b].get(t, 0) for b in bins)]
    flags = [(name, n, CARD_COLOURS[CES]) for name, n in report["ces_features"].items()] + \
            [(name, n, CARD_COLOURS[INDICATED]) for name, n in report["red_flags"].items()]
    modalities = sorted(report["by_modality"])
    modality_rows = [[m] + [report["by_modality"][m].get(t, 0) for t in CARD_ORDER] + [sum(report["by_modality"][m].values())]
                     for m in modalities]
    skipped = [[k, v] for k, v in report["orders_skipped"].items() if v]
    as_of = report["as_of"]
    policy = report["policy"]
    body = [
        f"<h1>Lumbar imaging orders: retrospective audit</h1>",
        f"<p class='note'>Source: {_e(report['source'])}. Knowledge {_e(report['knowledge_version'])}. "
        f"Generated {_e(report['generated_at'])}. {report['patients']} patients, {orders} orders, {run['seconds']:.1f} s on "
        f"{run['workers']} worker(s). Aggregate counts only: no patient identifiers.</p>",
        "<div class='tiles'>" + "".join(f"<div class='tile'><b>{_e(v)}</b><span>{_e(k)}</span></div>" for k, v in tiles) + "</div>",
        "<h2>The card each order would have received</h2>",
        _hbar_chart("Orders by card", cards, orders),
        _table(["Card", "Rule", "Orders", "Share"], rule_rows, "Orders by card and deciding rule (criteria.md section 3)"),
        "<h2>Orders by month</h2>",
        _stacked_columns("Orders by month of the order, by card", months, month_series),
        "<details><summary>The numbers by month</summary>",
        _table(["Month"] + [CARD_LABELS[t] for t in CARD_ORDER],
               [[m] + [report["by_month"][m].get(t, 0) for t in CARD_ORDER] for m in months], "Orders by month"),
        "</details>",
        "<h2>Back pain duration when the order was placed</h2>",
        _stacked_columns("Days since the episode began, by card", bins, bin_series),
        "<h2>Red flags and cauda equina features found</h2>",
        _hbar_chart("Orders with each fact (an order may have several)", flags, orders),
        "<h2>Modality ordered</h2>",
        _table(["Modality"] + [CARD_LABELS[t] for t in CARD_ORDER] + ["All"], modality_rows, "Orders by modality and card"),
        f"<p class='note'>The ordered protocol differs from the recommended one in {report['protocol_differs']} orders "
        f"({_pct(report['protocol_differs'], orders)}).</p>",
        "<h2>HEDIS-style rate: imaging within 28 days of a new low back pain diagnosis</h2>",
        _table(["", "Count"], [
            ["New back pain diagnoses (none in the 180 days before)", h["new_lbp_diagnoses"]],
            ["  outside ages 18-75", h["outside_ages_18_75"]],
            ["  28-day window not complete in the data", h["window_not_complete"]],
            ["  excluded: red flag or cauda equina feature by day 28", h["excluded_red_flag"]],
            ["Denominator", h["denominator"]],
            ["Imaged (lumbar X-ray, CT or MRI ordered, not revoked) within 28 days", h["imaged_within_28_days"]],
            ["Imaging rate (lower is better)", "-" if h["imaging_rate"] is None else f"{100 * h['imaging_rate']:.1f}%"],
            ["Inverted rate, as HEDIS reports it (higher is better)", "-" if h["inverted_rate"] is None else f"{100 * h['inverted_rate']:.1f}%"],
        ], "HEDIS-style, not the NCQA measure"),
        "<p class='note'>Not the licensed NCQA measure: the diagnosis date is the Condition's recordedDate (else onset), "
        "exclusions are this service's red flags and cauda equina features (criteria.yaml) evaluated on the record as it "
        "was 28 days after the diagnosis, the age is taken at the diagnosis, enrolment and encounter types are not "
        "checked, and an imaging order (not a claim) is the numerator event.</p>",
        "<h2>Method</h2>",
        "<ul class='note'>"
        "<li>Each order is evaluated by the service's own engine with today = the order's date and the patient's record "
        "as it was that day: resources dated after the order are ignored "
        f"({as_of['resources_after_order_ignored']} in all); conditions that resolved after the order are read as active "
        f"({as_of['conditions_active_on_order_date']}).</li>"
        f"<li>Undated resources: {_e(policy['undated'])}d ({as_of['undated_used'] if policy['undated'] == 'include' else as_of['undated_dropped']}).</li>"
        "<li>Orders in scope: ServiceRequests coded as lumbar spine MRI, CT or X-ray, with a date, not draft or "
        "entered-in-error; revoked orders are in scope (the hook fired when they were placed) but are not imaging for the "
        "HEDIS-style rate.</li></ul>",
        _table(["Order not evaluated", "Orders"], skipped, "Orders left out") if skipped else "",
    ]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
            "<title>Lumbar imaging retrospective audit</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


# -- command line ----------------------------------------------------------------------------------------


def add_audit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("source", help="FHIR Bulk Data export folder (NDJSON) or FHIR R4 server base URL")
    parser.add_argument("--out", type=Path, help="per-order results: CSV if the name ends in .csv, else NDJSON")
    parser.add_argument("--html", type=Path, help="HTML report with charts (self-contained)")
    parser.add_argument("--summary-json", type=Path, help="the summary as JSON")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes for an export (default: every core this process may use)")
    parser.add_argument("--token", help="FHIR server access token (sent as a Bearer token, never logged)")
    parser.add_argument("--token-file", type=Path, help="read the access token from this file (keeps it out of the process list)")
    parser.add_argument("--undated", choices=("include", "exclude"), default="include",
                        help="resources with no clinical date: used (default) or dropped")
    parser.add_argument("--data-end", type=date.fromisoformat,
                        help="last date the data covers (HEDIS-style windows ending later are left out); default: the "
                             "export manifest's transactionTime, else today")
    parser.add_argument("--since", type=date.fromisoformat, help="only orders on or after this date")
    parser.add_argument("--until", type=date.fromisoformat, help="only orders on or before this date")
    parser.add_argument("--tmp-dir", help="where the temporary patient partitions go (about the export's size)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    return parser


def run_audit(args: argparse.Namespace) -> dict[str, Any]:
    """Run the audit the arguments describe; write --out, --html, --summary-json; return the summary."""
    from .settings import Settings

    settings = Settings.from_env()
    knowledge = Knowledge.load(settings.criteria_file)
    source = str(args.source)
    is_url = source.startswith(("http://", "https://"))
    data_end = args.data_end or (None if is_url else _manifest_date(Path(source))) or date.today()
    policy = AuditPolicy(undated=args.undated, data_end=data_end, since=args.since, until=args.until)
    token = args.token
    if getattr(args, "token_file", None):
        token = args.token_file.read_text(encoding="utf-8").strip()
    writer = ResultWriter(args.out)
    try:
        if is_url:
            run = audit_fhir_server(source, writer, policy, token, settings.criteria_file, quiet=args.quiet, settings=settings)
        else:
            path = Path(source)
            if not path.exists():
                raise AuditError(f"{source}: no such folder")
            run = audit_export(path, writer, policy, max(1, args.workers), settings.criteria_file, args.tmp_dir, quiet=args.quiet)
    finally:
        writer.close()
    report = summary_json(run, knowledge.version, policy)
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.html:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(render_html(report), encoding="utf-8")
    return report


def _manifest_date(source: Path) -> date | None:
    manifest = source / "manifest.json" if source.is_dir() else None
    if manifest is None or not manifest.is_file():
        return None
    try:
        return fv.parse_date(json.loads(manifest.read_text(encoding="utf-8")).get("transactionTime"))
    except (OSError, ValueError, AttributeError):
        return None


def main_audit(args: argparse.Namespace) -> int:
    try:
        report = run_audit(args)
    except AuditError as exc:
        print(f"audit: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(render_summary(report), end="")
        for name, path in (("per-order results", args.out), ("HTML report", args.html), ("summary", args.summary_json)):
            if path:
                print(f"{name}: {path}")
    return 0
