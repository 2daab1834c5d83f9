"""The in-memory Medplum FHIR server used by integration tests (tests/fhir_server), and the demo loader."""

from __future__ import annotations

import socket
import uuid

import httpx
import pytest

from cds_service.demo_loader import DemoLoadError, as_transaction, load_bundles
from fhir_server import launcher
from fhir_server.launcher import FhirServerError, load_bundle, start_fhir_server
from server_support import fhir_server_or_skip

FHIR_JSON = {"Accept": "application/fhir+json"}


@pytest.fixture(scope="module")
def fhir():
    with fhir_server_or_skip() as server:
        yield server


def new_patient(fhir) -> str:
    response = httpx.post(f"{fhir.base_url}/Patient", json={"resourceType": "Patient", "name": [{"family": "Test"}]})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def condition(patient_id: str, code: str = "279039007") -> dict:
    return {
        "resourceType": "Condition",
        "subject": {"reference": f"Patient/{patient_id}"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]},
    }


def search_ids(bundle: dict) -> list[str]:
    return [entry["resource"]["id"] for entry in bundle.get("entry", [])]


@pytest.mark.fhir_server
def test_metadata_is_an_r4_capability_statement(fhir):
    response = httpx.get(f"{fhir.base_url}/metadata", headers=FHIR_JSON)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "CapabilityStatement"
    assert body["fhirVersion"] == "4.0.1"


@pytest.mark.fhir_server
def test_create_read_and_search_by_patient(fhir):
    patient_id = new_patient(fhir)
    other_id = new_patient(fhir)
    created = [httpx.post(f"{fhir.base_url}/Condition", json=condition(patient_id)).json()["id"] for _ in range(3)]
    httpx.post(f"{fhir.base_url}/Condition", json=condition(other_id)).raise_for_status()

    read = httpx.get(f"{fhir.base_url}/Patient/{patient_id}", headers=FHIR_JSON)
    assert read.status_code == 200
    assert read.json()["name"] == [{"family": "Test"}]

    bundle = httpx.get(f"{fhir.base_url}/Condition", params={"patient": patient_id}, headers=FHIR_JSON).json()
    assert bundle["type"] == "searchset"
    assert sorted(search_ids(bundle)) == sorted(created)
    assert all(entry["fullUrl"].startswith(f"{fhir.base_url}/Condition/") for entry in bundle["entry"])

    by_code = httpx.get(
        f"{fhir.base_url}/Condition", params={"patient": patient_id, "code": "http://snomed.info/sct|279039007"}
    ).json()
    assert sorted(search_ids(by_code)) == sorted(created)


@pytest.mark.fhir_server
def test_paging_with_count_follows_absolute_next_links(fhir):
    patient_id = new_patient(fhir)
    created = {httpx.post(f"{fhir.base_url}/Condition", json=condition(patient_id)).json()["id"] for _ in range(5)}

    url: str | None = f"{fhir.base_url}/Condition?patient={patient_id}&_count=2"
    seen: list[str] = []
    pages = 0
    while url:
        assert url.startswith(fhir.base_url + "/")
        bundle = httpx.get(url, headers=FHIR_JSON).json()
        pages += 1
        assert len(bundle.get("entry", [])) <= 2
        seen += search_ids(bundle)
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)

    assert pages == 3
    assert sorted(seen) == sorted(created)


@pytest.mark.fhir_server
def test_search_by_post(fhir):
    patient_id = new_patient(fhir)
    created = [httpx.post(f"{fhir.base_url}/Condition", json=condition(patient_id)).json()["id"] for _ in range(3)]
    response = httpx.post(f"{fhir.base_url}/Condition/_search", data={"patient": patient_id, "_count": "2"})
    assert response.status_code == 200
    bundle = response.json()
    assert bundle["total"] == 3
    assert set(search_ids(bundle)) <= set(created) and len(search_ids(bundle)) == 2
    assert [link["relation"] for link in bundle["link"]] == ["self", "next"]


@pytest.mark.fhir_server
def test_transaction_bundle_resolves_urn_uuid_references(fhir):
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    fixed_id = f"fixed-{uuid.uuid4().hex[:12]}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_urn,
                "resource": {"resourceType": "Patient", "name": [{"family": "Urn"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {"resourceType": "Condition", "subject": {"reference": patient_urn}},
                "request": {"method": "POST", "url": "Condition"},
            },
            {
                "resource": {"resourceType": "Patient", "id": fixed_id},
                "request": {"method": "PUT", "url": f"Patient/{fixed_id}"},
            },
        ],
    }
    result = load_bundle(fhir.base_url, bundle)
    assert result["type"] == "transaction-response"
    patient_id = result["entry"][0]["resource"]["id"]

    conditions = httpx.get(f"{fhir.base_url}/Condition", params={"patient": patient_id}).json()
    assert [e["resource"]["subject"]["reference"] for e in conditions["entry"]] == [f"Patient/{patient_id}"]
    assert httpx.get(f"{fhir.base_url}/Patient/{fixed_id}").status_code == 200


@pytest.mark.fhir_server
def test_load_bundle_reports_a_failed_transaction(fhir):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "GET", "url": "Patient/does-not-exist"}}],
    }
    with pytest.raises(FhirServerError, match="HTTP 404"):
        load_bundle(fhir.base_url, bundle)


@pytest.mark.fhir_server
def test_update_and_delete(fhir):
    resource_id = f"upd-{uuid.uuid4().hex[:12]}"
    url = f"{fhir.base_url}/Patient/{resource_id}"
    assert httpx.put(url, json={"resourceType": "Patient", "id": resource_id, "gender": "female"}).status_code in (200, 201)
    assert httpx.put(url, json={"resourceType": "Patient", "id": resource_id, "gender": "male"}).status_code == 200
    assert httpx.get(url).json()["gender"] == "male"
    assert httpx.delete(url).status_code == 200
    gone = httpx.get(url)
    assert gone.status_code in (404, 410)
    assert gone.json()["resourceType"] == "OperationOutcome"


@pytest.mark.fhir_server
def test_unknown_read_is_404_operation_outcome(fhir):
    response = httpx.get(f"{fhir.base_url}/Patient/{uuid.uuid4()}")
    assert response.status_code == 404
    assert response.json()["issue"][0]["code"] == "not-found"


@pytest.mark.fhir_server
def test_token_mode_requires_the_bearer_token():
    with fhir_server_or_skip(token="s3cret-token") as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            response = httpx.get(f"{server.base_url}/Patient", headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["resourceType"] == "OperationOutcome"
        metadata = httpx.get(f"{server.base_url}/metadata")
        assert metadata.status_code == 401

        good = {"Authorization": "Bearer s3cret-token"}
        assert httpx.get(f"{server.base_url}/Patient", headers=good).status_code == 200
        patient = {"resourceType": "Patient", "id": "token-test"}
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": patient, "request": {"method": "PUT", "url": "Patient/token-test"}}],
        }
        with pytest.raises(FhirServerError, match="HTTP 401"):
            load_bundle(server.base_url, bundle)
        assert load_bundle(server.base_url, bundle, token="s3cret-token")["type"] == "transaction-response"


def test_launcher_names_the_install_command_when_packages_are_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(launcher, "NODE_MODULES", tmp_path / "node_modules")
    with pytest.raises(FhirServerError, match=r"npm ci --prefix tests/fhir_server"):
        start_fhir_server()


@pytest.mark.fhir_server
def test_launcher_stops_the_node_process_on_exit():
    with fhir_server_or_skip() as server:
        process = server._process
        assert process is not None and process.poll() is None
    assert process.poll() is not None
    with pytest.raises(FhirServerError):
        server.base_url


# --- cds_service.demo_loader against the server ---------------------------------------------------


def demo_collection(patient_id: str) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": patient_id, "gender": "female"}},
            {"resource": {"resourceType": "Condition", "id": f"{patient_id}-lbp", **condition(patient_id)}},
            {"resource": {"resourceType": "Condition", "id": f"{patient_id}-sciatica", **condition(patient_id, "23056005")}},
        ],
    }


def test_collection_becomes_put_by_id_and_post_without_id():
    bundle = demo_collection("demo-1")
    bundle["entry"].append({"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Observation", "status": "final"}})
    transaction = as_transaction("demo-1.json", bundle)
    assert transaction["type"] == "transaction"
    assert [e["request"] for e in transaction["entry"]] == [
        {"method": "PUT", "url": "Patient/demo-1"},
        {"method": "PUT", "url": "Condition/demo-1-lbp"},
        {"method": "PUT", "url": "Condition/demo-1-sciatica"},
        {"method": "POST", "url": "Observation"},
    ]
    assert transaction["entry"][3]["fullUrl"] == "urn:uuid:1"


@pytest.mark.parametrize(
    "bundle",
    [{"resourceType": "Patient"}, {"resourceType": "Bundle", "type": "searchset"}, {"resourceType": "Bundle", "type": "collection", "entry": [{}]}],
)
def test_unloadable_bundles_are_named(bundle):
    with pytest.raises(DemoLoadError, match=r"^odd\.json: "):
        as_transaction("odd.json", bundle)


@pytest.mark.fhir_server
def test_load_bundles_loads_collections_and_transactions(fhir):
    patient_a, patient_b = f"demo-{uuid.uuid4().hex[:10]}", f"demo-{uuid.uuid4().hex[:10]}"
    transaction = as_transaction("b.json", demo_collection(patient_b))
    bundles = [("a.json", demo_collection(patient_a)), ("b.json", transaction)]

    assert load_bundles(fhir.base_url, bundles, progress=False) == 6
    assert load_bundles(fhir.base_url + "/", bundles, progress=True) == 6  # again: PUT updates, no duplicates

    for patient_id in (patient_a, patient_b):
        assert httpx.get(f"{fhir.base_url}/Patient/{patient_id}").json()["gender"] == "female"
        found = httpx.get(f"{fhir.base_url}/Condition", params={"patient": patient_id}).json()
        assert sorted(search_ids(found)) == [f"{patient_id}-lbp", f"{patient_id}-sciatica"]


@pytest.mark.fhir_server
def test_load_bundles_names_the_failing_bundle(fhir):
    good = ("good.json", demo_collection(f"demo-{uuid.uuid4().hex[:10]}"))
    bad = (
        "bad.json",
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": {"resourceType": "Patient", "id": "x"}, "request": {"method": "PUT", "url": "Patient/y"}}],
        },
    )
    with pytest.raises(DemoLoadError, match=r"^bad\.json: the FHIR server refused the bundle: HTTP 400"):
        load_bundles(fhir.base_url, [good, bad], progress=False)


def test_load_bundles_names_the_bundle_when_the_server_is_unreachable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before use: nothing listens there
    with pytest.raises(DemoLoadError, match=r"^p1\.json: cannot reach the FHIR server"):
        load_bundles(f"http://127.0.0.1:{port}", [("p1.json", demo_collection("p1"))], progress=False)


@pytest.mark.fhir_server
def test_load_bundles_reports_failed_entries_of_a_batch(fhir):
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": f"Patient/{uuid.uuid4()}"}},
        ],
    }
    with pytest.raises(DemoLoadError, match=r"^batch\.json: 1 entries failed \(entry 2: 404"):
        load_bundles(fhir.base_url, [("batch.json", batch)], progress=False)
