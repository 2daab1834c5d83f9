#!/usr/bin/env python3
"""Generate a synthetic FHIR R4 Bulk Data export of patients with low back pain and lumbar imaging orders.

    python scripts/generate_export.py --patients 3000 --seed 7 --out /tmp/export

Writes NDJSON files per resource type, as a Bulk Data $export does (Patient.ndjson, Condition.ndjson,
Condition-2.ndjson when a type has more than --lines-per-file lines, ...), plus Encounter.ndjson (a type
the audit does not read) and a manifest.json. Everything is derived from --seed: the same arguments give
byte-identical files, and patient i is the same in every export made with the same seed (an export of 300
patients is the first 300 patients of one of 1500). Patients are written one at a time: memory stays flat.

The population is adults (and a few children) with back pain episodes seen in primary care, about half of
the episodes imaged. Proportions are set to look like published primary-care data, not to be a study:

- imaging orders mostly in the first six weeks (the warning case), some after six weeks of
  physiotherapy or NSAIDs (rule F1), about 3 in 10 with a red flag (R1-R13, history or acute), ~1.5% with
  a cauda equina feature (C1-C7); children (N-child), orders without a back pain diagnosis
  (N-no-episode) and episodes with no date (N-unknown-duration); pregnancy and PAD modifiers (M1, M2);
- things that look like red flags and are not (basal cell carcinoma, old fever, old trauma, a
  cancer entered in error, abnormal reflex), normal temperatures, unrelated conditions;
- what happened after each order, which a retrospective audit must ignore: the MRI's findings recorded
  days later (a radiculopathy, sometimes bone metastases or a cauda equina diagnosis), physiotherapy
  started afterwards, episodes resolved later (clinicalStatus resolved, abatement after the order),
  repeat imaging;
- order statuses as they are found in a chart (completed, active, revoked, entered-in-error, draft),
  order codes in CPT, LOINC, RadLex and SNOMED CT, some NSAIDs by medicationReference (Medication.ndjson).

Clinical dates are dates (YYYY-MM-DD); orders' authoredOn (08:00-17:50) and observations' issued (08:00) are
dateTimes with a time zone.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
CPT = "http://www.ama-assn.org/go/cpt"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
RADLEX = "http://radlex.org"
UCUM = "http://unitsofmeasure.org"
LOCAL_OBS = "http://example.org/fhir/CodeSystem/local-observations"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
NAMESPACE = uuid.UUID("6f1c3f0e-2a47-4d51-9a3e-4b7f0d2c9e11")


def c(system: str, code: str, display: str) -> dict:
    return {"system": system, "code": code, "display": display}


# Imaging orders (code, weight): mostly MRI without contrast in CPT, some X-ray and CT, other systems.
ORDERS = [
    (c(CPT, "72148", "MRI lumbar spine, without contrast"), 52),
    (c(CPT, "72158", "MRI lumbar spine, without then with contrast"), 7),
    (c(CPT, "72131", "CT lumbar spine, without contrast"), 7),
    (c(CPT, "72100", "Radiologic exam lumbosacral spine, 2 or 3 views"), 16),
    (c(LOINC, "30679-5", "MR Lumbar spine WO contrast"), 6),
    (c(LOINC, "36670-8", "XR Lumbar spine 2 Views"), 4),
    (c(RADLEX, "RPID541", "MR Lumbar Spine wo IV Contrast"), 5),
    (c(SNOMED, "394451000119106", "Magnetic resonance imaging of lumbar spine without contrast"), 3),
]
ORDER_STATUSES = [("completed", 84), ("active", 7), ("revoked", 5), ("entered-in-error", 2), ("draft", 2)]
OTHER_IMAGING = c(CPT, "70551", "MRI brain, without contrast")

EPISODES = [
    (c(SNOMED, "279039007", "Low back pain (finding)"), 30),
    (c(ICD10CM, "M54.50", "Low back pain, unspecified"), 25),
    (c(ICD10CM, "M54.42", "Lumbago with sciatica, left side"), 10),
    (c(ICD10CM, "M54.41", "Lumbago with sciatica, right side"), 10),
    (c(ICD10CM, "M51.16", "Intervertebral disc disorders with radiculopathy, lumbar region"), 8),
    (c(ICD10CM, "M54.16", "Radiculopathy, lumbar region"), 5),
    (c(ICD10CM, "S39.012A", "Strain of muscle, fascia and tendon of lower back, initial encounter"), 7),
    (c(ICD10CM, "M48.062", "Spinal stenosis, lumbar region with neurogenic claudication"), 5),
]
RADICULOPATHY_FINDING = c(ICD10CM, "M51.26", "Other intervertebral disc displacement, lumbar region")

PHYSIO = c(SNOMED, "91251008", "Physical therapy procedure (regime/therapy)")
PT_EXERCISE = c(CPT, "97110", "Therapeutic exercises")
PT_REFERRAL = c(SNOMED, "306170007", "Referral to physiotherapy service (procedure)")
CHIROPRACTIC = c(CPT, "98940", "Chiropractic manipulative treatment, spinal 1-2 regions")
IBUPROFEN = c(RXNORM, "5640", "ibuprofen")
NAPROXEN = c(RXNORM, "198014", "naproxen 500 MG Oral Tablet")
MEDICATIONS = {  # the formulary items written to Medication.ndjson (referenced by some MedicationRequests)
    "med-ibuprofen-400": c(RXNORM, "5640", "ibuprofen"),
    "med-naproxen-500": NAPROXEN,
    "med-prednisone-5": c(RXNORM, "312617", "prednisone 5 MG Oral Tablet"),
    "med-alendronate-70": c(RXNORM, "46041", "alendronate"),
}

BODY_TEMPERATURE = c(LOINC, "8310-5", "Body temperature")
PRESENT = c(SNOMED, "52101004", "Present")
LABS = [  # unrelated results a Bulk export carries too (code, low, high, UCUM unit)
    (c(LOINC, "2345-7", "Glucose [Mass/volume] in Serum or Plasma"), 70, 160, "mg/dL"),
    (c(LOINC, "2160-0", "Creatinine [Mass/volume] in Serum or Plasma"), 0.6, 1.4, "mg/dL"),
    (c(LOINC, "718-7", "Hemoglobin [Mass/volume] in Blood"), 11.5, 16.5, "g/dL"),
    (c(LOINC, "4537-7", "Erythrocyte sedimentation rate by Westergren method"), 2, 40, "mm/h"),
    (c(LOINC, "1988-5", "C reactive protein [Mass/volume] in Serum or Plasma"), 0.1, 12, "mg/L"),
]

HYPERTENSION = c(ICD10CM, "I10", "Essential (primary) hypertension")
DIABETES = c(ICD10CM, "E11.9", "Type 2 diabetes mellitus without complications")
BPH = c(ICD10CM, "N40.1", "Benign prostatic hyperplasia with lower urinary tract symptoms")
BASAL_CELL = c(ICD10CM, "C44.91", "Basal cell carcinoma of skin, unspecified")
ABNORMAL_REFLEX = c(ICD10CM, "R29.2", "Abnormal reflex")
OLD_SPRAIN = c(ICD10CM, "S93.401A", "Sprain of unspecified ligament of right ankle, initial encounter")

CANCERS = [c(ICD10CM, "Z85.3", "Personal history of malignant neoplasm of breast"),
           c(ICD10CM, "C61", "Malignant neoplasm of prostate"),
           c(SNOMED, "254837009", "Malignant neoplasm of breast (disorder)"),
           c(ICD10CM, "Z85.038", "Personal history of other malignant neoplasm of large intestine")]
BONE_METASTASES = c(ICD10CM, "C79.51", "Secondary malignant neoplasm of bone")
HIV = c(ICD10CM, "B20", "Human immunodeficiency virus [HIV] disease")
KIDNEY_TRANSPLANT = c(ICD10CM, "Z94.0", "Kidney transplant status")
IMMUNODEFICIENCY = c(ICD10CM, "D84.9", "Immunodeficiency, unspecified")
TACROLIMUS = c(RXNORM, "198377", "tacrolimus 1 MG Oral Capsule")
METHOTREXATE = c(RXNORM, "6851", "methotrexate")
IVDU = [c(ICD10CM, "F11.20", "Opioid dependence, uncomplicated"),
        c(SNOMED, "145121000119106", "Intravenous nondependent opioid abuse (disorder)")]
SPINAL_INFECTION = c(ICD10CM, "M46.26", "Osteomyelitis of vertebra, lumbar region")
OSTEOPOROSIS = c(ICD10CM, "M81.0", "Age-related osteoporosis without current pathological fracture")
ALENDRONATE = c(RXNORM, "46041", "alendronate")
PREDNISONE = c(RXNORM, "312617", "prednisone 5 MG Oral Tablet")
LONG_TERM_STEROIDS = c(ICD10CM, "Z79.52", "Long term (current) use of systemic steroids")
LAMINECTOMY = c(CPT, "63047", "Laminectomy/facetectomy/foraminotomy, single segment, lumbar")
POSTLAMINECTOMY = c(ICD10CM, "M96.1", "Postlaminectomy syndrome, not elsewhere classified")
ANKYLOSING_SPONDYLITIS = c(ICD10CM, "M45.6", "Ankylosing spondylitis of lumbar region")
TRAUMA = [c(ICD10CM, "S32.000A", "Wedge compression fracture of unspecified lumbar vertebra, initial encounter"),
          c(ICD10CM, "V43.52XA", "Car driver injured in collision with other car in traffic accident, initial encounter")]
FALL = c(ICD10CM, "W19.XXXA", "Unspecified fall, initial encounter")
FRAGILITY_FRACTURE = c(ICD10CM, "M48.56XA", "Collapsed vertebra, not elsewhere classified, lumbar region, initial encounter for fracture")
FOOT_DROP_RIGHT = c(ICD10CM, "M21.371", "Foot drop, right foot")
FOOT_DROP_LEFT = c(ICD10CM, "M21.372", "Foot drop, left foot")
FEVER = c(ICD10CM, "R50.9", "Fever, unspecified")

CES_DIAGNOSIS = c(ICD10CM, "G83.4", "Cauda equina syndrome")
SADDLE_NUMBNESS = c(SNOMED, "449813001", "Numbness of saddle area (finding)")
URINARY_RETENTION = c(ICD10CM, "R33.9", "Retention of urine, unspecified")
URINARY_INCONTINENCE = c(ICD10CM, "R32", "Unspecified urinary incontinence")
FAECAL_INCONTINENCE = c(SNOMED, "72042002", "Incontinence of feces (finding)")
PVR = c(LOCAL_OBS, "PVR", "Post-void residual urine volume (bladder scan)")

PREGNANCY = c(SNOMED, "77386006", "Pregnancy (finding)")
PAD = c(ICD10CM, "I70.213", "Atherosclerosis of native arteries of extremities with intermittent claudication, bilateral legs")


class Export:
    """NDJSON files per resource type, rotated every `lines_per_file` lines: Condition.ndjson, Condition-2.ndjson..."""

    def __init__(self, out: Path, lines_per_file: int) -> None:
        self.out = out
        self.lines_per_file = lines_per_file
        self.files: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.outputs: list[tuple[str, str]] = []

    def write(self, resource: dict) -> None:
        kind = resource["resourceType"]
        count = self.counts.get(kind, 0)
        if count % self.lines_per_file == 0:
            if kind in self.files:
                self.files[kind].close()
            number = count // self.lines_per_file + 1
            name = f"{kind}.ndjson" if number == 1 else f"{kind}-{number}.ndjson"
            self.files[kind] = open(self.out / name, "w", encoding="utf-8", newline="\n")
            self.outputs.append((kind, name))
        self.files[kind].write(json.dumps(resource, separators=(",", ":"), ensure_ascii=False) + "\n")
        self.counts[kind] = count + 1

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


class PatientBuilder:
    """One synthetic patient: the chart as it stands on the export date, history included."""

    def __init__(self, seed: int, index: int, end: date) -> None:
        self.rng = random.Random(f"lumbar-export:{seed}:{index}")
        self.index = index
        self.end = end
        self.id = str(uuid.uuid5(NAMESPACE, f"{seed}:{index}"))
        self.resources: list[dict] = []
        self.counter = 0
        self.order_count = 0

    # -- helpers -----------------------------------------------------------------------------------
    def pick(self, weighted: list[tuple[Any, int]]) -> Any:
        return self.rng.choices([v for v, _ in weighted], weights=[w for _, w in weighted])[0]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def new_id(self, kind: str) -> str:
        self.counter += 1
        return str(uuid.uuid5(NAMESPACE, f"{self.id}:{kind}:{self.counter}"))

    def ref(self) -> dict:
        return {"reference": f"Patient/{self.id}"}

    def day(self, when: date) -> str | None:
        return when.isoformat() if when <= self.end else None  # nothing is recorded after the export

    def add(self, resource: dict) -> dict:
        self.resources.append(resource)
        return resource

    def condition(self, code: dict, onset: date | None, recorded: date | None = None, status: str = "active",
                  abatement: date | None = None, verification: str = "confirmed", category: str = "problem-list-item") -> dict | None:
        when = recorded or onset
        if when is not None and when > self.end:
            return None
        resource: dict[str, Any] = {
            "resourceType": "Condition", "id": self.new_id("Condition"),
            "clinicalStatus": {"coding": [{"system": CLINICAL, "code": status}]},
            "verificationStatus": {"coding": [{"system": VERIFICATION, "code": verification}]},
            "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
            "code": {"coding": [code], "text": code["display"]},
            "subject": self.ref(),
        }
        if onset is not None:
            resource["onsetDateTime"] = onset.isoformat()
        if recorded is not None:
            resource["recordedDate"] = recorded.isoformat()
        if abatement is not None and abatement <= self.end:
            resource["abatementDateTime"] = abatement.isoformat()
            resource["clinicalStatus"]["coding"][0]["code"] = "resolved"
        return self.add(resource)

    def observation(self, code: dict, when: date, *, quantity: tuple[float, str] | None = None,
                    value_code: dict | None = None, status: str = "final", category: str = "vital-signs") -> dict | None:
        if when > self.end:
            return None
        resource: dict[str, Any] = {
            "resourceType": "Observation", "id": self.new_id("Observation"), "status": status,
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
            "code": {"coding": [code], "text": code["display"]},
            "subject": self.ref(), "effectiveDateTime": when.isoformat(), "issued": f"{when.isoformat()}T08:00:00-05:00",
        }
        if quantity is not None:
            value, unit = quantity
            resource["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
        if value_code is not None:
            resource["valueCodeableConcept"] = {"coding": [value_code]}
        return self.add(resource)

    def medication_request(self, code: dict, start: date, supply_days: int | None = None, status: str = "active",
                           refills: int = 0, by_reference: str | None = None) -> dict | None:
        if start > self.end:
            return None
        resource: dict[str, Any] = {
            "resourceType": "MedicationRequest", "id": self.new_id("MedicationRequest"), "status": status,
            "intent": "order", "subject": self.ref(), "authoredOn": start.isoformat(),
        }
        if by_reference:
            resource["medicationReference"] = {"reference": f"Medication/{by_reference}"}
        else:
            resource["medicationCodeableConcept"] = {"coding": [code], "text": code["display"]}
        if supply_days is not None:
            resource["dispenseRequest"] = {
                "numberOfRepeatsAllowed": refills,
                "expectedSupplyDuration": {"value": supply_days, "unit": "days", "system": UCUM, "code": "d"},
            }
        return self.add(resource)

    def procedure(self, code: dict, start: date, end: date | None = None, status: str = "completed") -> dict | None:
        if start > self.end:
            return None
        resource: dict[str, Any] = {
            "resourceType": "Procedure", "id": self.new_id("Procedure"), "status": status,
            "code": {"coding": [code], "text": code["display"]}, "subject": self.ref(),
        }
        if end is not None and end <= self.end:
            resource["performedPeriod"] = {"start": start.isoformat(), "end": end.isoformat()}
        else:
            resource["performedPeriod"] = {"start": start.isoformat()}
            resource["status"] = "in-progress" if status == "completed" else status
        return self.add(resource)

    def referral(self, code: dict, when: date, status: str = "completed") -> dict | None:
        if when > self.end:
            return None
        return self.add({
            "resourceType": "ServiceRequest", "id": self.new_id("ServiceRequest"), "status": status, "intent": "order",
            "code": {"coding": [code], "text": code["display"]}, "subject": self.ref(), "authoredOn": when.isoformat(),
        })

    def imaging_order(self, when: date, code: dict | None = None, reason: dict | None = None) -> dict | None:
        if when > self.end:
            return None
        code = code or self.pick(ORDERS)
        status = self.pick(ORDER_STATUSES)
        if status == "completed" and (self.end - when).days < 3:
            status = "active"
        hour, minute = self.rng.randint(8, 17), self.rng.choice((0, 10, 15, 20, 30, 40, 45, 50))
        resource: dict[str, Any] = {
            "resourceType": "ServiceRequest", "id": self.new_id("ServiceRequest"), "status": status, "intent": "order",
            "category": [{"coding": [{"system": SNOMED, "code": "363679005", "display": "Imaging"}]}],
            "code": {"coding": [code], "text": code["display"]}, "subject": self.ref(),
            "authoredOn": f"{when.isoformat()}T{hour:02d}:{minute:02d}:00-05:00",
        }
        if reason is not None:
            resource["reasonCode"] = [{"coding": [reason], "text": reason["display"]}]
        self.order_count += 1
        return self.add(resource)

    def encounter(self, when: date) -> None:
        if when > self.end:
            return
        self.add({
            "resourceType": "Encounter", "id": self.new_id("Encounter"), "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": self.ref(), "period": {"start": when.isoformat(), "end": when.isoformat()},
        })

    def visit(self, when: date, fever: bool = False) -> None:
        """An office visit: encounter, most of the time a temperature, sometimes laboratory results."""
        self.encounter(when)
        if fever:
            self.observation(BODY_TEMPERATURE, when, quantity=(round(self.rng.uniform(38.2, 39.4), 1), "Cel"))
        elif self.chance(0.6):
            self.observation(BODY_TEMPERATURE, when, quantity=(round(self.rng.uniform(36.3, 37.4), 1), "Cel"))
        if self.chance(0.35):
            for code, low, high, unit in self.rng.sample(LABS, self.rng.randint(1, len(LABS))):
                self.observation(code, when, quantity=(round(self.rng.uniform(low, high), 1), unit), category="laboratory")

    # -- the patient -------------------------------------------------------------------------------
    def build(self) -> list[dict]:
        rng = self.rng
        age_band = self.pick([((10, 17), 2), ((18, 30), 15), ((31, 50), 34), ((51, 65), 28), ((66, 75), 12), ((76, 92), 9)])
        age = rng.randint(*age_band)
        sex = rng.choice(("female", "male"))
        birth = self.end - timedelta(days=age * 365 + rng.randint(0, 364))
        self.add({
            "resourceType": "Patient", "id": self.id, "gender": sex, "birthDate": birth.isoformat(),
            "name": [{"use": "official", "family": "Synthetic", "given": [f"Patient{self.index}"]}],
            "identifier": [{"system": "urn:example:mrn", "value": f"SYN{self.index:07d}"}],
        })
        self.age, self.sex, self.birth = age, sex, birth
        self.background()
        self.history()
        if self.chance(0.03):
            self.no_episode_order()
        else:
            first = self.end - timedelta(days=rng.randint(40, 900))
            episodes = [first]
            if self.chance(0.2) and (first - (self.end - timedelta(days=1100))).days > 340:
                episodes.insert(0, first - timedelta(days=rng.randint(330, 700)))
            for number, onset in enumerate(episodes):
                self.episode(onset, resolved_before_next=number < len(episodes) - 1)
        return self.resources

    def age_on(self, when: date) -> int:
        return when.year - self.birth.year - ((when.month, when.day) < (self.birth.month, self.birth.day))

    def background(self) -> None:
        """Conditions and results that are not about the back and are no red flag."""
        start = self.end - timedelta(days=1400)
        if self.age > 40 and self.chance(0.3):
            self.condition(HYPERTENSION, start + timedelta(days=self.rng.randint(0, 900)))
        if self.age > 35 and self.chance(0.1):
            self.condition(DIABETES, start + timedelta(days=self.rng.randint(0, 900)))
        if self.sex == "male" and self.age > 55 and self.chance(0.1):
            self.condition(BPH, start + timedelta(days=self.rng.randint(0, 900)))
        if self.age > 45 and self.chance(0.03):  # not a red flag (criteria.md: non-melanoma skin cancer)
            self.condition(BASAL_CELL, start + timedelta(days=self.rng.randint(0, 900)), status="resolved")
        if self.chance(0.02):
            self.condition(ABNORMAL_REFLEX, start + timedelta(days=self.rng.randint(0, 900)))
        if self.chance(0.01):  # a cancer entered in error: never a red flag
            self.condition(self.rng.choice(CANCERS), start + timedelta(days=self.rng.randint(0, 900)),
                           verification="entered-in-error")
        if self.chance(0.1):
            self.condition(OLD_SPRAIN, start + timedelta(days=self.rng.randint(0, 600)), status="resolved",
                           abatement=start + timedelta(days=700))
        for _ in range(self.rng.randint(0, 3)):
            self.visit(start + timedelta(days=self.rng.randint(0, 1300)))

    def history(self) -> None:
        """Red flags that are history (any time before): cancer, surgery, osteoporosis, immune, steroids."""
        rng, long_ago = self.rng, self.end - timedelta(days=2500)
        if self.age >= 40 and self.chance(0.05):
            self.condition(rng.choice(CANCERS), long_ago + timedelta(days=rng.randint(0, 1200)),
                           status=rng.choice(("resolved", "remission", "active")))
        if self.age >= 25 and self.chance(0.03):
            if self.chance(0.7):
                self.procedure(LAMINECTOMY, long_ago + timedelta(days=rng.randint(0, 1500)),
                               long_ago + timedelta(days=rng.randint(1500, 1501)))
            else:
                self.condition(POSTLAMINECTOMY, long_ago + timedelta(days=rng.randint(0, 1500)))
        if self.age >= 55 and self.chance(0.06 if self.sex == "female" else 0.02):
            if self.chance(0.6):
                self.condition(OSTEOPOROSIS, long_ago + timedelta(days=rng.randint(0, 2000)))
            else:
                self.medication_request(ALENDRONATE, long_ago + timedelta(days=rng.randint(0, 2000)), supply_days=90,
                                        refills=3, status="completed",
                                        by_reference="med-alendronate-70" if self.chance(0.3) else None)
        if self.chance(0.012):
            self.condition(self.rng.choice((HIV, KIDNEY_TRANSPLANT, IMMUNODEFICIENCY)), long_ago + timedelta(days=rng.randint(0, 1500)))
        if self.chance(0.008):
            self.condition(ANKYLOSING_SPONDYLITIS, long_ago + timedelta(days=rng.randint(0, 1500)))
        if self.chance(0.005):
            self.condition(LONG_TERM_STEROIDS, long_ago + timedelta(days=rng.randint(1500, 2400)))

    def episode(self, onset: date, resolved_before_next: bool) -> None:
        """A back pain episode: the diagnosis, maybe conservative care, maybe imaging, and what came after."""
        rng = self.rng
        seen = onset + timedelta(days=rng.choice((0, 1, 2, 3, 5, 7, 10, 14, 21)))
        self.visit(seen)
        episode_code = self.pick(EPISODES)
        unknown_duration = self.chance(0.03)
        imaged = self.chance(0.5)
        delay = self.pick([((0, 13), 36), ((14, 41), 30), ((42, 150), 34)])
        order_day = seen + timedelta(days=rng.randint(*delay)) if imaged else None
        resolves = None
        if resolved_before_next or self.chance(0.5):  # most episodes settle within months, after any imaging
            resolves = max(onset + timedelta(days=rng.randint(50, 220)), (order_day or seen) + timedelta(days=rng.randint(14, 90)))
        if unknown_duration:  # a problem-list entry with no dates at all (migrated data)
            self.condition(episode_code, None, None, category="problem-list-item")
        else:
            self.condition(episode_code, onset, recorded=seen, abatement=resolves, category="encounter-diagnosis")

        # Conservative care started at or after the first visit.
        care_start = None
        if self.chance(0.62):
            care_start = seen + timedelta(days=rng.choice((0, 0, 1, 3, 7, 10, 14)))
            kind = self.pick([("pt-procedure", 35), ("pt-referral", 25), ("nsaid", 30), ("chiro", 10)])
            if kind == "pt-procedure":
                self.procedure(rng.choice((PHYSIO, PT_EXERCISE)), care_start, care_start + timedelta(days=rng.randint(20, 90)))
            elif kind == "pt-referral":
                self.referral(PT_REFERRAL, care_start)
            elif kind == "nsaid":
                by_reference = rng.choice(("med-ibuprofen-400", "med-naproxen-500")) if self.chance(0.2) else None
                self.medication_request(rng.choice((IBUPROFEN, NAPROXEN)), care_start, supply_days=rng.choice((14, 30)),
                                        status="completed", by_reference=by_reference)
            else:
                self.procedure(CHIROPRACTIC, care_start, care_start + timedelta(days=rng.randint(10, 60)))

        anchor = order_day or seen + timedelta(days=10)
        ces = imaged and self.chance(0.016)
        self.acute_flags(anchor, ces)
        if self.sex == "female" and 18 <= self.age_on(anchor) <= 42 and self.chance(0.03):
            self.condition(PREGNANCY, anchor - timedelta(days=rng.randint(30, 150)))
        if self.age_on(anchor) >= 60 and self.chance(0.04):
            self.condition(PAD, anchor - timedelta(days=rng.randint(30, 900)))
        if order_day is None:
            return
        if order_day != seen:
            self.visit(order_day)
        reason = episode_code if self.chance(0.25) else None
        order = self.imaging_order(order_day, reason=reason)
        if order is None:
            return
        self.after_the_order(order_day, episode_code)

    def acute_flags(self, anchor: date, ces: bool) -> None:
        """Red flags and cauda equina features dated relative to the order (or the visit when not imaged)."""
        rng = self.rng
        age = self.age_on(anchor)
        if self.chance(0.018):
            when = anchor - timedelta(days=rng.randint(0, 10))
            self.visit(when, fever=True)
            if self.chance(0.3):
                self.condition(FEVER, when)
        elif self.chance(0.03):  # an old fever: not within 14 days, no red flag
            self.visit(anchor - timedelta(days=rng.randint(30, 200)), fever=True)
        if self.chance(0.03):
            self.condition(rng.choice(TRAUMA), anchor - timedelta(days=rng.randint(2, 80)), status=rng.choice(("active", "resolved")))
        elif self.chance(0.02):  # trauma long ago: not within 90 days
            self.condition(rng.choice(TRAUMA), anchor - timedelta(days=rng.randint(200, 700)), status="resolved")
        if age >= 70 and self.chance(0.07):
            self.condition(FALL, anchor - timedelta(days=rng.randint(1, 60)), status="resolved")
        if age >= 60 and self.chance(0.015):
            self.condition(FRAGILITY_FRACTURE, anchor - timedelta(days=rng.randint(3, 60)))
        if self.chance(0.012):
            self.condition(rng.choice((FOOT_DROP_RIGHT, FOOT_DROP_LEFT)), anchor - timedelta(days=rng.randint(2, 60)))
        if self.chance(0.003):
            self.condition(SPINAL_INFECTION, anchor - timedelta(days=rng.randint(20, 300)), status="resolved")
        if 18 <= age <= 60 and self.chance(0.012):
            self.condition(rng.choice(IVDU), anchor - timedelta(days=rng.randint(30, 300)))
        if self.chance(0.012):  # prolonged prednisone: 90-day fills, the last one running at the order
            start = anchor - timedelta(days=rng.randint(100, 330))
            fill = start
            while fill <= anchor:
                self.medication_request(PREDNISONE, fill, supply_days=90, status="completed" if fill + timedelta(days=90) < anchor else "active",
                                        by_reference="med-prednisone-5" if self.chance(0.2) else None)
                fill += timedelta(days=90)
        elif self.chance(0.02):  # a short burst: not prolonged, no red flag
            self.medication_request(PREDNISONE, anchor - timedelta(days=rng.randint(5, 200)), supply_days=rng.choice((5, 7, 10)),
                                    status="completed")
        if self.chance(0.008):
            self.medication_request(rng.choice((TACROLIMUS, METHOTREXATE)), anchor - timedelta(days=rng.randint(20, 80)), supply_days=720)
        if not ces:
            return
        feature = self.pick([("saddle", 25), ("retention", 25), ("diagnosis", 15), ("bilateral", 10), ("pvr", 10),
                             ("faecal", 10), ("incontinence", 8)])
        when = anchor - timedelta(days=rng.randint(0, 4))
        if feature == "saddle":
            self.observation(SADDLE_NUMBNESS, when, value_code=PRESENT, category="exam")
        elif feature == "retention":
            self.condition(URINARY_RETENTION, when)
        elif feature == "diagnosis":
            self.condition(CES_DIAGNOSIS, anchor, verification="provisional")
        elif feature == "bilateral":
            self.condition(FOOT_DROP_RIGHT, when)
            self.condition(FOOT_DROP_LEFT, when)
        elif feature == "pvr":
            self.observation(PVR, when, quantity=(float(rng.randint(250, 800)), "mL"), category="exam")
        elif feature == "faecal":
            self.condition(FAECAL_INCONTINENCE, when)
        else:
            self.condition(URINARY_INCONTINENCE, when)

    def no_episode_order(self) -> None:
        """A lumbar imaging order with no back pain diagnosis recorded (e.g. follow-up of something else)."""
        rng = self.rng
        when = self.end - timedelta(days=rng.randint(20, 800))
        self.visit(when)
        reason = rng.choice(EPISODES)[0] if self.chance(0.15) else None  # stated on the order only: onset unknown
        self.acute_flags(when, ces=self.chance(0.01))
        self.imaging_order(when, reason=reason)
        if self.chance(0.5):  # the diagnosis recorded after the imaging: must not count for this order
            self.condition(self.pick(EPISODES), when + timedelta(days=rng.randint(1, 20)),
                           recorded=when + timedelta(days=rng.randint(21, 30)), status="active")
        if self.chance(0.1):
            self.imaging_order(when - timedelta(days=rng.randint(30, 200)), code=OTHER_IMAGING)

    def after_the_order(self, order_day: date, episode_code: dict) -> None:
        """What the chart gained after the order: the audit must not let any of it count."""
        rng = self.rng
        if self.chance(0.35):  # the MRI report's finding, coded a few days later
            later = order_day + timedelta(days=rng.randint(2, 20))
            self.condition(RADICULOPATHY_FINDING, later, recorded=later)
        if self.chance(0.03):  # imaging found metastases
            later = order_day + timedelta(days=rng.randint(3, 30))
            self.condition(BONE_METASTASES, later, recorded=later)
        if self.chance(0.01):  # imaging showed cauda equina compression
            self.condition(CES_DIAGNOSIS, order_day + timedelta(days=1), recorded=order_day + timedelta(days=1))
        if self.chance(0.25):  # physiotherapy after the imaging
            later = order_day + timedelta(days=rng.randint(3, 30))
            self.procedure(PHYSIO, later, later + timedelta(days=rng.randint(20, 60)))
        if self.chance(0.05):
            self.visit(order_day + timedelta(days=rng.randint(1, 10)), fever=True)
        if self.chance(0.1):  # repeat imaging weeks later (an MRI after the X-ray, ...)
            later = order_day + timedelta(days=rng.randint(20, 90))
            self.visit(later)
            self.imaging_order(later, reason=episode_code if self.chance(0.3) else None)


def generate(patients: int, seed: int, out: Path, end: date, lines_per_file: int = 5000) -> dict:
    """Write the export; returns the manifest (also written to out/manifest.json)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.ndjson"):
        old.unlink()
    export = Export(out, lines_per_file)
    try:
        for medication_id, code in MEDICATIONS.items():
            export.write({"resourceType": "Medication", "id": medication_id, "code": {"coding": [code], "text": code["display"]}})
        orders = 0
        for index in range(patients):
            builder = PatientBuilder(seed, index, end)
            for resource in builder.build():
                export.write(resource)
            orders += builder.order_count
    finally:
        export.close()
    manifest = {
        "transactionTime": f"{end.isoformat()}T23:59:59Z",
        "request": f"urn:synthetic:generate_export?patients={patients}&seed={seed}",
        "requiresAccessToken": False,
        "output": [{"type": kind, "url": name, "count": None} for kind, name in export.outputs],
        "error": [],
        "extension": {"synthetic": True, "patients": patients, "seed": seed, "imagingOrders": orders,
                      "counts": dict(sorted(export.counts.items()))},
    }
    for entry in manifest["output"]:
        del entry["count"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=3000, help="number of patients (default 3000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (its *.ndjson files are replaced)")
    parser.add_argument("--end-date", type=date.fromisoformat, default=date(2025, 12, 31),
                        help="the export's date: nothing is dated after it (default 2025-12-31)")
    parser.add_argument("--lines-per-file", type=int, default=5000, help="NDJSON lines per file before a new file (default 5000)")
    args = parser.parse_args(argv)
    if args.patients < 0 or args.lines_per_file < 1:
        parser.error("--patients must be >= 0 and --lines-per-file >= 1")
    manifest = generate(args.patients, args.seed, args.out, args.end_date, args.lines_per_file)
    counts = manifest["extension"]["counts"]
    print(f"{args.patients} patients, {manifest['extension']['imagingOrders']} imaging orders, "
          f"{sum(counts.values())} resources in {len(manifest['output'])} files -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
