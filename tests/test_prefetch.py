"""Prefetch resolution per key (checklist PF-04..07): present, null, OperationOutcome, absent, extra keys, paging.

First resolve_prefetch itself, with a recording fake FHIR server (httpx.MockTransport) so "no
request was made" is checked rather than assumed; then what each state does to the HTTP answer.
"""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import date
from typing import Any, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from cds_service import vignettes
from cds_service.app import create_app
from cds_service.discovery import load_services
from cds_service.fhir_client import FhirClient
from cds_service.prefetch import PatientData, resolve_prefetch
from cds_service.protocol import parse_hook_request
from fhir_mappings.knowledge import Knowledge
from server_support import DEFAULT_TODAY, SELECT_ID, FakeFhir, app_settings, load_vignettes, searchset

TODAY = date.fromisoformat(DEFAULT_TODAY)
SELECT = f"/cds-services/{SELECT_ID}"
FHIR = "http://127.0.0.1:9/fhir"  # loopback (allowed by default); every request is answered by the fake
TOKEN = "prefetch-test-token"
V01 = load_vignettes()["LBP-V01"]  # low back pain 10 days, no red flags: the warning when all data is read
V17 = load_vignettes()["LBP-V17"]  # fever: imaging indicated
SERVICE = load_services(Knowledge.load().codes)[SELECT_ID]
KEY_TYPES = {"patient": "Patient", "conditions": "Condition", "observations": "Observation",
             "medicationRequests": "MedicationRequest", "medicationStatements": "MedicationStatement",
             "procedures": "Procedure", "serviceRequests": "ServiceRequest"}
OUTCOME = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout", "diagnostics": "backend timed out"}]}


def condition(cid: str = "c-extra", code: str = "279039007") -> dict:
    return {"resourceType": "Condition", "id": cid, "subject": {"reference": "Patient/lbp-v01"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]},
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}}


def v01_request(**changes: Any) -> dict:
    request = vignettes.hook_request(V01, TODAY)
    request.update(changes)
    return request


def resolve(request: dict, fake: FakeFhir | None = None) -> PatientData:
    hook_request = parse_hook_request(json.dumps(request).encode(), "order-select")

    async def run() -> PatientData:
        fhir = FhirClient(app_settings("/tmp"), transport=fake.transport) if fake else None
        try:
            return await resolve_prefetch(hook_request, SERVICE, fhir)
        finally:
            if fhir:
                await fhir.aclose()

    return asyncio.run(run())


def ids(data: PatientData) -> set[str]:
    return {f"{r['resourceType']}/{r.get('id')}" for r in data.resources}


# --- resolve_prefetch, key by key -------------------------------------------------------------------------


def test_present_bundle_and_bare_resource_are_used():
    request = v01_request()
    data = resolve(request)
    assert "Patient/lbp-v01" in ids(data)  # bare resource
    assert "Condition/lbp-v01-condition-0" in ids(data)  # searchset entry
    assert data.missing == [] and data.unreadable == {}


def test_bare_resource_under_a_search_key_is_used():
    request = v01_request()
    request["prefetch"]["conditions"] = request["prefetch"]["conditions"]["entry"][0]["resource"]
    data = resolve(request)
    assert "Condition/lbp-v01-condition-0" in ids(data) and data.unreadable == {} and data.missing == []


@pytest.mark.parametrize("key", sorted(KEY_TYPES))
def test_null_means_no_data_and_is_never_refetched(key):
    request = v01_request(fhirServer=FHIR)
    request["prefetch"] = {k: (None if k == key else v) for k, v in request["prefetch"].items()}
    fake = FakeFhir()
    data = resolve(request, fake)
    assert fake.requests == []
    assert KEY_TYPES[key] not in data.unreadable and KEY_TYPES[key] not in data.missing
    assert not any(r["resourceType"] == KEY_TYPES[key] for r in data.resources)


def test_empty_searchset_means_no_data_and_is_not_refetched():
    request = v01_request(fhirServer=FHIR)
    request["prefetch"]["procedures"] = {"resourceType": "Bundle", "type": "searchset", "total": 0}
    fake = FakeFhir()
    data = resolve(request, fake)
    assert fake.requests == [] and data.unreadable == {} and data.missing == []


@pytest.mark.parametrize("key", sorted(KEY_TYPES))
def test_bare_operation_outcome_makes_the_type_unreadable_without_refetch(key):
    request = v01_request(fhirServer=FHIR)
    request["prefetch"][key] = OUTCOME
    fake = FakeFhir()
    data = resolve(request, fake)
    assert data.unreadable == {KEY_TYPES[key]: "OperationOutcome: timeout"}
    assert fake.requests == []  # an outcome is an answer: not blindly refetched


def test_operation_outcome_error_entry_in_a_bundle_makes_the_type_unreadable_but_keeps_the_rest():
    request = v01_request()
    bundle = request["prefetch"]["conditions"]
    bundle["entry"].append({"resource": {**OUTCOME, "issue": [{"severity": "error", "code": "too-costly"}]}, "search": {"mode": "outcome"}})
    data = resolve(request)
    assert data.unreadable == {"Condition": "OperationOutcome: too-costly"}
    assert "Condition/lbp-v01-condition-0" in ids(data)


def test_warning_outcome_entry_in_a_bundle_is_not_an_error():
    request = v01_request()
    request["prefetch"]["conditions"]["entry"].append(
        {"resource": {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "informational"}]},
         "search": {"mode": "outcome"}})
    data = resolve(request)
    assert data.unreadable == {} and "Condition/lbp-v01-condition-0" in ids(data)


@pytest.mark.parametrize("value", ["Condition?patient=lbp-v01", 17, [condition()], {}, {"resourceType": 5}, True])
def test_value_that_is_not_a_fhir_resource_is_unreadable(value):
    request = v01_request()
    request["prefetch"]["conditions"] = value
    assert set(resolve(request).unreadable) == {"Condition"}


def test_absent_without_fhir_server_is_missing():
    request = v01_request()
    del request["prefetch"]["observations"], request["prefetch"]["patient"]
    data = resolve(request)
    assert sorted(data.missing) == ["Observation", "Patient"] and data.unreadable == {}


def test_absent_with_fhir_server_is_fetched_with_the_token():
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/Patient/lbp-v01"):
            return httpx.Response(200, json={"resourceType": "Patient", "id": "lbp-v01", "birthDate": "1986-11-21"})
        return httpx.Response(200, json=searchset())

    request = v01_request(fhirServer=FHIR, fhirAuthorization={"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300,
                                                              "scope": "patient/*.read", "subject": "cds"})
    del request["prefetch"]["observations"], request["prefetch"]["patient"]
    fake = FakeFhir(answer)
    data = resolve(request, fake)
    assert sorted(fake.types()) == ["Observation", "Patient"]
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fake.requests)
    observation_query = next(r for r in fake.requests if "Observation" in r.url.path)
    assert observation_query.url.params["patient"] == "lbp-v01" and "8310-5" in observation_query.url.params["code"]
    assert sorted(data.fetched_keys) == ["observations", "patient"]
    assert data.missing == [] and data.unreadable == {} and "Patient/lbp-v01" in ids(data)


def test_absent_with_a_failing_fhir_server_is_unreadable():
    request = v01_request(fhirServer=FHIR)
    del request["prefetch"]["observations"]
    data = resolve(request, FakeFhir(lambda r: httpx.Response(500, json=OUTCOME)))
    assert data.unreadable == {"Observation": "HTTP 500"} and data.missing == []


def test_fhir_server_not_allowed_is_unreadable_without_a_request():
    request = v01_request(fhirServer="https://ehr.example.org/fhir")  # not allow-listed (default: loopback only)
    del request["prefetch"]["observations"]
    fake = FakeFhir()
    data = resolve(request, fake)
    assert fake.requests == [] and data.unreadable == {"Observation": "server not allowed"}


def test_resources_under_unknown_key_names_are_used():
    request = v01_request()
    request["prefetch"]["lbpConditions"] = request["prefetch"].pop("conditions")  # a client with its own key names
    request["prefetch"]["problemList"] = condition("c-extra")
    data = resolve(request)
    assert {"Condition/lbp-v01-condition-0", "Condition/c-extra"} <= ids(data)
    assert "Condition" not in data.missing and data.unreadable == {}


def test_outcome_under_an_unknown_key_is_ignored():
    request = v01_request()
    request["prefetch"]["somethingElse"] = OUTCOME
    data = resolve(request)
    assert data.unreadable == {} and data.missing == []


def test_duplicates_across_keys_are_counted_once():
    request = v01_request()
    request["prefetch"]["copy"] = copy.deepcopy(request["prefetch"]["conditions"])
    data = resolve(request)
    assert sum(1 for r in data.resources if r.get("id") == "lbp-v01-condition-0") == 1


# --- paging (PF-06) --------------------------------------------------------------------------------------------


def test_next_link_to_the_bare_fhir_server_base_is_no_page():
    request = v01_request(fhirServer=FHIR)
    request["prefetch"]["conditions"] = searchset(condition("c1"), next_url=FHIR)
    fake = FakeFhir()
    data = resolve(request, fake)
    assert fake.requests == [] and "Condition" in data.unreadable


def test_next_link_without_fhir_server_is_unreadable():
    request = v01_request()
    request["prefetch"]["conditions"] = searchset(condition("c1"), next_url=FHIR + "/Condition?patient=lbp-v01&_page=2")
    data = resolve(request)
    assert "Condition" in data.unreadable and "Condition/c1" in ids(data)


def test_next_link_to_another_server_is_not_followed():
    request = v01_request(fhirServer=FHIR)
    request["prefetch"]["conditions"] = searchset(condition("c1"), next_url="http://127.0.0.2:9/fhir/Condition?page=2")
    fake = FakeFhir()
    data = resolve(request, fake)
    assert fake.requests == [] and "Condition" in data.unreadable


def test_next_link_with_an_unreachable_fhir_server_is_unreadable():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    request = v01_request(fhirServer=FHIR)
    request["prefetch"]["conditions"] = searchset(condition("c1"), next_url=FHIR + "/Condition?patient=lbp-v01&_page=2")
    data = resolve(request, FakeFhir(refuse))
    assert data.unreadable.get("Condition", "").startswith("request failed") and "Condition/c1" in ids(data)


@pytest.mark.parametrize("next_url", [FHIR + "/Condition?patient=lbp-v01&_page=2", FHIR + "/Condition/_search?page=2",
                                      FHIR + "?_getpages=abc&_getpagesoffset=1"], ids=["path", "search-path", "hapi-base-query"])
def test_next_link_on_the_fhir_server_is_followed_with_the_token(next_url):
    request = v01_request(fhirServer=FHIR, fhirAuthorization={"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300,
                                                              "scope": "patient/*.read", "subject": "cds"})
    request["prefetch"]["conditions"] = searchset(condition("c1"), next_url=next_url)
    fake = FakeFhir(lambda r: httpx.Response(200, json=searchset(condition("c2"))))
    data = resolve(request, fake)
    assert len(fake.requests) == 1
    followed, wanted = fake.requests[0].url, httpx.URL(next_url)
    assert (followed.host, followed.port, followed.path.rstrip("/"), followed.params) == (wanted.host, wanted.port, wanted.path.rstrip("/"), wanted.params)
    assert fake.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert {"Condition/c1", "Condition/c2"} <= ids(data) and data.unreadable == {}


# --- what each state does to the answer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_fhir() -> FakeFhir:
    return FakeFhir()


@pytest.fixture(scope="module")
def client(tmp_path_factory, fake_fhir) -> Iterator[TestClient]:
    app = create_app(app_settings(tmp_path_factory.mktemp("prefetch")), fhir_transport=fake_fhir.transport)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture()
def fhir_requests(fake_fhir) -> list[httpx.Request]:
    fake_fhir.requests.clear()
    fake_fhir.answer = lambda request: httpx.Response(200, json=searchset())
    return fake_fhir.requests


def card_types(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [card["source"]["topic"]["code"] for card in response.json()["cards"]]


def test_vignette_prefetch_with_nulls_gives_the_warning_without_any_fhir_request(client, fhir_requests):
    request = v01_request(fhirServer=FHIR)
    assert any(value is None for value in request["prefetch"].values())
    assert card_types(client.post(SELECT, json=request)) == ["imaging-not-indicated"]
    assert fhir_requests == []


@pytest.mark.parametrize("key", sorted(KEY_TYPES))
@pytest.mark.parametrize("shape", ["bare", "bundle-entry"])
def test_unreadable_key_gives_the_data_incomplete_card_instead_of_the_warning(client, fhir_requests, key, shape):
    request = v01_request(fhirServer=FHIR)
    if shape == "bare":
        request["prefetch"][key] = OUTCOME
    else:
        request["prefetch"][key] = {"resourceType": "Bundle", "type": "searchset",
                                    "entry": [{"resource": OUTCOME, "search": {"mode": "outcome"}}]}
    response = client.post(SELECT, json=request)
    assert card_types(response) == ["imaging-data-incomplete"]
    assert response.json()["cards"][0]["indicator"] == "info"
    assert fhir_requests == []


def test_unreadable_data_does_not_hide_a_red_flag(client, fhir_requests):
    request = vignettes.hook_request(V17, TODAY)
    request["prefetch"]["procedures"] = OUTCOME
    assert card_types(client.post(SELECT, json=request)) == ["imaging-indicated"]


def test_absent_keys_are_fetched_from_fhir_server_and_give_the_same_card(client, fhir_requests, fake_fhir):
    full = v01_request()
    record = {k: v for k, v in full["prefetch"].items()}

    def answer(request: httpx.Request) -> httpx.Response:
        resource_type = request.url.path.rsplit("/fhir/", 1)[-1].split("/")[0]
        key = next(k for k, t in KEY_TYPES.items() if t == resource_type)
        value = record[key]
        if key == "patient":
            return httpx.Response(200, json=value)
        return httpx.Response(200, json=value or searchset())

    fake_fhir.answer = answer
    request = v01_request(fhirServer=FHIR)
    del request["prefetch"]
    assert card_types(client.post(SELECT, json=request)) == ["imaging-not-indicated"]
    assert sorted(fake_fhir.types()) == sorted(KEY_TYPES.values())


def test_absent_key_without_fhir_server_is_412_naming_it(client):
    request = v01_request()
    del request["prefetch"]["medicationRequests"]
    response = client.post(SELECT, json=request)
    assert response.status_code == 412
    assert response.json()["resourceType"] == "OperationOutcome"
    assert "MedicationRequest" in response.json()["issue"][0]["diagnostics"]


def test_key_renamed_by_the_client_still_counts(client):
    request = v01_request()
    request["prefetch"]["problems"] = request["prefetch"].pop("conditions")
    assert card_types(client.post(SELECT, json=request)) == ["imaging-not-indicated"]


def test_next_link_without_fhir_server_gives_the_data_incomplete_card(client):
    request = v01_request()
    request["prefetch"]["conditions"]["link"] = [{"relation": "next", "url": FHIR + "/Condition?patient=lbp-v01&_page=2"}]
    assert card_types(client.post(SELECT, json=request)) == ["imaging-data-incomplete"]


def test_next_link_followed_over_http(client, fhir_requests, fake_fhir):
    fake_fhir.answer = lambda request: httpx.Response(200, json=searchset(condition("c-page2", code="192970008")))  # cauda equina
    request = v01_request(fhirServer=FHIR)
    request["prefetch"]["conditions"]["link"] = [{"relation": "next", "url": FHIR + "/Condition?patient=lbp-v01&_page=2"}]
    assert card_types(client.post(SELECT, json=request)) == ["cauda-equina-emergency"]
    assert len(fhir_requests) == 1


# --- the access token and the patient stay out of logs and storage (PF-10, SEC-16) ----------------------------


def test_access_token_and_patient_id_are_never_logged_or_stored(tmp_path, caplog):
    fake = FakeFhir(lambda request: httpx.Response(500, json=OUTCOME))
    settings = app_settings(tmp_path)
    request = v01_request(fhirServer=FHIR, fhirAuthorization={"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300,
                                                              "scope": "patient/*.read", "subject": "cds"})
    request["context"]["patientId"] = request["prefetch"]["patient"]["id"] = "patient-7c1e9a"
    del request["prefetch"]["observations"]
    with caplog.at_level("DEBUG"), TestClient(create_app(settings, fhir_transport=fake.transport)) as client:
        response = client.post(SELECT, json=request)
        bad = client.post(SELECT, json={**request, "fhirServer": None})  # 400: fhirAuthorization without fhirServer
    assert response.status_code == 200 and bad.status_code == 400
    assert fake.requests and all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fake.requests)
    assert TOKEN not in caplog.text and "patient-7c1e9a" not in caplog.text
    assert TOKEN not in response.text + bad.text
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("service.db*"))
    assert stored and TOKEN.encode() not in stored and b"patient-7c1e9a" not in stored
