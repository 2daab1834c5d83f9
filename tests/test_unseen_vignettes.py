"""Unseen-style clinical vignettes (tests/data/unseen_vignettes/*.json), end to end through the HTTP API.

Written by clinical informatics from ../shared/clinical/criteria.md section 3, NOT from the service's
output: `expected.rules` names the rule ids that decide each answer. The format is the clinical team's
(criteria.md section 4, as in vignettes-public.json), built into a CDS Hooks request by
cds_service/vignettes.py through tests/scenarios.py, plus a few optional keys for what that format
cannot say:

* fact ``fhir``: elements merged into the generated FHIR resource (valueString, component,
  dataAbsentReason, a text-only ``code``...); fact ``fhirRemove``: top-level elements deleted from it
  (e.g. ``clinicalStatus``, which the vignette format always fills);
* ``order.reasonCode`` and ``extra_orders`` (more draft orders), as tests/scenarios.py reads them;
  ``orderCode``: the draft order's whole ``code`` as sent (several codings, or text only);
* ``prefetchOverrides``: prefetch keys replaced as sent (e.g. an OperationOutcome: "could not be read");
* ``hooks``: the hooks to run (default both); ``selections`` for order-select (default: the first order);
* ``expected.protocol``: items the card's recommendedProtocol must contain (for the card on
  ``expected.protocolOrder``, default the first draft order);
* ``expected.cardOrders``: the draft order (``ServiceRequest/<id>``) of each card, in card order (default:
  a single card is on the first draft order);
* ``prefetchOverrides.patient``: a Patient sent as is (its id must be the vignette id's slug), e.g. a
  birthDate that makes the patient 18 today;
* ``detailIncludes`` / ``detailExcludes``: text the first card's detail must / must not contain;
* ``orderFhir``: elements merged into the first draft order as sent (``status``, ``priority``,
  ``reasonReference``, ``contained``...);
* ``evidenceIncludes``: FHIR references the first card's machine-readable evidence must name;
* card id ``data-incomplete`` = the service's ``imaging-data-incomplete`` card.

Vignettes where the service disagrees with criteria.md are strict xfails (DISAGREEMENTS below, with the
rule and the diagnosis) until the product is fixed.

Round 3 (round3_*.json) uses the STRICT public format only (no optional key beyond ``expected.rules``), so
the request is exactly what cds_service/vignettes.py makes of a judge's vignette. What that format cannot
say is checked below from the test's own tables: each card's required content (criteria.md 3.1: the facts
that triggered it, the guideline, the protocol, the suggestions, the pregnancy/PAD/HEDIS/urgency notes) and
several draft orders at order-sign (a round-3 vignette plus one more draft order).

Round 4 (round4_*.json, ids UV4-*) is about the shapes real EHR exports give the same facts (Epic, Cerner/Oracle,
Meditech, Synthea): medicationReference to a contained, included or urn:uuid Medication, dosage only as text,
findings coded as the value of a generic LOINC code or in components, vital-signs panels, units, laterality in
Condition.bodySite, categories, abatement[x] variants, verification statuses, text-only and multi-coded orders,
reasonReference, priority and status of the draft order, Patient without birthDate or deceased, and prefetch
Bundles with include entries, duplicates and urn:uuid fullUrls. They use the optional keys above.

Round 5 (round5_*.json, ids UV5-*) is about time and status edges: dateTimes with offsets at the 14- and 42-day
boundaries (Z), partial dates (P), future dates from entry errors (F), 17 years 364 days vs 18 years 0 days for
each card type (A, a Patient in prefetchOverrides), CES findings as Observations with interpretation codes or
dataAbsentReason (O), CES Conditions by clinicalStatus, drug-induced retention, stress and overflow incontinence
and a '<200 mL' residual (C), several drafts and order-select selections (R), conservative care as OMT, an NSAID
statement or disqualified acts (K), windows that have just expired (W) and history flags whatever their status (H).
Where criteria.md is silent the vignette's `notes` say so ("AMBIGUOUS") and the clinically safer reading is expected.

Round 6 (round6_names.json, ids UV6-*) is about problem-list wording: the key fact is a Condition coded only with
text (fact ``fhir`` replaces ``code`` with {"text": ...}) or with an unlisted SNOMED-style code + display, as clinicians
type it: abbreviations and synonyms of each CES feature (N01-N09, critical) and red flag (N10-N28, info), and
negations, family history, donors, negative tests and non-spinal sites that must NOT count (X01-X10, warning).
Disagreements name the fhir_mappings/valueset_rules.yaml group and the names / exclude_words to add.

Round 7 (strict public format for the B series) is an outside judge's view: boundaries of every window, age and supply
on both sides (round7_boundaries.json, UV7-B*, 60, no disagreement), and false alarms paired with the real finding
in the same words (round7_false_alarms.json, UV7-F*, 60; three disagreements fixed: hesitancy of micturition as C3,
a lower-back contusion as trauma, a fusion named with its lumbar level as prior surgery).

Round 8: primary-care charts as an EHR sends them, 6-15 facts among unrelated problems and drugs, old and new
episodes, overlapping therapies, statuses (round8_records.json, UV8-R*, 50), and what the clinician reads on each
card type per criteria.md 3.1 (round8_card_content.json, UV8-C*, 40, through detailIncludes / detailExcludes,
protocol and evidence checks). No disagreement; the content review added "MRI preferred" for radiography or CT
ordered with suspected cancer or infection, and paragraph breaks the Markdown keeps.

Round 9 (round9_international.json, UV9-I*, 45): records from outside the US: SNOMED CT-only problem lists, WHO
ICD-10, dm+d or UK-named medicines, OPCS-4, SNOMED-coded orders. Four disagreements fixed: a SNOMED body temperature,
WHO M21.3 foot drop without a site, a physiotherapy referral written as text, co-codamol.

Round 10 (round10_ces_shapes.json, UV10-S*, 40): every way an EHR records each cauda equina sign (codes, text, findings
as values or components, interpretations, residuals in L or as text, the order's reasons) and the negated, old or
unilateral mirrors. Three disagreements fixed, all text: "reduced perineal sensation", "unable to pass urine",
"bilateral sciatica with weakness".

Round 11 (round11_flag_shapes.json, UV11-T*, 45): every red flag and failed care as clinicians type them, and
negated, family or ruled-out mirrors. Sixteen disagreements fixed by names and exclusion words (mets, lytic lesion,
injects heroin, MTX, pred, crush fracture, ladder falls, mechanical fall, spinal TB, pyrexial, Bechterew, physio;
"no hx", "FHx", "r/o") and one rule: an immunosuppressant on the problem list counts for R5, as steroids do for R10.
"""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from scenarios import (CES, INCOMPLETE, INDICATED, NOT_INDICATED, TODAY, VIGNETTE_CARD_IDS, assessment, card_types,
                       hook_request, with_extra_order)

DATA = Path(__file__).parent / "data" / "unseen_vignettes"
SERVICES = {"order-select": "lumbar-imaging-order-select", "order-sign": "lumbar-imaging-order-sign"}
CARD_IDS = {**VIGNETTE_CARD_IDS, "data-incomplete": INCOMPLETE}
FIRST_ORDER = "ServiceRequest/draft-imaging-1"


def load() -> list[dict]:
    vignettes = []
    for path in sorted(DATA.glob("*.json")):
        vignettes.extend(json.loads(path.read_text(encoding="utf-8")))
    return vignettes


VIGNETTES = load()

# Vignette id -> why the service's answer differs from criteria.md (a strict xfail, with the rule and the
# diagnosis), until the rule, the data or criteria.md is fixed. Rounds 1-4: the disagreements of the four reviews
# (12, 11, 7 and 17) were fixed, or, where criteria.md can be read both ways (UV2-S11 missing clinicalStatus,
# UV2-D03 unreadable Conditions with a red flag), decided and written into the vignette's expected answer as
# "Decision (...)" for clinical review.
DISAGREEMENTS: dict[str, str] = {
    # --- Round 5 (16 of 58): fixed first: incontinence codes, '<' comparators, interpretation vs value, future
    # onsets; then, where criteria.md is silent, the reading that hides no finding: a date that can mean several
    # days (a partial date, a time whose UTC day differs) is recent by its last day and starts on its first; a
    # recurrence or relapse is recent; a partial birthDate that may be under 18 is an unknown age; an episode whose
    # only onset is in the future has no known start. Left, for clinical review, because criteria.md states the
    # window: an active fever Condition older than 14 days.
    "UV5-W06": "AMBIGUOUS. R2 (fever Condition, <= 14 d) vs 1.9 (only OLD/RESOLVED symptoms are non-flags): R50.9 still "
               "active with onset 15 d; criteria.yaml R2 FEVER_CONDITION has status current AND within_days 14, so an "
               "ongoing (persistent) fever is dropped -> warning. Fix: for the FEVER_CONDITION entry count a current "
               "Condition whatever its onset (drop within_days, or status current-or-recent semantics: current OR "
               "onset <= 14 d); a resolved fever stays out (UV2-S03).",
    # --- Round 6 (13 of 38, problem-list wording): 12 fixed by names in valueset_rules.yaml; left: a whole entry
    # 'AS' (ankylosing spondylitis), which a case-blind word match cannot tell from the word 'as'.
    "UV6-N27": "R13: text 'AS' (whole problem-list entry) -> warning, not info. NOT fixable by a plain name: finding_names "
               "match whole words in ANY case, so name 'AS' would match the English word 'as' in every text. Needs a new "
               "option, e.g. SPONDYLOARTHROPATHY.finding_names.exact_texts: ['AS'] (case-sensitive, whole trimmed text), "
               "in the matcher and valueset_rules.yaml; or leave for clinical review (accepted miss).",
}


def build_request(vignette: dict, hook: str) -> dict:
    request = hook_request(vignette, hook=hook, today=TODAY, selections=vignette.get("selections"))
    patient_id = request["context"]["patientId"]
    patches = {
        f"{patient_id}-{fact['resourceType'].lower()}-{index}": fact
        for index, fact in enumerate(vignette["facts"]) if fact.get("fhir") or fact.get("fhirRemove")
    }
    for value in request["prefetch"].values():
        for entry in (value or {}).get("entry", ()):
            resource = entry["resource"]
            if resource.get("id") in patches:
                fact = patches[resource["id"]]
                resource.update(copy.deepcopy(fact.get("fhir") or {}))
                for element in fact.get("fhirRemove", ()):
                    resource.pop(element, None)
    if vignette.get("orderCode"):
        request["context"]["draftOrders"]["entry"][0]["resource"]["code"] = copy.deepcopy(vignette["orderCode"])
    if vignette.get("orderFhir"):
        request["context"]["draftOrders"]["entry"][0]["resource"].update(copy.deepcopy(vignette["orderFhir"]))
    for key, value in vignette.get("prefetchOverrides", {}).items():
        request["prefetch"][key] = copy.deepcopy(value)
    return request


def post(client: TestClient, vignette: dict, hook: str) -> dict:
    response = client.post(f"/cds-services/{SERVICES[hook]}", json=build_request(vignette, hook))
    assert response.status_code == 200, response.text
    return response.json()


def check(body: dict, vignette: dict, hook: str) -> None:
    expected = vignette["expected"]
    where = f"{vignette['id']} {hook}: {expected['reason']}"
    assert card_types(body["cards"]) == [CARD_IDS[c] for c in expected["cards"]], where
    if not expected["cards"]:
        assert body == {"cards": []}, where
        return
    first = assessment(body["cards"][0])
    if expected["cards"][0] == "cauda-equina-critical":
        assert body["cards"][0]["indicator"] == "critical", where
    assert set(expected["redFlags"]) <= set(first.get("facts", ())), (where, expected["redFlags"], first)
    if expected.get("cardOrders"):
        assert [assessment(card)["order"] for card in body["cards"]] == expected["cardOrders"], where
    elif len(body["cards"]) == 1:
        assert first["order"] == FIRST_ORDER, where
    for text in vignette.get("detailIncludes", ()):
        assert text in body["cards"][0]["detail"], (where, text)
    for text in vignette.get("detailExcludes", ()):
        assert text not in body["cards"][0]["detail"], (where, text)
    for reference in vignette.get("evidenceIncludes", ()):
        assert reference in first.get("evidence", ()), (where, reference, first.get("evidence"))
    if expected["cards"] == ["early-imaging-warning"]:
        assert first["rule"] == "W1" and "recommendedProtocol" not in first, where
        return
    if expected["cards"][0] == "data-incomplete":
        assert first.get("unread"), where
        return
    for card in body["cards"]:
        found = assessment(card)
        protocol = found.get("recommendedProtocol", {})
        if expected["contrast"] is not None and expected["cards"][0] == "red-flag-justified-info":
            assert protocol.get("modality") == "MR" and protocol.get("contrast") == expected["contrast"], (where, protocol)
        if expected.get("protocol") and found["order"] == expected.get("protocolOrder", FIRST_ORDER):
            assert protocol == {**protocol, **expected["protocol"]}, (where, protocol)


def _param(vignette: dict):
    marks = ()
    if vignette["id"] in DISAGREEMENTS:
        marks = (pytest.mark.xfail(strict=True, reason=DISAGREEMENTS[vignette["id"]]),)
    return pytest.param(vignette, id=vignette["id"], marks=marks)


def test_the_unseen_vignettes_are_well_formed():
    ids = [v["id"] for v in VIGNETTES]
    assert len(ids) == len(set(ids)) >= 30
    for vignette in VIGNETTES:
        expected = vignette["expected"]
        assert set(expected["cards"]) <= set(CARD_IDS), vignette["id"]
        assert expected["rules"] and expected["reason"], vignette["id"]
        assert expected["contrast"] in (None, "without", "with-and-without"), vignette["id"]
    covered = {tuple(v["expected"]["cards"][:1]) for v in VIGNETTES}
    assert covered == {("cauda-equina-critical",), ("red-flag-justified-info",), ("early-imaging-warning",), ("data-incomplete",), ()}


@pytest.mark.parametrize("vignette", [_param(v) for v in VIGNETTES])
def test_unseen_vignette(client, vignette):
    """Every hook the vignette names (default both) gives the card(s) criteria.md calls for."""
    for hook in vignette.get("hooks", sorted(SERVICES)):
        check(post(client, vignette, hook), vignette, hook)


CES_FIRST = [v for v in VIGNETTES if v["expected"]["cards"][:1] == ["cauda-equina-critical"] and v["id"] not in DISAGREEMENTS]


@pytest.mark.parametrize("vignette", CES_FIRST, ids=[v["id"] for v in CES_FIRST])
def test_a_cauda_equina_card_is_first_and_asks_for_an_emergency_mri(client, vignette):
    card = post(client, vignette, "order-sign")["cards"][0]
    assert card["indicator"] == "critical"
    assert assessment(card)["recommendedProtocol"]["modality"] == "MR"
    recommended = [s for s in card["suggestions"] if s.get("isRecommended")]
    assert len(recommended) == 1
    priorities = [a["resource"].get("priority") for a in recommended[0]["actions"] if a["type"] in ("create", "update")]
    assert "stat" in priorities


def test_an_mri_without_contrast_for_a_contrast_flag_comes_with_a_replacement_to_without_and_with(client):
    vignette = next(v for v in VIGNETTES if v["id"] == "UV-R28")  # prior lumbar surgery, 72148 ordered
    card = post(client, vignette, "order-sign")["cards"][0]
    replacement = card["suggestions"][0]
    created = [a["resource"] for a in replacement["actions"] if a["type"] == "create"]
    deleted = [a["resourceId"] for a in replacement["actions"] if a["type"] == "delete"]
    assert deleted == [FIRST_ORDER]
    assert created[0]["code"]["coding"][0]["code"] == "72158"


def test_the_unilateral_foot_drop_card_says_urgent(client):
    vignette = next(v for v in VIGNETTES if v["id"] == "UV-C12")
    card = post(client, vignette, "order-sign")["cards"][0]
    assert card["indicator"] == "info" and "urgent" in (card["summary"] + card["detail"]).lower()


def test_the_pregnancy_warning_mentions_gadolinium_and_radiation(client):
    vignette = next(v for v in VIGNETTES if v["id"] == "UV-R35")
    detail = post(client, vignette, "order-sign")["cards"][0]["detail"].lower()
    assert "pregnan" in detail and "gadolinium" in detail


# --- Round 3: what the strict public format cannot say -------------------------------------------------------
ROUND3 = [v for v in VIGNETTES if v["id"].startswith("UV3-")]
PUBLIC_KEYS = {"id", "description", "age", "sex", "facts", "order", "expected"}
PUBLIC_FACT_KEYS = {"resourceType", "system", "code", "display", "onsetDaysAgo", "effectiveDaysAgo", "value", "unit",
                    "status", "verificationStatus", "recordedDaysAgo", "abatementDaysAgo", "durationDays"}
PUBLIC_EXPECTED_KEYS = {"cards", "reason", "guidelines", "contrast", "redFlags", "notes", "rules"}

# Codes of the round-3 vignettes' episodes (LBP_EPISODE) and modifiers, for the notes a card must carry.
EPISODE_CODES = {"279039007", "278860009", "9121000119106", "M54.50", "M54.41", "M54.42", "M54.31", "M54.32", "M54.16",
                 "M51.16", "M48.062", "S39.012A"}
PREGNANCY_CODES = {"77386006", "9121000119106", "Z3A.22", "Z3A.24", "Z3A.30", "O24.414"}
PAD_CODES = {"I70.213", "I73.9", "63491006", "399957001"}
MRI_CODES = {"without": {"72148", "30679-5", "394451000119106", "RPID541"},
             "with-and-without": {"72158", "24967-2", "RPID500"}}

# The recommended protocol where the vignette's `contrast` cannot say it (X-ray and CT orders: null).
ROUND3_PROTOCOL = {
    "UV3-C11": {"modality": "MR", "contrast": "without", "orderMatches": False},  # foot drop: not radiographs
    "UV3-C12": {"modality": "MR", "contrast": "with-and-without", "orderMatches": False},
    "UV3-N06": {"modality": "XR", "orderMatches": True},  # steroids: radiography usually appropriate (ACR V6)
    "UV3-O05": {"modality": "MR", "contrast": "with-and-without", "orderMatches": True},  # no swap
    "UV3-O10": {"modality": "CT", "orderMatches": True},  # trauma: CT w/o as ordered
    "UV3-O11": {"modality": "CT", "orderMatches": True},
    "UV3-O15": {"modality": "MR", "contrast": "with-and-without", "orderMatches": False},  # X-ray -> MRI preferred
    "UV3-O16": {"modality": "XR", "orderMatches": True},  # prior surgery: radiography usually appropriate (ACR V5)
    "UV3-O21": {"modality": "XR", "orderMatches": True},
}
# The facts (indices into the vignette's facts) that must be named as the card's evidence (3.1 "which facts").
ROUND3_EVIDENCE = {
    "UV3-C01": [3], "UV3-C02": [4], "UV3-C03": [0], "UV3-C04": [0], "UV3-C06": [1, 2], "UV3-C10": [0, 2],
    "UV3-C11": [3], "UV3-C12": [0, 2], "UV3-C15": [2], "UV3-N06": [1], "UV3-N19": [5], "UV3-N20": [2],
    "UV3-O05": [0, 1], "UV3-T03": [1], "UV3-T06": [3], "UV3-T07": [2], "UV3-T11": [1, 2, 3],
}


def _codes(vignette: dict) -> set[str]:
    return {fact["code"] for fact in vignette["facts"]}


def _episode_days(vignette: dict) -> int:
    return max(fact["onsetDaysAgo"] if fact.get("onsetDaysAgo") is not None else fact["recordedDaysAgo"]
               for fact in vignette["facts"]
               if fact["resourceType"] == "Condition" and fact["code"] in EPISODE_CODES and fact["status"] == "active")


def _resource_ref(vignette: dict, index: int) -> str:
    kind = vignette["facts"][index]["resourceType"]
    return f"{kind}/{vignette['id'].lower()}-{kind.lower()}-{index}"


def test_round_three_is_in_the_strict_public_format():
    assert len(ROUND3) >= 60
    for vignette in ROUND3:
        assert set(vignette) == PUBLIC_KEYS, vignette["id"]
        assert set(vignette["order"]) == {"system", "code", "display"}, vignette["id"]
        assert set(vignette["expected"]) == PUBLIC_EXPECTED_KEYS, vignette["id"]
        for fact in vignette["facts"]:
            assert set(fact) <= PUBLIC_FACT_KEYS, (vignette["id"], fact)


def _check_content(vignette: dict, card: dict, order: str = FIRST_ORDER) -> None:
    """criteria.md 3.1: what each card must carry."""
    where = vignette["id"]
    found = assessment(card)
    summary, detail = card["summary"], card["detail"]
    codes = _codes(vignette)
    kind = card["source"]["topic"]["code"]
    assert len(summary) <= 140 and card["links"] and card["source"]["url"], where
    recommended = [s for s in card.get("suggestions", ()) if s.get("isRecommended")]
    pregnant = any(f["code"] in PREGNANCY_CODES and f.get("status") in ("active", None) for f in vignette["facts"])
    assert ("gadolinium" in detail.lower()) == pregnant, (where, "pregnancy note iff a current pregnancy (M1)")
    if PAD_CODES & codes and kind != CES:
        assert "ankle-brachial" in detail.lower() or "abi" in detail.lower(), where
    for index in ROUND3_EVIDENCE.get(where, ()):
        reference = _resource_ref(vignette, index)
        assert reference in found.get("evidence", ()) and reference in detail, (where, reference)
    if kind != NOT_INDICATED:  # the deciding facts are listed with their references (background facts need not be)
        assert any(reference in detail for reference in found.get("evidence", ())), where
    if kind == NOT_INDICATED:
        days = _episode_days(vignette)
        assert "not recommended" in summary.lower(), where
        assert (TODAY - timedelta(days=days)).isoformat() in detail, (where, "episode start")
        assert "conservative care" in detail.lower() and "cauda equina" in detail.lower(), where  # care so far; safety net
        assert ("HEDIS" in detail) == (days <= 28), (where, "HEDIS note iff episode <= 28 days")
        if days >= 42:
            assert "Variant 2" in detail, (where, "subacute/chronic: ACR Variant 2")
        elif days < 28:
            assert "Variant 1" in detail, (where, "acute: ACR Variant 1")
        assert card.get("overrideReasons"), where
        actions = recommended[0]["actions"]
        assert {"type": "delete", "resourceId": order} == {k: actions[0][k] for k in ("type", "resourceId")}, where
        created = [a["resource"]["code"]["coding"][0]["code"] for a in actions if a["type"] == "create"]
        assert set(created) & {"306170007", "97161"}, (where, "physiotherapy referral suggested")
    elif kind == INDICATED:
        protocol = found["recommendedProtocol"]
        assert summary.startswith(("Lumbar imaging appropriate", "Urgent lumbar MRI appropriate")), where
        assert found.get("evidence") and "Guidelines" in detail, where
        if "RF-NEURO-SEVERE" in found.get("facts", ()):
            assert "urgent" in (summary + detail).lower(), (where, "R11 urgency wording")
        expected = ROUND3_PROTOCOL.get(where)
        if expected:
            assert protocol == {**protocol, **expected}, (where, protocol)
        deletes = [a for s in card.get("suggestions", ()) for a in s["actions"] if a["type"] == "delete"]
        if protocol["orderMatches"]:
            assert not deletes, (where, "no swap when the order matches")
        else:
            assert recommended, where
            actions = recommended[0]["actions"]
            assert [a.get("resourceId") for a in actions if a["type"] == "delete"] == [order], where
            created = [a["resource"]["code"]["coding"][0]["code"] for a in actions if a["type"] == "create"]
            assert created and set(created) <= MRI_CODES[protocol["contrast"]], (where, created)
    else:
        assert kind == CES and card["indicator"] == "critical", where
        assert "cauda equina" in summary.lower() and "do not substitute" in detail.lower(), where
        actions = recommended[0]["actions"]
        stat_mri = [a for a in actions if a["type"] in ("update", "create") and a["resource"].get("priority") == "stat"
                    and a["resource"]["code"].get("coding")]
        referral = [a for a in actions if a["type"] == "create" and "spinal" in a["resource"]["code"].get("text", "").lower()]
        assert stat_mri and referral, (where, "stat MRI and spinal surgery referral")
        if vignette["order"]["code"] not in {"72148", "72149", "72158"}:
            assert [a.get("resourceId") for a in actions if a["type"] == "delete"] == [order], (where, "X-ray/CT deleted")
            assert stat_mri[0]["resource"]["code"]["coding"][0]["code"] in MRI_CODES["without"] | MRI_CODES["with-and-without"], where


CONTENT = [v for v in ROUND3 if v["expected"]["cards"] and v["id"] not in DISAGREEMENTS]


@pytest.mark.parametrize("vignette", CONTENT, ids=[v["id"] for v in CONTENT])
def test_round_three_card_content(client, vignette):
    """Each card carries what criteria.md 3.1 asks: the triggering facts, guideline, protocol, suggestions, notes."""
    for hook in sorted(SERVICES):
        body = post(client, vignette, hook)
        assert len(body["cards"]) == 1, vignette["id"]
        _check_content(vignette, body["cards"][0])


SECOND = "ServiceRequest/draft-imaging-2"
XRAY_72100 = {"system": "http://www.ama-assn.org/go/cpt", "code": "72100", "display": "Radiologic exam lumbosacral spine, 2 or 3 views"}
XRAY_72110 = {"system": "http://www.ama-assn.org/go/cpt", "code": "72110", "display": "Radiologic exam lumbosacral spine, minimum 4 views"}
CT_72131 = {"system": "http://www.ama-assn.org/go/cpt", "code": "72131", "display": "CT lumbar spine, without contrast"}
MRI_72148 = {"system": "http://www.ama-assn.org/go/cpt", "code": "72148", "display": "MRI lumbar spine, without contrast"}
# Round-3 vignette + a second draft order at order-sign -> one card per lumbar order, in draft order, each
# with its own protocol (criteria.md section 3: "one card per in-scope draft order").
MULTI_ORDERS = {
    # osteoporosis + failed care: MRI w/o matches; the radiographs are fine as ordered (ACR V6)
    "UV3-C03": (XRAY_72100, [INDICATED, INDICATED], [{"modality": "MR", "contrast": "without", "orderMatches": True},
                                                     {"modality": "XR", "orderMatches": True}]),
    # cancer + failed care: both orders -> MRI without and with contrast (an X-ray for suspected cancer -> MRI)
    "UV3-C04": (XRAY_72100, [INDICATED, INDICATED], [{"modality": "MR", "contrast": "with-and-without", "orderMatches": False},
                                                     {"modality": "MR", "contrast": "with-and-without", "orderMatches": False}]),
    # failed care only: MRI w/o matches; the CT -> MRI without contrast (ACR V3)
    "UV3-T03": (CT_72131, [INDICATED, INDICATED], [{"modality": "MR", "contrast": "without", "orderMatches": True},
                                                   {"modality": "MR", "contrast": "without", "orderMatches": False}]),
    # many chronic conditions, no flag: a warning on each lumbar order
    "UV3-N01": (XRAY_72110, [NOT_INDICATED, NOT_INDICATED], [None, None]),
    # CES with a CT and an MRI draft: a critical card on each (the CT replaced by a stat MRI)
    "UV3-C02": (MRI_72148, [CES, CES], [None, None]),
    # 17-year-old, no CES: no card on either order
    "UV3-C07": (CT_72131, [], []),
}


@pytest.mark.parametrize("vignette_id", sorted(MULTI_ORDERS))
def test_round_three_several_draft_orders_at_order_sign(client, vignette_id):
    vignette = next(v for v in ROUND3 if v["id"] == vignette_id)
    extra, types, protocols = MULTI_ORDERS[vignette_id]
    both = with_extra_order(vignette, extra, "draft-imaging-2")
    cards = post(client, both, "order-sign")["cards"]
    assert card_types(cards) == types, vignette_id
    if not types:
        return
    assert [assessment(card)["order"] for card in cards] == [FIRST_ORDER, SECOND], vignette_id
    for card, protocol in zip(cards, protocols):
        if protocol:
            found = assessment(card)["recommendedProtocol"]
            assert found == {**found, **protocol}, (vignette_id, found)
    _check_content(vignette, cards[0], FIRST_ORDER)
    second = {**vignette, "order": {k: extra[k] for k in ("system", "code", "display")}}
    _check_content(second, cards[1], SECOND)


def test_round_three_order_select_gives_a_card_only_for_the_selected_order(client):
    """order-select with two drafts, the clinician has just selected the radiographs: one card, on them."""
    vignette = next(v for v in ROUND3 if v["id"] == "UV3-C04")
    both = {**with_extra_order(vignette, XRAY_72100, "draft-imaging-2"), "selections": [SECOND]}
    cards = post(client, both, "order-select")["cards"]
    assert card_types(cards) == [INDICATED]
    assert assessment(cards[0])["order"] == SECOND
    assert assessment(cards[0])["recommendedProtocol"] == {"modality": "MR", "contrast": "with-and-without", "orderMatches": False}
