"""Every rule of criteria.md section 3, both sides of every window, every status filter.

Rows are (name, scenario, expected card type, expected fact id). The scenarios are built in
tests/scenarios.py from the vignette format, so a row reads as the clinical case it is; the engine runs
on the FHIR record the vignette describes (the same record the HTTP tests send as prefetch).
"""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from fhir_mappings.fhir_values import date_span, latest_date, parse_date

from scenarios import (
    ABNORMAL_REFLEX, ABSENT, ACUTE_RETENTION, ALENDRONATE, ANKYLOSING_SPONDYLITIS, BASAL_CELL_CARCINOMA, BODY_TEMPERATURE,
    BONE_METASTASIS, BPH, BRAIN_MRI, BREAST_CANCER, BREAST_CANCER_HISTORY, CAR_CRASH, CERVICAL_MRI, CES, CES_DIAGNOSIS,
    CES_ICD, CHIROPRACTIC, COLLAPSED_VERTEBRA, CPT, CT_WITHOUT, DIFFICULTY_WALKING, DRUG_INDUCED_RETENTION, DXA,
    EPIDURAL_ABSCESS, ESR, FAECAL_INCONTINENCE, FALL_SAME_LEVEL, FEVER, FEVER_SNOMED, FOOT_DROP_LEFT, FOOT_DROP_RIGHT,
    FOOT_DROP_UNSPECIFIED, HIV, HYDROCORTISONE_CREAM, HYPERTENSION, IBUPROFEN, IMMUNODEFICIENCY, INCOMPLETE,
    INCOMPLETE_CES, INDICATED, IV_OPIOID_ABUSE, KIDNEY_TRANSPLANT, LAMINECTOMY, LAMINECTOMY_SNOMED, LBP_IN_PREGNANCY,
    LONG_TERM_STEROIDS, LOW_BACK_PAIN, LUMBAR_FRACTURE, LUMBAR_RADICULOPATHY, LUMBAR_SPRAIN, LUMBAR_STRAIN,
    MELANOMA_HISTORY, METHOTREXATE, MRI_LOINC_UNSPECIFIED, MRI_LOINC_WITHOUT, MRI_RADLEX_WITHOUT, MRI_SNOMED_WITHOUT,
    MRI_WITH, MRI_WITH_AND_WITHOUT, MRI_WITHOUT, NAPROXEN, NEUROGENIC_BOWEL, NOT_INDICATED, OPIOID_DEPENDENCE,
    OPIOID_DEPENDENCE_IN_REMISSION, ORAL_TEMPERATURE, OSTEOPOROSIS, OSTEOPOROSIS_SNOMED, OSTEOPOROTIC_VERTEBRAL_FRACTURE,
    PAD_CLAUDICATION, PARAPLEGIA_INCOMPLETE, PARESTHESIA, PHYSICAL_THERAPY, PHYSIOTHERAPY_REFERRAL, POSTLAMINECTOMY_SYNDROME,
    PREDNISONE, PREGNANCY, PRESENT, PROSTATE_CANCER, PT_EVALUATION, PVR, SACRUM_XRAY, SADDLE_NUMBNESS, SCIATICA_LEFT,
    SKIN_CANCER_HISTORY, SNOMED, SPINAL_PARAPARESIS, STENOSIS_CLAUDICATION, TACROLIMUS, TODAY, UNSPECIFIED_FALL,
    URINARY_INCONTINENCE, URINARY_RETENTION, VERTEBRAL_OSTEOMYELITIS, XRAY, XRAY_LOINC, adult, adult_with_acute_lbp,
    adult_with_lbp_of_unknown_onset, assessment, card_types, child, child_with_lbp, code, draft_order_resources,
    evaluate, evaluate_resources, fact_ids, fhir_record, hook_request, modify, only_card, ordering, with_condition,
    with_conservative_care, with_extra_order, with_medication, with_observation, with_order_reason, with_procedure,
    with_referral, with_temperature,
)

LBP = adult_with_acute_lbp(days=10)


def _no_clinical_status(resources: list[dict]) -> list[dict]:
    return modify(resources, "Condition", lambda r: r.pop("clinicalStatus", None))


def _data_absent(resources: list[dict]) -> list[dict]:
    reason = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "not-performed"}]}
    return modify(resources, "Observation", lambda r: r.update(dataAbsentReason=reason))


def check(vignette: dict, expected_type: str | None, expected_fact: str | None = None, **kwargs) -> dict | None:
    evaluation = evaluate(vignette, **kwargs)
    if expected_type is None:
        assert evaluation.cards == [], card_types(evaluation)
        return None
    card = only_card(evaluation)
    assert card_types([card]) == [expected_type], [a.reason for a in evaluation.assessments]
    if expected_fact is not None:
        assert expected_fact in fact_ids(card), fact_ids(card)
    return card


def table(*rows):
    return pytest.mark.parametrize("vignette,expected_type,expected_fact,kwargs",
                                   [r[1:] if len(r) == 5 else (*r[1:], {}) for r in rows], ids=[r[0] for r in rows])


# ---- S: scope --------------------------------------------------------------------------------------------------------
IN_SCOPE_ORDERS = [MRI_WITHOUT, MRI_WITH, MRI_WITH_AND_WITHOUT, MRI_LOINC_WITHOUT, MRI_LOINC_UNSPECIFIED, MRI_SNOMED_WITHOUT,
                   MRI_RADLEX_WITHOUT, CT_WITHOUT, code(CPT, "72133"), code("http://loinc.org", "24965-6"), XRAY, XRAY_LOINC,
                   code(SNOMED, "22791004"), code("http://radlex.org", "RPID2550")]
OUT_OF_SCOPE_ORDERS = [BRAIN_MRI, CERVICAL_MRI, DXA, SACRUM_XRAY, code("http://loinc.org", "36502-3"), code(CPT, "73721"),
                       code("http://loinc.org", "38267-1"), code("http://example.org/unknown", "72148")]


@pytest.mark.parametrize("order", IN_SCOPE_ORDERS, ids=lambda o: f"{o['system'].rsplit('/', 1)[-1]}-{o['code']}")
def test_S_every_lumbar_modality_and_code_system_is_in_scope(order):
    check(ordering(LBP, order), NOT_INDICATED)
    check(ordering(with_condition(LBP, URINARY_RETENTION, 2), order), CES, "CES-URINARY-RETENTION")


@pytest.mark.parametrize("order", OUT_OF_SCOPE_ORDERS, ids=lambda o: o["code"])
def test_S_other_imaging_gets_no_card_even_with_red_flags_or_cauda_equina(order):
    check(ordering(LBP, order), None)
    check(ordering(with_condition(LBP, PROSTATE_CANCER, 100), order), None)
    check(ordering(with_condition(LBP, CES_DIAGNOSIS, 1), order), None)


def test_S_any_coding_of_the_order_puts_it_in_scope():
    both = {"system": "http://example.org/local-orders", "code": "LSPINE-MR", "display": "local"}
    resources = fhir_record(LBP)
    order = draft_order_resources(LBP)[0]
    order["code"]["coding"].insert(0, both)
    assert card_types(evaluate_resources(resources, [order])) == [NOT_INDICATED]


@pytest.mark.parametrize("status,expected", [("draft", [NOT_INDICATED]), ("active", [NOT_INDICATED]), ("entered-in-error", []),
                                             ("revoked", []), ("completed", [])])
def test_S_draft_order_status(status, expected):
    order = draft_order_resources(LBP)[0]
    order["status"] = status
    assert card_types(evaluate_resources(fhir_record(LBP), [order])) == expected


def test_S_an_empty_order_coding_as_the_sandbox_sends_is_out_of_scope():
    order = {"resourceType": "ServiceRequest", "id": "x", "status": "draft", "intent": "plan", "code": {"coding": [{}]}, "reasonCode": []}
    assert evaluate_resources(fhir_record(LBP), [order]).cards == []


# ---- C1-C7: cauda equina --------------------------------------------------------------------------------------------
@table(
    ("C1-icd-G83.4", with_condition(LBP, CES_ICD, 1), CES, "CES-DIAGNOSIS"),
    ("C1-snomed", with_condition(LBP, CES_DIAGNOSIS, 1), CES, "CES-DIAGNOSIS"),
    ("C1-incomplete-ces", with_condition(LBP, INCOMPLETE_CES, 1), CES, "CES-DIAGNOSIS"),
    ("C1-provisional", with_condition(LBP, CES_DIAGNOSIS, 1, verification="provisional"), CES, "CES-DIAGNOSIS"),
    ("C1-differential", with_condition(LBP, CES_DIAGNOSIS, 1, verification="differential"), CES, "CES-DIAGNOSIS"),
    ("C1-unconfirmed", with_condition(LBP, CES_DIAGNOSIS, 1, verification="unconfirmed"), CES, "CES-DIAGNOSIS"),
    ("C1-recurrence", with_condition(LBP, CES_DIAGNOSIS, 300, status="recurrence"), CES, "CES-DIAGNOSIS"),
    ("C1-relapse", with_condition(LBP, CES_DIAGNOSIS, 300, status="relapse"), CES, "CES-DIAGNOSIS"),
    ("C1-no-clinical-status", with_condition(LBP, CES_DIAGNOSIS, 1), CES, "CES-DIAGNOSIS", {"patch": _no_clinical_status}),
    ("C1-no-onset-date", with_condition(LBP, CES_DIAGNOSIS, None), CES, "CES-DIAGNOSIS"),
    ("C1-resolved", with_condition(LBP, CES_DIAGNOSIS, 300, status="resolved"), NOT_INDICATED, None),
    ("C1-inactive", with_condition(LBP, CES_DIAGNOSIS, 300, status="inactive"), NOT_INDICATED, None),
    ("C1-refuted", with_condition(LBP, CES_DIAGNOSIS, 1, verification="refuted"), NOT_INDICATED, None),
    ("C1-entered-in-error", with_condition(LBP, CES_DIAGNOSIS, 1, verification="entered-in-error"), NOT_INDICATED, None),
    ("C2-condition", with_condition(LBP, SADDLE_NUMBNESS, 2), CES, "CES-SADDLE-ANAESTHESIA"),
    ("C2-condition-old-but-current", with_condition(LBP, SADDLE_NUMBNESS, 200), CES, "CES-SADDLE-ANAESTHESIA"),
    ("C2-condition-resolved", with_condition(LBP, SADDLE_NUMBNESS, 2, status="resolved"), NOT_INDICATED, None),
    ("C2-observation-no-value", with_observation(LBP, SADDLE_NUMBNESS, 2), CES, "CES-SADDLE-ANAESTHESIA"),
    ("C2-observation-present", with_observation(LBP, SADDLE_NUMBNESS, 2, PRESENT), CES, "CES-SADDLE-ANAESTHESIA"),
    ("C2-observation-true", with_observation(LBP, SADDLE_NUMBNESS, 2, True), CES, "CES-SADDLE-ANAESTHESIA"),
    ("C2-observation-preliminary", with_observation(LBP, SADDLE_NUMBNESS, 2, status="preliminary"), CES, "CES-SADDLE-ANAESTHESIA"),
    ("C2-observation-amended", with_observation(LBP, SADDLE_NUMBNESS, 2, status="amended"), CES, "CES-SADDLE-ANAESTHESIA"),
    ("C2-observation-corrected", with_observation(LBP, SADDLE_NUMBNESS, 2, status="corrected"), CES, "CES-SADDLE-ANAESTHESIA"),
    ("C2-finding-as-value", with_observation(LBP, code(SNOMED, "404684003", "Clinical finding"), 2, dict(SADDLE_NUMBNESS)), CES, "CES-SADDLE-ANAESTHESIA"),
    ("C2-observation-14d", with_observation(LBP, SADDLE_NUMBNESS, 14), CES, "CES-SADDLE-ANAESTHESIA"),
    ("C2-observation-15d", with_observation(LBP, SADDLE_NUMBNESS, 15), NOT_INDICATED, None),
    ("C2-observation-absent", with_observation(LBP, SADDLE_NUMBNESS, 2, ABSENT), NOT_INDICATED, None),
    ("C2-observation-false", with_observation(LBP, SADDLE_NUMBNESS, 2, False), NOT_INDICATED, None),
    ("C2-observation-cancelled", with_observation(LBP, SADDLE_NUMBNESS, 2, status="cancelled"), NOT_INDICATED, None),
    ("C2-observation-entered-in-error", with_observation(LBP, SADDLE_NUMBNESS, 2, status="entered-in-error"), NOT_INDICATED, None),
    ("C2-observation-registered", with_observation(LBP, SADDLE_NUMBNESS, 2, status="registered"), NOT_INDICATED, None),
    ("C2-observation-data-absent", with_observation(LBP, SADDLE_NUMBNESS, 2), NOT_INDICATED, None, {"patch": _data_absent}),
    ("C3-retention-1d", with_condition(LBP, URINARY_RETENTION, 1), CES, "CES-URINARY-RETENTION"),
    ("C3-retention-14d", with_condition(LBP, URINARY_RETENTION, 14), CES, "CES-URINARY-RETENTION"),
    ("C3-retention-15d", with_condition(LBP, URINARY_RETENTION, 15), NOT_INDICATED, None),
    ("C3-retention-resolved", with_condition(LBP, URINARY_RETENTION, 3, status="resolved"), NOT_INDICATED, None),
    ("C3-retention-recorded-3d", with_condition(LBP, URINARY_RETENTION, None, recorded_days_ago=3), CES, "CES-URINARY-RETENTION"),
    ("C3-retention-undated-is-not-new", with_condition(LBP, URINARY_RETENTION, None), NOT_INDICATED, None),
    ("C3-acute-retention-snomed", with_condition(LBP, ACUTE_RETENTION, 2), CES, "CES-URINARY-RETENTION"),
    ("C3-retention-observation", with_observation(LBP, ACUTE_RETENTION, 2), CES, "CES-URINARY-RETENTION"),
    ("C3-retention-observation-absent", with_observation(LBP, ACUTE_RETENTION, 2, ABSENT), NOT_INDICATED, None),
    ("C3-drug-induced-still-counts", with_condition(LBP, DRUG_INDUCED_RETENTION, 2), CES, "CES-URINARY-RETENTION"),
    ("C4-incontinence-14d", with_condition(LBP, URINARY_INCONTINENCE, 14), CES, "CES-URINARY-INCONTINENCE"),
    ("C4-incontinence-15d", with_condition(LBP, URINARY_INCONTINENCE, 15), NOT_INDICATED, None),
    ("C4-incontinence-inactive", with_condition(LBP, URINARY_INCONTINENCE, 3, status="inactive"), NOT_INDICATED, None),
    ("C5-faecal-incontinence", with_condition(LBP, FAECAL_INCONTINENCE, 14), CES, "CES-FAECAL-INCONTINENCE"),
    ("C5-faecal-incontinence-15d", with_condition(LBP, FAECAL_INCONTINENCE, 15), NOT_INDICATED, None),
    ("C5-neurogenic-bowel", with_condition(LBP, NEUROGENIC_BOWEL, 3), CES, "CES-FAECAL-INCONTINENCE"),
    ("C5-icd-R15.9", with_condition(LBP, code("http://hl7.org/fhir/sid/icd-10-cm", "R15.9"), 3), CES, "CES-FAECAL-INCONTINENCE"),
    ("C6-paraparesis", with_condition(LBP, SPINAL_PARAPARESIS, 2), CES, "CES-BILATERAL-DEFICIT"),
    ("C6-paraplegia-incomplete", with_condition(LBP, PARAPLEGIA_INCOMPLETE, 2), CES, "CES-BILATERAL-DEFICIT"),
    ("C6-paraparesis-resolved", with_condition(LBP, SPINAL_PARAPARESIS, 2, status="resolved"), NOT_INDICATED, None),
    ("C6-bilateral-new-foot-drop", with_condition(with_condition(LBP, FOOT_DROP_RIGHT, 3), FOOT_DROP_LEFT, 14), CES, "CES-BILATERAL-DEFICIT"),
    # the deficit became bilateral when the second side appeared: an old foot drop plus a new one is a new bilateral deficit
    ("C6-old-foot-drop-then-new-other-side", with_condition(with_condition(LBP, FOOT_DROP_RIGHT, 3), FOOT_DROP_LEFT, 15), CES, "CES-BILATERAL-DEFICIT"),
    ("C6-bilateral-since-14-days", with_condition(with_condition(LBP, FOOT_DROP_RIGHT, 14), FOOT_DROP_LEFT, 40), CES, "CES-BILATERAL-DEFICIT"),
    ("C6-bilateral-for-15-days-is-not-new", with_condition(with_condition(LBP, FOOT_DROP_RIGHT, 15), FOOT_DROP_LEFT, 40), INDICATED, "RF-NEURO-SEVERE"),
    ("C6-new-side-and-a-side-of-unknown-onset", with_condition(with_condition(LBP, FOOT_DROP_RIGHT, 3), FOOT_DROP_LEFT, None), CES, "CES-BILATERAL-DEFICIT"),
    ("C6-old-side-and-a-side-of-unknown-onset", with_condition(with_condition(LBP, FOOT_DROP_RIGHT, 30), FOOT_DROP_LEFT, None), INDICATED, "RF-NEURO-SEVERE"),
    ("C6-second-foot-drop-refuted", with_condition(with_condition(LBP, FOOT_DROP_RIGHT, 3), FOOT_DROP_LEFT, 2, verification="refuted"), INDICATED, "RF-NEURO-SEVERE"),
    ("C7-pvr-200", with_observation(LBP, PVR, 1, 200, "mL"), CES, "CES-PVR"),
    ("C7-pvr-199", with_observation(LBP, PVR, 1, 199, "mL"), NOT_INDICATED, None),
    ("C7-pvr-litres", with_observation(LBP, PVR, 1, 0.25, "L"), CES, "CES-PVR"),
    ("C7-pvr-15d", with_observation(LBP, PVR, 15, 450, "mL"), NOT_INDICATED, None),
    ("C7-pvr-cancelled", with_observation(LBP, PVR, 1, 450, "mL", status="cancelled"), NOT_INDICATED, None),
)
def test_C_cauda_equina(vignette, expected_type, expected_fact, kwargs):
    card = check(vignette, expected_type, expected_fact, **kwargs)
    if expected_type == CES:
        assert card["indicator"] == "critical"
        assert assessment(card)["rule"].startswith("C")


@pytest.mark.parametrize("age", [0, 5, 12, 17, 18, 45, 95])
def test_C_cauda_equina_fires_at_any_age_with_or_without_a_back_pain_episode(age):
    check(with_condition(child_with_lbp(age=age) if age < 18 else adult_with_acute_lbp(age=age), URINARY_RETENTION, 2), CES, "CES-URINARY-RETENTION")
    check(with_observation(child(age) if age < 18 else adult(age), SADDLE_NUMBNESS, 1), CES, "CES-SADDLE-ANAESTHESIA")


def test_C1_a_cauda_equina_reason_on_the_draft_order_gives_the_critical_card_with_no_conditions():
    vignette = with_order_reason(adult(), CES_DIAGNOSIS)
    card = check(vignette, CES, "CES-DIAGNOSIS")
    assert "order reason" in card["detail"]


def test_C1_a_cauda_equina_reason_wins_over_a_child_and_over_an_xray_order():
    card = check(with_order_reason(child(9, order=XRAY), CES_DIAGNOSIS), CES, "CES-DIAGNOSIS")
    assert assessment(card)["recommendedProtocol"] == {"modality": "MR", "contrast": "without", "orderMatches": False}


def test_C_cauda_equina_wins_over_every_other_branch():
    record = with_conservative_care(with_condition(with_condition(adult_with_acute_lbp(days=80), PROSTATE_CANCER, 900), URINARY_RETENTION, 1), 60)
    card = check(record, CES, "CES-URINARY-RETENTION")
    assert {"RF-CANCER", "RF-FAILED-CONSERVATIVE-6W"} <= set(fact_ids(card))
    assert assessment(card)["recommendedProtocol"]["contrast"] == "with-and-without"  # tumour suspected


def test_C3_drug_induced_retention_card_names_the_drug_cause():
    card = check(with_condition(LBP, DRUG_INDUCED_RETENTION, 2), CES)
    assert "drug-induced" in card["detail"]
    assert "drug-induced" not in check(with_condition(LBP, URINARY_RETENTION, 2), CES)["detail"]


# ---- R1-R13: red flags ----------------------------------------------------------------------------------------------
@table(
    ("R1-history-z85", with_condition(LBP, BREAST_CANCER_HISTORY, 2900), INDICATED, "RF-CANCER"),
    ("R1-resolved-cancer-counts", with_condition(LBP, BREAST_CANCER, 2900, status="resolved", abatement_days_ago=2700), INDICATED, "RF-CANCER"),
    ("R1-inactive", with_condition(LBP, PROSTATE_CANCER, 3000, status="inactive"), INDICATED, "RF-CANCER"),
    ("R1-remission", with_condition(LBP, PROSTATE_CANCER, 3000, status="remission"), INDICATED, "RF-CANCER"),
    ("R1-undated", with_condition(LBP, PROSTATE_CANCER, None), INDICATED, "RF-CANCER"),
    ("R1-bone-metastasis", with_condition(LBP, BONE_METASTASIS, 30), INDICATED, "RF-CANCER"),
    ("R1-melanoma-history", with_condition(LBP, MELANOMA_HISTORY, 4000), INDICATED, "RF-CANCER"),
    ("R1-order-reason", with_order_reason(LBP, PROSTATE_CANCER), INDICATED, "RF-CANCER"),
    ("R1-refuted", with_condition(LBP, PROSTATE_CANCER, 30, verification="refuted"), NOT_INDICATED, None),
    ("R1-entered-in-error", with_condition(LBP, PROSTATE_CANCER, 30, verification="entered-in-error"), NOT_INDICATED, None),
    ("R1-not-C44-skin-cancer", with_condition(LBP, BASAL_CELL_CARCINOMA, 400), NOT_INDICATED, None),
    ("R1-not-Z85.828", with_condition(LBP, SKIN_CANCER_HISTORY, 400), NOT_INDICATED, None),
    ("R2-38.0-Cel", with_temperature(LBP, 38.0), INDICATED, "RF-INFECTION-FEVER"),
    ("R2-37.9-Cel", with_temperature(LBP, 37.9), NOT_INDICATED, None),
    ("R2-100.4-degF", with_temperature(LBP, 100.4, "[degF]"), INDICATED, "RF-INFECTION-FEVER"),
    ("R2-100.3-degF", with_temperature(LBP, 100.3, "[degF]"), NOT_INDICATED, None),
    ("R2-14d", with_temperature(LBP, 38.6, days_ago=14), INDICATED, "RF-INFECTION-FEVER"),
    ("R2-15d", with_temperature(LBP, 39.5, days_ago=15), NOT_INDICATED, None),
    ("R2-oral", with_temperature(LBP, 38.2, concept=ORAL_TEMPERATURE), INDICATED, "RF-INFECTION-FEVER"),
    ("R2-preliminary", with_temperature(LBP, 38.6, status="preliminary"), INDICATED, "RF-INFECTION-FEVER"),
    ("R2-corrected", with_temperature(LBP, 38.6, status="corrected"), INDICATED, "RF-INFECTION-FEVER"),
    ("R2-cancelled", with_temperature(LBP, 39.0, status="cancelled"), NOT_INDICATED, None),
    ("R2-entered-in-error", with_temperature(LBP, 39.0, status="entered-in-error"), NOT_INDICATED, None),
    ("R2-unknown-status", with_temperature(LBP, 39.0, status="unknown"), NOT_INDICATED, None),
    ("R2-data-absent", with_temperature(LBP, 39.0), NOT_INDICATED, None, {"patch": _data_absent}),
    ("R2-condition-14d", with_condition(LBP, FEVER, 14), INDICATED, "RF-INFECTION-FEVER"),
    ("R2-condition-15d", with_condition(LBP, FEVER, 15), NOT_INDICATED, None),
    ("R2-condition-snomed", with_condition(LBP, FEVER_SNOMED, 3), INDICATED, "RF-INFECTION-FEVER"),
    ("R2-condition-resolved", with_condition(LBP, FEVER, 3, status="resolved"), NOT_INDICATED, None),
    ("R3-spinal-infection-current-old", with_condition(LBP, VERTEBRAL_OSTEOMYELITIS, 1000), INDICATED, "RF-INFECTION-SPINAL"),
    ("R3-resolved-365d", with_condition(LBP, VERTEBRAL_OSTEOMYELITIS, 365, status="resolved"), INDICATED, "RF-INFECTION-SPINAL"),
    ("R3-resolved-366d", with_condition(LBP, VERTEBRAL_OSTEOMYELITIS, 366, status="resolved"), NOT_INDICATED, None),
    ("R3-epidural-abscess", with_condition(LBP, EPIDURAL_ABSCESS, 20), INDICATED, "RF-INFECTION-SPINAL"),
    ("R4-ivdu-inactive-365d", with_condition(LBP, OPIOID_DEPENDENCE, 365, status="inactive"), INDICATED, "RF-INFECTION-IVDU"),
    ("R4-ivdu-inactive-366d", with_condition(LBP, OPIOID_DEPENDENCE, 366, status="inactive"), NOT_INDICATED, None),
    ("R4-ivdu-active-old", with_condition(LBP, OPIOID_DEPENDENCE, 2000), INDICATED, "RF-INFECTION-IVDU"),
    ("R4-iv-opioid-abuse", with_condition(LBP, IV_OPIOID_ABUSE, 30), INDICATED, "RF-INFECTION-IVDU"),
    ("R4-in-remission-code", with_condition(LBP, OPIOID_DEPENDENCE_IN_REMISSION, 30), NOT_INDICATED, None),
    ("R4-social-history-observation", with_observation(LBP, IV_OPIOID_ABUSE, 30), INDICATED, "RF-INFECTION-IVDU"),
    ("R4-social-history-as-value", with_observation(LBP, code("http://loinc.org", "11343-1", "History of other nonmedical drug use"), 300, dict(IV_OPIOID_ABUSE)), INDICATED, "RF-INFECTION-IVDU"),
    ("R4-observation-366d", with_observation(LBP, IV_OPIOID_ABUSE, 366), NOT_INDICATED, None),
    ("R4-observation-absent", with_observation(LBP, IV_OPIOID_ABUSE, 30, ABSENT), NOT_INDICATED, None),
    ("R4-observation-entered-in-error", with_observation(LBP, IV_OPIOID_ABUSE, 30, status="entered-in-error"), NOT_INDICATED, None),
    ("R5-hiv-any-status", with_condition(LBP, HIV, 3000, status="inactive"), INDICATED, "RF-INFECTION-IMMUNOSUPPRESSION"),
    ("R5-transplant-resolved", with_condition(LBP, KIDNEY_TRANSPLANT, 3000, status="resolved"), INDICATED, "RF-INFECTION-IMMUNOSUPPRESSION"),
    ("R5-immunodeficiency", with_condition(LBP, IMMUNODEFICIENCY, 300), INDICATED, "RF-INFECTION-IMMUNOSUPPRESSION"),
    ("R5-immunodeficiency-resolved", with_condition(LBP, IMMUNODEFICIENCY, 300, status="resolved"), NOT_INDICATED, None),
    ("R5-immunosuppressant-90d", with_medication(LBP, TACROLIMUS, 90, status="completed"), INDICATED, "RF-INFECTION-IMMUNOSUPPRESSION"),
    ("R5-immunosuppressant-91d", with_medication(LBP, TACROLIMUS, 91, status="completed"), NOT_INDICATED, None),
    ("R5-immunosuppressant-ended-80d", with_medication(LBP, TACROLIMUS, 200, status="completed", duration_days=120), INDICATED, "RF-INFECTION-IMMUNOSUPPRESSION"),
    ("R5-immunosuppressant-ended-100d", with_medication(LBP, TACROLIMUS, 200, status="completed", duration_days=100), NOT_INDICATED, None),
    ("R5-immunosuppressant-active", with_medication(LBP, TACROLIMUS, 400), INDICATED, "RF-INFECTION-IMMUNOSUPPRESSION"),
    ("R5-methotrexate-statement", with_medication(LBP, METHOTREXATE, 30, kind="MedicationStatement"), INDICATED, "RF-INFECTION-IMMUNOSUPPRESSION"),
    ("R5-not-taken", with_medication(LBP, METHOTREXATE, 30, status="not-taken", kind="MedicationStatement"), NOT_INDICATED, None),
    ("R5-cancelled", with_medication(LBP, TACROLIMUS, 30, status="cancelled"), NOT_INDICATED, None),
    ("R5-draft", with_medication(LBP, TACROLIMUS, 30, status="draft"), NOT_INDICATED, None),
    ("R5-entered-in-error", with_medication(LBP, TACROLIMUS, 30, status="entered-in-error"), NOT_INDICATED, None),
    ("R6-fracture-90d", with_condition(LBP, LUMBAR_FRACTURE, 90), INDICATED, "RF-FRACTURE-TRAUMA"),
    ("R6-fracture-91d", with_condition(LBP, LUMBAR_FRACTURE, 91), NOT_INDICATED, None),
    ("R6-car-crash", with_condition(LBP, CAR_CRASH, 20), INDICATED, "RF-FRACTURE-TRAUMA"),
    ("R6-recent-trauma-coded-resolved", with_condition(LBP, LUMBAR_FRACTURE, 30, status="resolved"), INDICATED, "RF-FRACTURE-TRAUMA"),
    ("R6-refuted", with_condition(LBP, LUMBAR_FRACTURE, 30, verification="refuted"), NOT_INDICATED, None),
    ("R6-strain-is-not-trauma", adult_with_acute_lbp(days=5, episode=LUMBAR_STRAIN), NOT_INDICATED, None),
    ("R6-sprain-is-not-trauma", adult_with_acute_lbp(days=5, episode=LUMBAR_SPRAIN), NOT_INDICATED, None),
    ("R7-fall-age-70", with_condition(adult_with_acute_lbp(age=70), FALL_SAME_LEVEL, 5), INDICATED, "RF-FRACTURE-TRAUMA"),
    ("R7-fall-age-69", with_condition(adult_with_acute_lbp(age=69), FALL_SAME_LEVEL, 5), NOT_INDICATED, None),
    ("R7-fall-age-75-91d", with_condition(adult_with_acute_lbp(age=75), UNSPECIFIED_FALL, 91), NOT_INDICATED, None),
    ("R7-fall-age-75-90d", with_condition(adult_with_acute_lbp(age=75), UNSPECIFIED_FALL, 90), INDICATED, "RF-FRACTURE-TRAUMA"),
    ("R7-fall-with-osteoporosis", with_condition(with_condition(adult_with_acute_lbp(age=55), FALL_SAME_LEVEL, 5), OSTEOPOROSIS, 900), INDICATED, "RF-FRACTURE-TRAUMA"),
    ("R7-fall-with-steroids", with_condition(with_condition(adult_with_acute_lbp(age=55), FALL_SAME_LEVEL, 5), LONG_TERM_STEROIDS, 900), INDICATED, "RF-FRACTURE-TRAUMA"),
    ("R7-fall-with-short-steroids", with_medication(with_condition(adult_with_acute_lbp(age=55), FALL_SAME_LEVEL, 5), PREDNISONE, 20, status="completed", duration_days=5), NOT_INDICATED, None),
    ("R8-osteoporosis-any-status", with_condition(LBP, OSTEOPOROSIS, 3000, status="inactive"), INDICATED, "RF-FRACTURE-OSTEOPOROSIS"),
    ("R8-osteoporosis-snomed", with_condition(LBP, OSTEOPOROSIS_SNOMED, 300), INDICATED, "RF-FRACTURE-OSTEOPOROSIS"),
    ("R8-osteoporosis-drug", with_medication(LBP, ALENDRONATE, 1500, status="completed"), INDICATED, "RF-FRACTURE-OSTEOPOROSIS"),
    ("R8-osteoporosis-drug-not-taken", with_medication(LBP, ALENDRONATE, 100, status="not-taken", kind="MedicationStatement"), NOT_INDICATED, None),
    ("R9-fragility-90d", with_condition(LBP, OSTEOPOROTIC_VERTEBRAL_FRACTURE, 90), INDICATED, "RF-FRACTURE-FRAGILITY"),
    ("R9-fragility-91d", with_condition(LBP, COLLAPSED_VERTEBRA, 91), NOT_INDICATED, None),
    ("R9-collapsed-vertebra", with_condition(LBP, COLLAPSED_VERTEBRA, 10), INDICATED, "RF-FRACTURE-FRAGILITY"),
    ("R9-collapsed-vertebra-old", with_condition(LBP, COLLAPSED_VERTEBRA, 400), NOT_INDICATED, None),
    ("R8-old-osteoporotic-fracture-is-osteoporosis", with_condition(LBP, OSTEOPOROTIC_VERTEBRAL_FRACTURE, 400, status="resolved"), INDICATED, "RF-FRACTURE-OSTEOPOROSIS"),
    ("R8-old-osteoporotic-fracture-icd", with_condition(LBP, code("http://hl7.org/fhir/sid/icd-10-cm", "M80.08XA"), 400, status="inactive"), INDICATED, "RF-FRACTURE-OSTEOPOROSIS"),
    ("R10-90-days-supply", with_medication(LBP, PREDNISONE, 120, status="completed", duration_days=90), INDICATED, "RF-FRACTURE-STEROIDS"),
    ("R10-89-days-supply", with_medication(LBP, PREDNISONE, 120, status="completed", duration_days=89), NOT_INDICATED, None),
    ("R10-statement-90-days", with_medication(LBP, PREDNISONE, 200, status="completed", duration_days=90, kind="MedicationStatement"), INDICATED, "RF-FRACTURE-STEROIDS"),
    ("R10-90-day-course-begun-30d-ago", with_medication(LBP, PREDNISONE, 30, duration_days=90), INDICATED, "RF-FRACTURE-STEROIDS"),
    ("R10-active-for-200d", with_medication(LBP, PREDNISONE, 200), INDICATED, "RF-FRACTURE-STEROIDS"),
    ("R10-active-for-30d", with_medication(LBP, PREDNISONE, 30), NOT_INDICATED, None),
    ("R10-two-courses-cumulative", with_medication(with_medication(LBP, PREDNISONE, 300, status="completed", duration_days=50), PREDNISONE, 100, status="completed", duration_days=40), INDICATED, "RF-FRACTURE-STEROIDS"),
    ("R10-course-mostly-before-lookback", with_medication(LBP, PREDNISONE, 400, status="completed", duration_days=120), NOT_INDICATED, None),
    ("R10-short-burst", with_medication(LBP, PREDNISONE, 20, status="completed", duration_days=5), NOT_INDICATED, None),
    # prescriptions add up: an early refill starts when the previous supply ends (45 + 45 days, 15 days apart)
    ("R10-early-refill-adds-up", with_medication(with_medication(LBP, PREDNISONE, 100, status="completed", duration_days=45), PREDNISONE, 70, status="completed", duration_days=45), INDICATED, "RF-FRACTURE-STEROIDS"),
    # one 45-day prescription sent twice (the EHR's and an exchange's copy, other ids) is 45 days, not 90
    ("R10-one-prescription-sent-twice", with_medication(with_medication(LBP, PREDNISONE, 100, status="completed", duration_days=45), PREDNISONE, 100, status="completed", duration_days=45), NOT_INDICATED, None),
    # an order and a statement of the same 60-day course are 60 days, not 120
    ("R10-order-and-statement-of-one-course", with_medication(with_medication(LBP, PREDNISONE, 100, status="completed", duration_days=60), PREDNISONE, 100, status="completed", duration_days=60, kind="MedicationStatement"), NOT_INDICATED, None),
    ("R10-not-taken", with_medication(LBP, PREDNISONE, 200, status="not-taken", kind="MedicationStatement"), NOT_INDICATED, None),
    ("R10-topical-is-not-systemic", with_medication(LBP, HYDROCORTISONE_CREAM, 300), NOT_INDICATED, None),
    ("R10-long-term-use-code", with_condition(LBP, LONG_TERM_STEROIDS, 900), INDICATED, "RF-FRACTURE-STEROIDS"),
    ("R11-foot-drop", with_condition(LBP, FOOT_DROP_RIGHT, 3), INDICATED, "RF-NEURO-SEVERE"),
    ("R11-foot-drop-90d", with_condition(LBP, FOOT_DROP_LEFT, 90), INDICATED, "RF-NEURO-SEVERE"),
    ("R11-foot-drop-91d", with_condition(LBP, FOOT_DROP_LEFT, 91), NOT_INDICATED, None),
    ("R11-foot-drop-unspecified", with_condition(LBP, FOOT_DROP_UNSPECIFIED, 3), INDICATED, "RF-NEURO-SEVERE"),
    ("R11-foot-drop-resolved", with_condition(LBP, FOOT_DROP_RIGHT, 3, status="resolved"), NOT_INDICATED, None),
    ("R12-laminectomy-cpt", with_procedure(LBP, LAMINECTOMY, 3000), INDICATED, "RF-PRIOR-LUMBAR-SURGERY"),
    ("R12-laminectomy-snomed", with_procedure(LBP, LAMINECTOMY_SNOMED, 400), INDICATED, "RF-PRIOR-LUMBAR-SURGERY"),
    ("R12-undated-procedure", with_procedure(LBP, LAMINECTOMY, None), INDICATED, "RF-PRIOR-LUMBAR-SURGERY"),
    ("R12-postlaminectomy-resolved", with_condition(LBP, POSTLAMINECTOMY_SYNDROME, 3000, status="resolved"), INDICATED, "RF-PRIOR-LUMBAR-SURGERY"),
    ("R12-not-done", with_procedure(LBP, LAMINECTOMY, 30, status="not-done"), NOT_INDICATED, None),
    ("R12-entered-in-error", with_procedure(LBP, LAMINECTOMY, 30, status="entered-in-error"), NOT_INDICATED, None),
    ("R12-in-preparation", with_procedure(LBP, LAMINECTOMY, 30, status="preparation"), NOT_INDICATED, None),
    ("R13-ankylosing-spondylitis", with_condition(LBP, ANKYLOSING_SPONDYLITIS, 3000, status="inactive"), INDICATED, "RF-SPONDYLOARTHROPATHY"),
)
def test_R_red_flags(vignette, expected_type, expected_fact, kwargs):
    card = check(vignette, expected_type, expected_fact, **kwargs)
    if expected_type == INDICATED:
        assert card["indicator"] == "info"
        assert assessment(card)["rule"].startswith("R")
    if expected_type == NOT_INDICATED:
        assert card["indicator"] == "warning" and assessment(card)["rule"] == "W1"


@pytest.mark.parametrize("value,unit,expected", [
    (100.4, "[degF]", INDICATED), (100.3, "[degF]", NOT_INDICATED), (38.0, "Cel", INDICATED), (37.9, "Cel", NOT_INDICATED),
    (101.2, "°F", INDICATED), (38.4, "°C", INDICATED), (101.2, None, INDICATED), (99.0, None, NOT_INDICATED),
    (38.4, None, INDICATED), (37.5, None, NOT_INDICATED),
])
def test_R2_temperature_units_are_normalised(value, unit, expected):
    def quantity(resources):
        quantity = {"value": value}
        if unit is not None:
            quantity["unit"] = unit  # display unit only, no UCUM code
        return modify(resources, "Observation", lambda r: r.update(valueQuantity=quantity))
    check(with_temperature(LBP, 36.6), expected, "RF-INFECTION-FEVER" if expected == INDICATED else None, patch=quantity)


def test_R2_a_temperature_in_a_vital_signs_panel_component_counts():
    panel = {"resourceType": "Observation", "id": "vitals", "status": "final", "effectiveDateTime": (TODAY - timedelta(days=1)).isoformat(),
             "code": {"coding": [{"system": "http://loinc.org", "code": "85353-1"}]},
             "component": [{"code": {"coding": [dict(BODY_TEMPERATURE)]}, "valueQuantity": {"value": 38.9, "code": "Cel", "system": "http://unitsofmeasure.org"}}]}
    check(LBP, INDICATED, "RF-INFECTION-FEVER", extra_resources=[panel])


@table(
    ("age-51-alone", adult_with_acute_lbp(age=51), NOT_INDICATED, None),
    ("age-80-alone", adult_with_acute_lbp(age=80), NOT_INDICATED, None),
    ("R29.2-abnormal-reflex", with_condition(LBP, ABNORMAL_REFLEX, 3), NOT_INDICATED, None),
    ("R26.2-difficulty-walking", with_condition(LBP, DIFFICULTY_WALKING, 3), NOT_INDICATED, None),
    ("R20.2-paresthesia", with_condition(LBP, PARESTHESIA, 3), NOT_INDICATED, None),
    ("M48.062-stenosis-claudication", adult_with_acute_lbp(days=12, episode=STENOSIS_CLAUDICATION), NOT_INDICATED, None),
    ("PAD", with_condition(LBP, PAD_CLAUDICATION, 400), NOT_INDICATED, None),
    ("pregnancy", with_condition(LBP, PREGNANCY, 100), NOT_INDICATED, None),
    ("old-fever", with_temperature(LBP, 39.4, days_ago=30), NOT_INDICATED, None),
    ("old-retention-resolved", with_condition(LBP, URINARY_RETENTION, 60, status="resolved"), NOT_INDICATED, None),
    ("chronic-retention-from-BPH", with_condition(with_condition(LBP, URINARY_RETENTION, 400), BPH, 900), NOT_INDICATED, None),
    ("ESR-only-supporting", with_observation(LBP, ESR, 2, 60, "mm/h"), NOT_INDICATED, None),
    ("hypertension", with_condition(LBP, HYPERTENSION, 900), NOT_INDICATED, None),
)
def test_non_flags_do_not_suppress_the_warning(vignette, expected_type, expected_fact, kwargs):
    card = check(vignette, expected_type, expected_fact, **kwargs)
    assert not assessment(card).get("facts")


def test_R11_unilateral_foot_drop_is_urgent_info_and_bilateral_is_critical():
    unilateral = check(with_condition(LBP, FOOT_DROP_RIGHT, 3), INDICATED, "RF-NEURO-SEVERE")
    assert unilateral["summary"].startswith("Urgent")
    assert "**Urgent:**" in unilateral["detail"]
    bilateral = check(with_condition(with_condition(LBP, FOOT_DROP_RIGHT, 3), FOOT_DROP_LEFT, 3), CES, "CES-BILATERAL-DEFICIT")
    assert bilateral["indicator"] == "critical"
    not_urgent = check(with_condition(LBP, OSTEOPOROSIS, 900), INDICATED)
    assert not not_urgent["summary"].startswith("Urgent") and "**Urgent:**" not in not_urgent["detail"]


# ---- F1: failed conservative care ------------------------------------------------------------------------------------
EPISODE_60 = adult_with_acute_lbp(days=60)


@table(
    ("F1-physical-therapy-42d", with_conservative_care(EPISODE_60, 42), INDICATED, "RF-FAILED-CONSERVATIVE-6W"),
    ("F1-physical-therapy-41d", with_conservative_care(EPISODE_60, 41), NOT_INDICATED, None),
    ("F1-care-the-day-the-episode-began", with_conservative_care(adult_with_acute_lbp(days=42), 42), INDICATED, "RF-FAILED-CONSERVATIVE-6W"),
    ("F1-care-before-episode-onset", with_conservative_care(adult_with_acute_lbp(days=41), 50), NOT_INDICATED, None),
    ("F1-earliest-of-several", with_conservative_care(with_medication(EPISODE_60, IBUPROFEN, 45, kind="MedicationStatement"), 10), INDICATED, "RF-FAILED-CONSERVATIVE-6W"),
    ("F1-pt-evaluation-cpt", with_procedure(EPISODE_60, PT_EVALUATION, 50), INDICATED, "RF-FAILED-CONSERVATIVE-6W"),
    ("F1-chiropractic", with_procedure(EPISODE_60, CHIROPRACTIC, 43), INDICATED, "RF-FAILED-CONSERVATIVE-6W"),
    ("F1-nsaid-statement", with_medication(EPISODE_60, IBUPROFEN, 50, kind="MedicationStatement"), INDICATED, "RF-FAILED-CONSERVATIVE-6W"),
    ("F1-nsaid-request-completed", with_medication(EPISODE_60, NAPROXEN, 55, status="completed", duration_days=14), INDICATED, "RF-FAILED-CONSERVATIVE-6W"),
    ("F1-physiotherapy-referral", with_referral(EPISODE_60, PHYSIOTHERAPY_REFERRAL, 50), INDICATED, "RF-FAILED-CONSERVATIVE-6W"),
    ("F1-referral-revoked", with_referral(EPISODE_60, PHYSIOTHERAPY_REFERRAL, 50, status="revoked"), NOT_INDICATED, None),
    ("F1-referral-entered-in-error", with_referral(EPISODE_60, PHYSIOTHERAPY_REFERRAL, 50, status="entered-in-error"), NOT_INDICATED, None),
    ("F1-referral-draft", with_referral(EPISODE_60, PHYSIOTHERAPY_REFERRAL, 50, status="draft"), NOT_INDICATED, None),
    ("F1-procedure-not-done", with_procedure(EPISODE_60, PHYSICAL_THERAPY, 50, status="not-done"), NOT_INDICATED, None),
    ("F1-procedure-entered-in-error", with_procedure(EPISODE_60, PHYSICAL_THERAPY, 50, status="entered-in-error"), NOT_INDICATED, None),
    ("F1-medication-not-taken", with_medication(EPISODE_60, IBUPROFEN, 50, status="not-taken", kind="MedicationStatement"), NOT_INDICATED, None),
    ("F1-medication-cancelled", with_medication(EPISODE_60, NAPROXEN, 50, status="cancelled"), NOT_INDICATED, None),
    ("F1-episode-resolved", with_conservative_care(with_condition(adult(), LOW_BACK_PAIN, 60, status="resolved"), 50), None, None),
    ("F1-with-unknown-episode-start", with_conservative_care(adult_with_lbp_of_unknown_onset(), 50), None, None),
)
def test_F1_failed_conservative_care(vignette, expected_type, expected_fact, kwargs):
    card = check(vignette, expected_type, expected_fact, **kwargs)
    if expected_type == INDICATED:
        assert assessment(card)["rule"] == "F1"
        assert assessment(card)["recommendedProtocol"] == {"modality": "MR", "contrast": "without", "orderMatches": True}


def test_F1_is_also_reported_behind_a_red_flag():
    card = check(with_conservative_care(with_condition(EPISODE_60, OSTEOPOROSIS, 900), 50), INDICATED)
    assert fact_ids(card) == ["RF-FRACTURE-OSTEOPOROSIS", "RF-FAILED-CONSERVATIVE-6W"]
    assert assessment(card)["rule"] == "R8"


# ---- W1: early imaging warning ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("days", [0, 1, 10, 41, 42, 180, 2000])
def test_W1_no_red_flag_and_no_six_weeks_of_care_is_a_warning_whatever_the_episode_length(days):
    card = check(adult_with_acute_lbp(days=days), NOT_INDICATED)
    assert card["indicator"] == "warning" and assessment(card)["rule"] == "W1"
    if days < 42:
        assert f"{days} days" in card["summary"]
    else:
        assert "no 6-week trial" in card["summary"]


@pytest.mark.parametrize("episode", [LOW_BACK_PAIN, SCIATICA_LEFT, LUMBAR_RADICULOPATHY, LBP_IN_PREGNANCY,
                                     code("http://hl7.org/fhir/sid/icd-10-cm", "M5450"), code("http://hl7.org/fhir/sid/icd-10", "M54.5")],
                         ids=lambda c: c["code"])
def test_W1_every_kind_of_episode(episode):
    check(adult_with_acute_lbp(days=10, episode=episode), NOT_INDICATED)


def test_W1_episode_starts_at_the_earliest_active_episode_condition():
    vignette = with_condition(with_condition(adult_with_acute_lbp(days=10), SCIATICA_LEFT, 30), LOW_BACK_PAIN, 400, status="resolved")
    card = check(vignette, NOT_INDICATED)
    assert "30 days" in card["summary"]


def test_W1_episode_start_falls_back_to_the_recorded_date():
    card = check(with_condition(adult(), LOW_BACK_PAIN, None, recorded_days_ago=12), NOT_INDICATED)
    assert "12 days" in card["summary"]


def test_W1_the_warning_suggests_cancelling_the_order_and_physiotherapy():
    card = check(LBP, NOT_INDICATED)
    recommended = [s for s in card["suggestions"] if s.get("isRecommended")][0]
    assert [a["type"] for a in recommended["actions"]] == ["delete", "create"]
    assert recommended["actions"][0]["resourceId"] == "ServiceRequest/draft-imaging-1"
    assert recommended["actions"][1]["resource"]["code"]["coding"][0]["code"] == "306170007"
    assert "cauda equina" in card["detail"].lower()  # safety net


# ---- N1: no card -----------------------------------------------------------------------------------------------------
@table(
    ("out-of-scope-order", adult_with_acute_lbp(order=BRAIN_MRI), None, None),
    ("child-12", child_with_lbp(age=12), None, None),
    ("child-17", child_with_lbp(age=17), None, None),
    ("child-with-red-flag", with_condition(child_with_lbp(age=15), PROSTATE_CANCER, 100), None, None),
    ("child-with-failed-care", with_conservative_care(child_with_lbp(days=80, age=16), 60), None, None),
    ("adult-18", adult_with_acute_lbp(age=18), NOT_INDICATED, None),
    ("no-episode", adult(), None, None),
    ("no-episode-with-red-flag", with_condition(adult(), PROSTATE_CANCER, 100), None, None),
    ("episode-resolved", with_condition(adult(), LOW_BACK_PAIN, 20, status="resolved"), None, None),
    ("episode-inactive", with_condition(adult(), LOW_BACK_PAIN, 20, status="inactive"), None, None),
    ("episode-refuted", with_condition(adult(), LOW_BACK_PAIN, 20, verification="refuted"), None, None),
    ("episode-entered-in-error", with_condition(adult(), LOW_BACK_PAIN, 20, verification="entered-in-error"), None, None),
    ("unknown-duration", adult_with_lbp_of_unknown_onset(), None, None),
    ("episode-only-as-order-reason", with_order_reason(adult(), LOW_BACK_PAIN), None, None),
    ("order-reason-episode-with-red-flag", with_condition(with_order_reason(adult(), LOW_BACK_PAIN), PROSTATE_CANCER, 100), INDICATED, "RF-CANCER"),
    ("unknown-duration-with-red-flag", with_condition(adult_with_lbp_of_unknown_onset(), OSTEOPOROSIS, 900), INDICATED, "RF-FRACTURE-OSTEOPOROSIS"),
)
def test_N1_no_card(vignette, expected_type, expected_fact, kwargs):
    check(vignette, expected_type, expected_fact, **kwargs)


# ---- M1-M3: modifiers change the text, never the card ---------------------------------------------------------------
def test_M1_pregnancy_adds_the_gadolinium_note_to_every_card_type():
    for base, expected in ((LBP, NOT_INDICATED), (with_condition(LBP, OSTEOPOROSIS, 900), INDICATED), (with_condition(LBP, URINARY_RETENTION, 1), CES)):
        without = check(base, expected)
        pregnant = check(with_condition(base, PREGNANCY, 100), expected)
        assert "gadolinium" not in without["detail"] and "gadolinium" in pregnant["detail"]


@pytest.mark.parametrize("order", [CT_WITHOUT, XRAY], ids=["ct", "xray"])
def test_M1_in_pregnancy_a_fracture_risk_flag_calls_for_mri_not_ionising_radiation(order):
    """criteria.md 1.9: in pregnancy, MRI without gadolinium; avoid ionising radiation (CT, radiography)."""
    card = check(ordering(with_condition(with_condition(LBP, PREGNANCY, 100), OSTEOPOROSIS, 900), order), INDICATED)
    assert assessment(card)["recommendedProtocol"] == {"modality": "MR", "contrast": "without", "orderMatches": False}
    assert card["suggestions"][0]["actions"][1]["resource"]["code"]["coding"][0]["code"] == "72148"
    not_pregnant = check(ordering(with_condition(LBP, OSTEOPOROSIS, 900), order), INDICATED)
    assert assessment(not_pregnant)["recommendedProtocol"]["orderMatches"] is True


def test_M1_a_positive_pregnancy_test_and_lbp_in_pregnancy_count_as_pregnancy():
    test = code("http://loinc.org", "2106-3", "Choriogonadotropin (pregnancy test) [Presence] in Urine")
    positive = with_observation(LBP, test, 5, {"system": SNOMED, "code": "10828004", "display": "Positive"})
    assert "gadolinium" in check(positive, NOT_INDICATED)["detail"]
    negative = with_observation(LBP, test, 5, {"system": SNOMED, "code": "260385009", "display": "Negative"})
    assert "gadolinium" not in check(negative, NOT_INDICATED)["detail"]
    assert "gadolinium" in check(adult_with_acute_lbp(episode=LBP_IN_PREGNANCY), NOT_INDICATED)["detail"]


def test_M1_pregnancy_withholds_gadolinium_where_the_flags_would_call_for_it():
    pregnant_cancer = with_condition(with_condition(LBP, PREGNANCY, 100), PROSTATE_CANCER, 900)
    card = check(pregnant_cancer, INDICATED, "RF-CANCER")
    assert assessment(card)["recommendedProtocol"] == {"modality": "MR", "contrast": "without", "orderMatches": True}
    assert "suggestions" not in card and "only if essential" in card["detail"]
    xray = check(ordering(pregnant_cancer, XRAY), INDICATED)
    assert assessment(xray)["recommendedProtocol"]["contrast"] == "without"
    assert xray["suggestions"][0]["actions"][1]["resource"]["code"]["coding"][0]["code"] == "72148"
    ordered_with = check(ordering(pregnant_cancer, MRI_WITH_AND_WITHOUT), INDICATED)
    assert assessment(ordered_with)["recommendedProtocol"]["orderMatches"] is False  # suggests dropping gadolinium
    not_needed = check(with_condition(with_condition(LBP, PREGNANCY, 100), OSTEOPOROSIS, 900), INDICATED)
    assert assessment(not_needed)["recommendedProtocol"] == {"modality": "MR", "contrast": "without", "orderMatches": True}
    ces = check(with_condition(with_condition(pregnant_cancer, URINARY_RETENTION, 1), PREGNANCY, 100), CES)
    assert assessment(ces)["recommendedProtocol"]["contrast"] == "without"


def test_M2_peripheral_arterial_disease_adds_the_vascular_note():
    assert "ankle-brachial" in check(with_condition(LBP, PAD_CLAUDICATION, 400), NOT_INDICATED)["detail"]
    assert "ankle-brachial" not in check(LBP, NOT_INDICATED)["detail"]
    assert "ankle-brachial" not in check(with_condition(LBP, PAD_CLAUDICATION, 400, status="resolved"), NOT_INDICATED)["detail"]


@pytest.mark.parametrize("days,note", [(0, True), (28, True), (29, False), (41, False)])
def test_M3_hedis_note_for_episodes_of_28_days_or_less(days, note):
    card = check(adult_with_acute_lbp(days=days), NOT_INDICATED)
    assert ("HEDIS" in card["detail"]) is note


def test_sciatica_note_on_the_warning_for_radicular_pain_only():
    assert "12 weeks" in check(adult_with_acute_lbp(episode=SCIATICA_LEFT), NOT_INDICATED)["detail"]
    assert "12 weeks" not in check(LBP, NOT_INDICATED)["detail"]


# ---- contrast and modality -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", [
    with_condition(LBP, PROSTATE_CANCER, 100), with_temperature(LBP, 38.7), with_condition(LBP, VERTEBRAL_OSTEOMYELITIS, 30),
    with_condition(LBP, OPIOID_DEPENDENCE, 30), with_condition(LBP, HIV, 900), with_medication(LBP, TACROLIMUS, 30),
    with_procedure(LBP, LAMINECTOMY, 900), with_condition(with_condition(LBP, OSTEOPOROSIS, 900), PROSTATE_CANCER, 100),
], ids=["cancer", "fever", "spinal-infection", "ivdu", "hiv", "immunosuppressant", "prior-surgery", "osteoporosis+cancer"])
def test_contrast_cancer_infection_or_prior_surgery_calls_for_without_and_with(flag):
    card = check(flag, INDICATED)
    assert assessment(card)["recommendedProtocol"] == {"modality": "MR", "contrast": "with-and-without", "orderMatches": False}
    swap = card["suggestions"][0]["actions"]
    assert [(a["type"], a.get("resourceId")) for a in swap] == [("delete", "ServiceRequest/draft-imaging-1"), ("create", None)]
    assert swap[1]["resource"]["code"]["coding"][0] == {"system": CPT, "code": "72158", "display": "MRI lumbar spine, without then with contrast"}
    assert "without and with contrast" in card["summary"]


@pytest.mark.parametrize("flag", [
    with_conservative_care(EPISODE_60, 50), with_condition(LBP, LUMBAR_FRACTURE, 10), with_condition(LBP, OSTEOPOROTIC_VERTEBRAL_FRACTURE, 10),
    with_condition(LBP, OSTEOPOROSIS, 900), with_condition(LBP, LONG_TERM_STEROIDS, 900), with_condition(LBP, FOOT_DROP_RIGHT, 3),
    with_condition(LBP, ANKYLOSING_SPONDYLITIS, 900),
], ids=["failed-care", "trauma", "fragility-fracture", "osteoporosis", "steroids", "foot-drop", "spondyloarthropathy"])
def test_contrast_failed_care_fracture_and_neurological_deficit_call_for_without(flag):
    card = check(flag, INDICATED)
    assert assessment(card)["recommendedProtocol"] == {"modality": "MR", "contrast": "without", "orderMatches": True}
    assert "suggestions" not in card
    with_contrast = check(ordering(flag, MRI_WITH), INDICATED)
    assert assessment(with_contrast)["recommendedProtocol"] == {"modality": "MR", "contrast": "without", "orderMatches": False}
    assert with_contrast["suggestions"][0]["actions"][1]["resource"]["code"]["coding"][0]["code"] == "72148"


@pytest.mark.parametrize("order, matches", [
    (CT_WITHOUT, True),
    (code(CPT, "72132", "CT lumbar spine, with contrast"), False),
    (code(CPT, "72133", "CT lumbar spine, without and with contrast"), False),
], ids=["ct-without", "ct-with", "ct-without-and-with"])
def test_a_ct_fits_fracture_risk_only_without_contrast(order, matches):
    """R6: 'CT w/o or radiography; MRI w/o' (ACR V6): a contrast CT is not what the flag calls for."""
    card = check(ordering(with_condition(LBP, LUMBAR_FRACTURE, 10), order), INDICATED)
    expected = {"modality": "CT", "contrast": None, "orderMatches": True} if matches else {"modality": "MR", "contrast": "without", "orderMatches": False}
    assert assessment(card)["recommendedProtocol"] == expected


def test_contrast_the_ordered_without_and_with_mri_matches_for_cancer():
    card = check(ordering(with_condition(LBP, PROSTATE_CANCER, 100), MRI_WITH_AND_WITHOUT), INDICATED)
    assert assessment(card)["recommendedProtocol"]["orderMatches"] is True
    assert "suggestions" not in card


@pytest.mark.parametrize("order,replacement", [
    (MRI_LOINC_WITHOUT, {"system": "http://loinc.org", "code": "24967-2"}),
    (MRI_RADLEX_WITHOUT, {"system": "http://radlex.org", "code": "RPID500"}),
    (XRAY, {"system": CPT, "code": "72158"}),
    (XRAY_LOINC, {"system": "http://loinc.org", "code": "24967-2"}),
    (MRI_SNOMED_WITHOUT, {"system": CPT, "code": "72158"}),  # SNOMED has no without-and-with lumbar MRI code: CPT
], ids=["loinc-mri", "radlex-mri", "cpt-xray", "loinc-xray", "snomed-mri"])
def test_contrast_replacement_is_coded_in_the_orders_code_system(order, replacement):
    card = check(ordering(with_condition(LBP, PROSTATE_CANCER, 100), order), INDICATED)
    created = card["suggestions"][0]["actions"][1]["resource"]
    assert {k: created["code"]["coding"][0][k] for k in ("system", "code")} == replacement
    assert created["status"] == "draft" and created["subject"] == {"reference": f"Patient/{created['subject']['reference'].split('/')[1]}"}


def test_xray_with_osteoporosis_is_fine_as_ordered():
    card = check(ordering(with_condition(LBP, OSTEOPOROSIS, 900), XRAY), INDICATED, "RF-FRACTURE-OSTEOPOROSIS")
    assert assessment(card)["recommendedProtocol"] == {"modality": "XR", "contrast": None, "orderMatches": True}
    assert "suggestions" not in card
    assert "as ordered" in card["summary"]


def test_xray_with_cancer_is_replaced_by_mri_without_and_with():
    card = check(ordering(with_condition(LBP, PROSTATE_CANCER, 100), XRAY), INDICATED, "RF-CANCER")
    assert assessment(card)["recommendedProtocol"] == {"modality": "MR", "contrast": "with-and-without", "orderMatches": False}
    assert card["suggestions"][0]["actions"][0] == {"type": "delete", "description": card["suggestions"][0]["actions"][0]["description"],
                                                    "resourceId": "ServiceRequest/draft-imaging-1"}


def test_xray_after_failed_care_is_replaced_by_mri_without():
    card = check(ordering(with_conservative_care(EPISODE_60, 50), XRAY), INDICATED)
    assert assessment(card)["recommendedProtocol"] == {"modality": "MR", "contrast": "without", "orderMatches": False}
    assert card["suggestions"][0]["actions"][1]["resource"]["code"]["coding"][0]["code"] == "72148"


def test_ct_after_trauma_is_fine_as_ordered():
    card = check(ordering(with_condition(LBP, LUMBAR_FRACTURE, 10), CT_WITHOUT), INDICATED)
    assert assessment(card)["recommendedProtocol"] == {"modality": "CT", "contrast": None, "orderMatches": True}


def test_cauda_equina_with_an_xray_order_replaces_it_with_a_stat_mri():
    card = check(ordering(with_condition(LBP, URINARY_RETENTION, 1), XRAY), CES)
    actions = [s for s in card["suggestions"] if s.get("isRecommended")][0]["actions"]
    assert [a["type"] for a in actions] == ["delete", "create", "create"]
    assert actions[0]["resourceId"] == "ServiceRequest/draft-imaging-1"
    assert actions[1]["resource"]["priority"] == "stat" and actions[1]["resource"]["code"]["coding"][0]["code"] == "72148"


# ---- several draft orders; order-select selections -------------------------------------------------------------------
MANY_ORDERS = with_extra_order(with_extra_order(with_condition(LBP, PROSTATE_CANCER, 100), BRAIN_MRI, "brain-1"), XRAY, "xray-1")


def test_every_in_scope_draft_order_gets_its_own_card_and_others_none():
    evaluation = evaluate(MANY_ORDERS)
    assert card_types(evaluation) == [INDICATED, INDICATED]
    assert [assessment(c)["order"] for c in evaluation.cards] == ["ServiceRequest/draft-imaging-1", "ServiceRequest/xray-1"]
    assert len({c["uuid"] for c in evaluation.cards}) == 2


def test_cauda_equina_gives_a_critical_card_for_each_lumbar_order():
    evaluation = evaluate(with_condition(MANY_ORDERS, SADDLE_NUMBNESS, 1))
    assert card_types(evaluation) == [CES, CES]


@pytest.mark.parametrize("selections,orders", [
    (("ServiceRequest/xray-1",), ["ServiceRequest/xray-1"]),
    (("xray-1",), ["ServiceRequest/xray-1"]),
    (("ServiceRequest/brain-1",), []),
    (("ServiceRequest/brain-1", "ServiceRequest/draft-imaging-1"), ["ServiceRequest/draft-imaging-1"]),
    (("ServiceRequest/unknown",), ["ServiceRequest/draft-imaging-1", "ServiceRequest/xray-1"]),
])
def test_order_select_evaluates_only_the_selections_when_they_resolve(selections, orders):
    evaluation = evaluate(MANY_ORDERS, selections=selections)
    assert [assessment(c)["order"] for c in evaluation.cards] == orders


def test_draft_orders_without_ids_get_distinct_cards():
    orders = [{"resourceType": "ServiceRequest", "status": "draft", "intent": "order", "code": {"coding": [dict(o)]}} for o in (MRI_WITHOUT, XRAY)]
    evaluation = evaluate_resources(fhir_record(LBP), orders)
    assert card_types(evaluation) == [NOT_INDICATED, NOT_INDICATED]
    assert len({c["uuid"] for c in evaluation.cards}) == 2


# ---- data incompleteness (engine and HTTP) ---------------------------------------------------------------------------
def test_unread_observations_never_allow_the_warning():
    card = check(LBP, INCOMPLETE, unreadable={"Observation": "OperationOutcome: timeout"})
    assert card["indicator"] == "info" and assessment(card)["unread"] == ["Observation"]
    check(with_condition(LBP, URINARY_RETENTION, 1), CES, unreadable={"Observation": "timeout"})
    red_flag = check(with_condition(LBP, PROSTATE_CANCER, 100), INDICATED, unreadable={"Observation": "timeout"})
    assert "Not read" in red_flag["detail"]


@pytest.mark.parametrize("resource_type", ["Patient", "Condition", "Observation", "MedicationRequest", "MedicationStatement", "Procedure", "ServiceRequest"])
def test_any_unread_source_turns_the_warning_into_data_incomplete(resource_type):
    check(LBP, INCOMPLETE, unreadable={resource_type: "HTTP 500"})
    check(with_observation(LBP, SADDLE_NUMBNESS, 1), CES, unreadable={resource_type: "HTTP 500"})


OPERATION_OUTCOME = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout", "diagnostics": "upstream timeout"}]}


def post(client, request, service="lumbar-imaging-order-sign"):
    response = client.post(f"/cds-services/{service}", json=request)
    return response.status_code, response.json()


def request_with(vignette, change):
    request = hook_request(vignette)
    change(request["prefetch"])
    return request


def test_http_operation_outcome_for_observations_gives_data_incomplete_not_a_warning(client):
    status, body = post(client, request_with(LBP, lambda p: p.update(observations=OPERATION_OUTCOME)))
    assert status == 200 and card_types(body["cards"]) == [INCOMPLETE]


def test_http_operation_outcome_for_observations_still_gives_the_critical_card(client):
    status, body = post(client, request_with(with_condition(LBP, CES_DIAGNOSIS, 1), lambda p: p.update(observations=OPERATION_OUTCOME)))
    assert status == 200 and card_types(body["cards"]) == [CES]


def test_http_absent_key_without_fhir_server_is_412(client):
    status, body = post(client, request_with(LBP, lambda p: p.pop("observations")))
    assert status == 412 and body["resourceType"] == "OperationOutcome"
    status, body = post(client, request_with(LBP, lambda p: p.pop("medicationStatements")))
    assert status == 412


def test_http_absent_key_with_a_cauda_equina_sign_is_200_critical(client):
    status, body = post(client, request_with(with_condition(LBP, URINARY_RETENTION, 1), lambda p: p.pop("observations")))
    assert status == 200 and card_types(body["cards"]) == [CES]
    status, body = post(client, request_with(with_order_reason(LBP, CES_DIAGNOSIS), lambda p: p.clear()))
    assert status == 200 and card_types(body["cards"]) == [CES]


def test_http_absent_conditions_hide_a_recorded_cauda_equina_condition_so_412(client):
    status, _ = post(client, request_with(with_condition(LBP, URINARY_RETENTION, 1), lambda p: p.pop("conditions")))
    assert status == 412


def test_http_absent_observations_with_a_red_flag_still_justify_imaging(client):
    status, body = post(client, request_with(with_condition(LBP, PROSTATE_CANCER, 100), lambda p: p.pop("observations")))
    assert status == 200 and card_types(body["cards"]) == [INDICATED]


@pytest.mark.parametrize("vignette", [child_with_lbp(), adult(), adult_with_lbp_of_unknown_onset()], ids=["child", "no-episode", "unknown-duration"])
def test_http_no_card_is_not_said_when_cauda_equina_could_not_be_ruled_out(client, vignette):
    status, _ = post(client, request_with(vignette, lambda p: p.pop("observations")))
    assert status == 412
    status, body = post(client, request_with(vignette, lambda p: p.update(observations=OPERATION_OUTCOME)))
    assert status == 200 and card_types(body["cards"]) == [INCOMPLETE]
    status, body = post(client, hook_request(vignette))
    assert status == 200 and body == {"cards": []}


def test_http_out_of_scope_order_needs_no_data(client):
    status, body = post(client, request_with(adult_with_acute_lbp(order=BRAIN_MRI), lambda p: p.clear()))
    assert status == 200 and body == {"cards": []}


def test_http_null_prefetch_keys_mean_no_data_not_missing_data(client):
    request = hook_request(LBP)
    assert request["prefetch"]["observations"] is None and request["prefetch"]["procedures"] is None
    status, body = post(client, request)
    assert status == 200 and card_types(body["cards"]) == [NOT_INDICATED]


# ---- every enumerated code of every group decides as its group says -------------------------------------------------
GROUP_DECISIONS = {
    **{g: CES for g in ("CES_DIAGNOSIS", "CES_SADDLE_ANAESTHESIA", "CES_URINARY_RETENTION", "CES_URINARY_INCONTINENCE",
                        "CES_FAECAL_INCONTINENCE", "CES_BILATERAL_DEFICIT", "PVR")},
    **{g: INDICATED for g in ("MALIGNANCY", "FEVER_OBSERVATION", "FEVER_CONDITION", "SPINAL_INFECTION", "IV_DRUG_USE", "HIV", "TRANSPLANT",
                              "IMMUNODEFICIENCY", "IMMUNOSUPPRESSANT_MEDS", "SIGNIFICANT_TRAUMA", "LOW_VELOCITY_FALL", "OSTEOPOROSIS",
                              "OSTEOPOROSIS_MEDS", "FRAGILITY_FRACTURE", "SYSTEMIC_CORTICOSTEROIDS", "NEURO_SEVERE_UNILATERAL",
                              "PRIOR_LUMBAR_SURGERY", "SPONDYLOARTHROPATHY", "CONSERVATIVE_THERAPY")},
    **{g: NOT_INDICATED for g in ("LBP_EPISODE", "NEURO_NOT_RED_FLAG_ALONE", "NON_MELANOMA_SKIN_CANCER_EXCLUDED", "CONTEXT_ONLY",
                                  "INFLAMMATORY_MARKERS_SUPPORTING", "PAD_MIMIC_MODIFIER", "PREGNANCY_MODIFIER")},
}


def _group_rows():
    from scenarios import knowledge
    index = knowledge().codes
    assert set(GROUP_DECISIONS) | {"LUMBAR_MRI", "LUMBAR_CT", "LUMBAR_XR", "OUT_OF_SCOPE_ORDER_EXAMPLES"} == set(index.group_names())
    for group, decision in GROUP_DECISIONS.items():
        for entry in index.group_codes(group):
            coding = {k: entry[k] for k in ("system", "code", "display")}
            if group == "CES_BILATERAL_DEFICIT" and entry["code"] in ("M21.371", "M21.372"):
                decision_here = INDICATED  # one foot: unilateral deficit (R11); both feet: C6 (tested above)
            else:
                decision_here = decision
            yield pytest.param(group, coding, decision_here, id=f"{group}-{entry['system'].rsplit('/', 1)[-1]}-{entry['code']}")


def _record_with(group: str, coding: dict) -> dict:
    """The plausible FHIR home of a code: measured observations, medications, procedures, else a Condition."""
    if group == "CONSERVATIVE_THERAPY":
        base = adult_with_acute_lbp(days=60)
        if coding["system"] == "http://www.nlm.nih.gov/research/umls/rxnorm":
            return with_medication(base, coding, 50, kind="MedicationStatement")
        return with_procedure(base, coding, 50, status="in-progress")
    base = adult_with_acute_lbp(days=10, age=75 if group == "LOW_VELOCITY_FALL" else 40)
    if group == "FEVER_OBSERVATION":
        return with_temperature(base, 38.5, concept=coding)
    if group == "PVR":
        return with_observation(base, coding, 1, 300, "mL")
    if coding["system"] == "http://www.nlm.nih.gov/research/umls/rxnorm" or group == "OSTEOPOROSIS_MEDS":
        return with_medication(base, coding, 200)
    if group == "PRIOR_LUMBAR_SURGERY" and not coding["system"].startswith("http://hl7.org/fhir/sid/icd-10"):
        return with_procedure(base, coding, 900)
    if coding["system"] == "http://loinc.org":
        return with_observation(base, coding, 2, PRESENT)
    return with_condition(base, coding, 2)


@pytest.mark.parametrize("group,coding,decision", list(_group_rows()))
def test_every_enumerated_code_decides_as_its_group_says(group, coding, decision):
    card = check(_record_with(group, coding), decision)
    if decision in (CES, INDICATED):
        assert fact_ids(card)


def _order_rows():
    from scenarios import knowledge
    index = knowledge().codes
    for group in ("LUMBAR_MRI", "LUMBAR_CT", "LUMBAR_XR", "OUT_OF_SCOPE_ORDER_EXAMPLES"):
        for entry in index.group_codes(group):
            yield pytest.param({k: entry[k] for k in ("system", "code", "display")}, group != "OUT_OF_SCOPE_ORDER_EXAMPLES",
                               id=f"{group}-{entry['code']}")


@pytest.mark.parametrize("order,in_scope", list(_order_rows()))
def test_every_enumerated_order_code_is_in_or_out_of_scope(order, in_scope):
    check(ordering(with_condition(LBP, URINARY_RETENTION, 1), order), CES if in_scope else None)


# --- findings coded outside the enumerated lists, matched by name (SNOMED CT descendants) -----------------------


UNLISTED_SNOMED = "http://snomed.info/sct"


@pytest.mark.parametrize("display, card_type, fact", [
    ("Metastatic adenocarcinoma of prostate", "imaging-indicated", "RF-CANCER"),
    ("Incomplete cauda equina syndrome due to disc prolapse", "cauda-equina-emergency", "CES-DIAGNOSIS"),
    ("Spondylodiscitis of lumbar spine", "imaging-indicated", "RF-INFECTION-SPINAL"),
])
def test_an_unlisted_snomed_finding_counts_by_its_name(display, card_type, fact):
    vignette = with_condition(adult_with_acute_lbp(days=10), code(UNLISTED_SNOMED, "999999991000119100", display), days_ago=5)
    card = only_card(evaluate(vignette))
    assert card["source"]["topic"]["code"] == card_type
    assert fact in fact_ids(card)


@pytest.mark.parametrize("display", ["Family history of malignant neoplasm of colon", "Screening for malignant neoplasm of breast",
                                     "Basal cell carcinoma of skin of back"])
def test_a_named_non_flag_still_gets_the_warning(display):
    vignette = with_condition(adult_with_acute_lbp(days=10), code(UNLISTED_SNOMED, "999999991000119100", display), days_ago=400)
    assert card_types(evaluate(vignette)) == ["imaging-not-indicated"]


# -- values written as text -------------------------------------------------------------------------------

from fhir_mappings.fhir_values import quantity_from_text  # noqa: E402


@pytest.mark.parametrize("text, expected", [
    ("38.6 C", {"value": 38.6, "unit": "C"}),
    ("38.6C", {"value": 38.6, "unit": "C"}),
    ("101.3 °F", {"value": 101.3, "unit": "°F"}),
    (" 38,6 ", {"value": 38.6, "unit": None}),
    ("38.6 deg C", {"value": 38.6, "unit": "deg C"}),
])
def test_a_number_written_as_text_is_read_with_its_unit(text, expected):
    assert quantity_from_text(text) == expected


@pytest.mark.parametrize("text", ["Present", "febrile", "", "C 38.6", None, 38.6, ["38.6"], "38.6 C" * 10])
def test_text_that_is_not_a_number_with_a_short_unit_is_no_quantity(text):
    assert quantity_from_text(text) is None


# -- days of supply from quantity and dose --------------------------------------------------------------------

from fhir_mappings.fhir_values import doses_per_day, supply_days_from_quantity  # noqa: E402

TWO_A_DAY = {"timing": {"repeat": {"frequency": 2, "period": 1, "periodUnit": "d"}},
             "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet"}}]}


def test_a_dispensed_quantity_lasts_quantity_over_daily_dose():
    assert doses_per_day(TWO_A_DAY) == 2
    assert supply_days_from_quantity({"value": 10, "unit": "tablet"}, TWO_A_DAY) == 5
    weekly = {"timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "wk"}}, "doseAndRate": [{"doseQuantity": {"value": 2}}]}
    assert supply_days_from_quantity({"value": 8}, weekly) == 28


@pytest.mark.parametrize("quantity, dosage", [
    ({"value": 10, "unit": "mL"}, TWO_A_DAY),  # units that do not compare
    ({"value": 0}, TWO_A_DAY),
    (None, TWO_A_DAY),
    ({"value": 10}, {"text": "as directed"}),
    ({"value": 10}, {"timing": {"repeat": {"frequency": 2}}, "doseAndRate": [{"doseQuantity": {"value": 1}}]}),  # no period
    ({"value": 10}, None),
])
def test_no_supply_from_quantity_without_a_computable_daily_dose(quantity, dosage):
    assert supply_days_from_quantity(quantity, dosage) is None


def test_an_open_steroid_order_lasts_as_long_as_its_dispensed_quantity():
    """R10: a 5-day burst ordered 100 days ago whose order was never closed is not 100 days of steroids."""
    def burst(resources: list[dict]) -> list[dict]:
        return modify(resources, "MedicationRequest", lambda r: r.update(
            dosageInstruction=[TWO_A_DAY], dispenseRequest={"quantity": {"value": 10, "unit": "tablet"}}))
    check(with_medication(LBP, PREDNISONE, 100), NOT_INDICATED, patch=burst)
    check(with_medication(LBP, PREDNISONE, 100), INDICATED, "RF-FRACTURE-STEROIDS")  # no quantity: runs to today


# -- onset given as an age ----------------------------------------------------------------------------------

from datetime import date  # noqa: E402

from fhir_mappings.fhir_values import date_at_age  # noqa: E402


@pytest.mark.parametrize("age, expected", [
    ({"value": 40, "unit": "a"}, date(2020, 3, 1)),
    ({"value": 40, "system": "http://unitsofmeasure.org", "code": "a", "unit": "years"}, date(2020, 3, 1)),
    ({"value": 0}, date(1980, 3, 1)),
    ({"value": 6, "code": "mo"}, date(1980, 8, 28)),
    ({"value": -1}, None), ({"value": True}, None), ({"value": "40"}, None), ({"value": 40, "unit": "parsecs"}, None), (None, None),
])
def test_an_onset_age_is_the_day_the_patient_reached_it(age, expected):
    assert date_at_age(date(1980, 3, 1), age) == expected


def test_born_on_29_february():
    assert date_at_age(date(2000, 2, 29), {"value": 1}) == date(2001, 2, 28)


def test_a_back_pain_episode_dated_only_by_onset_age():
    """1.10 #2: episode start = earliest onset[x]; an onsetAge is the day the patient reached that age."""
    def onset_by_age(age: int):
        def patch(resources: list[dict]) -> list[dict]:
            return modify(resources, "Condition", lambda r: (r.pop("onsetDateTime", None), r.update(onsetAge={"value": age, "unit": "a"})))
        return patch
    # a 40-year-old: onset at age 40 began on the last birthday (within the year); at 39, more than 42 days ago
    assert check(adult_with_acute_lbp(days=10, age=40), NOT_INDICATED, patch=onset_by_age(40)) is not None
    check(with_conservative_care(adult_with_acute_lbp(days=10, age=40), 50), INDICATED, "RF-FAILED-CONSERVATIVE-6W", patch=onset_by_age(39))


# -- the order's reasonReference ------------------------------------------------------------------------------

from scenarios import ICD10CM  # noqa: E402


def _with_reason_reference(reference: dict, contained: list[dict] | None = None, record_extra: list[dict] = ()) -> list[str]:
    orders = draft_order_resources(LBP)
    orders[0]["reasonReference"] = [reference]
    if contained:
        orders[0]["contained"] = contained
    return card_types(evaluate_resources(fhir_record(LBP, TODAY) + list(record_extra), orders))


def test_a_contained_reason_is_the_orders_reason():
    contained = [{"resourceType": "Condition", "id": "r1", "code": {"coding": [{"system": ICD10CM, "code": "G83.4"}]}}]
    assert _with_reason_reference({"reference": "#r1"}, contained) == [CES]


def test_a_reason_known_only_by_its_display_is_matched_by_name():
    assert _with_reason_reference({"reference": "Condition/not-sent", "display": "Cauda equina syndrome"}) == [CES]


def test_a_reason_in_the_record_is_read_with_its_statuses_not_its_display():
    refuted = {"resourceType": "Condition", "id": "ces-1", "code": {"coding": [{"system": ICD10CM, "code": "G83.4"}]},
               "verificationStatus": {"coding": [{"code": "entered-in-error"}]}, "subject": {"reference": "Patient/x"}}
    reference = {"reference": "Condition/ces-1", "display": "Cauda equina syndrome"}
    assert _with_reason_reference(reference, record_extra=[refuted]) == [NOT_INDICATED]


# -- laterality of foot drops (C6 bilateral vs R11 unilateral) ------------------------------------------------

FOOT_DROP_SNOMED = code(SNOMED, "6077001", "Foot drop")
RIGHT_FOOT = {"coding": [{"system": SNOMED, "code": "7769000", "display": "Right foot"}]}
LEFT_FOOT = {"coding": [{"system": SNOMED, "code": "22335008", "display": "Left foot"}]}


def _foot_drops(*body_sites: list[dict], days: tuple[int, ...] = ()):
    vignette = LBP
    for index, _ in enumerate(body_sites):
        vignette = with_condition(vignette, FOOT_DROP_SNOMED, days[index] if days else 3)
    sites = iter(body_sites)

    def patch(resources: list[dict]) -> list[dict]:
        for resource in resources:
            if resource["resourceType"] == "Condition" and resource["code"]["coding"][0]["code"] == "6077001":
                site = next(sites)
                if site:
                    resource["bodySite"] = site
        return resources
    return evaluate(vignette, patch=patch)


def test_C6_foot_drops_sided_by_body_site_pair_up():
    assert card_types(_foot_drops([RIGHT_FOOT], [LEFT_FOOT])) == [CES]
    assert card_types(_foot_drops([RIGHT_FOOT, LEFT_FOOT])) == [CES]  # one finding, both feet
    assert card_types(_foot_drops([{"text": "both feet"}])) == [CES]


def test_C6_a_foot_drop_of_one_or_unknown_side_stays_unilateral():
    assert fact_ids(only_card(_foot_drops([RIGHT_FOOT]))) == ["RF-NEURO-SEVERE"]
    assert fact_ids(only_card(_foot_drops([RIGHT_FOOT], []))) == ["RF-NEURO-SEVERE"]  # the other: side unknown
    assert card_types(_foot_drops([RIGHT_FOOT], [LEFT_FOOT], days=(40, 30))) == [INDICATED]  # neither side new


def test_C6_a_coded_side_pairs_with_a_body_site_side():
    vignette = with_condition(with_condition(LBP, FOOT_DROP_RIGHT, 3), FOOT_DROP_SNOMED, 5)

    def left(resources: list[dict]) -> list[dict]:
        return modify(resources, "Condition", lambda r: r.update(bodySite=[LEFT_FOOT]) if r["code"]["coding"][0]["code"] == "6077001" else None)
    assert card_types(evaluate(vignette, patch=left)) == [CES]


@pytest.mark.parametrize("route, expected", [
    ({"coding": [{"system": SNOMED, "code": "6064005", "display": "Topical route"}]}, NOT_INDICATED),
    ({"text": "Inhalation"}, NOT_INDICATED),
    ({"coding": [{"system": SNOMED, "code": "26643006", "display": "Oral route"}]}, INDICATED),
])
def test_R10_a_topical_or_inhaled_route_is_no_systemic_steroid(route, expected):
    def with_route(resources: list[dict]) -> list[dict]:
        return modify(resources, "MedicationRequest", lambda r: r.update(dosageInstruction=[{"route": route}]))
    check(with_medication(LBP, PREDNISONE, 200), expected, patch=with_route)


def test_no_early_imaging_advice_when_the_age_is_unknown():
    """'Not indicated' is advice for adults (criteria.md 1.10 #4): a Patient without birthDate gets data-incomplete."""
    card = check(LBP, INCOMPLETE, patch=lambda resources: modify(resources, "Patient", lambda r: r.pop("birthDate", None)))
    assert "patient demographics: no birth date, age unknown" in card["detail"]
    check(with_condition(LBP, PROSTATE_CANCER, 900), INDICATED, "RF-CANCER",
          patch=lambda resources: modify(resources, "Patient", lambda r: r.pop("birthDate", None)))  # a red flag still decides


from fhir_mappings.fhir_values import units_per_day_from_text  # noqa: E402


@pytest.mark.parametrize("text, expected", [
    ("Take 1 tablet (5 mg) by mouth once daily", 1), ("1 tab BID", 2), ("two capsules every 8 hours", 6),
    ("2 tablets q6h", 8), ("1 tablet three times a day", 3), ("half tablet nightly", 0.5),
    ("take as directed", None), ("1 tablet", None), (None, None),
])
def test_tablets_a_day_from_sig_text(text, expected):
    assert units_per_day_from_text(text) == expected


def test_a_quantity_with_a_sig_in_text_gives_the_days_of_supply():
    assert supply_days_from_quantity({"value": 30, "unit": "tablet"}, {"text": "Take 1 tablet by mouth once daily"}) == 30
    assert supply_days_from_quantity({"value": 30, "unit": "mL"}, {"text": "1 tab BID"}) is None  # units that do not count


# ---- Imprecise dates: a date that can mean several days never hides a finding --------------------------------------
# criteria.md counts days before the hook date and is silent on partial dates and time zones. A recency window takes
# the last day a date can mean; a duration counts from the day as written (a partial date's first day); "started
# after the onset" and "not in the future" hold when they hold on some day both dates can mean. TODAY is 2026-03-15.

@pytest.mark.parametrize("value,first,written,last", [
    ("2026-03-15", "2026-03-15", "2026-03-15", "2026-03-15"),
    ("2025", "2025-01-01", "2025-01-01", "2025-12-31"),
    ("2024-02", "2024-02-01", "2024-02-01", "2024-02-29"),
    ("2025-12", "2025-12-01", "2025-12-01", "2025-12-31"),
    ("2026-02-28T23:30:00-10:00", "2026-02-28", "2026-02-28", "2026-03-01"),
    ("2026-01-21T07:30:00+11:00", "2026-01-20", "2026-01-21", "2026-01-21"),
    ("2026-01-20T22:00:00Z", "2026-01-20", "2026-01-20", "2026-01-20"),
    ("2026-01-20T22:00:00", "2026-01-20", "2026-01-20", "2026-01-20"),  # no zone: as written
    ("0001-01-01T00:30:00+05:00", "0001-01-01", "0001-01-01", "0001-01-01"),  # before year 1 in UTC: as written
])
def test_date_span(value, first, written, last):
    span = date_span(value)
    assert (span.first, span.written, span.last) == (date.fromisoformat(first), date.fromisoformat(written), date.fromisoformat(last))
    assert parse_date(value) == span.written and latest_date(value) == span.last


@pytest.mark.parametrize("value", ["", "20", "2026-13", "2026-02-30", "March 2026", None, 2026])
def test_date_span_of_unreadable_dates_is_none(value):
    assert date_span(value) is None


def _condition_element(concept: dict, **elements):
    def patch(resources: list[dict]) -> list[dict]:
        def change(resource: dict) -> None:
            if resource["code"]["coding"][0]["code"] == concept["code"]:
                for name in ("onsetDateTime", "recordedDate"):
                    resource.pop(name, None)
                resource.update(elements)
        return modify(resources, "Condition", change)
    return patch


@pytest.mark.parametrize("onset,expected", [
    ("2026", CES),  # 1 January to today: may be new
    ("2026-03", CES),
    ("2025", NOT_INDICATED),  # at the latest 31 December: 74 days
    ("2026-02-28T23:30:00-10:00", CES),  # 1 March in UTC: 14 days
    ("2026-02-28T23:30:00+10:00", NOT_INDICATED),  # 28 February either way: 15 days
    ("2026-02-28", NOT_INDICATED),
])
def test_C3_retention_window_by_the_last_day_its_onset_can_mean(onset, expected):
    check(with_condition(LBP, URINARY_RETENTION, 200), expected, patch=_condition_element(URINARY_RETENTION, onsetDateTime=onset))


@pytest.mark.parametrize("status,expected", [("recurrence", CES), ("relapse", CES), ("active", NOT_INDICATED), ("resolved", NOT_INDICATED)])
def test_C3_a_recurrence_is_recent_whatever_its_first_onset(status, expected):
    check(with_condition(LBP, URINARY_RETENTION, 200, status=status), expected)


@pytest.mark.parametrize("birth_date,expected", [
    ("2008-03", INCOMPLETE),  # 17 or 18 today: adulthood unknown
    ("2008-02", NOT_INDICATED),  # 18 whatever the day
    ("2008-04", None),  # 17 whatever the day: a child
    ("2008", INCOMPLETE),
    ("1970", NOT_INDICATED),
])
def test_a_partial_birth_date_that_may_be_under_18_is_an_unknown_age(birth_date, expected):
    check(LBP, expected, patch=lambda resources: modify(resources, "Patient", lambda r: r.update(birthDate=birth_date)))


def test_an_episode_whose_only_onset_is_in_the_future_has_no_known_start_but_a_future_dated_sign_counts():
    future = _condition_element(LOW_BACK_PAIN, onsetDateTime="2026-09-10")
    check(LBP, None, patch=future)
    check(LBP, NOT_INDICATED, patch=_condition_element(LOW_BACK_PAIN, onsetDateTime="2026-09-10", recordedDate="2026-03-05"))
    retention = with_condition(LBP, URINARY_RETENTION, 1)
    check(retention, CES, patch=lambda r: future(_condition_element(URINARY_RETENTION, onsetDateTime="2026-03-16")(r)))


def test_F1_care_started_after_the_onset_across_time_zones_and_counted_from_its_written_day():
    # onset 2026-01-21T07:30+11:00 is 2026-01-20T20:30Z; ibuprofen at 22:00Z the same evening came after it
    vignette = with_medication(adult_with_acute_lbp(days=53), IBUPROFEN, 54)
    def patch(resources: list[dict]) -> list[dict]:
        _condition_element(LOW_BACK_PAIN, onsetDateTime="2026-01-21T07:30:00+11:00")(resources)
        return modify(resources, "MedicationRequest", lambda r: r.update(authoredOn="2026-01-20T22:00:00Z"))
    check(vignette, INDICATED, "RF-FAILED-CONSERVATIVE-6W", patch=patch)
    # an active prescription written for tomorrow in Brisbane is today in UTC: in use now
    tacrolimus = with_medication(LBP, TACROLIMUS, 1)
    check(tacrolimus, INDICATED, patch=lambda r: modify(r, "MedicationRequest", lambda m: m.update(authoredOn="2026-03-16T01:10:00+10:00")))
    check(tacrolimus, NOT_INDICATED, patch=lambda r: modify(r, "MedicationRequest", lambda m: m.update(authoredOn="2026-03-17")))
