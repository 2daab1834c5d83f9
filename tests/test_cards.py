"""Every card the service renders is a well-formed CDS Hooks 2.0 card (spec 2.0 §Card Attributes and the
checklist in shared/cds-hooks/checklist.md): the public vignettes and a corpus of rule cases covering the
four card types, through the engine and through the HTTP API.
"""

from __future__ import annotations

import re
import uuid

import pytest
from fhir.resources.R4B import get_fhir_model_class
from markdown_it import MarkdownIt

from scenarios import (
    BREAST_CANCER_HISTORY, CES, CES_DIAGNOSIS, CT_WITHOUT, DRUG_INDUCED_RETENTION, FOOT_DROP_LEFT, FOOT_DROP_RIGHT, HIV, ICD10CM,
    INCOMPLETE, INDICATED, LAMINECTOMY, LONG_TERM_STEROIDS, LOW_BACK_PAIN, LUMBAR_FRACTURE, MRI_LOINC_WITHOUT, MRI_RADLEX_WITHOUT,
    MRI_SNOMED_WITHOUT, MRI_WITH, NOT_INDICATED, OPIOID_DEPENDENCE, OSTEOPOROSIS, PAD_CLAUDICATION, PREGNANCY, PROSTATE_CANCER,
    SADDLE_NUMBNESS, SCIATICA_LEFT, SNOMED, TACROLIMUS, TODAY, URINARY_RETENTION, VERTEBRAL_OSTEOMYELITIS, XRAY, XRAY_LOINC,
    adult, adult_with_acute_lbp, assessment, card_types, child_with_lbp, draft_order_resources, evaluate, evaluate_resources,
    fhir_record, hook_request, ordering, public_vignettes, with_condition, with_conservative_care, with_extra_order,
    with_medication, with_observation, with_order_reason, with_procedure, with_temperature,
)

EXTENSION_KEY = "org.example.lumbar-imaging-cds.assessment"
SCRIPT = "<script>alert('x')</script><img src=x onerror=alert(1)> **bold** [click](javascript:alert(1)) `code` | pipe"
LBP = adult_with_acute_lbp(days=10)
EVERY_FLAG = [PROSTATE_CANCER, VERTEBRAL_OSTEOMYELITIS, OPIOID_DEPENDENCE, HIV, LUMBAR_FRACTURE, OSTEOPOROSIS, LONG_TERM_STEROIDS, FOOT_DROP_RIGHT]


def _every_flag() -> dict:
    vignette = with_procedure(with_temperature(with_medication(LBP, TACROLIMUS, 10), 39.1), LAMINECTOMY, 900)
    for flag in EVERY_FLAG:
        vignette = with_condition(vignette, flag, 20)
    return vignette


# name -> (vignette, expected card types, engine keyword arguments)
CORPUS: dict[str, tuple[dict, list[str], dict]] = {
    **{f"vignette-{v['id']}": (v, None, {}) for v in public_vignettes()},
    "warning-acute": (LBP, [NOT_INDICATED], {}),
    "warning-chronic-sciatica-pregnant-pad": (with_condition(with_condition(adult_with_acute_lbp(days=200, episode=SCIATICA_LEFT), PREGNANCY, 90), PAD_CLAUDICATION, 900), [NOT_INDICATED], {}),
    "warning-loinc-order": (ordering(LBP, MRI_LOINC_WITHOUT), [NOT_INDICATED], {}),
    "info-cancer-swap": (with_condition(LBP, PROSTATE_CANCER, 100), [INDICATED], {}),
    "info-xray-osteoporosis": (ordering(with_condition(LBP, OSTEOPOROSIS, 900), XRAY), [INDICATED], {}),
    "info-xray-cancer-loinc": (ordering(with_condition(LBP, BREAST_CANCER_HISTORY, 900), XRAY_LOINC), [INDICATED], {}),
    "info-ct-trauma": (ordering(with_condition(LBP, LUMBAR_FRACTURE, 20), CT_WITHOUT), [INDICATED], {}),
    "info-ct-cancer": (ordering(with_condition(LBP, PROSTATE_CANCER, 100), CT_WITHOUT), [INDICATED], {}),
    "info-radlex-infection": (ordering(with_temperature(LBP, 38.9), MRI_RADLEX_WITHOUT), [INDICATED], {}),
    "info-snomed-surgery": (ordering(with_procedure(LBP, LAMINECTOMY, 900), MRI_SNOMED_WITHOUT), [INDICATED], {}),
    "info-pregnant-cancer-xray": (ordering(with_condition(with_condition(LBP, PREGNANCY, 60), PROSTATE_CANCER, 900), XRAY), [INDICATED], {}),
    "info-urgent-foot-drop": (with_condition(LBP, FOOT_DROP_RIGHT, 5), [INDICATED], {}),
    "info-failed-care-with-contrast-order": (ordering(with_conservative_care(adult_with_acute_lbp(days=70), 50), MRI_WITH), [INDICATED], {}),
    "info-every-flag": (_every_flag(), [INDICATED], {}),
    "info-unread-observations": (with_condition(LBP, OSTEOPOROSIS, 900), [INDICATED], {"unreadable": {"Observation": "timeout"}}),
    "critical-retention": (with_condition(LBP, URINARY_RETENTION, 1), [CES], {}),
    "critical-drug-retention-pregnant": (with_condition(with_condition(LBP, DRUG_INDUCED_RETENTION, 2), PREGNANCY, 100), [CES], {}),
    "critical-xray-order": (ordering(with_condition(LBP, SADDLE_NUMBNESS, 1), XRAY), [CES], {}),
    "critical-ct-with-cancer": (ordering(with_condition(with_observation(LBP, SADDLE_NUMBNESS, 1), PROSTATE_CANCER, 100), CT_WITHOUT), [CES], {}),
    "critical-bilateral-foot-drop": (with_condition(with_condition(LBP, FOOT_DROP_RIGHT, 1), FOOT_DROP_LEFT, 2), [CES], {}),
    "critical-child": (with_condition(child_with_lbp(age=9), CES_DIAGNOSIS, 1), [CES], {}),
    "critical-order-reason-only": (with_order_reason(adult(), CES_DIAGNOSIS), [CES], {}),
    "critical-nothing-read": (with_order_reason(adult(), CES_DIAGNOSIS), [CES], {"unreadable": {t: "HTTP 503" for t in ("Patient", "Condition", "Observation")}}),
    "incomplete-observations": (LBP, [INCOMPLETE], {"unreadable": {"Observation": "OperationOutcome: timeout"}}),
    "incomplete-everything": (LBP, [INCOMPLETE], {"unreadable": {t: "HTTP 500" for t in ("Patient", "Condition", "Observation", "MedicationRequest", "MedicationStatement", "Procedure", "ServiceRequest")}}),
    "incomplete-conditions": (LBP, [INCOMPLETE], {"unreadable": {"Condition": "timeout"}}),
    "two-orders": (with_extra_order(with_condition(LBP, PROSTATE_CANCER, 100), XRAY, "xray-2"), [INDICATED, INDICATED], {}),
    "script-in-record": (ordering(with_condition(with_condition(adult_with_acute_lbp(days=10, episode={"system": SNOMED, "code": "279039007", "display": SCRIPT}),
                                                               {"system": ICD10CM, "code": "C61", "display": SCRIPT}, 100),
                                                {"system": ICD10CM, "code": "R33.9", "display": SCRIPT}, 1),
                                 {"system": "http://www.ama-assn.org/go/cpt", "code": "72148", "display": SCRIPT}), [CES], {}),
    "script-in-warning": (ordering(adult_with_acute_lbp(days=10, episode={"system": SNOMED, "code": "279039007", "display": SCRIPT}),
                                   {"system": "http://www.ama-assn.org/go/cpt", "code": "72148", "display": SCRIPT}), [NOT_INDICATED], {}),
    "script-in-info": (ordering(with_condition(LBP, {"system": ICD10CM, "code": "C61", "display": SCRIPT}, 100),
                                {"system": "http://www.ama-assn.org/go/cpt", "code": "72100", "display": SCRIPT}), [INDICATED], {}),
    "long-display": (ordering(with_condition(LBP, {"system": ICD10CM, "code": "C61", "display": "x" * 500}, 100),
                              {"system": "http://www.ama-assn.org/go/cpt", "code": "72148", "display": "MRI " * 200}), [INDICATED], {}),
}


def _render_corpus() -> list[tuple[str, dict]]:
    cards = []
    for name, (vignette, expected, kwargs) in CORPUS.items():
        evaluation = evaluate(vignette, **kwargs)
        if expected is not None:
            assert card_types(evaluation) == expected, name
        cards.extend((f"{name}#{i}", card) for i, card in enumerate(evaluation.cards))
    return cards


CARDS = _render_corpus()
MARKDOWN = MarkdownIt("commonmark").enable(["table", "strikethrough"])


def test_the_corpus_has_every_card_type_on_every_modality():
    types = {card["source"]["topic"]["code"] for _, card in CARDS}
    assert types == {CES, INDICATED, NOT_INDICATED, INCOMPLETE}
    assert len(CARDS) >= 40


@pytest.mark.parametrize("name,card", CARDS, ids=[name for name, _ in CARDS])
def test_card_shape(name, card):
    uuid.UUID(card["uuid"])
    assert isinstance(card["summary"], str) and 0 < len(card["summary"]) < 140
    assert "\n" not in card["summary"]
    assert card["indicator"] in ("info", "warning", "critical")
    expected_indicator = {CES: "critical", INDICATED: "info", NOT_INDICATED: "warning", INCOMPLETE: "info"}
    topic = card["source"]["topic"]
    assert card["indicator"] == expected_indicator[topic["code"]]
    assert isinstance(card["detail"], str) and card["detail"].strip()
    assert card["source"]["label"].strip()
    assert card["source"]["url"].startswith("https://")
    assert topic["system"].startswith("https://") and topic["code"] and topic["display"]
    assert card["links"], "every card cites its guidelines"
    for link in card["links"]:
        assert link["type"] == "absolute" and link["url"].startswith("https://") and link["label"].strip()
        assert "appContext" not in link
    assert card["overrideReasons"]
    for reason in card["overrideReasons"]:
        assert set(reason) == {"system", "code", "display"} and all(isinstance(v, str) and v for v in reason.values())
    extension = card["extension"][EXTENSION_KEY]
    assert extension["rule"] and extension["knowledgeVersion"]
    facts = extension.get("facts") or []  # the HTTP body omits empty values
    assert all(re.fullmatch(r"(CES|RF)-[A-Z0-9-]+", fact) for fact in facts)
    if topic["code"] in (CES, INDICATED):
        assert facts, "a card that justifies imaging names the facts it rests on"
        assert extension["recommendedProtocol"]["modality"] in ("MR", "CT", "XR")
        assert extension["recommendedProtocol"].get("contrast") in (None, "without", "with-and-without")
        if extension["recommendedProtocol"]["modality"] == "MR":
            assert extension["recommendedProtocol"]["contrast"] in ("without", "with-and-without")
    else:
        assert not facts and "recommendedProtocol" not in extension
    if topic["code"] == INCOMPLETE:
        assert extension["unread"]


@pytest.mark.parametrize("name,card", [(n, c) for n, c in CARDS if "suggestions" in c], ids=[n for n, c in CARDS if "suggestions" in c])
def test_suggestions_and_actions(name, card):
    assert card["selectionBehavior"] == "at-most-one"
    assert card["suggestions"]
    assert sum(1 for s in card["suggestions"] if s.get("isRecommended")) <= 1
    uuids = [s["uuid"] for s in card["suggestions"]]
    assert len(set(uuids)) == len(uuids)
    for suggestion in card["suggestions"]:
        uuid.UUID(suggestion["uuid"])
        assert suggestion["label"].strip() and suggestion["actions"]
        for action in suggestion["actions"]:
            assert action["type"] in ("create", "update", "delete")
            assert action["description"].strip()
            if action["type"] == "delete":
                assert re.fullmatch(r"ServiceRequest/[A-Za-z0-9\-.]{1,64}", action["resourceId"])
                assert "resource" not in action
            else:
                resource = action["resource"]
                model = get_fhir_model_class(resource["resourceType"])
                model.model_validate(resource)  # FHIR R4 (fhir.resources.R4B)
                assert resource["subject"]["reference"].startswith("Patient/")


@pytest.mark.parametrize("name,card", CARDS, ids=[name for name, _ in CARDS])
def test_detail_is_markdown_without_raw_html_or_links(name, card):
    def tokens(stream):
        for token in stream:
            yield token
            yield from tokens(token.children or [])
    kinds = {token.type for token in tokens(MARKDOWN.parse(card["detail"]))}
    assert not kinds & {"html_inline", "html_block", "link_open", "image"}, name
    assert "<script" not in MARKDOWN.render(card["detail"]).lower()


def test_record_text_is_escaped_not_dropped():
    card = next(card for name, card in CARDS if name.startswith("script-in-record"))
    assert r"\<script\>" in card["detail"]
    assert "<script>" not in card["detail"].replace(r"\<script\>", "")
    rendered = MARKDOWN.render(card["detail"])
    assert "&lt;script&gt;" in rendered and "<strong>bold</strong>" not in rendered


def test_long_flag_lists_shorten_the_flags_never_the_advice():
    card = next(card for name, card in CARDS if name.startswith("info-every-flag"))
    assert len(card["summary"]) < 140
    assert card["summary"].endswith(("contrast", "contrast, spinal opinion", "usual first study"))
    assert "more" in card["summary"]


def test_card_uuids_are_unique_per_card_and_stable_per_hook_instance():
    assert len({card["uuid"] for _, card in CARDS}) == len(CARDS)
    vignette = with_extra_order(with_condition(LBP, PROSTATE_CANCER, 100), XRAY, "xray-2")
    resources, orders = fhir_record(vignette), draft_order_resources(vignette)
    from scenarios import engine
    first = engine().evaluate(resources, {"entry": [{"resource": o} for o in orders]}, TODAY, "same-instance").cards
    again = engine().evaluate(resources, {"entry": [{"resource": o} for o in orders]}, TODAY, "same-instance").cards
    other = engine().evaluate(resources, {"entry": [{"resource": o} for o in orders]}, TODAY, "other-instance").cards
    assert [c["uuid"] for c in first] == [c["uuid"] for c in again]
    assert not {c["uuid"] for c in first} & {c["uuid"] for c in other}


def test_replacement_orders_get_a_subject_even_when_the_draft_has_none():
    vignette = with_condition(LBP, PROSTATE_CANCER, 100)
    orders = draft_order_resources(ordering(vignette, XRAY))
    orders[0].pop("subject")
    card = evaluate_resources(fhir_record(vignette), orders).cards[0]
    created = [a["resource"] for s in card["suggestions"] for a in s["actions"] if a["type"] == "create"]
    assert created and all(r["subject"]["reference"].startswith("Patient/") for r in created)
    for resource in created:
        get_fhir_model_class("ServiceRequest").model_validate(resource)


def test_cards_are_ordered_critical_first():
    vignette = with_extra_order(LBP, XRAY, "x")
    evaluation = evaluate(vignette)
    assert [c["indicator"] for c in evaluation.cards] == ["warning", "warning"]
    indicators = [c["indicator"] for c in evaluate(with_condition(vignette, URINARY_RETENTION, 1)).cards]
    assert indicators == ["critical", "critical"]


# ---- through HTTP: the response body as the EHR receives it ---------------------------------------------------------------
def _empty_values(value, path="$"):
    if value is None or value == "" or value == [] or value == {}:
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _empty_values(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _empty_values(item, f"{path}[{index}]")


HTTP_CASES = {name: vignette for name, (vignette, _, kwargs) in CORPUS.items() if not kwargs}


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
@pytest.mark.parametrize("name", sorted(HTTP_CASES))
def test_http_body_has_no_null_or_empty_values_and_well_formed_cards(client, name, hook):
    response = client.post(f"/cds-services/lumbar-imaging-{hook}", json=hook_request(HTTP_CASES[name], hook=hook))
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"cards"}
    if body["cards"] == []:
        return
    assert list(_empty_values(body)) == []
    for card in body["cards"]:
        test_card_shape(name, card)
        test_detail_is_markdown_without_raw_html_or_links(name, card)
        if "suggestions" in card:
            test_suggestions_and_actions(name, card)


def test_http_no_card_is_exactly_an_empty_cards_array(client):
    for vignette in (adult_with_acute_lbp(order={"system": "http://www.ama-assn.org/go/cpt", "code": "70551"}), child_with_lbp(), adult()):
        response = client.post("/cds-services/lumbar-imaging-order-sign", json=hook_request(vignette))
        assert response.status_code == 200 and response.content.replace(b" ", b"") == b'{"cards":[]}'


def test_http_data_incomplete_card_through_the_api(client):
    request = hook_request(LBP)
    request["prefetch"]["conditions"] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}
    body = client.post("/cds-services/lumbar-imaging-order-sign", json=request).json()
    assert card_types(body["cards"]) == [INCOMPLETE]
    assert list(_empty_values(body)) == []
    test_card_shape("incomplete-http", body["cards"][0])
    assert "suggestions" not in body["cards"][0] and "selectionBehavior" not in body["cards"][0]


def test_low_back_pain_display_reaches_the_warning_evidence():
    card = evaluate(adult_with_acute_lbp(episode={**LOW_BACK_PAIN, "display": "Back pain after lifting"})).cards[0]
    assert "Back pain after lifting" in card["detail"]
    assert assessment(card)["order"] == "ServiceRequest/draft-imaging-1"


@pytest.mark.parametrize("name,card", CARDS, ids=[name for name, _ in CARDS])
def test_detail_is_tidy_markdown(name, card):
    """One blank line between paragraphs, no trailing spaces, and every bold lead-in starts its own paragraph
    (an '**Urgent:**' line glued to the protocol paragraph would render as one paragraph)."""
    detail = card["detail"]
    assert "\n\n\n" not in detail and detail == detail.strip()
    assert all(line == line.rstrip() for line in detail.splitlines())
    for line in detail.splitlines():
        if line.startswith("**") and line not in detail.split("\n\n")[0]:
            assert f"\n\n{line}" in detail, line


@pytest.mark.parametrize("name,expected", [
    ("info-xray-cancer-loinc", True),  # criteria.md 3.1: X-ray for suspected cancer -> "MRI preferred"
    ("info-ct-cancer", True),
    ("info-pregnant-cancer-xray", True),
    ("info-xray-osteoporosis", False),  # radiography is a usual first study for fracture risk
    ("info-ct-trauma", False),
    ("info-cancer-swap", False),  # an MRI order: only the contrast changes
])
def test_mri_preferred_over_radiography_or_ct_for_suspected_cancer_or_infection(name, expected):
    card = dict(CARDS)[f"{name}#0"]
    assert ("MRI preferred" in card["detail"]) is expected, card["detail"]
