"""FHIR references as the audit reads them: the patient a resource belongs to, the Medication a
MedicationRequest or MedicationStatement names, and resources de-duplicated by type and id."""

from __future__ import annotations

from typing import Any, Iterable


def patient_reference(resource: dict) -> str | None:
    """The patient id a resource belongs to: Patient.id, or subject/patient references to a Patient."""
    if resource.get("resourceType") == "Patient":
        return resource.get("id") if isinstance(resource.get("id"), str) else None
    return referenced_patient(resource.get(name) for name in ("subject", "patient"))


def referenced_patient(values: Iterable[Any]) -> str | None:
    """The patient id of the first of `values` (subject, then patient) that is a reference: None when it is not to a Patient."""
    for value in values:
        reference = value.get("reference") if isinstance(value, dict) else None
        if isinstance(reference, str):
            return patient_id_of(reference)
    return None


def patient_id_of(reference: str) -> str | None:
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    return None


def medication_reference(resource: dict) -> str | None:
    """A MedicationRequest's or MedicationStatement's medicationReference, unless contained (#id) or absent."""
    if resource.get("resourceType") not in ("MedicationRequest", "MedicationStatement"):
        return None
    reference = resource.get("medicationReference")
    target = reference.get("reference") if isinstance(reference, dict) else None
    if not isinstance(target, str) or target.startswith("#"):
        return None
    return target


def unique(resources: Iterable[dict]) -> list[dict]:
    """The resources without repeats of the same type and id (the first kept); resources without an id all kept."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for resource in resources:
        resource_id = resource.get("id")
        if isinstance(resource_id, str) and resource_id:
            key = (resource["resourceType"], resource_id)
            if key in seen:
                continue
            seen.add(key)
        kept.append(resource)
    return kept
