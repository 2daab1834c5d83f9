"""Clinical scenarios for the engine tests, built by functions named for what they are.

A scenario is a vignette in the clinical team's format (criteria.md section 4, cds_service/vignettes.py):
``{id, age, sex, facts[], order{system, code, display}}`` with every date given in days before TODAY.
Builders never mutate their input: ``with_condition(adult_with_acute_lbp(days=10), CANCER_HISTORY)``
returns a new vignette. Two keys go beyond the vignette format and are applied by `hook_request`:
``order["reasonCode"]`` (the draft order's stated reason) and ``extra_orders`` (more draft orders).

`evaluate(vignette)` runs the pure engine (facts -> assessments -> cards) on the record the vignette
describes, the same record `hook_request` sends over HTTP as prefetch.
"""

from __future__ import annotations

import copy
import itertools
import json
import uuid
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from cards.engine import Engine, Evaluation
from cds_service import vignettes as V
from fhir_mappings.knowledge import Knowledge

TODAY = date(2026, 3, 15)
EXTENSION_KEY = "org.example.lumbar-imaging-cds.assessment"

# Card types (source.topic.code) and the vignettes' card ids.
CES = "cauda-equina-emergency"
INDICATED = "imaging-indicated"
NOT_INDICATED = "imaging-not-indicated"
INCOMPLETE = "imaging-data-incomplete"
VIGNETTE_CARD_IDS = {
    "cauda-equina-critical": CES,
    "red-flag-justified-info": INDICATED,
    "early-imaging-warning": NOT_INDICATED,
}

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
LOINC = "http://loinc.org"
CPT = "http://www.ama-assn.org/go/cpt"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
RADLEX = "http://radlex.org"
LOCAL_OBS = "http://example.org/fhir/CodeSystem/local-observations"


def code(system: str, value: str, display: str | None = None) -> dict:
    return {"system": system, "code": value, "display": display or value}


# --- orders ------------------------------------------------------------------------------------------
MRI_WITHOUT = code(CPT, "72148", "MRI lumbar spine, without contrast")
MRI_WITH = code(CPT, "72149", "MRI lumbar spine, with contrast")
MRI_WITH_AND_WITHOUT = code(CPT, "72158", "MRI lumbar spine, without then with contrast")
MRI_LOINC_WITHOUT = code(LOINC, "30679-5", "MR Lumbar spine WO contrast")
MRI_LOINC_UNSPECIFIED = code(LOINC, "24968-0", "MR Lumbar spine")
MRI_SNOMED_WITHOUT = code(SNOMED, "394451000119106", "Magnetic resonance imaging of lumbar spine without contrast")
MRI_RADLEX_WITHOUT = code(RADLEX, "RPID541", "MR Lumbar Spine wo IV Contrast")
CT_WITHOUT = code(CPT, "72131", "CT lumbar spine, without contrast")
XRAY = code(CPT, "72100", "Radiologic exam lumbosacral spine, 2 or 3 views")
XRAY_LOINC = code(LOINC, "36670-8", "XR Lumbar spine 2 Views")
BRAIN_MRI = code(CPT, "70551", "MRI brain, without contrast")
CERVICAL_MRI = code(CPT, "72141", "MRI cervical spine, without contrast")
DXA = code(CPT, "77080", "DXA bone density, axial skeleton")
SACRUM_XRAY = code(CPT, "72220", "Radiologic exam sacrum and coccyx, minimum 2 views")

# --- back pain episode -------------------------------------------------------------------------------
LOW_BACK_PAIN = code(SNOMED, "279039007", "Low back pain (finding)")
SCIATICA_LEFT = code(ICD10CM, "M54.42", "Lumbago with sciatica, left side")
LUMBAR_RADICULOPATHY = code(ICD10CM, "M51.16", "Intervertebral disc disorders with radiculopathy, lumbar region")
LUMBAR_STRAIN = code(ICD10CM, "S39.012A", "Strain of muscle, fascia and tendon of lower back, initial encounter")
LUMBAR_SPRAIN = code(ICD10CM, "S33.5XXA", "Sprain of ligaments of lumbar spine, initial encounter")
STENOSIS_CLAUDICATION = code(ICD10CM, "M48.062", "Spinal stenosis, lumbar region with neurogenic claudication")
LBP_IN_PREGNANCY = code(SNOMED, "9121000119106", "Low back pain in pregnancy (finding)")

# --- cauda equina features ---------------------------------------------------------------------------
CES_DIAGNOSIS = code(SNOMED, "192970008", "Cauda equina syndrome (disorder)")
CES_ICD = code(ICD10CM, "G83.4", "Cauda equina syndrome")
INCOMPLETE_CES = code(SNOMED, "782388003", "Incomplete cauda equina syndrome (disorder)")
SADDLE_NUMBNESS = code(SNOMED, "449813001", "Numbness of saddle area (finding)")
URINARY_RETENTION = code(ICD10CM, "R33.9", "Retention of urine, unspecified")
ACUTE_RETENTION = code(SNOMED, "236648008", "Acute retention of urine (disorder)")
DRUG_INDUCED_RETENTION = code(ICD10CM, "R33.0", "Drug induced retention of urine")
URINARY_INCONTINENCE = code(ICD10CM, "R32", "Unspecified urinary incontinence")
FAECAL_INCONTINENCE = code(SNOMED, "72042002", "Incontinence of feces (finding)")
NEUROGENIC_BOWEL = code(ICD10CM, "K59.2", "Neurogenic bowel, not elsewhere classified")
SPINAL_PARAPARESIS = code(SNOMED, "23042008", "Spinal paraparesis (finding)")
PARAPLEGIA_INCOMPLETE = code(ICD10CM, "G82.22", "Paraplegia, incomplete")
FOOT_DROP_RIGHT = code(ICD10CM, "M21.371", "Foot drop, right foot")
FOOT_DROP_LEFT = code(ICD10CM, "M21.372", "Foot drop, left foot")
FOOT_DROP_UNSPECIFIED = code(ICD10CM, "M21.379", "Foot drop, unspecified foot")
PVR = code(LOCAL_OBS, "PVR", "Post-void residual urine volume (bladder scan)")

# --- red flags ---------------------------------------------------------------------------------------
BREAST_CANCER = code(SNOMED, "254837009", "Malignant neoplasm of breast (disorder)")
BREAST_CANCER_HISTORY = code(ICD10CM, "Z85.3", "Personal history of malignant neoplasm of breast")
PROSTATE_CANCER = code(ICD10CM, "C61", "Malignant neoplasm of prostate")
BONE_METASTASIS = code(ICD10CM, "C79.51", "Secondary malignant neoplasm of bone")
BASAL_CELL_CARCINOMA = code(ICD10CM, "C44.91", "Basal cell carcinoma of skin, unspecified")
SKIN_CANCER_HISTORY = code(ICD10CM, "Z85.828", "Personal history of other malignant neoplasm of skin")
MELANOMA_HISTORY = code(ICD10CM, "Z85.820", "Personal history of malignant melanoma of skin")
BODY_TEMPERATURE = code(LOINC, "8310-5", "Body temperature")
ORAL_TEMPERATURE = code(LOINC, "8331-1", "Oral temperature")
FEVER = code(ICD10CM, "R50.9", "Fever, unspecified")
FEVER_SNOMED = code(SNOMED, "386661006", "Fever (finding)")
VERTEBRAL_OSTEOMYELITIS = code(ICD10CM, "M46.26", "Osteomyelitis of vertebra, lumbar region")
EPIDURAL_ABSCESS = code(SNOMED, "63627007", "Spinal epidural abscess (disorder)")
IV_OPIOID_ABUSE = code(SNOMED, "145121000119106", "Intravenous nondependent opioid abuse (disorder)")
OPIOID_DEPENDENCE = code(ICD10CM, "F11.20", "Opioid dependence, uncomplicated")
OPIOID_DEPENDENCE_IN_REMISSION = code(ICD10CM, "F11.21", "Opioid dependence, in remission")
HIV = code(ICD10CM, "B20", "Human immunodeficiency virus [HIV] disease")
KIDNEY_TRANSPLANT = code(ICD10CM, "Z94.0", "Kidney transplant status")
IMMUNODEFICIENCY = code(ICD10CM, "D84.9", "Immunodeficiency, unspecified")
TACROLIMUS = code(RXNORM, "198377", "tacrolimus 1 MG Oral Capsule")
METHOTREXATE = code(RXNORM, "6851", "methotrexate")
LUMBAR_FRACTURE = code(ICD10CM, "S32.000A", "Wedge compression fracture of unspecified lumbar vertebra, initial encounter")
CAR_CRASH = code(ICD10CM, "V43.52XA", "Car driver injured in collision with other car in traffic accident, initial encounter")
FALL_SAME_LEVEL = code(ICD10CM, "W01.0XXA", "Fall on same level from slipping, tripping and stumbling without subsequent striking against object, initial encounter")
UNSPECIFIED_FALL = code(ICD10CM, "W19.XXXA", "Unspecified fall, initial encounter")
OSTEOPOROSIS = code(ICD10CM, "M81.0", "Age-related osteoporosis without current pathological fracture")
OSTEOPOROSIS_SNOMED = code(SNOMED, "64859006", "Osteoporosis (disorder)")
ALENDRONATE = code(RXNORM, "46041", "alendronate")
OSTEOPOROTIC_VERTEBRAL_FRACTURE = code(SNOMED, "203450003", "Osteoporotic fracture of lumbar vertebra (disorder)")
COLLAPSED_VERTEBRA = code(ICD10CM, "M48.56XA", "Collapsed vertebra, not elsewhere classified, lumbar region, initial encounter for fracture")
PREDNISONE = code(RXNORM, "312617", "prednisone 5 MG Oral Tablet")
LONG_TERM_STEROIDS = code(ICD10CM, "Z79.52", "Long term (current) use of systemic steroids")
HYDROCORTISONE_CREAM = code(RXNORM, "999999", "hydrocortisone 1 % topical cream")
LAMINECTOMY = code(CPT, "63047", "Laminectomy/facetectomy/foraminotomy, single segment, lumbar")
LAMINECTOMY_SNOMED = code(SNOMED, "427752004", "Excision of lamina of lumbar vertebra for decompression of spinal cord")
POSTLAMINECTOMY_SYNDROME = code(ICD10CM, "M96.1", "Postlaminectomy syndrome, not elsewhere classified")
ANKYLOSING_SPONDYLITIS = code(ICD10CM, "M45.6", "Ankylosing spondylitis of lumbar region")

# --- not red flags -----------------------------------------------------------------------------------
ABNORMAL_REFLEX = code(ICD10CM, "R29.2", "Abnormal reflex")
DIFFICULTY_WALKING = code(ICD10CM, "R26.2", "Difficulty in walking, not elsewhere classified")
PARESTHESIA = code(ICD10CM, "R20.2", "Paresthesia of skin")
HYPERTENSION = code(ICD10CM, "I10", "Essential (primary) hypertension")
BPH = code(ICD10CM, "N40.1", "Benign prostatic hyperplasia with lower urinary tract symptoms")
ESR = code(LOINC, "4537-7", "Erythrocyte sedimentation rate by Westergren method")

# --- conservative care -------------------------------------------------------------------------------
PHYSICAL_THERAPY = code(SNOMED, "91251008", "Physical therapy procedure (regime/therapy)")
PT_EVALUATION = code(CPT, "97161", "PT evaluation, low complexity")
PHYSIOTHERAPY_REFERRAL = code(SNOMED, "306170007", "Referral to physiotherapy service (procedure)")
CHIROPRACTIC = code(CPT, "98940", "Chiropractic manipulative treatment, spinal 1-2 regions")
IBUPROFEN = code(RXNORM, "5640", "ibuprofen")
NAPROXEN = code(RXNORM, "198014", "naproxen 500 MG Oral Tablet")

# --- modifiers ---------------------------------------------------------------------------------------
PREGNANCY = code(SNOMED, "77386006", "Pregnancy (finding)")
PAD_CLAUDICATION = code(ICD10CM, "I70.213", "Atherosclerosis of native arteries of extremities with intermittent claudication, bilateral legs")

# --- finding values ----------------------------------------------------------------------------------
PRESENT = {"system": SNOMED, "code": "52101004", "display": "Present"}
ABSENT = {"system": SNOMED, "code": "2667000", "display": "Absent"}

_ids = itertools.count(1)


# --- patients ----------------------------------------------------------------------------------------
def adult(age: int = 40, sex: str = "female", order: dict = MRI_WITHOUT) -> dict:
    """A patient with an empty chart and a draft lumbar MRI (without contrast)."""
    return {"id": f"scenario-{next(_ids)}", "age": age, "sex": sex, "facts": [], "order": dict(order)}


def child(age: int = 12, order: dict = MRI_WITHOUT) -> dict:
    return adult(age=age, sex="male", order=order)


def adult_with_acute_lbp(days: int = 10, age: int = 40, sex: str = "female", episode: dict = LOW_BACK_PAIN,
                         order: dict = MRI_WITHOUT) -> dict:
    """Uncomplicated low back pain that began `days` ago; the baseline that earns the early-imaging warning."""
    return with_condition(adult(age, sex, order), episode, days_ago=days)


def child_with_lbp(days: int = 14, age: int = 12, order: dict = MRI_WITHOUT) -> dict:
    return with_condition(child(age, order), LOW_BACK_PAIN, days_ago=days)


def adult_with_lbp_of_unknown_onset(age: int = 40) -> dict:
    """An active back pain Condition with neither onset nor recordedDate: the duration is unknown."""
    return with_condition(adult(age), LOW_BACK_PAIN, days_ago=None)


# --- facts -------------------------------------------------------------------------------------------
def _with_fact(vignette: dict, fact: dict) -> dict:
    updated = copy.deepcopy(vignette)
    updated["facts"].append(fact)
    return updated


def with_condition(vignette: dict, concept: dict, days_ago: int | None = 1, status: str | None = "active",
                   verification: str = "confirmed", recorded_days_ago: int | None = None,
                   abatement_days_ago: int | None = None) -> dict:
    """A Condition; `status` is clinicalStatus (None: no clinicalStatus), `days_ago` the onset (None: no onset)."""
    return _with_fact(vignette, {
        "resourceType": "Condition", **concept, "onsetDaysAgo": days_ago, "value": None, "unit": None,
        "status": status, "verificationStatus": verification, "recordedDaysAgo": recorded_days_ago,
        "abatementDaysAgo": abatement_days_ago,
    })


def with_observation(vignette: dict, concept: dict, days_ago: int | None = 1, value: Any = None,
                     unit: str | None = None, status: str = "final") -> dict:
    """An Observation: `value` a number (with UCUM `unit`), a coding dict (e.g. PRESENT/ABSENT), a bool, or None."""
    return _with_fact(vignette, {
        "resourceType": "Observation", **concept, "effectiveDaysAgo": days_ago, "value": value, "unit": unit,
        "status": status,
    })


def with_temperature(vignette: dict, value: float, unit: str = "Cel", days_ago: int = 1, status: str = "final",
                     concept: dict = BODY_TEMPERATURE) -> dict:
    return with_observation(vignette, concept, days_ago=days_ago, value=value, unit=unit, status=status)


def with_medication(vignette: dict, concept: dict, days_ago: int | None = 1, status: str = "active",
                    duration_days: int | None = None, kind: str = "MedicationRequest") -> dict:
    """A MedicationRequest (authoredOn = start) or MedicationStatement (effective = start [+ duration])."""
    return _with_fact(vignette, {
        "resourceType": kind, **concept, "effectiveDaysAgo": days_ago, "value": None, "unit": None,
        "status": status, "durationDays": duration_days,
    })


def with_procedure(vignette: dict, concept: dict, days_ago: int | None = 1, status: str = "completed") -> dict:
    return _with_fact(vignette, {
        "resourceType": "Procedure", **concept, "effectiveDaysAgo": days_ago, "value": None, "unit": None,
        "status": status,
    })


def with_referral(vignette: dict, concept: dict = PHYSIOTHERAPY_REFERRAL, days_ago: int = 1, status: str = "active") -> dict:
    """A past (not draft) ServiceRequest, e.g. a physiotherapy referral."""
    return _with_fact(vignette, {
        "resourceType": "ServiceRequest", **concept, "effectiveDaysAgo": days_ago, "value": None, "unit": None,
        "status": status,
    })


def with_conservative_care(vignette: dict, days_ago: int, concept: dict = PHYSICAL_THERAPY) -> dict:
    return with_procedure(vignette, concept, days_ago=days_ago, status="in-progress")


def ordering(vignette: dict, order: dict) -> dict:
    updated = copy.deepcopy(vignette)
    reasons = updated["order"].get("reasonCode")
    updated["order"] = dict(order)
    if reasons:
        updated["order"]["reasonCode"] = reasons
    return updated


def with_order_reason(vignette: dict, concept: dict) -> dict:
    """The draft order states a reason (ServiceRequest.reasonCode)."""
    updated = copy.deepcopy(vignette)
    updated["order"].setdefault("reasonCode", []).append({"coding": [dict(concept)]})
    return updated


def with_extra_order(vignette: dict, order: dict, order_id: str) -> dict:
    """Another draft ServiceRequest in the same draftOrders bundle."""
    updated = copy.deepcopy(vignette)
    updated.setdefault("extra_orders", []).append({"id": order_id, **dict(order)})
    return updated


# --- FHIR ---------------------------------------------------------------------------------------------
def fhir_record(vignette: dict, today: date = TODAY) -> list[dict]:
    """Patient first, then one resource per fact (cds_service/vignettes.py)."""
    return V.patient_record(_plain_vignette(vignette), today)


def draft_order_resources(vignette: dict) -> list[dict]:
    patient_id = V.patient_resource(_plain_vignette(vignette), TODAY)["id"]
    first = V.draft_order(vignette, patient_id)
    if vignette["order"].get("reasonCode"):
        first["reasonCode"] = copy.deepcopy(vignette["order"]["reasonCode"])
    orders = [first]
    for extra in vignette.get("extra_orders", ()):
        spec = {k: v for k, v in extra.items() if k != "id"}
        orders.append(V.draft_order({"order": spec}, patient_id, order_id=extra["id"]))
    return orders


def draft_orders_bundle(orders: Iterable[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": o} for o in orders]}


def hook_request(vignette: dict, hook: str = "order-sign", today: date = TODAY, selections: list[str] | None = None) -> dict:
    """The CDS Hooks request an EHR sends for this vignette: every prefetch key filled (null when empty)."""
    request = V.hook_request(_plain_vignette(vignette), today, hook)
    orders = draft_order_resources(vignette)
    request["context"]["draftOrders"] = draft_orders_bundle(orders)
    if hook == "order-select":
        request["context"]["selections"] = selections if selections is not None else [f"ServiceRequest/{orders[0]['id']}"]
    return request


def _plain_vignette(vignette: dict) -> dict:
    plain = {k: v for k, v in vignette.items() if k != "extra_orders"}
    plain["order"] = {k: v for k, v in vignette["order"].items() if k != "reasonCode"}
    return plain


# --- the engine ---------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def knowledge() -> Knowledge:
    return Knowledge.load()


@lru_cache(maxsize=1)
def engine() -> Engine:
    return Engine(knowledge())


def evaluate(vignette: dict, *, today: date = TODAY, selections: tuple[str, ...] | None = None,
             patch: Callable[[list[dict]], list[dict]] | None = None, extra_resources: Iterable[dict] = (),
             unreadable: dict[str, str] | None = None, missing: Iterable[str] = ()) -> Evaluation:
    """Run the engine on the vignette's record; `patch` may rewrite the FHIR resources first."""
    resources = fhir_record(vignette, today) + [copy.deepcopy(r) for r in extra_resources]
    if patch is not None:
        resources = patch(resources)
    orders = draft_orders_bundle(draft_order_resources(vignette))
    return engine().evaluate(resources, orders, today, f"hook-{uuid.uuid4()}", selections=selections,
                             unreadable=unreadable, missing=missing)


def evaluate_resources(resources: list[dict], orders: list[dict], *, today: date = TODAY,
                       selections: tuple[str, ...] | None = None) -> Evaluation:
    return engine().evaluate(resources, draft_orders_bundle(orders), today, f"hook-{uuid.uuid4()}", selections=selections)


def card_types(evaluation_or_cards: Evaluation | list[dict]) -> list[str]:
    cards = evaluation_or_cards.cards if isinstance(evaluation_or_cards, Evaluation) else evaluation_or_cards
    return [card["source"]["topic"]["code"] for card in cards]


def only_card(evaluation: Evaluation) -> dict:
    assert len(evaluation.cards) == 1, f"expected one card, got {card_types(evaluation)}"
    return evaluation.cards[0]


def assessment(card: dict) -> dict:
    return card["extension"][EXTENSION_KEY]


def fact_ids(card: dict) -> list[str]:
    return list(assessment(card).get("facts") or ())


def modify(resources: list[dict], resource_type: str, change: Callable[[dict], None]) -> list[dict]:
    """Apply `change` to every resource of a type (for FHIR details the vignette format cannot say)."""
    for resource in resources:
        if resource["resourceType"] == resource_type:
            change(resource)
    return resources


def public_vignettes() -> list[dict]:
    path = Path(__file__).parent / "data" / "vignettes-public.json"
    return json.loads(path.read_text(encoding="utf-8"))
