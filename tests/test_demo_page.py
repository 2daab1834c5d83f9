"""The /demo page's server side: the patient list and records, the synthetic record files and their
date shifting, the wiring (redirect, CDS_DEMO=false), the assets and their CSP, and every demo patient
through the real service, with the request built as the page builds it (prefetch filled from the
discovery templates). The page itself runs in Chromium in test_demo_browser.py."""

from __future__ import annotations

import json
import re
import uuid
from datetime import date, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle

from cds_service import demo
from cds_service.app import create_app
from cds_service.settings import Settings

TODAY = date(2026, 3, 15)
STATIC = Path(demo.__file__).parent / "static" / "demo"

# The vignettes name their expected cards with the clinical team's first ids.
VIGNETTE_CARDS = {
    "early-imaging-warning": "imaging-not-indicated",
    "red-flag-justified-info": "imaging-indicated",
    "cauda-equina-critical": "cauda-equina-emergency",
}
DATE_FIELD = re.compile(r"^\d{4}-\d{2}(-\d{2})?")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    db = tmp_path_factory.mktemp("demo") / "demo.db"
    app = create_app(Settings(database_url=f"sqlite:///{db}", today=TODAY))
    with TestClient(app) as test_client:
        yield test_client


def expected_cards() -> dict[str, list[str]]:
    """Patient id -> expected card types for the scenario's order: the vignettes' own expectation,
    or the record file's `demo-expected-card`."""
    expected = {}
    for scenario in json.loads(demo.SCENARIOS_FILE.read_text(encoding="utf-8")):
        expected[scenario["id"].lower()] = [VIGNETTE_CARDS[c] for c in scenario["expected"]["cards"]]
    for path in sorted(demo.PATIENTS_DIR.glob("*.json")):
        bundle = json.loads(path.read_text(encoding="utf-8"))
        card = next(e["valueCode"] for e in bundle["meta"]["extension"] if e["url"].endswith("/demo-expected-card"))
        expected[bundle["entry"][0]["resource"]["id"]] = [card]
    return expected


# -- the request as the page builds it ---------------------------------------------------------


def fill(template: str, context: dict) -> str:
    return re.sub(r"\{\{\s*context\.(\w+)\s*\}\}", lambda m: context[m.group(1)], template)


def run_query(query: str, resources: list[dict], patient_id: str):
    path, _, params = query.partition("?")
    kind, _, resource_id = path.partition("/")
    if resource_id and not params:
        return next((r for r in resources if r["resourceType"] == kind and r["id"] == resource_id), None)
    matches = [r for r in resources if r["resourceType"] == kind
               and (r.get("subject") or r.get("patient") or {}).get("reference") == f"Patient/{patient_id}"]
    if not matches:
        return None
    return {"resourceType": "Bundle", "type": "searchset", "total": len(matches),
            "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": r, "search": {"mode": "match"}} for r in matches]}


def hook_call(client, hook: str, patient: dict, order: dict, failing_key: str | None = None) -> tuple[dict, dict]:
    """(request, response JSON) of one hook call built like demo.js builds it."""
    services = {s["hook"]: s for s in client.get("/cds-services").json()["services"]}
    service = services[hook]
    record = client.get(f"/demo/patients/{patient['id']}").json()
    resources = [e["resource"] for e in record["entry"]]
    draft = {"resourceType": "ServiceRequest", "id": "demo-draft-1", "status": "draft", "intent": "order",
             "code": {"coding": [order], "text": order.get("display")}, "subject": {"reference": f"Patient/{patient['id']}"}}
    context = {"userId": "Practitioner/demo-clinician", "patientId": patient["id"],
               "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": draft}]}}
    if hook == "order-select":
        context["selections"] = ["ServiceRequest/demo-draft-1"]
    prefetch = {key: run_query(fill(template, context), resources, patient["id"]) for key, template in service["prefetch"].items()}
    if failing_key:
        prefetch[failing_key] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}
    request = {"hookInstance": str(uuid.uuid4()), "hook": hook, "context": context, "prefetch": prefetch}
    response = client.post(f"/cds-services/{service['id']}", json=request)
    assert response.status_code == 200, response.text
    return request, response.json()


def card_types(body: dict) -> list[str]:
    return [card["source"]["topic"]["code"] for card in body["cards"]]


# -- the patient list and records --------------------------------------------------------------


def test_patient_list_has_the_records_then_the_vignettes(client):
    response = client.get("/demo/patients")
    assert response.status_code == 200
    patients = response.json()
    assert isinstance(patients, list)
    records = [p for p in patients if p["kind"] == "record"]
    vignettes = [p for p in patients if p["kind"] == "vignette"]
    assert 2 <= len(records) <= 3 and len(vignettes) == len(json.loads(demo.SCENARIOS_FILE.read_text()))
    assert patients[: len(records)] == records, "full records come first"
    for patient in patients:
        assert {"id", "label", "age", "sex", "summary"} <= set(patient)
        assert patient["label"] and patient["summary"] and patient["sex"] in ("male", "female", "other", "unknown")
        assert isinstance(patient["age"], int)
    by_id = {p["id"]: p for p in patients}
    assert len(by_id) == len(patients), "patient ids are unique"
    assert {p["id"]: p["age"] for p in records} == {"synth-hale": 58, "synth-lindqvist": 34, "synth-okafor": 71}
    for scenario in json.loads(demo.SCENARIOS_FILE.read_text()):
        entry = by_id[scenario["id"].lower()]
        assert (entry["age"], entry["sex"], entry["summary"]) == (scenario["age"], scenario["sex"], scenario["description"])
        assert entry["order"] == scenario["order"]
    assert {p["id"]: [p["expectedCard"]] if p["expectedCard"] else [] for p in patients} == expected_cards()


def test_record_endpoint_returns_the_chart_as_a_valid_fhir_bundle(client):
    for patient in client.get("/demo/patients").json():
        response = client.get(f"/demo/patients/{patient['id']}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/fhir+json")
        bundle = response.json()
        Bundle.model_validate(bundle)  # FHIR R4(B), every resource inside
        assert bundle["type"] == "collection" and bundle["timestamp"].startswith(TODAY.isoformat())
        resources = [e["resource"] for e in bundle["entry"]]
        assert resources[0]["resourceType"] == "Patient" and resources[0]["id"] == patient["id"]
        assert all(e["fullUrl"].startswith("urn:uuid:") for e in bundle["entry"])
        for resource in resources[1:]:
            reference = (resource.get("subject") or resource.get("patient") or {}).get("reference")
            assert reference == f"Patient/{patient['id']}", resource["id"]
        assert demo.age_on(resources[0]["birthDate"], TODAY) == patient["age"]


def test_full_records_have_years_of_history_dated_relative_to_today(client):
    hale = [e["resource"] for e in client.get("/demo/patients/synth-hale").json()["entry"]]
    dates = sorted(d for r in hale for d in _dates(r) if not r["resourceType"] == "Patient")
    assert date.fromisoformat(dates[0][:10]) < TODAY - timedelta(days=5 * 365), "years of history"
    assert max(date.fromisoformat(d[:10]) for d in dates) <= TODAY, "nothing in the future"
    back_pain = next(r for r in hale if r["resourceType"] == "Condition" and r["code"]["coding"][0]["code"] == "M54.50")
    assert back_pain["onsetDateTime"] == (TODAY - timedelta(days=21)).isoformat(), "new back pain 3 weeks ago"
    temperatures = [r for r in hale if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "8310-5"]
    assert len(temperatures) >= 5
    cancer = next(r for r in hale if r["resourceType"] == "Condition" and r["code"]["coding"][0]["code"] == "C61")
    assert 5 * 365 < (TODAY - date.fromisoformat(cancer["onsetDateTime"])).days < 7 * 365

    lindqvist = [e["resource"] for e in client.get("/demo/patients/synth-lindqvist").json()["entry"]]
    episodes = [r for r in lindqvist if r["resourceType"] == "Condition" and r["code"]["coding"][0]["code"].startswith("M54")]
    assert len(episodes) >= 4, "recurrent back pain over the years"
    sciatica = next(r for r in episodes if r["clinicalStatus"]["coding"][0]["code"] == "active")
    assert (TODAY - date.fromisoformat(sciatica["onsetDateTime"])).days == 63, "9 weeks of sciatica"
    physio = [date.fromisoformat(r["performedDateTime"]) for r in lindqvist if r["resourceType"] == "Procedure"
              and r["code"]["coding"][0]["code"] == "91251008" and date.fromisoformat(r["performedDateTime"]) >= TODAY - timedelta(days=63)]
    assert (TODAY - min(physio)).days == 49, "7 weeks of physiotherapy"

    okafor = [e["resource"] for e in client.get("/demo/patients/synth-okafor").json()["entry"]]
    prednisone = [r for r in okafor if r["resourceType"] == "MedicationRequest" and "prednisone" in r["medicationCodeableConcept"]["text"]]
    assert len(prednisone) >= 8 and any(r["status"] == "active" for r in prednisone)
    fall = next(r for r in okafor if r["resourceType"] == "Condition" and r["code"]["coding"][0]["code"] == "W19.XXXA")
    assert 28 <= (TODAY - date.fromisoformat(fall["onsetDateTime"])).days <= 35, "a fall last month"


def test_unknown_patient_is_404_operation_outcome(client):
    response = client.get("/demo/patients/no-such-patient")
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"


# -- the record files and date shifting --------------------------------------------------------


def _dates(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _dates(item)
    elif isinstance(value, list):
        for item in value:
            yield from _dates(item)
    elif isinstance(value, str) and DATE_FIELD.match(value):
        yield value


@pytest.mark.parametrize("path", sorted(demo.PATIENTS_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_record_files_are_anchored_valid_bundles(path):
    bundle = json.loads(path.read_text(encoding="utf-8"))
    Bundle.model_validate(bundle)
    assert bundle["type"] == "collection"
    urls = {e["url"].rsplit("/", 1)[1] for e in bundle["meta"]["extension"]}
    assert {"demo-anchor-date", "demo-label", "demo-summary", "demo-order", "demo-expected-card"} <= urls
    patient = bundle["entry"][0]["resource"]
    assert patient["resourceType"] == "Patient" and patient["id"] == path.stem == bundle["id"]
    ids = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]]
    assert len(set(ids)) == len(ids)
    # load-demo sends each record as one transaction; some servers cap updates per transaction
    # (the Medplum test server at 50).
    assert len(ids) <= 50
    assert all(rid == patient["id"] or rid.startswith(patient["id"] + "-") for _, rid in ids), "ids unique across patients"
    # Every date is a full date (or dateTime): the loader shifts exactly those, so nothing can go stale.
    for value in _dates({k: v for k, v in bundle.items() if k != "meta"}):
        assert re.match(r"^\d{4}-\d{2}-\d{2}(T|$)", value), value


def test_shifting_moves_every_date_by_the_same_number_of_days():
    path = demo.PATIENTS_DIR / "synth-hale.json"
    original = json.loads(path.read_text(encoding="utf-8"))
    anchor = date.fromisoformat(original["meta"]["extension"][0]["valueDate"])
    for today in (anchor, anchor + timedelta(days=1), date(2031, 2, 28), date(2028, 2, 29)):
        shifted = demo.shifted_bundle(original, today)
        assert shifted["meta"] == original["meta"]
        before, after = list(_dates(original["entry"])), list(_dates(shifted["entry"]))
        assert len(before) == len(after)
        for old, new in zip(before, after):
            assert (date.fromisoformat(new[:10]) - date.fromisoformat(old[:10])).days == (today - anchor).days
            assert new[10:] == old[10:], "times and offsets are kept"
        assert demo.age_on(shifted["entry"][0]["resource"]["birthDate"], today) == 58
    assert original == json.loads(path.read_text(encoding="utf-8")), "the file's data is not modified"


def test_demo_records_and_load_demo_include_the_full_records(monkeypatch):
    names = [name for name, _ in demo.demo_records(TODAY)]
    assert names[:3] == ["synth-hale", "synth-lindqvist", "synth-okafor"]
    assert "lbp-v01" in names and len(names) == 3 + len(demo.scenarios())
    loaded = {}

    def fake_load(url, bundles, progress=True):
        loaded.update(url=url, bundles=list(bundles))
        return sum(len(b["entry"]) for _, b in loaded["bundles"])

    monkeypatch.setattr("cds_service.demo_loader.load_bundles", fake_load)
    from cds_service.__main__ import main

    assert main(["load-demo", "--fhir", "http://127.0.0.1:9/fhir", "--today", TODAY.isoformat()]) == 0
    bundles = dict(loaded["bundles"])
    assert set(names) == set(bundles)
    hale = bundles["synth-hale"]
    assert hale["type"] == "transaction"
    assert hale["entry"][0]["request"] == {"method": "PUT", "url": "Patient/synth-hale"}
    onset = next(e["resource"]["onsetDateTime"] for e in hale["entry"]
                 if e["resource"]["resourceType"] == "Condition" and e["resource"]["code"]["coding"][0]["code"] == "M54.50")
    assert onset == (TODAY - timedelta(days=21)).isoformat()


# -- every demo patient through the service ------------------------------------------------------


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_every_demo_patient_yields_its_expected_card(client, hook):
    expected = expected_cards()
    patients = client.get("/demo/patients").json()
    assert {p["id"] for p in patients} == set(expected)
    seen = set()
    for patient in patients:
        _, body = hook_call(client, hook, patient, patient["order"])
        assert card_types(body) == expected[patient["id"]], patient["id"]
        seen.update(card_types(body))
        if not body["cards"]:
            assert body == {"cards": []}
    assert seen == {"cauda-equina-emergency", "imaging-indicated", "imaging-not-indicated"}


def test_full_records_get_the_protocol_their_history_calls_for(client):
    by_id = {p["id"]: p for p in client.get("/demo/patients").json()}
    _, hale = hook_call(client, "order-select", by_id["synth-hale"], by_id["synth-hale"]["order"])
    card = hale["cards"][0]
    assert "History of cancer" in card["summary"] and "without and with contrast" in card["summary"]
    actions = card["suggestions"][0]["actions"]
    assert [a["type"] for a in actions] == ["delete", "create"]
    assert actions[0]["resourceId"] == "ServiceRequest/demo-draft-1"
    assert actions[1]["resource"]["code"]["coding"][0]["code"] == "72158"

    _, lindqvist = hook_call(client, "order-select", by_id["synth-lindqvist"], by_id["synth-lindqvist"]["order"])
    card = lindqvist["cards"][0]
    assert card["extension"]["org.example.lumbar-imaging-cds.assessment"]["rule"] == "F1"
    assert "suggestions" not in card, "MRI without contrast is what failed conservative care calls for"

    _, okafor = hook_call(client, "order-select", by_id["synth-okafor"], by_id["synth-okafor"]["order"])
    card = okafor["cards"][0]
    assert {"R7", "R10"} & set(card["extension"]["org.example.lumbar-imaging-cds.assessment"]["rule"].split(","))
    assert "radiography as ordered" in card["summary"].lower()


def test_a_simulated_read_failure_gives_the_data_incomplete_card(client):
    v01 = next(p for p in client.get("/demo/patients").json() if p["id"] == "lbp-v01")
    _, body = hook_call(client, "order-select", v01, v01["order"], failing_key="medicationStatements")
    assert card_types(body) == ["imaging-data-incomplete"]


def test_each_order_choice_of_the_page_is_lumbar_imaging(client):
    """The four orders the page offers are all in scope: each gets a card for a patient with back pain."""
    script = (STATIC / "demo.js").read_text(encoding="utf-8")
    choices = re.findall(r'system: "([^"]+)", code: "([^"]+)", display: "([^"]+)"', script)
    assert [c[1] for c in choices] == ["72148", "72158", "72131", "72100"]
    v01 = next(p for p in client.get("/demo/patients").json() if p["id"] == "lbp-v01")
    for system, code, display in choices:
        _, body = hook_call(client, "order-select", v01, {"system": system, "code": code, "display": display})
        assert card_types(body) == ["imaging-not-indicated"], code


# -- the page, its assets and the wiring -----------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/demo/"])
def test_root_redirects_to_the_demo_page(client, path):
    response = client.get(path, follow_redirects=False)
    assert response.status_code in (302, 303, 307) and response.headers["location"] == "/demo"
    page = client.get("/demo")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<base href="/demo/">' in page.text


def test_assets_are_served_and_nothing_else(client):
    for name, kind in (("demo.js", "javascript"), ("markdown.js", "javascript"), ("demo.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        response = client.get(f"/demo/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"], name
        assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/demo/static/index.html").status_code == 404
    assert client.get("/demo/static/..%2F..%2Fapp.py").status_code == 404
    assert client.get("/demo/static/nothing.js").status_code == 404


def test_page_has_no_inline_script_style_or_cdn():
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "no inline script (CSP script-src 'self')"
    assert "<style" not in html and not re.search(r"\sstyle=", html) and not re.search(r"\son[a-z]+=", html)
    for name in ("index.html", "demo.js", "markdown.js", "demo.css"):
        text = (STATIC / name).read_text(encoding="utf-8")
        assert not re.search(r"(src|href)=\"(https?:)?//", text), f"{name} loads nothing from another origin"
        assert not re.search(r"\.(inner|outer)HTML\s*\+?=|insertAdjacentHTML\(|document\.write\(", text), f"{name} builds DOM nodes only"


def test_demo_off_serves_no_page(tmp_path):
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'off.db'}", demo=False))
    with TestClient(app) as off:
        assert off.get("/demo").status_code == 404
        assert off.get("/demo/patients").status_code == 404
        assert off.get("/", follow_redirects=False).status_code == 404
        assert off.get("/cds-services").status_code == 200


# -- the demo FHIR server and the CDS Hooks sandbox -------------------------------------------------


def test_demo_fhir_server_reads_and_searches(client):
    metadata = client.get("/demo/fhir/metadata").json()
    assert metadata["resourceType"] == "CapabilityStatement" and metadata["fhirVersion"] == "4.0.1"
    patients = client.get("/demo/fhir/Patient").json()
    assert patients["type"] == "searchset" and patients["total"] == len(client.get("/demo/patients").json())
    assert client.get("/demo/fhir/Patient/synth-okafor").json()["name"][0]["family"] == "Okafor"
    assert client.get("/demo/fhir/Patient/nobody").status_code == 404
    record = client.get("/demo/patients/synth-okafor").json()
    conditions = client.get("/demo/fhir/Condition", params={"patient": "synth-okafor"}).json()
    assert sorted(e["resource"]["id"] for e in conditions["entry"]) == sorted(
        e["resource"]["id"] for e in record["entry"] if e["resource"]["resourceType"] == "Condition")
    assert conditions["entry"][0]["resource"] == next(e["resource"] for e in record["entry"] if e["resource"]["id"] == conditions["entry"][0]["resource"]["id"])
    temperatures = client.get("/demo/fhir/Observation", params={"patient": "Patient/synth-okafor", "code": "http://loinc.org|8310-5,http://loinc.org|8331-1"}).json()
    assert temperatures["total"] == 4 and all(e["resource"]["code"]["coding"][0]["code"] == "8310-5" for e in temperatures["entry"])
    posted = client.post("/demo/fhir/MedicationRequest/_search", content="patient=synth-okafor&_count=3",
                         headers={"Content-Type": "application/x-www-form-urlencoded"}).json()
    assert posted["total"] == 3 and all(e["resource"]["subject"]["reference"] == "Patient/synth-okafor" for e in posted["entry"])
    nobody = client.get("/demo/fhir/Condition", params={"patient": "no-one"}).json()
    assert (nobody["total"], nobody["entry"]) == (0, [])


def test_sandbox_request_shapes_work_against_the_demo_fhir_server(tmp_path):
    """Replays what the CDS Hooks sandbox (PAMA tab, checklist section 5) does, over real HTTP: CORS
    preflights, FHIR reads from fhirServiceUrl, order-select with fhirServer and only the prefetch keys
    it could fill (the service fetches the rest from the demo FHIR server), feedback without display.
    The patient's failed conservative care is in Procedures and MedicationRequests, which only the
    service's own FHIR reads bring in."""
    import httpx

    from browser_support import serve_app_on_loopback

    origin = "http://localhost:8088"
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'sandbox.db'}", today=TODAY))
    with serve_app_on_loopback(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        fhir = f"{base}/demo/fhir"
        preflight = http.options("/cds-services", headers={"Origin": origin, "Access-Control-Request-Method": "GET",
                                                           "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] in ("*", origin)
        for url in (f"{fhir}/metadata", f"{fhir}/Patient/synth-lindqvist"):
            response = http.get(url, headers={"Origin": origin, "Accept": "application/json"})
            assert response.status_code == 200 and response.headers["access-control-allow-origin"] in ("*", origin)
        patient = http.get(f"{fhir}/Patient/synth-lindqvist").json()
        conditions = http.post(f"{fhir}/Condition/_search", data={"patient": "synth-lindqvist"}).json()
        services = {s["hook"]: s["id"] for s in http.get("/cds-services").json()["services"]}

        def call(coding: list, reason: list) -> httpx.Response:
            order = {"resourceType": "ServiceRequest", "id": "example-request-id", "status": "draft", "intent": "plan",
                     "code": {"coding": coding}, "subject": {"reference": "Patient/synth-lindqvist"}, "reasonCode": reason}
            body = {"hookInstance": str(uuid.uuid4()), "hook": "order-select", "fhirServer": fhir,
                    "context": {"patientId": "synth-lindqvist", "userId": "Practitioner/COREPRACTITIONER1",
                                "selections": ["ServiceRequest/example-request-id"],
                                "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": order}]}},
                    "prefetch": {"patient": patient, "conditions": conditions}}
            return http.post(f"/cds-services/{services['order-select']}", json=body, headers={"Origin": origin})

        first = call([{}], [])  # the sandbox's first call on entering the PAMA tab
        assert first.status_code == 200 and first.json() == {"cards": []}
        answered = call([{"system": "http://www.ama-assn.org/go/cpt", "code": "72148"}],
                        [{"coding": [{"system": "http://snomed.info/sct", "code": "279039007"}]}])
        assert answered.status_code == 200, answered.text
        assert answered.headers["access-control-allow-origin"] in ("*", origin)
        cards = answered.json()["cards"]
        assert [c["source"]["topic"]["code"] for c in cards] == ["imaging-indicated"]
        assert cards[0]["extension"]["org.example.lumbar-imaging-cds.assessment"]["rule"] == "F1"  # read by the service
        feedback = http.post(f"/cds-services/{services['order-select']}/feedback", headers={"Origin": origin}, json={"feedback": [{
            "card": cards[0]["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-03-15T10:00:00Z",
            "overrideReason": {"reason": {"code": "other", "system": cards[0]["overrideReasons"][-1]["system"]}}}]})
        assert feedback.status_code == 200
