"""The HEDIS-style rate (not the NCQA measure): new low back pain diagnoses of one patient, which of them
count in the denominator, and whether a lumbar imaging order followed within 28 days."""

from __future__ import annotations

from collections import Counter
from datetime import date, timedelta
from typing import TYPE_CHECKING

from cards.engine import Engine
from fhir_mappings import fhir_values as fv
from fhir_mappings.facts import extract_facts
from fhir_mappings.knowledge import Knowledge

from .as_of import Moment, record_as_of
from .model import AuditPolicy

if TYPE_CHECKING:
    from .patient import PastOrder

NOT_PERFORMED_STATUSES = ("revoked",)  # placed (the hook fired), then withdrawn: not imaging for the HEDIS-style rate
EPISODE_GROUP = "LBP_EPISODE"

HEDIS_NEGATIVE_HISTORY_DAYS = 180
HEDIS_WINDOW_DAYS = 28
HEDIS_AGES = (18, 75)


def performed(order: dict) -> bool:
    """Whether a placed order counts as imaging for the rate (not revoked)."""
    return fv.text(order.get("status")) not in NOT_PERFORMED_STATUSES


def index_episode(episodes: dict[date, bool], day: date) -> date | None:
    """The latest new diagnosis whose 28-day window holds `day`."""
    return max((d for d in episodes if d <= day <= d + timedelta(days=HEDIS_WINDOW_DAYS)), default=None)


def hedis_episodes(resources: list[dict], timeline: list, orders: list[PastOrder], engine: Engine, policy: AuditPolicy,
                   summary: dict[str, Counter]) -> dict[date, bool]:
    """HEDIS-style index episodes: IESD -> counted in the denominator (adult 18-75, window complete, no red flag)."""
    hedis = summary["hedis"]
    episodes: dict[date, bool] = {}
    patient = next((r for r in resources if r["resourceType"] == "Patient"), None)
    birth = fv.parse_date(patient.get("birthDate")) if patient else None
    for iesd in _new_diagnoses(_lbp_diagnosis_dates(resources, engine.knowledge)):
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
        imaged = any(iesd <= o.when.day <= window_end and performed(o.resource) for o in orders)
        hedis["denominator"] += 1
        hedis["imaged_within_28_days"] += imaged
        episodes[iesd] = True
    return episodes


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
