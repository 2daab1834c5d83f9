"""Clinical vignettes (the clinical team's format, criteria.md section 4) -> FHIR R4 resources and CDS Hooks requests.

A vignette gives ages and dates relative to "today"; this module turns them into a patient record
(Patient, Condition, Observation, MedicationRequest/Statement, Procedure, ServiceRequest), a draft
imaging ServiceRequest, and a CDS Hooks request whose prefetch follows the service's templates.
Used by the tests, the demo patients and `python -m cds_service send`.
"""

from __future__ import annotations

import re
import uuid
from datetime import date, timedelta
from typing import Any

CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
UCUM = "http://unitsofmeasure.org"

PREFETCH_KEYS = {
    "Condition": "conditions",
    "Observation": "observations",
    "MedicationRequest": "medicationRequests",
    "MedicationStatement": "medicationStatements",
    "Procedure": "procedures",
    "ServiceRequest": "serviceRequests",
}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-").lower()[:40] or "x"


def _day(today: date, days_ago: Any) -> str | None:
    if days_ago is None:
        return None
    return (today - timedelta(days=int(days_ago))).isoformat()


def patient_resource(vignette: dict, today: date) -> dict:
    patient_id = _slug(vignette["id"])
    # Birthday 100 days before today's month/day: the age in years is exactly the vignette's age.
    anchor = today - timedelta(days=100)
    try:
        birth = anchor.replace(year=anchor.year - int(vignette["age"]))
    except ValueError:  # 29 February
        birth = anchor.replace(year=anchor.year - int(vignette["age"]), day=28)
    return {
        "resourceType": "Patient",
        "id": patient_id,
        "gender": vignette.get("sex") or "unknown",
        "birthDate": birth.isoformat(),
    }


def fact_resource(fact: dict, index: int, patient_id: str, today: date) -> dict:
    kind = fact["resourceType"]
    coding = {"system": fact["system"], "code": fact["code"]}
    if fact.get("display"):
        coding["display"] = fact["display"]
    concept = {"coding": [coding]}
    resource: dict[str, Any] = {"resourceType": kind, "id": f"{patient_id}-{kind.lower()}-{index}"}
    subject = {"reference": f"Patient/{patient_id}"}
    status = fact.get("status")
    if kind == "Condition":
        resource.update(subject=subject, code=concept)
        resource["clinicalStatus"] = {"coding": [{"system": CONDITION_CLINICAL, "code": status or "active"}]}
        resource["verificationStatus"] = {"coding": [{"system": CONDITION_VERIFICATION, "code": fact.get("verificationStatus") or "confirmed"}]}
        if fact.get("onsetDaysAgo") is not None:
            resource["onsetDateTime"] = _day(today, fact["onsetDaysAgo"])
        if fact.get("recordedDaysAgo") is not None:
            resource["recordedDate"] = _day(today, fact["recordedDaysAgo"])
        if fact.get("abatementDaysAgo") is not None:
            resource["abatementDateTime"] = _day(today, fact["abatementDaysAgo"])
    elif kind == "Observation":
        resource.update(status=status or "final", code=concept, subject=subject)
        if fact.get("effectiveDaysAgo") is not None:
            resource["effectiveDateTime"] = _day(today, fact["effectiveDaysAgo"])
        value = fact.get("value")
        if isinstance(value, dict):
            resource["valueCodeableConcept"] = {"coding": [value]}
        elif isinstance(value, bool):
            resource["valueBoolean"] = value
        elif isinstance(value, (int, float)):
            quantity: dict[str, Any] = {"value": value}
            if fact.get("unit"):
                quantity.update(unit=fact["unit"], system=UCUM, code=fact["unit"])
            resource["valueQuantity"] = quantity
    elif kind in ("MedicationRequest", "MedicationStatement"):
        resource.update(status=status or "active", medicationCodeableConcept=concept, subject=subject)
        start = _day(today, fact.get("effectiveDaysAgo"))
        duration = fact.get("durationDays")
        if kind == "MedicationRequest":
            resource["intent"] = "order"
            if start:
                resource["authoredOn"] = start
            if duration is not None:
                resource["dispenseRequest"] = {"expectedSupplyDuration": {"value": duration, "unit": "days", "system": UCUM, "code": "d"}}
        elif start:
            if duration is not None:
                end = (date.fromisoformat(start) + timedelta(days=int(duration))).isoformat()
                resource["effectivePeriod"] = {"start": start, "end": end}
            else:
                resource["effectiveDateTime"] = start
    elif kind == "Procedure":
        resource.update(status=status or "completed", code=concept, subject=subject)
        if fact.get("effectiveDaysAgo") is not None:
            resource["performedDateTime"] = _day(today, fact["effectiveDaysAgo"])
    elif kind == "ServiceRequest":
        resource.update(status=status or "active", intent="order", code=concept, subject=subject)
        if fact.get("effectiveDaysAgo") is not None:
            resource["authoredOn"] = _day(today, fact["effectiveDaysAgo"])
    else:
        raise ValueError(f"vignette fact of unsupported type {kind}")
    return resource


def draft_order(vignette: dict, patient_id: str, order_id: str = "draft-imaging-1") -> dict:
    order = vignette["order"]
    coding = {"system": order["system"], "code": order["code"]}
    if order.get("display"):
        coding["display"] = order["display"]
    return {
        "resourceType": "ServiceRequest",
        "id": order_id,
        "status": "draft",
        "intent": "order",
        "code": {"coding": [coding]},
        "subject": {"reference": f"Patient/{patient_id}"},
    }


def patient_record(vignette: dict, today: date) -> list[dict]:
    """The patient's chart: Patient first, then one resource per fact."""
    patient = patient_resource(vignette, today)
    return [patient] + [fact_resource(f, i, patient["id"], today) for i, f in enumerate(vignette["facts"])]


def prefetch_for(record: list[dict]) -> dict[str, Any]:
    """Prefetch as an EHR fills the service's templates: a Bundle per search key, null when empty."""
    prefetch: dict[str, Any] = {"patient": record[0]}
    for resource_type, key in PREFETCH_KEYS.items():
        matches = [r for r in record[1:] if r["resourceType"] == resource_type]
        prefetch[key] = searchset(matches) if matches else None
    return prefetch


def searchset(resources: list[dict]) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, r['resourceType'] + '/' + r['id'])}", "resource": r, "search": {"mode": "match"}} for r in resources],
    }


def hook_request(vignette: dict, today: date, hook: str = "order-select", with_prefetch: bool = True) -> dict:
    record = patient_record(vignette, today)
    patient_id = record[0]["id"]
    order = draft_order(vignette, patient_id)
    context: dict[str, Any] = {
        "userId": "Practitioner/example-clinician",
        "patientId": patient_id,
        "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]},
    }
    if hook == "order-select":
        context["selections"] = [f"ServiceRequest/{order['id']}"]
    request: dict[str, Any] = {"hookInstance": str(uuid.uuid4()), "hook": hook, "context": context}
    if with_prefetch:
        request["prefetch"] = prefetch_for(record)
    return request


def transaction_bundle(record: list[dict]) -> dict:
    """A FHIR transaction that PUTs the record by id (for loading into a FHIR server)."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in record
        ],
    }
