"""The benchmark's request bodies, generated deterministically (fixed seed).

small      the order-select request the CDS Hooks sandbox sends (checklist §5.4): no usable code, tiny prefetch
realistic  1 Patient, 30 Conditions, 200 Observations, 20 medication resources, 5 ServiceRequests (~280 KB)
"""

from __future__ import annotations

import json
import random
import uuid
from datetime import date, timedelta

TODAY = date(2026, 11, 21)


def small_request() -> dict:
    return {
        "hookInstance": str(uuid.UUID(int=1)),
        "hook": "order-select",
        "fhirServer": "http://127.0.0.1:9/fhir",
        "context": {
            "patientId": "lbp1",
            "userId": "Practitioner/COREPRACTITIONER1",
            "selections": ["ServiceRequest/example-request-id"],
            "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": {
                "resourceType": "ServiceRequest", "id": "example-request-id", "status": "draft", "intent": "plan",
                "code": {"coding": [{}]}, "subject": {"reference": "Patient/lbp1"}, "reasonCode": []}}]},
        },
        "prefetch": {
            "patient": {"resourceType": "Patient", "id": "lbp1", "gender": "male", "birthDate": "1980-03-01"},
            "conditions": None, "observations": None, "medicationRequests": None,
            "medicationStatements": None, "procedures": None, "serviceRequests": None,
        },
    }


def _day(days_ago: int) -> str:
    return (TODAY - timedelta(days=days_ago)).isoformat()


def realistic_record(seed: int = 7, patient_id: str = "bench-1") -> list[dict]:
    rng = random.Random(seed)
    subject = {"reference": f"Patient/{patient_id}"}
    record: list[dict] = [{
        "resourceType": "Patient", "id": patient_id, "gender": "female", "birthDate": "1971-06-15",
        "name": [{"family": "Benchmark", "given": ["Realistic"]}],
        "address": [{"line": ["1 Example Road"], "city": "Springfield", "postalCode": "00000"}],
    }]
    context_codes = [("http://hl7.org/fhir/sid/icd-10-cm", c, d) for c, d in (
        ("I10", "Essential (primary) hypertension"), ("E11.9", "Type 2 diabetes mellitus without complications"),
        ("J44.9", "Chronic obstructive pulmonary disease, unspecified"), ("E78.5", "Hyperlipidemia, unspecified"),
        ("K21.9", "Gastro-esophageal reflux disease without esophagitis"), ("M17.11", "Unilateral primary osteoarthritis, right knee"),
        ("F41.1", "Generalized anxiety disorder"), ("N40.1", "Benign prostatic hyperplasia with LUTS"))]
    for i in range(29):
        system, code, display = context_codes[i % len(context_codes)]
        record.append({
            "resourceType": "Condition", "id": f"c{i}", "subject": subject,
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": rng.choice(["active", "resolved", "inactive"])}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item"}]}],
            "code": {"coding": [{"system": system, "code": code, "display": display}], "text": display},
            "onsetDateTime": _day(rng.randint(30, 4000)), "recordedDate": _day(rng.randint(0, 30)),
            "note": [{"text": "Reviewed at annual visit. " * 4}],
        })
    record.append({
        "resourceType": "Condition", "id": "lbp", "subject": subject,
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "279039007", "display": "Low back pain"}]},
        "onsetDateTime": _day(12),
    })
    loinc = [("8310-5", "Body temperature", "Cel", 36.2, 37.6), ("8867-4", "Heart rate", "/min", 55, 95),
             ("8480-6", "Systolic blood pressure", "mm[Hg]", 105, 150), ("29463-7", "Body weight", "kg", 60, 90),
             ("2339-0", "Glucose", "mg/dL", 70, 180), ("4548-4", "Hemoglobin A1c", "%", 5.0, 8.5)]
    for i in range(200):
        code, display, unit, low, high = loinc[i % len(loinc)]
        record.append({
            "resourceType": "Observation", "id": f"o{i}", "status": "final", "subject": subject,
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}], "text": display},
            "effectiveDateTime": _day(rng.randint(0, 2000)) + "T09:30:00Z", "issued": _day(0) + "T10:00:00Z",
            "valueQuantity": {"value": round(rng.uniform(low, high), 1), "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
            "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "N"}]}],
            "referenceRange": [{"low": {"value": low, "unit": unit}, "high": {"value": high, "unit": unit}}],
        })
    drugs = [("197361", "amlodipine 5 MG Oral Tablet"), ("860975", "metformin hydrochloride 500 MG Oral Tablet"),
             ("617312", "atorvastatin 40 MG Oral Tablet"), ("198211", "simvastatin 40 MG Oral Tablet"),
             ("310965", "ibuprofen 200 MG Oral Tablet")]
    for i in range(20):
        code, display = drugs[i % len(drugs)]
        kind = "MedicationRequest" if i % 2 == 0 else "MedicationStatement"
        resource = {
            "resourceType": kind, "id": f"m{i}", "status": rng.choice(["active", "completed", "stopped"]), "subject": subject,
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": code, "display": display}], "text": display},
            "dosage" if kind == "MedicationStatement" else "dosageInstruction": [{"text": "one tablet daily", "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}}],
        }
        if kind == "MedicationRequest":
            resource.update(intent="order", authoredOn=_day(rng.randint(40, 3000)),
                            dispenseRequest={"expectedSupplyDuration": {"value": 30, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"}, "numberOfRepeatsAllowed": 3})
        else:
            resource["effectivePeriod"] = {"start": _day(rng.randint(40, 3000))}
        record.append(resource)
    for i in range(5):
        record.append({
            "resourceType": "ServiceRequest", "id": f"s{i}", "status": "completed", "intent": "order", "subject": subject,
            "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "Chest CT"}]},
            "authoredOn": _day(rng.randint(100, 3000)),
        })
    return record


def realistic_request(seed: int = 7) -> dict:
    record = realistic_record(seed)
    by_key = {"Condition": "conditions", "Observation": "observations", "MedicationRequest": "medicationRequests",
              "MedicationStatement": "medicationStatements", "Procedure": "procedures", "ServiceRequest": "serviceRequests"}
    prefetch: dict = {"patient": record[0]}
    for resource_type, key in by_key.items():
        entries = [{"fullUrl": f"http://127.0.0.1/fhir/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                   for r in record if r["resourceType"] == resource_type]
        prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries} if entries else None
    order = {"resourceType": "ServiceRequest", "id": "draft-1", "status": "draft", "intent": "order",
             "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "72148", "display": "MRI lumbar spine without contrast"}]},
             "subject": {"reference": "Patient/bench-1"}}
    return {
        "hookInstance": str(uuid.UUID(int=2)),
        "hook": "order-select",
        "context": {"patientId": "bench-1", "userId": "Practitioner/bench",
                    "selections": ["ServiceRequest/draft-1"],
                    "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]}},
        "prefetch": prefetch,
    }


if __name__ == "__main__":
    body = json.dumps(realistic_request()).encode()
    print(f"realistic request: {len(body)} bytes")
