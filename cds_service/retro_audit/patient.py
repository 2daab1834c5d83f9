"""One patient, the audit's unit of work: `audit_patient` takes a patient's resources and returns that
patient's per-order rows and counts, with no I/O (what a Dask or Spark job would map over partitions)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

from cards.engine import Engine
from fhir_mappings import fhir_values as fv
from fhir_mappings.facts import read_orders

from .as_of import Moment, dated, moment, record_as_of
from .hedis import hedis_episodes, index_episode, performed
from .model import EPISODE_BINS, NO_CARD, NOT_INDICATED, AuditPolicy, new_summary
from .references import patient_reference, unique

NOT_PLACED_STATUSES = ("draft", "entered-in-error")  # never signed, or never real
NOT_ORDER_INTENTS = ("proposal", "plan", "directive", "option")


@dataclass
class PatientAudit:
    rows: list[dict] = field(default_factory=list)
    summary: dict[str, Counter] = field(default_factory=new_summary)


@dataclass
class PastOrder:
    resource: dict
    when: Moment
    imaging: Any  # fhir_mappings.facts.ImagingOrder


def audit_patient(resources: list[dict], engine: Engine, policy: AuditPolicy = AuditPolicy(),
                  unreadable: dict[str, str] | None = None) -> PatientAudit:
    """Every past lumbar imaging order of one patient, evaluated on the record as it was that day. Pure.

    `resources` is the patient's whole record (any order); `unreadable` names resource types that
    could not be read (FHIR server source), as in a hook call.
    """
    knowledge = engine.knowledge
    audit = PatientAudit()
    counts, summary = audit.summary["counts"], audit.summary
    resources = unique(r for r in resources if isinstance(r, dict) and isinstance(r.get("resourceType"), str))
    patient_id = _patient_id(resources) or ""
    counts["patients"] += 1
    if not any(r["resourceType"] == "Patient" for r in resources):
        counts["patients_without_patient_resource"] += 1

    orders: list[PastOrder] = []
    for resource in resources:
        if resource["resourceType"] != "ServiceRequest":
            continue
        in_scope, _ = read_orders(_draft_bundle(resource), None, knowledge)
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
            orders.append(PastOrder(resource, when, in_scope[0]))
    orders.sort(key=lambda o: (o.when.day, o.when.instant or datetime.min.replace(tzinfo=timezone.utc), str(o.resource.get("id"))))

    timeline = dated(resources)
    episodes = hedis_episodes(resources, timeline, orders, engine, policy, summary)

    in_range = [o for o in orders if (policy.since is None or o.when.day >= policy.since)
                and (policy.until is None or o.when.day <= policy.until)]
    if len(in_range) < len(orders):
        summary["skipped_orders"]["outside --since/--until"] += len(orders) - len(in_range)
    if in_range:
        counts["patients_with_orders"] += 1
    for order in in_range:
        audit.rows.append(_audit_order(order, timeline, patient_id, engine, policy, unreadable, episodes, summary))
    return audit


def _patient_id(resources: list[dict]) -> str | None:
    for resource in resources:
        if resource.get("resourceType") == "Patient" and isinstance(resource.get("id"), str):
            return resource["id"]
    for resource in resources:
        reference = patient_reference(resource)
        if reference:
            return reference
    return None


def _draft_bundle(order: dict) -> dict:
    """The order as the draft of a hook call: as it stood when it was placed."""
    draft = dict(order)
    draft["status"] = "draft"
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": draft}]}


def _audit_order(order: PastOrder, timeline: list, patient_id: str, engine: Engine, policy: AuditPolicy,
                 unreadable: dict[str, str] | None, episodes: dict[date, bool], summary: dict[str, Counter]) -> dict:
    today = order.when.day
    record, stats = record_as_of(timeline, order.when, policy.undated, skip=lambda r: r is order.resource)
    evaluation = engine.evaluate(record, _draft_bundle(order.resource), today, f"retro-audit|{patient_id}|{order.resource.get('id')}",
                                 unreadable=unreadable)
    facts = evaluation.facts
    assessment = evaluation.assessments[0]
    card = evaluation.cards[0] if evaluation.cards else None
    card_type = assessment.card_type or NO_CARD
    red_flags = [f.id for f in facts.red_flags]
    ces = [f.id for f in facts.ces]
    protocol = assessment.protocol
    iesd = index_episode(episodes, today)
    hedis_counted = bool(iesd is not None and episodes.get(iesd) and performed(order.resource))
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
    counts["orders_revoked"] += not performed(order.resource)
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

