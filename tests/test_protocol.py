"""The CDS Hooks 2.0 protocol at the HTTP edge, in process (checklist 2.1, 2.3, 2.5, 2.6, 2.7, 2.9).

Every error body is a FHIR OperationOutcome naming the field; every 200 body obeys the 2.0 JSON
rules; real clients' sloppy input (the sandbox's) gets 200, never 500. Requests are built from the
public vignettes (cds_service.vignettes) and the recorded sandbox calls (server_support).
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient

from cds_service import vignettes
from cds_service.app import create_app
from server_support import (DEFAULT_TODAY, SELECT_ID, SIGN_ID, FakeFhir, app_settings, load_vignettes, sandbox_first_order_select,
                            sandbox_order_select)

TODAY = date.fromisoformat(DEFAULT_TODAY)
SELECT = f"/cds-services/{SELECT_ID}"
SIGN = f"/cds-services/{SIGN_ID}"
VIGNETTES = load_vignettes()
EXPECTED_TOPIC = {  # the clinical team's card names -> source.topic.code
    "early-imaging-warning": ("imaging-not-indicated", "warning"),
    "red-flag-justified-info": ("imaging-indicated", "info"),
    "cauda-equina-critical": ("cauda-equina-emergency", "critical"),
}


@pytest.fixture(scope="module")
def fake_fhir() -> FakeFhir:
    """The sandbox's FHIR server: patient lbp1 has nothing on record (every search is empty)."""
    return FakeFhir()


@pytest.fixture(scope="module")
def client(tmp_path_factory, fake_fhir) -> Iterator[TestClient]:
    app = create_app(app_settings(tmp_path_factory.mktemp("protocol")), fhir_transport=fake_fhir.transport)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture()
def fhir_requests(fake_fhir) -> list:
    fake_fhir.requests.clear()
    return fake_fhir.requests


def vignette_request(vignette_id: str = "LBP-V01", hook: str = "order-select") -> dict:
    return vignettes.hook_request(VIGNETTES[vignette_id], TODAY, hook=hook)


def post(client: TestClient, path: str, body: Any) -> Any:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


def assert_outcome(response, status: int, field: str | None = None, mentions: str | None = None) -> dict:
    """A JSON OperationOutcome error with the given status; `field` in issue.expression and in the text."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error" and issue["code"] and issue["diagnostics"].strip()
    if field:
        assert field in issue.get("expression", []), body
        assert field.split(".")[-1] in issue["diagnostics"], body
    if mentions:
        assert mentions in issue["diagnostics"], body
    return body


def topics(response) -> list[tuple[str, str]]:
    return [(card["source"]["topic"]["code"], card["indicator"]) for card in response.json()["cards"]]


def empties(value: Any, path: str = "$") -> list[str]:
    """JSON paths that hold null, "", [] or {} (CDS Hooks 2.0 'Use of JSON')."""
    if value is None or value == "" or value == [] or value == {}:
        return [path]
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += empties(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += empties(item, f"{path}[{index}]")
    return found


def assert_conformant_200(response) -> dict:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("cards"), list)
    assert set(body) <= {"cards", "systemActions", "extension"}
    problems = [p for p in empties(body) if p != "$.cards"]
    assert problems == [], problems
    return body


# --- malformed bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"", b"   \n", b"{", b"{'hook': 'order-select'}", b"not json", b"\xff\xfe\x00", b'{"hook": "order-select"} trailing',
    b'{"hook": NaN}', b'{"n": 1e999}',
], ids=["empty", "whitespace", "truncated", "single-quotes", "text", "binary", "trailing", "nan", "overflow"])
def test_malformed_json_is_400(client, body):
    assert_outcome(post(client, SELECT, body), 400)


@pytest.mark.parametrize("body, kind", [(b"[]", "array"), (b'[{"hook": "order-select"}]', "array"), (b'"x"', "string"),
                                        (b"42", "number"), (b"null", "null"), (b"true", "boolean")])
def test_body_that_is_not_an_object_is_400(client, body, kind):
    assert_outcome(post(client, SELECT, body), 400, mentions="object")
    assert kind in post(client, SELECT, body).json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize("shape", ["arrays", "objects", "inside-context", "inside-prefetch"])
def test_deeply_nested_json_is_400_not_500(client, shape):
    depth = 5000
    if shape == "arrays":
        body = "[" * depth + "]" * depth
    elif shape == "objects":
        body = '{"a":' * depth + "1" + "}" * depth
    else:
        request = json.dumps(vignette_request())
        nested = '{"a":' * depth + "1" + "}" * depth
        anchor = '"context": {' if shape == "inside-context" else '"prefetch": {'
        body = request.replace(anchor, anchor + '"deep": ' + nested + ", ", 1)
    assert_outcome(post(client, SELECT, body), 400, mentions="nested")


def test_utf8_byte_order_mark_is_tolerated(client):
    body = "\ufeff" + json.dumps(vignette_request())
    assert topics(post(client, SELECT, body.encode("utf-8"))) == [("imaging-not-indicated", "warning")]


# --- the request envelope ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["hook", "hookInstance", "context"])
@pytest.mark.parametrize("how", ["missing", "null"])
def test_missing_required_field_is_400_naming_it(client, field, how):
    request = vignette_request()
    if how == "missing":
        del request[field]
    else:
        request[field] = None
    assert_outcome(post(client, SELECT, request), 400, field)


@pytest.mark.parametrize("field, value", [
    ("hook", 1), ("hook", ["order-select"]), ("hook", True),
    ("hookInstance", 12345), ("hookInstance", {"id": "x"}), ("hookInstance", ""), ("hookInstance", "   "),
    ("hookInstance", "d1577c69\nINFO forged log line"), ("hookInstance", "d1577c69\u0000"),
    ("context", []), ("context", "patientId=1"), ("context", 7),
    ("prefetch", []), ("prefetch", "patient"), ("prefetch", 3), ("prefetch", True),
    ("fhirServer", 8080), ("fhirServer", "ftp://ehr.example.org/fhir"), ("fhirServer", "ehr.example.org/fhir"),
    ("fhirAuthorization", "Bearer abc"), ("fhirAuthorization", ["abc"]),
])
def test_wrong_type_is_400_naming_the_field(client, field, value):
    request = vignette_request()
    request[field] = value
    if field == "fhirAuthorization":
        request["fhirServer"] = "http://127.0.0.1:9/fhir"
    assert_outcome(post(client, SELECT, request), 400, field)


def test_fhir_authorization_without_fhir_server_is_400(client):
    request = vignette_request()
    request["fhirAuthorization"] = {"access_token": "secret-token", "token_type": "Bearer", "expires_in": 300,
                                    "scope": "patient/*.read", "subject": "lumbar-cds"}
    response = post(client, SELECT, request)
    body = assert_outcome(response, 400, "fhirServer", mentions="fhirAuthorization")
    assert "secret-token" not in json.dumps(body)


@pytest.mark.parametrize("path, hook", [(SELECT, "order-sign"), (SIGN, "order-select"), (SELECT, "patient-view"), (SELECT, "Order-Select")])
def test_hook_not_matching_the_service_is_400(client, path, hook):
    request = vignette_request(hook="order-sign" if hook == "order-sign" else "order-select")
    request["hook"] = hook
    assert_outcome(post(client, path, request), 400, "hook", mentions=hook)


@pytest.mark.parametrize("hook, field", [
    ("order-select", "userId"), ("order-select", "patientId"), ("order-select", "selections"), ("order-select", "draftOrders"),
    ("order-sign", "userId"), ("order-sign", "patientId"), ("order-sign", "draftOrders"),
])
@pytest.mark.parametrize("how", ["missing", "null"])
def test_missing_hook_context_field_is_400(client, hook, field, how):
    request = vignette_request(hook=hook)
    if how == "missing":
        del request["context"][field]
    else:
        request["context"][field] = None
    assert_outcome(post(client, SELECT if hook == "order-select" else SIGN, request), 400, f"context.{field}", mentions=hook)


def test_order_sign_does_not_require_selections(client):
    request = vignette_request(hook="order-sign")
    assert "selections" not in request["context"]
    assert topics(post(client, SIGN, request)) == [("imaging-not-indicated", "warning")]


@pytest.mark.parametrize("field, value", [
    ("userId", 7), ("userId", {"reference": "Practitioner/1"}),
    ("patientId", 123), ("patientId", ""), ("patientId", "  "), ("patientId", ["lbp-v01"]),
    ("encounterId", 5),
    ("selections", "ServiceRequest/draft-imaging-1"), ("selections", [1, 2]), ("selections", [{"reference": "ServiceRequest/x"}]),
    ("draftOrders", []), ("draftOrders", "Bundle"), ("draftOrders", {"resourceType": "ServiceRequest", "id": "x"}),
    ("draftOrders", {"resourceType": "Bundle", "entry": {"resource": {}}}),
])
def test_wrong_context_type_is_400_naming_the_field(client, field, value):
    request = vignette_request()
    request["context"][field] = value
    response = post(client, SELECT, request)
    expected_field = "context.draftOrders.entry" if field == "draftOrders" and isinstance(value, dict) and "entry" in value else f"context.{field}"
    assert_outcome(response, 400, expected_field)


def test_more_draft_orders_than_one_session_holds_is_400(client):
    """5000 lumbar orders were 2.4 s of event-loop time and a 26 MB answer: bounded at 500."""
    request = vignette_request(hook="order-sign")
    order = request["context"]["draftOrders"]["entry"][0]["resource"]
    request["context"]["draftOrders"]["entry"] = [{"resource": {**order, "id": f"o{i}"}} for i in range(501)]
    assert_outcome(post(client, SIGN, request), 400, "context.draftOrders.entry", mentions="500")
    request["context"]["draftOrders"]["entry"] = request["context"]["draftOrders"]["entry"][:500]
    assert len(post(client, SIGN, request).json()["cards"]) == 500
    select = vignette_request()
    select["context"]["selections"] = [f"ServiceRequest/o{i}" for i in range(501)]
    assert_outcome(post(client, SELECT, select), 400, "context.selections", mentions="500")


def test_draft_orders_not_a_bundle_is_400(client):
    request = vignette_request(hook="order-sign")
    request["context"]["draftOrders"] = request["context"]["draftOrders"]["entry"][0]["resource"]  # a bare ServiceRequest
    assert_outcome(post(client, SIGN, request), 400, "context.draftOrders", mentions="Bundle")


def test_prefetch_not_an_object_is_400(client):
    request = vignette_request()
    request["prefetch"] = [request["prefetch"]["patient"]]
    assert_outcome(post(client, SELECT, request), 400, "prefetch", mentions="object")


# --- routing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/cds-services/no-such-service", "/cds-services/no-such-service/feedback"])
def test_unknown_service_id_is_404_json(client, path):
    body = assert_outcome(post(client, path, vignette_request()), 404)
    assert body["issue"][0]["code"] == "not-found"
    assert "no-such-service" in body["issue"][0]["diagnostics"]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", [SELECT, SIGN, SELECT + "/feedback"])
def test_other_methods_on_a_service_url_are_405_json(client, method, path):
    response = client.request(method, path)
    assert_outcome(response, 405)
    assert "POST" in response.headers["allow"]


def test_post_to_discovery_is_405_json(client):
    assert_outcome(post(client, "/cds-services", {}), 405)


def test_unknown_path_is_404_json(client):
    assert_outcome(client.get("/cds-services/x/y/z"), 404)


# --- 412: data the decision needs, neither sent nor fetchable ------------------------------------------


@pytest.mark.parametrize("absent", ["observations", "conditions", "patient", "medicationStatements"])
def test_absent_prefetch_key_without_fhir_server_is_412_naming_the_data(client, absent):
    request = vignette_request()
    resource_type = {"observations": "Observation", "conditions": "Condition", "patient": "Patient",
                     "medicationStatements": "MedicationStatement"}[absent]
    del request["prefetch"][absent]
    body = assert_outcome(post(client, SELECT, request), 412, mentions=resource_type)
    assert body["issue"][0]["code"] == "incomplete"


def test_no_prefetch_at_all_without_fhir_server_is_412_naming_every_type(client):
    request = vignette_request(hook="order-sign")
    del request["prefetch"]
    body = assert_outcome(post(client, SIGN, request), 412)
    for resource_type in ("Patient", "Condition", "Observation", "MedicationRequest", "MedicationStatement", "Procedure", "ServiceRequest"):
        assert resource_type in body["issue"][0]["diagnostics"]


@pytest.mark.parametrize("request_builder", [
    lambda: {**vignette_request("LBP-V38"), "prefetch": {}},  # brain MRI: not lumbar imaging
    lambda: {k: v for k, v in vignette_request("LBP-V38").items() if k != "prefetch"},
    lambda: {**sandbox_first_order_select(fhir_server=None), "prefetch": {}},  # empty coding: nothing to assess yet
], ids=["brain-mri-empty-prefetch", "brain-mri-no-prefetch", "sandbox-empty-order"])
def test_no_data_needed_when_the_order_is_not_lumbar_imaging(client, request_builder):
    assert assert_conformant_200(post(client, SELECT, request_builder())) == {"cards": []}


def test_cauda_equina_card_is_never_held_back_by_missing_data(client):
    request = sandbox_order_select(reason="192970008", fhir_server=None)
    del request["prefetch"]
    assert topics(post(client, SELECT, request)) == [("cauda-equina-emergency", "critical")]


def test_missing_optional_data_degrades_instead_of_412(client):
    request = vignette_request("LBP-V17")  # fever: imaging indicated whatever else is unread
    del request["prefetch"]["procedures"]
    assert topics(post(client, SELECT, request)) == [("imaging-indicated", "info")]


# --- leniency (GEN-03, HOOK-03..05) -----------------------------------------------------------------------


def test_sandbox_first_order_select_is_200_with_no_cards(client, fhir_requests):
    assert assert_conformant_200(post(client, SELECT, sandbox_first_order_select())) == {"cards": []}
    assert fhir_requests == []  # no imaging order yet: nothing is fetched (TIME-02)


def test_sandbox_sciatica_order_without_condition_is_200_without_card(client, fake_fhir, fhir_requests):
    # The sandbox prefetches patient and conditions only; the rest is read from its FHIR server (empty).
    # No Condition on the chart: the duration of the episode is unknown -> no card (no false alert).
    assert assert_conformant_200(post(client, SELECT, sandbox_order_select("72149", "23056005"))) == {"cards": []}
    assert sorted(fake_fhir.types()) == ["MedicationRequest", "MedicationStatement", "Observation", "Procedure", "ServiceRequest"]


def test_sandbox_sciatica_order_without_fhir_server_is_412(client, fhir_requests):
    # Without its FHIR server the cauda equina sources (observations...) cannot be read: 412, not a silent "no card".
    body = assert_outcome(post(client, SELECT, sandbox_order_select("72149", "23056005", fhir_server=None)), 412)
    assert "Observation" in body["issue"][0]["diagnostics"]
    assert fhir_requests == []


def test_sandbox_cauda_equina_reason_is_200_with_the_critical_card(client):
    body = assert_conformant_200(post(client, SELECT, sandbox_order_select("72149", "192970008")))
    assert [(c["source"]["topic"]["code"], c["indicator"]) for c in body["cards"]] == [("cauda-equina-emergency", "critical")]
    assert body["cards"][0]["uuid"]


def test_unknown_context_fields_and_other_request_types_are_tolerated(client):
    request = vignette_request()
    request["context"]["foo"] = 1
    request["context"]["org.example.unknown"] = {"a": [1, 2]}
    request["extension"] = {"org.example.ehr": {"tenant": "t1"}}
    request["context"]["draftOrders"]["entry"].append({"resource": {
        "resourceType": "NutritionOrder", "id": "diet-1", "status": "draft", "intent": "order",
        "patient": {"reference": "Patient/lbp-v01"}, "dateTime": "2025-03-01"}})
    request["context"]["draftOrders"]["entry"].append({"resource": {"resourceType": "MedicationRequest", "id": "m1",
                                                                     "status": "draft", "intent": "order"}})
    assert topics(post(client, SELECT, request)) == [("imaging-not-indicated", "warning")]


def test_selection_referencing_a_missing_entry_is_200(client):
    request = vignette_request()
    request["context"]["selections"] = ["ServiceRequest/not-in-draft-orders"]
    assert_conformant_200(post(client, SELECT, request))
    request["context"]["selections"] = ["ServiceRequest/not-in-draft-orders", "ServiceRequest/draft-imaging-1"]
    assert topics(post(client, SELECT, request)) == [("imaging-not-indicated", "warning")]


@pytest.mark.parametrize("status", ["active", "on-hold", "draft"])
def test_order_sign_evaluates_orders_whatever_their_status(client, status):
    request = vignette_request("LBP-V30", hook="order-sign")
    request["context"]["draftOrders"]["entry"][0]["resource"]["status"] = status
    assert topics(post(client, SIGN, request)) == [("cauda-equina-emergency", "critical")]
    request = vignette_request("LBP-V01", hook="order-sign")
    request["context"]["draftOrders"]["entry"][0]["resource"]["status"] = status
    assert topics(post(client, SIGN, request)) == [("imaging-not-indicated", "warning")]


@pytest.mark.parametrize("mutate", [
    lambda r: r["context"]["draftOrders"].pop("entry"),
    lambda r: r["context"]["draftOrders"].pop("resourceType"),
    lambda r: r["context"]["draftOrders"].update(entry=[]),
    lambda r: r["context"]["draftOrders"].update(entry=[None, 1, "x", [], {}, {"resource": None}, {"resource": "ServiceRequest/1"}]),
    lambda r: r["context"]["draftOrders"]["entry"][0]["resource"].update(code="72148"),
    lambda r: r["context"]["draftOrders"]["entry"][0]["resource"].update(code={"coding": {"code": "72148"}}),
    lambda r: r["context"]["draftOrders"]["entry"][0]["resource"].update(code={"coding": [None, 1, {"code": 72148}]}),
    lambda r: r["context"]["draftOrders"]["entry"][0]["resource"].update(reasonCode={"coding": []}),
    lambda r: r["context"]["draftOrders"]["entry"][0]["resource"].update(reasonCode=[None, "x", {"coding": "x"}]),
    lambda r: r["context"]["draftOrders"]["entry"][0]["resource"].update(subject="Patient/x", status=None, id=5),
    lambda r: r["context"]["draftOrders"]["entry"][0]["resource"].pop("resourceType"),
    lambda r: r["context"].update(selections=[]),
    lambda r: r["context"].update(selections=["", "ServiceRequest", "/", "ServiceRequest/draft-imaging-1/_history/1"]),
    lambda r: r["prefetch"].update(patient="Patient/lbp-v01"),
    lambda r: r["prefetch"].update(patient={"resourceType": "Patient", "birthDate": "not-a-date", "gender": 5}),
    lambda r: r["prefetch"].update(patient={"resourceType": "Patient", "birthDate": "2030-01-01"}),
    lambda r: r["prefetch"].update(conditions={"resourceType": "Bundle", "entry": "x"}),
    lambda r: r["prefetch"].update(conditions={"resourceType": "Bundle", "entry": [None, 1, {"resource": 1}, {"resource": {}}]}),
    lambda r: r["prefetch"].update(conditions={"resourceType": "Bundle", "link": [None, {"relation": "next"}, {"relation": "next", "url": 5}]}),
    lambda r: r["prefetch"].update(conditions=[1, 2], observations=7, procedures="none"),
    lambda r: r["prefetch"].update(conditions={"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "Condition", "code": {"coding": [{"system": "http://snomed.info/sct", "code": "279039007"}]},
        "onsetDateTime": "yesterday", "clinicalStatus": "active", "verificationStatus": {"coding": [None]}}}]}),
    lambda r: r["prefetch"].update(observations={"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
        "valueQuantity": {"value": "hot", "unit": 5}, "effectiveDateTime": 20250101}}]}),
    lambda r: r["prefetch"].update(medicationStatements={"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "MedicationStatement", "status": "active", "medicationCodeableConcept": "ibuprofen",
        "effectivePeriod": {"start": "2025-02-30", "end": None}}}]}),
    lambda r: r.update(fhirServer="http://127.0.0.1:1/fhir", fhirAuthorization={"access_token": 5}),
], ids=lambda f: None)
def test_hostile_but_valid_json_never_gets_a_500(client, mutate):
    request = vignette_request()
    mutate(request)
    response = post(client, SELECT, request)
    assert response.status_code in (200, 400, 412), response.text
    assert response.headers["content-type"].startswith("application/json")
    if response.status_code == 200:
        assert_conformant_200(response)


# --- response JSON rules (GEN-01/02, RSP-01/03) ------------------------------------------------------------


def every_200_request() -> Iterator[tuple[str, str, dict]]:
    for vignette_id in VIGNETTES:
        yield vignette_id + "/select", SELECT, vignette_request(vignette_id)
        yield vignette_id + "/sign", SIGN, vignette_request(vignette_id, hook="order-sign")
    yield "sandbox-first", SELECT, sandbox_first_order_select()
    yield "sandbox-sciatica", SELECT, sandbox_order_select()
    yield "sandbox-ces", SELECT, sandbox_order_select(reason="192970008")
    incomplete = vignette_request()
    incomplete["prefetch"]["observations"] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    yield "data-incomplete", SELECT, incomplete


@pytest.mark.parametrize("name, path, request_body", list(every_200_request()), ids=lambda v: v if isinstance(v, str) and "/" not in v[:1] else "")
def test_every_200_body_has_no_null_or_empty_value(client, name, path, request_body):
    body = assert_conformant_200(post(client, path, request_body))
    for card in body["cards"]:
        assert len(card["summary"]) < 140
        assert card["indicator"] in ("info", "warning", "critical")
        assert card["source"]["label"] and card["source"]["topic"]["code"]
        if "suggestions" in card:
            assert card["selectionBehavior"] in ("at-most-one", "any")
        for reason in card.get("overrideReasons", []):
            assert reason["code"] and reason["system"] and reason["display"]


@pytest.mark.parametrize("vignette_id", [v for v in VIGNETTES])
def test_public_vignettes_get_the_expected_card(client, vignette_id):
    vignette = VIGNETTES[vignette_id]
    expected = [EXPECTED_TOPIC[name] for name in vignette["expected"]["cards"]]
    for hook, path in (("order-select", SELECT), ("order-sign", SIGN)):
        assert topics(post(client, path, vignette_request(vignette_id, hook))) == expected, hook


def test_incomplete_data_gives_the_data_incomplete_card_not_the_warning(client):
    request = vignette_request()
    request["prefetch"]["observations"] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    assert topics(post(client, SELECT, request)) == [("imaging-data-incomplete", "info")]


def test_card_uuids_are_stable_per_hook_instance_and_differ_between_calls(client):
    request = vignette_request()
    first = post(client, SELECT, request).json()["cards"][0]["uuid"]
    assert post(client, SELECT, request).json()["cards"][0]["uuid"] == first
    request["hookInstance"] = "a-different-hook-instance"
    assert post(client, SELECT, request).json()["cards"][0]["uuid"] != first


def every_kind_of_response(client: TestClient) -> Iterator[tuple[str, Any]]:
    yield "discovery", client.get("/cds-services")
    yield "health", client.get("/healthz")
    yield "200", post(client, SELECT, vignette_request())
    yield "400", post(client, SELECT, b"{")
    yield "404-service", post(client, "/cds-services/nope", {})
    yield "404-path", client.get("/nope")
    yield "405", client.get(SELECT)
    request = vignette_request()
    del request["prefetch"]
    yield "412", post(client, SELECT, request)
    yield "feedback-200", post(client, SELECT + "/feedback", {"feedback": [
        {"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2025-03-01T10:00:00Z"}]})
    yield "feedback-400", post(client, SELECT + "/feedback", {"feedback": []})


def test_every_response_is_json_with_a_json_content_type(client):
    seen = set()
    for name, response in every_kind_of_response(client):
        seen.add(response.status_code)
        assert response.headers["content-type"].split(";")[0].strip() == "application/json", name
        json.loads(response.content)
    assert {200, 400, 404, 405, 412} <= seen


def test_413_is_json(tmp_path):
    with TestClient(create_app(app_settings(tmp_path, CDS_MAX_BODY_BYTES="1000")), raise_server_exceptions=False) as small:
        response = post(small, SELECT, b"x" * 2000)
    assert_outcome(response, 413)


# --- 413 (CDS_MAX_BODY_BYTES) ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_client(tmp_path_factory) -> Iterator[TestClient]:
    app = create_app(app_settings(tmp_path_factory.mktemp("small"), CDS_MAX_BODY_BYTES="20000"))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize("path", [SELECT, SELECT + "/feedback", "/cds-services/nope"])
def test_body_over_the_limit_with_content_length_is_413(small_client, path):
    body = json.dumps({**vignette_request(), "padding": "x" * 30000})
    body = assert_outcome(post(small_client, path, body), 413, mentions="20000")
    assert body["issue"][0]["code"] == "too-costly"


def test_chunked_body_over_the_limit_is_413(small_client):
    def chunks() -> Iterator[bytes]:
        yield b'{"hook": "order-select", "padding": "'
        for _ in range(10):
            yield b"x" * 4000
        yield b'"}'

    response = small_client.post(SELECT, content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers  # really sent chunked
    assert_outcome(response, 413)


def test_body_under_the_limit_is_processed(small_client):
    request = vignette_request()
    assert len(json.dumps(request)) < 20000
    assert topics(post(small_client, SELECT, request)) == [("imaging-not-indicated", "warning")]


# --- CORS (SEC-14) ---------------------------------------------------------------------------------------------


def preflight(client: TestClient, path: str, origin: str = "http://localhost:8080", headers: str = "authorization,content-type"):
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "POST" if path != "/cds-services" else "GET",
                                         "Access-Control-Request-Headers": headers})


@pytest.mark.parametrize("path", ["/cds-services", SELECT, SIGN, SELECT + "/feedback"])
def test_preflight_is_answered_in_open_mode(client, path):
    response = preflight(client, path)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "http://localhost:8080")
    methods = {m.strip() for m in response.headers["access-control-allow-methods"].split(",")}
    assert {"GET", "POST", "OPTIONS"} <= methods
    allowed_headers = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed_headers


def test_cors_headers_on_actual_responses_including_errors(client):
    origin = {"Origin": "http://localhost:8080"}
    for response in (client.get("/cds-services", headers=origin),
                     client.post(SELECT, content=json.dumps(vignette_request()), headers=origin),
                     client.post(SELECT, content=b"{", headers=origin)):
        assert "access-control-allow-origin" in response.headers, response.status_code


def test_413_carries_cors_headers_so_a_browser_can_read_it(small_client):
    response = small_client.post(SELECT, content=b"x" * 30000, headers={"Origin": "http://localhost:8080"})
    assert response.status_code == 413
    assert "access-control-allow-origin" in response.headers


@pytest.fixture(scope="module")
def restricted_client(tmp_path_factory) -> Iterator[TestClient]:
    settings = app_settings(tmp_path_factory.mktemp("cors"), CDS_CORS_ORIGINS="https://ehr.example.org")
    assert not settings.auth_required
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize("path", ["/cds-services", SELECT, SELECT + "/feedback"])
def test_configured_cors_origins_allow_only_those_origins(restricted_client, path):
    allowed = preflight(restricted_client, path, origin="https://ehr.example.org")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://ehr.example.org"
    refused = preflight(restricted_client, path, origin="https://attacker.example")
    assert refused.headers.get("access-control-allow-origin") in (None, "")
    assert refused.status_code >= 400
    response = restricted_client.get("/cds-services", headers={"Origin": "https://attacker.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


# --- feedback (FB-01..07) ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shown_card(client) -> dict:
    return post(client, SELECT, vignette_request("LBP-V02")).json()["cards"][0]


def test_valid_feedback_is_200(client, shown_card):
    suggestion = shown_card["suggestions"][0]["uuid"]
    payloads = [
        {"card": shown_card["uuid"], "outcome": "accepted", "acceptedSuggestions": [{"id": suggestion}],
         "outcomeTimestamp": "2025-03-01T10:00:00Z"},
        {"card": shown_card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2025-03-01T10:01:00.123Z",
         "overrideReason": {"reason": {"code": "red-flag-not-in-chart",
                                       "system": "https://lumbar-imaging-cds.example.org/fhir/CodeSystem/override-reason"}}},
        {"card": shown_card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2025-03-01T10:02:00+00:00",
         "overrideReason": {"userComment": "Patient reports saddle numbness today."}},
        {"card": shown_card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2025-03-01T10:03:00Z"},
        {"card": "an-unknown-card", "outcome": "overridden", "outcomeTimestamp": "2025-03-01T10:04:00Z"},
    ]
    for item in payloads:
        response = post(client, SELECT + "/feedback", {"feedback": [item]})
        assert response.status_code == 200, (item, response.text)
        assert response.headers["content-type"].startswith("application/json")
    response = post(client, SELECT + "/feedback", {"feedback": payloads})  # several items, repeats: still 200
    assert response.status_code == 200
    assert response.json()["duplicates"] == len(payloads)


@pytest.mark.parametrize("timestamp", ["2025-03-01T10:00:00.000Z", "2025-03-01T10:00:00.123456789Z", "2025-03-01T10:00Z",
                                       "2025-03-01T10:00:00", "2025-03-01 10:00:00+02:00", "9999-12-31T23:59:59Z"])
def test_feedback_timestamps_clients_send_are_accepted(client, timestamp):
    item = {"card": "c-" + timestamp, "outcome": "overridden", "outcomeTimestamp": timestamp}
    response = post(client, SELECT + "/feedback", {"feedback": [item]})
    assert response.status_code == 200, response.text
    assert response.json()["stored"] == 1


def test_sandbox_feedback_shape_is_accepted(client, shown_card):
    body = {"feedback": [{"card": shown_card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2025-03-01T10:05:00.000Z",
                          "overrideReason": {"reason": {"code": "red-flag", "system": "http://example.org/override"}}}]}
    assert post(client, SIGN + "/feedback", body).status_code == 200


GOOD_ITEM = {"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2025-03-01T10:00:00Z"}


@pytest.mark.parametrize("body, field", [
    ({"feedback": [{k: v for k, v in GOOD_ITEM.items() if k != "card"}]}, "feedback[0].card"),
    ({"feedback": [{**GOOD_ITEM, "card": ""}]}, "feedback[0].card"),
    ({"feedback": [{**GOOD_ITEM, "card": 17}]}, "feedback[0].card"),
    ({"feedback": [{k: v for k, v in GOOD_ITEM.items() if k != "outcome"}]}, "feedback[0].outcome"),
    ({"feedback": [{**GOOD_ITEM, "outcome": "dismissed"}]}, "feedback[0].outcome"),
    ({"feedback": [{**GOOD_ITEM, "outcome": "Accepted"}]}, "feedback[0].outcome"),
    ({"feedback": [{**GOOD_ITEM, "outcome": "accepted"}]}, "feedback[0].acceptedSuggestions"),
    ({"feedback": [{**GOOD_ITEM, "outcome": "accepted", "acceptedSuggestions": []}]}, "feedback[0].acceptedSuggestions"),
    ({"feedback": [{**GOOD_ITEM, "outcome": "accepted", "acceptedSuggestions": ["s1"]}]}, "feedback[0].acceptedSuggestions"),
    ({"feedback": [{**GOOD_ITEM, "outcome": "accepted", "acceptedSuggestions": [{"uuid": "s1"}]}]}, "feedback[0].acceptedSuggestions"),
    ({"feedback": [{k: v for k, v in GOOD_ITEM.items() if k != "outcomeTimestamp"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**GOOD_ITEM, "outcomeTimestamp": "yesterday"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**GOOD_ITEM, "outcomeTimestamp": "2025-13-45T99:00:00Z"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**GOOD_ITEM, "outcomeTimestamp": 1740823200}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**GOOD_ITEM, "outcomeTimestamp": "2025-03-01"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**GOOD_ITEM, "outcomeTimestamp": "2025-W09-6"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**GOOD_ITEM, "outcomeTimestamp": "2025-03-01T10:00:00Z\u0000"}]}, "feedback[0].outcomeTimestamp"),
    # valid ISO 8601 but not expressible in UTC: was an OverflowError (500)
    ({"feedback": [{**GOOD_ITEM, "outcomeTimestamp": "9999-12-31T23:59:59-12:00"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**GOOD_ITEM, "outcomeTimestamp": "0001-01-01T00:00:00+14:00"}]}, "feedback[0].outcomeTimestamp"),
    # values a database text column cannot hold or that are not a Coding: were a 503 "retry" from the store
    ({"feedback": [{**GOOD_ITEM, "overrideReason": {"reason": {"code": "x", "system": 7}}}]}, "feedback[0].overrideReason.reason"),
    ({"feedback": [{**GOOD_ITEM, "overrideReason": {"reason": {"code": "x", "system": "http://x", "display": []}}}]},
     "feedback[0].overrideReason.reason"),
    ({"feedback": [{**GOOD_ITEM, "overrideReason": {"reason": {"code": "", "system": "http://x"}}}]}, "feedback[0].overrideReason.reason"),
    ({"feedback": [{**GOOD_ITEM, "overrideReason": {"userComment": "a\u0000b"}}]}, "feedback[0].overrideReason.userComment"),
    ({"feedback": [{**GOOD_ITEM, "card": "c\u00001"}]}, "feedback[0].card"),
    ({"feedback": [{**GOOD_ITEM, "outcome": "accepted", "acceptedSuggestions": [{"id": ""}]}]}, "feedback[0].acceptedSuggestions"),
    ({"feedback": [{**GOOD_ITEM, "overrideReason": "patient preference"}]}, "feedback[0].overrideReason"),
    ({"feedback": [{**GOOD_ITEM, "overrideReason": {}}]}, "feedback[0].overrideReason"),
    ({"feedback": [{**GOOD_ITEM, "overrideReason": {"reason": {"system": "http://x"}}}]}, "feedback[0].overrideReason.reason"),
    ({"feedback": [{**GOOD_ITEM, "overrideReason": {"userComment": 5}}]}, "feedback[0].overrideReason.userComment"),
    ({"feedback": [GOOD_ITEM, "not-an-object"]}, "feedback[1]"),
    ({"feedback": []}, "feedback"),
    ({"feedback": GOOD_ITEM}, "feedback"),
    ({"feedback": None}, "feedback"),
    ({}, "feedback"),
    ({"card": "c1", "outcome": "overridden"}, "feedback"),
])
def test_invalid_feedback_is_400_naming_the_field(client, body, field):
    assert_outcome(post(client, SELECT + "/feedback", body), 400, field)


@pytest.mark.parametrize("body", [b"", b"[]", b'"feedback"', b"null", b"{", b"[" * 5000 + b"]" * 5000])
def test_feedback_body_that_is_not_a_json_object_is_400(client, body):
    assert_outcome(post(client, SELECT + "/feedback", body), 400)


# --- health --------------------------------------------------------------------------------------------------------


def test_health_reports_status_and_the_development_mode_warning(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == "ok"
    assert body["authentication"].startswith("disabled")
    assert any("Authentication is disabled" in w for w in body["warnings"])
    assert set(body["services"]) == {SELECT_ID, SIGN_ID}
    assert empties(body) == []


# --- a client that hangs up mid-body ----------------------------------------------------------------------------


def test_client_disconnect_mid_body_ends_quietly(tmp_path, caplog):
    """No 'unexpected' error, no traceback: the ASGI app returns without answering nobody."""
    import asyncio

    app = create_app(app_settings(tmp_path))
    messages = [{"type": "http.request", "body": b'{"hook": "order-sel', "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": SELECT, "raw_path": SELECT.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    with caplog.at_level("INFO"):
        asyncio.run(app(scope, receive, send))
    assert sent == []
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert "disconnected" in caplog.text


# --- real faults (ERR-02) -----------------------------------------------------------------------------------------


def test_internal_error_is_a_generic_json_500_without_details(tmp_path, monkeypatch):
    app = create_app(app_settings(tmp_path))

    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail /work/main/cards/engine.py")

    monkeypatch.setattr(app.state.cds.engine, "evaluate", explode)
    with TestClient(app, raise_server_exceptions=False) as faulty:
        response = post(faulty, SELECT, vignette_request())
    body = assert_outcome(response, 500)
    assert body["issue"][0]["code"] == "exception"
    assert "secret" not in response.text and "Traceback" not in response.text and "engine.py" not in response.text


@pytest.mark.parametrize("method, path", [("GET", "/cds-services/"), ("POST", SELECT + "/"), ("POST", SELECT + "/feedback/")])
def test_trailing_slash_gets_json_not_an_empty_redirect(method, path, tmp_path):
    with TestClient(create_app(app_settings(tmp_path)), raise_server_exceptions=False, follow_redirects=False) as no_follow:
        response = no_follow.request(method, path, content=json.dumps(vignette_request()) if method == "POST" else None)
    assert response.status_code != 307
    assert response.headers["content-type"].startswith("application/json")


# --- a large but legal prefetch ----------------------------------------------------------------------------------


def test_thousands_of_matching_observations_are_evaluated_in_linear_time(client):
    """A guard against quadratic work (12,000 readings took minutes), not a speed test: the bound is
    far above the linear cost on a loaded machine; speed itself is measured by bench/run.py."""
    import time

    request = vignette_request("LBP-V17")  # fever reading: a red flag, every reading is evidence
    reading = request["prefetch"]["observations"]["entry"][0]["resource"]
    request["prefetch"]["observations"]["entry"] = [{"resource": {**reading, "id": f"t{i}"}} for i in range(12000)]
    body = json.dumps(request)
    assert len(body) < 5_000_000
    started = time.perf_counter()
    response = post(client, SELECT, body)
    elapsed = time.perf_counter() - started
    assert topics(response) == [("imaging-indicated", "info")]
    assert elapsed < 10, f"{elapsed:.1f} s"


def test_invalid_utf8_is_a_400_not_a_500(tmp_path):
    with TestClient(create_app(app_settings(tmp_path)), raise_server_exceptions=False) as client:
        response = client.post(SELECT, content=b'{"hook": "\xff\xfe"}')
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"
