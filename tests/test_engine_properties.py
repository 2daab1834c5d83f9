"""Properties of the engine over random records built from the code groups (hypothesis).

* the order of resources, and resources that decide nothing, never change the cards;
* entered-in-error and refuted copies of any resource never change the cards;
* one current cauda equina sign always gives the critical card (any age, any data, any lumbar order);
* a recorded red flag never leaves an adult with a dated back pain episode with "imaging not indicated";
* random FHIR resources, valid or malformed, never crash the engine.
"""

from __future__ import annotations

import copy
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scenarios import (
    ACUTE_RETENTION, CES, CES_DIAGNOSIS, CES_ICD, FAECAL_INCONTINENCE, FOOT_DROP_LEFT, FOOT_DROP_RIGHT, INCOMPLETE_CES,
    INDICATED, NOT_INDICATED, PRESENT, PVR, SADDLE_NUMBNESS, SPINAL_PARAPARESIS, TODAY, URINARY_INCONTINENCE,
    URINARY_RETENTION, adult, assessment, card_types, draft_order_resources, engine, evaluate_resources, fhir_record,
    knowledge, ordering, with_condition, with_observation, with_order_reason,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ORDER_GROUPS = ("LUMBAR_MRI", "LUMBAR_CT", "LUMBAR_XR")
UNRELATED_GROUPS = ("CONTEXT_ONLY", "OUT_OF_SCOPE_ORDER_EXAMPLES", "INFLAMMATORY_MARKERS_SUPPORTING", "NEURO_NOT_RED_FLAG_ALONE",
                    "NON_MELANOMA_SKIN_CANCER_EXCLUDED")
DECIDING_GROUPS = tuple(g for g in knowledge().codes.group_names() if g not in ORDER_GROUPS + UNRELATED_GROUPS)
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _codes(groups) -> list[dict]:
    index = knowledge().codes
    found = []
    for group in groups:
        for entry in index.group_codes(group):
            coding = {"system": entry["system"], "code": entry["code"], "display": entry["display"]}
            if coding not in found:
                found.append(coding)
    return found


ALL_CODES = _codes(DECIDING_GROUPS)
LUMBAR_ORDERS = _codes(ORDER_GROUPS)
# Codes that decide nothing: in an unrelated group and in no deciding group.
UNRELATED_CODES = [c for c in _codes(UNRELATED_GROUPS)
                   if not knowledge().codes.groups(c["system"], c["code"]) & set(DECIDING_GROUPS + ORDER_GROUPS)]

STATUSES = {
    "Condition": ["active", "recurrence", "relapse", "inactive", "remission", "resolved"],
    "Observation": ["final", "amended", "corrected", "preliminary", "registered", "cancelled", "entered-in-error", "unknown"],
    "MedicationRequest": ["active", "on-hold", "completed", "stopped", "cancelled", "draft", "entered-in-error", "unknown"],
    "MedicationStatement": ["active", "completed", "intended", "stopped", "on-hold", "not-taken", "entered-in-error", "unknown"],
    "Procedure": ["completed", "in-progress", "on-hold", "stopped", "unknown", "preparation", "not-done", "entered-in-error"],
    "ServiceRequest": ["active", "completed", "on-hold", "revoked", "draft", "entered-in-error", "unknown"],
}
VERIFICATIONS = ["confirmed", "provisional", "differential", "unconfirmed", "refuted", "entered-in-error"]
BOUNDARY_DAYS = [0, 1, 13, 14, 15, 27, 28, 29, 41, 42, 43, 89, 90, 91, 364, 365, 366, 400, 2000]

days = st.one_of(st.sampled_from(BOUNDARY_DAYS), st.integers(0, 4000), st.none())


@st.composite
def facts(draw, codes=ALL_CODES) -> dict:
    """One vignette fact: a code from the code groups, a plausible resource type, random status and dates."""
    coding = draw(st.sampled_from(codes))
    system = coding["system"]
    if system == RXNORM:
        kind = draw(st.sampled_from(["MedicationRequest", "MedicationStatement"]))
    elif system == "http://loinc.org":
        kind = "Observation"
    elif system in ("http://www.ama-assn.org/go/cpt", "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"):
        kind = draw(st.sampled_from(["Procedure", "ServiceRequest"]))
    else:
        kind = draw(st.sampled_from(["Condition", "Condition", "Observation", "Procedure"]))
    fact = {"resourceType": kind, **coding, "status": draw(st.sampled_from(STATUSES[kind])), "value": None, "unit": None}
    if kind == "Condition":
        fact.update(onsetDaysAgo=draw(days), recordedDaysAgo=draw(days), verificationStatus=draw(st.sampled_from(VERIFICATIONS)))
        if fact["status"] in ("inactive", "resolved", "remission"):
            fact["abatementDaysAgo"] = draw(st.one_of(st.none(), st.integers(0, 30)))
    else:
        fact["effectiveDaysAgo"] = draw(days)
    if kind == "Observation":
        fact["value"], fact["unit"] = draw(st.one_of(
            st.tuples(st.none(), st.none()),
            st.tuples(st.floats(35, 42, allow_nan=False).map(lambda v: round(v, 1)), st.just("Cel")),
            st.tuples(st.floats(95, 106, allow_nan=False).map(lambda v: round(v, 1)), st.just("[degF]")),
            st.tuples(st.integers(0, 900), st.just("mL")),
            st.tuples(st.sampled_from([PRESENT, {"system": "http://snomed.info/sct", "code": "2667000", "display": "Absent"}]), st.none()),
            st.tuples(st.booleans(), st.none()),
        ))
    if kind in ("MedicationRequest", "MedicationStatement"):
        fact["durationDays"] = draw(st.one_of(st.none(), st.sampled_from([5, 30, 89, 90, 91, 365]), st.integers(1, 400)))
    return fact


@st.composite
def records(draw, min_facts: int = 0, max_facts: int = 8) -> dict:
    """A random vignette: age 0-100, random facts, a random lumbar MRI/CT/X-ray order."""
    vignette = adult(age=draw(st.integers(0, 100)), order=draw(st.sampled_from(LUMBAR_ORDERS)))
    vignette["facts"] = draw(st.lists(facts(), min_size=min_facts, max_size=max_facts))
    return vignette


def with_episode(draw, vignette: dict) -> dict:
    """The record, plus an active back pain episode of known onset (so the adult branches are reached)."""
    episode = draw(st.sampled_from(_codes(["LBP_EPISODE"])))
    return with_condition(vignette, episode, days_ago=draw(st.integers(0, 400)))


def run(vignette: dict, resources: list[dict] | None = None, **kwargs):
    resources = fhir_record(vignette) if resources is None else resources
    return engine().evaluate(resources, {"resourceType": "Bundle", "entry": [{"resource": o} for o in draft_order_resources(vignette)]},
                             TODAY, "hook-property", **kwargs)


def outcome(evaluation) -> list[tuple]:
    """What a clinician and the audit see: card type, rule and the set of facts, per card."""
    return [(card["source"]["topic"]["code"], assessment(card)["rule"], frozenset(assessment(card).get("facts") or ())) for card in evaluation.cards]


# ---- invariance -----------------------------------------------------------------------------------------------------
@SETTINGS
@given(records(), st.randoms(use_true_random=False))
def test_shuffling_the_resources_never_changes_the_cards(vignette, rnd):
    resources = fhir_record(vignette)
    shuffled = resources[:]
    rnd.shuffle(shuffled)
    assert outcome(run(vignette, shuffled)) == outcome(run(vignette, resources))


@SETTINGS
@given(st.data())
def test_adding_unrelated_resources_never_changes_the_card_types(data):
    vignette = data.draw(records())
    if data.draw(st.booleans()):
        vignette = with_episode(data.draw, vignette)
    before = card_types(run(vignette))
    noisy = copy.deepcopy(vignette)
    noisy["facts"] += data.draw(st.lists(facts(UNRELATED_CODES), min_size=1, max_size=6))
    data.draw(st.randoms(use_true_random=False)).shuffle(noisy["facts"])
    assert card_types(run(noisy)) == before


def _voided(resource: dict, rnd: random.Random) -> dict:
    """A copy of the resource that must not count: entered-in-error, refuted, cancelled, not-taken, not-done."""
    copied = copy.deepcopy(resource)
    copied["id"] = f"{resource['id']}-void"
    kind = resource["resourceType"]
    if kind == "Condition":
        status = rnd.choice(["refuted", "entered-in-error"])
        copied["verificationStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": status}]}
        copied["clinicalStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}
    elif kind == "Observation":
        copied["status"] = rnd.choice(["entered-in-error", "cancelled"])
    elif kind in ("MedicationRequest", "MedicationStatement"):
        copied["status"] = rnd.choice(["entered-in-error", "cancelled"] + (["not-taken"] if kind == "MedicationStatement" else []))
    elif kind == "Procedure":
        copied["status"] = rnd.choice(["entered-in-error", "not-done"])
    elif kind == "ServiceRequest":
        copied["status"] = rnd.choice(["entered-in-error", "revoked"])
    return copied


@SETTINGS
@given(st.data())
def test_entered_in_error_or_refuted_copies_never_change_the_card_types(data):
    vignette = data.draw(records())
    if data.draw(st.booleans()):
        vignette = with_episode(data.draw, vignette)
    rnd = data.draw(st.randoms(use_true_random=False))
    resources = fhir_record(vignette)
    before = card_types(run(vignette, resources))
    # copies of the record's own resources, and of random ones (a voided cauda equina sign among them)
    others = fhir_record({**adult(), "facts": data.draw(st.lists(facts(), min_size=1, max_size=5)), "id": "other"})[1:]
    voided = [_voided(r, rnd) for r in resources[1:] + others]
    assert card_types(run(vignette, resources + voided)) == before


# ---- safety -----------------------------------------------------------------------------------------------------------
CES_SIGNS = [
    lambda v, d: with_condition(v, CES_DIAGNOSIS, d, status="active"),
    lambda v, d: with_condition(v, CES_ICD, None, status="recurrence", verification="provisional"),
    lambda v, d: with_condition(v, INCOMPLETE_CES, d, verification="differential"),
    lambda v, d: with_condition(v, SADDLE_NUMBNESS, d),
    lambda v, d: with_observation(v, SADDLE_NUMBNESS, min(d, 14)),
    lambda v, d: with_observation(v, SADDLE_NUMBNESS, min(d, 14), PRESENT, status="preliminary"),
    lambda v, d: with_condition(v, URINARY_RETENTION, min(d, 14)),
    lambda v, d: with_observation(v, ACUTE_RETENTION, min(d, 14), True),
    lambda v, d: with_condition(v, URINARY_INCONTINENCE, min(d, 14), status="relapse"),
    lambda v, d: with_condition(v, FAECAL_INCONTINENCE, min(d, 14)),
    lambda v, d: with_condition(v, SPINAL_PARAPARESIS, d),
    lambda v, d: with_condition(with_condition(v, FOOT_DROP_RIGHT, min(d, 14)), FOOT_DROP_LEFT, min(d + 3, 14)),
    lambda v, d: with_observation(v, PVR, min(d, 14), 200 + d, "mL"),
    lambda v, d: with_order_reason(v, CES_DIAGNOSIS),
]
UNREADABLE = st.dictionaries(st.sampled_from(["Patient", "Condition", "Observation", "MedicationRequest", "MedicationStatement", "Procedure", "ServiceRequest"]),
                             st.just("OperationOutcome: timeout"), max_size=3)


@SETTINGS
@given(records(), st.sampled_from(range(len(CES_SIGNS))), st.integers(0, 400), st.booleans(), UNREADABLE)
def test_one_current_cauda_equina_sign_always_gives_the_critical_card(vignette, sign, days_ago, episode, unreadable):
    if episode:
        vignette = with_condition(vignette, {"system": "http://snomed.info/sct", "code": "279039007", "display": "Low back pain"}, days_ago=days_ago)
    evaluation = run(CES_SIGNS[sign](vignette, days_ago), unreadable=unreadable)
    assert card_types(evaluation) == [CES], (vignette["age"], vignette["order"], [a.reason for a in evaluation.assessments])
    assert evaluation.cards[0]["indicator"] == "critical"
    assert any(f.startswith("CES-") for f in assessment(evaluation.cards[0])["facts"])


RED_FLAGS = [
    lambda v: with_condition(v, {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "Z85.46", "display": "History of prostate cancer"}, 3000, status="resolved"),
    lambda v: with_observation(v, {"system": "http://loinc.org", "code": "8310-5", "display": "Body temperature"}, 3, 38.3, "Cel"),
    lambda v: with_observation(v, {"system": "http://loinc.org", "code": "8331-1", "display": "Oral temperature"}, 14, 100.4, "[degF]"),
    lambda v: with_condition(v, {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M46.26", "display": "Vertebral osteomyelitis"}, 200, status="resolved"),
    lambda v: with_condition(v, {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F11.20", "display": "Opioid dependence"}, 100, status="inactive"),
    lambda v: with_condition(v, {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "Z94.0", "display": "Kidney transplant status"}, 3000),
    lambda v: with_condition(v, {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "S32.000A", "display": "Lumbar fracture"}, 60),
    lambda v: with_condition(v, {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M81.0", "display": "Osteoporosis"}, 900, status="inactive"),
    lambda v: with_condition(v, {"system": "http://snomed.info/sct", "code": "203450003", "display": "Osteoporotic fracture"}, 60),
    lambda v: with_condition(v, {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "Z79.52", "display": "Long-term steroids"}, 900),
    lambda v: with_condition(v, {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M21.371", "display": "Foot drop, right"}, 30),
    lambda v: with_condition(v, {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M96.1", "display": "Postlaminectomy syndrome"}, 900, status="resolved"),
    lambda v: with_condition(v, {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M45.6", "display": "Ankylosing spondylitis"}, 900),
]


@SETTINGS
@given(st.data())
def test_a_recorded_red_flag_never_gets_imaging_not_indicated(data):
    vignette = with_episode(data.draw, data.draw(records()))
    vignette["age"] = data.draw(st.integers(18, 100))
    flagged = data.draw(st.sampled_from(RED_FLAGS))(vignette)
    types = card_types(run(flagged))
    assert types in ([INDICATED], [CES]), types


@SETTINGS
@given(records(min_facts=1))
def test_the_warning_is_only_given_with_an_adult_dated_episode_and_no_flag_found(vignette):
    evaluation = run(vignette)
    for assessed in evaluation.assessments:
        if assessed.card_type == NOT_INDICATED:
            facts = evaluation.facts
            assert facts.age is not None and facts.age >= 18
            assert facts.episode is not None and facts.episode.start is not None
            assert not facts.ces and not facts.red_flags and not facts.conservative_care_failed


# ---- robustness ---------------------------------------------------------------------------------------------------------
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=8), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
DATES = st.one_of(JUNK, st.dates().map(str), st.sampled_from(["2026", "2026-02", "2026-02-30", "2026-03-01T23:30:00-10:00", "0001-01-01", "9999-12-31"]))


def _concepts():
    coding = st.one_of(st.sampled_from(ALL_CODES + LUMBAR_ORDERS), st.fixed_dictionaries({}, optional={"system": JUNK, "code": JUNK, "display": JUNK}))
    return st.one_of(JUNK, st.fixed_dictionaries({"coding": st.lists(coding, max_size=3)}, optional={"text": JUNK}))


CONCEPT = _concepts()
STATUS = st.one_of(JUNK, st.sampled_from(sorted({s for group in STATUSES.values() for s in group})))
QUANTITY = st.one_of(JUNK, st.fixed_dictionaries({}, optional={"value": JUNK, "unit": st.one_of(JUNK, st.sampled_from(["Cel", "[degF]", "mL", "L"])), "code": JUNK}))
PERIOD = st.one_of(JUNK, st.fixed_dictionaries({}, optional={"start": DATES, "end": DATES}))
DURATION = st.one_of(JUNK, st.fixed_dictionaries({}, optional={"value": JUNK, "code": st.one_of(JUNK, st.sampled_from(["d", "wk", "mo", "a"]))}))


def _resource(kind, **fields):
    return st.fixed_dictionaries({"resourceType": st.just(kind)}, optional={"id": st.one_of(JUNK, st.text(min_size=1, max_size=4)), **fields})


MALFORMED = st.one_of(
    _resource("Condition", code=CONCEPT, clinicalStatus=st.one_of(JUNK, CONCEPT), verificationStatus=st.one_of(JUNK, CONCEPT),
              onsetDateTime=DATES, onsetPeriod=PERIOD, recordedDate=DATES, abatementDateTime=DATES),
    _resource("Observation", code=CONCEPT, status=STATUS, effectiveDateTime=DATES, effectivePeriod=PERIOD, issued=DATES,
              valueQuantity=QUANTITY, valueCodeableConcept=CONCEPT, valueBoolean=JUNK, valueString=JUNK, dataAbsentReason=JUNK,
              interpretation=st.one_of(JUNK, st.lists(CONCEPT, max_size=2)),
              component=st.one_of(JUNK, st.lists(st.fixed_dictionaries({}, optional={"code": CONCEPT, "valueQuantity": QUANTITY}), max_size=2))),
    _resource("MedicationRequest", medicationCodeableConcept=CONCEPT, status=STATUS, authoredOn=DATES,
              medicationReference=st.one_of(JUNK, st.fixed_dictionaries({"reference": st.sampled_from(["#m", "Medication/m", "x"])})),
              dispenseRequest=st.one_of(JUNK, st.fixed_dictionaries({}, optional={"expectedSupplyDuration": DURATION, "numberOfRepeatsAllowed": JUNK})),
              dosageInstruction=st.one_of(JUNK, st.lists(st.fixed_dictionaries({}, optional={"timing": st.one_of(JUNK, st.fixed_dictionaries({"repeat": st.fixed_dictionaries({}, optional={"boundsPeriod": PERIOD, "boundsDuration": DURATION})}))}), max_size=2))),
    _resource("MedicationStatement", medicationCodeableConcept=CONCEPT, status=STATUS, effectiveDateTime=DATES, effectivePeriod=PERIOD),
    _resource("Medication", code=CONCEPT),
    _resource("Procedure", code=CONCEPT, status=STATUS, performedDateTime=DATES, performedPeriod=PERIOD),
    _resource("ServiceRequest", code=CONCEPT, status=STATUS, authoredOn=DATES, occurrencePeriod=PERIOD),
    _resource("Patient", birthDate=DATES),
    JUNK,
)
DRAFT = st.fixed_dictionaries({"resourceType": st.just("ServiceRequest")}, optional={
    "id": st.one_of(JUNK, st.text(min_size=1, max_size=4)), "status": STATUS, "code": CONCEPT,
    "reasonCode": st.one_of(JUNK, st.lists(CONCEPT, max_size=2)), "subject": st.one_of(JUNK, st.just({"reference": "Patient/p"}))})


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(MALFORMED, max_size=8), st.lists(st.one_of(DRAFT, JUNK), max_size=3), st.one_of(st.none(), st.lists(st.text(max_size=20), max_size=2)))
def test_malformed_resources_never_crash_the_engine(resources, orders, selections):
    bundle = {"resourceType": "Bundle", "entry": [{"resource": order} for order in orders]}
    evaluation = engine().evaluate(resources, bundle, TODAY, "hook-fuzz", selections=tuple(selections) if selections else None)
    for card in evaluation.cards:
        assert card["indicator"] in ("info", "warning", "critical") and len(card["summary"]) < 140


@SETTINGS
@given(records(), st.sampled_from(LUMBAR_ORDERS))
def test_random_records_give_at_most_one_card_per_order(vignette, other_order):
    vignette = ordering(vignette, vignette["order"])
    resources = fhir_record(vignette)
    orders = draft_order_resources(vignette) + [{**draft_order_resources(ordering(vignette, other_order))[0], "id": "second"}]
    evaluation = evaluate_resources(resources, orders)
    assert len(evaluation.cards) in (0, 2)
    assert sorted(assessment(c)["order"] for c in evaluation.cards) in ([], ["ServiceRequest/draft-imaging-1", "ServiceRequest/second"])
