"""CDS Hooks 2.0 conformance, as an outside client sees it (the audit of /work/shared/cds-hooks/checklist.md).

Requests are shaped as real clients send them: the CDS Hooks sandbox (order-select with a
MedicationRequest and a ServiceRequest in draftOrders, no fhirServer, prefetch of some keys only,
override feedback with a reason of code + system) and EHRs (selections as absolute URLs or versioned
references, Bundles whose entries have only a fullUrl, `application/json; charset=utf-8`).

Each test names the checklist item it checks.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient

from cds_service import vignettes
from cds_service.app import create_app
from server_support import DEFAULT_TODAY, SELECT_ID, SIGN_ID, app_settings, load_vignettes

TODAY = date.fromisoformat(DEFAULT_TODAY)
SELECT = f"/cds-services/{SELECT_ID}"
SIGN = f"/cds-services/{SIGN_ID}"
VIGNETTES = load_vignettes()
EHR_BASE = "https://ehr.example.org/fhir/r4"


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(tmp_path_factory.mktemp("conformance"))), raise_server_exceptions=False) as test_client:
        yield test_client


def post(client: TestClient, path: str, body: Any, content_type: str | None = "application/json") -> Any:
    headers = {"Content-Type": content_type} if content_type else {}
    return client.post(path, content=json.dumps(body).encode(), headers=headers)


def card_orders(response) -> list[tuple[str, str | None]]:
    """(card type, the order the card is about) of every card of a 200 answer."""
    assert response.status_code == 200, response.text
    return [(card["source"]["topic"]["code"], card["extension"]["org.example.lumbar-imaging-cds.assessment"].get("order"))
            for card in response.json()["cards"]]


# --- draft orders as clients send them -------------------------------------------------------------------------


def warning_request() -> dict:
    """LBP-V01 (10 days of back pain, lumbar MRI, no red flags: imaging-not-indicated), full prefetch."""
    return vignettes.hook_request(VIGNETTES["LBP-V01"], TODAY)


def the_mri(request: dict) -> dict:
    return request["context"]["draftOrders"]["entry"][0]["resource"]


def lumbar_xray(patient_reference: str) -> dict:
    return {"resourceType": "ServiceRequest", "id": "draft-xray-2", "status": "draft", "intent": "order",
            "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "72100", "display": "X-ray lumbar spine, 2 or 3 views"}]},
            "subject": {"reference": patient_reference}}


def ibuprofen(patient_reference: str) -> dict:
    return {"resourceType": "MedicationRequest", "id": "draft-med-1", "status": "draft", "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197806",
                                                      "display": "Ibuprofen 600 MG Oral Tablet"}]},
            "subject": {"reference": patient_reference}}


def two_lumbar_orders(selections: list[str], with_full_urls: bool = False, ids: bool = True) -> dict:
    """A lumbar MRI and a lumbar X-ray in draftOrders; `selections` names the one(s) selected."""
    request = warning_request()
    mri = the_mri(request)
    xray = lumbar_xray(mri["subject"]["reference"])
    entries = [{"resource": mri}, {"resource": xray}]
    if with_full_urls:
        for entry in entries:
            entry["fullUrl"] = f"{EHR_BASE}/ServiceRequest/{entry['resource']['id']}"
    if not ids:
        for entry in entries:
            entry["resource"] = {k: v for k, v in entry["resource"].items() if k != "id"}
    request["context"]["draftOrders"]["entry"] = entries
    request["context"]["selections"] = selections
    return request


def test_both_lumbar_orders_get_a_card_when_both_are_selected(client):
    """The baseline of the selection tests below: each of the two drafts gets its own card."""
    request = two_lumbar_orders(["ServiceRequest/draft-imaging-1", "ServiceRequest/draft-xray-2"])
    assert sorted(card_orders(post(client, SELECT, request))) == [
        ("imaging-not-indicated", "ServiceRequest/draft-imaging-1"), ("imaging-not-indicated", "ServiceRequest/draft-xray-2")]


@pytest.mark.parametrize("selection", [
    "ServiceRequest/draft-xray-2",                                    # the 2.0 form
    f"{EHR_BASE}/ServiceRequest/draft-xray-2",                        # an absolute reference, no fullUrl in the Bundle
    "ServiceRequest/draft-xray-2/_history/3",                         # a versioned reference
    f"{EHR_BASE}/ServiceRequest/draft-xray-2/_history/3",
])
def test_order_select_advises_on_the_selected_order_only(client, selection):
    """HOOK-02, HOOK-05: order-select advice is about the selections; the other drafts are context. A
    selection written as an absolute or versioned reference names the same draft as `Type/id`."""
    assert card_orders(post(client, SELECT, two_lumbar_orders([selection]))) == [("imaging-not-indicated", "ServiceRequest/draft-xray-2")]


def test_a_relative_selection_finds_an_entry_known_by_its_absolute_full_url_only(client):
    """HOOK-05: the entry carries no resource id, only `fullUrl` = {fhirServer}/ServiceRequest/id."""
    request = two_lumbar_orders(["ServiceRequest/draft-xray-2"], with_full_urls=True, ids=False)
    assert [code for code, _ in card_orders(post(client, SELECT, request))] == ["imaging-not-indicated"]  # not two


def test_urn_uuid_selections_name_entries_by_full_url(client):
    request = two_lumbar_orders([], ids=False)
    for number, entry in enumerate(request["context"]["draftOrders"]["entry"], start=1):
        entry["fullUrl"] = f"urn:uuid:6a9d1f2c-0000-4000-8000-00000000000{number}"
    request["context"]["selections"] = ["urn:uuid:6a9d1f2c-0000-4000-8000-000000000001"]
    assert [code for code, _ in card_orders(post(client, SELECT, request))] == ["imaging-not-indicated"]


def test_a_selection_naming_nothing_in_draft_orders_still_evaluates_every_draft(client):
    """Safety (kept): a selection that names no draft at all is a client error; every lumbar draft is then
    evaluated rather than none (a cauda equina order must not go unseen)."""
    request = two_lumbar_orders(["ServiceRequest/not-in-this-bundle"])
    assert len(card_orders(post(client, SELECT, request))) == 2


def test_sandbox_rx_shape_medication_and_imaging_selected(client):
    """Sandbox-like order-select: a MedicationRequest and the lumbar MRI, both selected, fhirServer absent,
    full prefetch: one card, about the MRI; the medication is not in scope."""
    request = warning_request()
    mri = the_mri(request)
    request["context"]["draftOrders"] = {"resourceType": "Bundle", "entry": [
        {"resource": ibuprofen(mri["subject"]["reference"])}, {"resource": mri}]}
    request["context"]["selections"] = ["MedicationRequest/draft-med-1", "ServiceRequest/draft-imaging-1"]
    assert card_orders(post(client, SELECT, request)) == [("imaging-not-indicated", "ServiceRequest/draft-imaging-1")]


def test_selecting_a_medication_gives_no_card_about_the_unselected_mri(client):
    """HOOK-02: the clinician selects ibuprofen while a lumbar MRI (already advised on when it was selected)
    waits in the same ordering session: order-select should not repeat the MRI card."""
    request = warning_request()
    mri = the_mri(request)
    request["context"]["draftOrders"] = {"resourceType": "Bundle", "entry": [
        {"resource": ibuprofen(mri["subject"]["reference"])}, {"resource": mri}]}
    request["context"]["selections"] = ["MedicationRequest/draft-med-1"]
    assert card_orders(post(client, SELECT, request)) == []


def test_order_sign_ignores_selections_and_evaluates_every_draft(client):
    """order-sign has no `selections` (order-sign 1.1); one sent anyway is ignored, not an error."""
    request = two_lumbar_orders(["ServiceRequest/draft-xray-2"])
    request["hook"] = "order-sign"
    assert len(card_orders(post(client, SIGN, request))) == 2


# --- hook definitions -----------------------------------------------------------------------------------------


def test_hook_contexts_are_the_published_ones():
    """Checklist 2.5: order-select 1.0 and order-sign 1.1 (re-signing revised orders), their context fields,
    which are required and which are prefetch tokens (only root-level primitives: userId, patientId,
    encounterId); the request validation and the prefetch template lint both read these definitions."""
    from cds_service.protocol import HOOK_DEFINITIONS

    common = {"userId": ("string", True, True), "patientId": ("string", True, True), "encounterId": ("string", False, True),
              "draftOrders": ("object", True, False)}
    expected = {"order-select": ("1.0", {**common, "selections": ("array", True, False)}), "order-sign": ("1.1", common)}
    actual = {hook: (definition["version"], {name: (spec["type"], bool(spec.get("required")), bool(spec.get("token")))
                                             for name, spec in definition["context"].items()})
              for hook, definition in HOOK_DEFINITIONS.items()}
    assert actual == expected


# --- content types ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/json;charset=UTF-8", None])
def test_json_with_a_charset_or_without_a_content_type_is_read(client, content_type):
    """GEN-01, robustness: EHRs send `application/json; charset=utf-8`; some send no Content-Type."""
    assert card_orders(post(client, SELECT, warning_request(), content_type)) == [("imaging-not-indicated", "ServiceRequest/draft-imaging-1")]
    item = {"card": "c-content-type", "outcome": "overridden", "outcomeTimestamp": "2025-03-01T10:00:00Z"}
    assert post(client, SELECT + "/feedback", {"feedback": [item]}, content_type).status_code == 200


# --- feedback --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("timestamp", ["2025-03-01t10:00:00z", "2025-03-01T10:00:00z", "2025-03-01t10:00:00.123+01:00"])
def test_feedback_timestamp_with_lower_case_t_and_z_is_rfc_3339(client, timestamp):
    """FB-03: outcomeTimestamp is an RFC 3339 §5.6 date-time, whose "T" and "Z" may be lower case (RFC 3339
    §5.6 NOTE). Stored as the same instant as its upper-case spelling (a repeat is a duplicate)."""
    item = {"card": "c-lower-case", "outcome": "overridden", "outcomeTimestamp": timestamp}
    response = post(client, SELECT + "/feedback", {"feedback": [item]})
    assert response.status_code == 200, response.text
    repeat = post(client, SELECT + "/feedback", {"feedback": [{**item, "outcomeTimestamp": timestamp.upper()}]})
    assert repeat.status_code == 200 and repeat.json() == {"stored": 0, "duplicates": 1}


def test_sandbox_override_feedback_on_a_real_card(client):
    """FB-02, FB-07: the sandbox's body: one item, overridden, reason {code, system} without display."""
    card = post(client, SELECT, warning_request()).json()["cards"][0]
    reason = card["overrideReasons"][0]
    body = {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2025-03-01T10:05:00.000Z",
                          "overrideReason": {"reason": {"code": reason["code"], "system": reason["system"]}}}]}
    response = post(client, SELECT + "/feedback", body)
    assert response.status_code == 200 and response.json()["stored"] == 1


# --- HTTP methods ----------------------------------------------------------------------------------------------


def test_head_on_discovery_is_answered_like_get_without_a_body(client):
    get = client.get("/cds-services")
    head = client.head("/cds-services")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_private_network_preflight_from_the_hosted_sandbox_is_allowed_in_open_mode(client):
    """SEC-14: Chromium preflights a call from a public origin to a private or loopback address with
    `Access-Control-Request-Private-Network: true` and needs `Access-Control-Allow-Private-Network: true`."""
    response = client.options("/cds-services", headers={
        "Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization", "Access-Control-Request-Private-Network": "true"})
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-private-network"] == "true"


def test_discovery_and_service_answers_carry_cors_headers_for_a_browser_client(client):
    """SEC-14: the sandbox's discovery and service calls read the answers from another origin."""
    origin = {"Origin": "http://localhost:8088"}
    assert client.get("/cds-services", headers=origin).headers["access-control-allow-origin"] in ("*", "http://localhost:8088")
    response = client.post(SELECT, content=json.dumps(warning_request()), headers={**origin, "Content-Type": "application/json"})
    assert response.headers["access-control-allow-origin"] in ("*", "http://localhost:8088")


def test_a_sandbox_request_without_fhir_server_and_some_prefetch_keys_is_412_naming_what_is_missing(client):
    """PF-07: keys the decision needs neither prefetched nor readable (no fhirServer): 412 OperationOutcome."""
    request = warning_request()
    request["prefetch"] = {key: request["prefetch"][key] for key in ("patient", "conditions")}
    request.pop("fhirServer", None)
    response = post(client, SELECT, request)
    assert response.status_code == 412
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "incomplete"
    assert "Observation" in outcome["issue"][0]["diagnostics"]


def test_every_card_of_the_public_vignettes_is_2_0_shaped(client):
    """CARD-01..08, SUG-01, ACT-01, LINK-01, COD-01 on every card the public vignettes produce, both hooks."""
    seen = set()
    for vignette in VIGNETTES.values():
        for hook, path in (("order-select", SELECT), ("order-sign", SIGN)):
            response = post(client, path, vignettes.hook_request(vignette, TODAY, hook=hook))
            assert response.status_code == 200, response.text
            for card in response.json()["cards"]:
                seen.add(card["source"]["topic"]["code"])
                assert_card_is_2_0(card)
    assert {"imaging-not-indicated", "imaging-indicated", "cauda-equina-emergency"} <= seen


def assert_card_is_2_0(card: dict) -> None:
    assert set(card) <= {"uuid", "summary", "detail", "indicator", "source", "suggestions", "selectionBehavior",
                         "overrideReasons", "links", "extension"}
    assert isinstance(card["summary"], str) and 0 < len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    assert card["source"]["label"]
    topic = card["source"]["topic"]
    assert topic["system"] and topic["code"]
    for reason in card.get("overrideReasons", []):
        assert reason["system"] and reason["code"] and reason["display"]
    for link in card.get("links", []):
        assert link["label"] and link["url"].startswith("https://") and link["type"] in ("absolute", "smart")
        assert link["type"] == "smart" or "appContext" not in link
    if "suggestions" in card:
        assert card["selectionBehavior"] in ("at-most-one", "any")
        if card["selectionBehavior"] == "at-most-one":
            assert sum(1 for s in card["suggestions"] if s.get("isRecommended")) <= 1
        for suggestion in card["suggestions"]:
            assert suggestion["label"] and suggestion["uuid"]
            for action in suggestion.get("actions", []):
                assert action["type"] in ("create", "update", "delete") and action["description"]
                if action["type"] == "delete":
                    assert "/" in action["resourceId"] and "resource" not in action
                elif action["type"] == "update":
                    assert action["resource"]["resourceType"] and action["resource"]["id"]
                else:
                    assert action["resource"]["resourceType"] and "resourceId" not in action
    extension = card.get("extension", {})
    assert all("." in key and isinstance(value, dict) for key, value in extension.items())  # EXT-01
