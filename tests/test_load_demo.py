"""`python -m cds_service load-demo --fhir URL`, run as a subprocess against the real test FHIR server.

The demo patients are whatever `cds_service.demo.demo_records` lists, so these tests follow the demo
data as it grows. After loading, the service reading from that server (fhirServer, no prefetch)
gives each public vignette its expected card: the loaded data is what the demo needs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter
from datetime import date
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from cds_service import vignettes
from cds_service.app import create_app
from cds_service.demo import demo_records, scenarios
from cds_service.settings import Settings
from server_support import fhir_server_or_skip

REPO = Path(__file__).resolve().parent.parent
TODAY = date(2026, 11, 21)
EXPECTED_CARD = {
    "early-imaging-warning": "imaging-not-indicated",
    "red-flag-justified-info": "imaging-indicated",
    "cauda-equina-critical": "cauda-equina-emergency",
}
MEDPLUM_MAX_UPDATES = 50  # Medplum's fhir-router refuses transactions with more updates than this


def load_demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CDS_")}
    env["COLUMNS"] = "160"  # room for rich's progress line
    return subprocess.run(
        [sys.executable, "-m", "cds_service", "load-demo", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )


def search_ids(base_url: str, resource_type: str, token: str | None = None) -> list[str]:
    """Every id of one resource type on the server, following next links."""
    headers = {"Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url: str | None = f"{base_url}/{resource_type}?_count=100"
    ids: list[str] = []
    while url:
        bundle = httpx.get(url, headers=headers, timeout=30).json()
        ids += [entry["resource"]["id"] for entry in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return ids


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/fhir"  # closed again: nothing listens there


@pytest.fixture(scope="module")
def fhir():
    """A fresh server of its own: the Patient count must be the demo's alone."""
    with fhir_server_or_skip() as server:
        yield server


@pytest.fixture(scope="module")
def loaded(fhir) -> subprocess.CompletedProcess[str]:
    return load_demo("--fhir", fhir.base_url, "--today", TODAY.isoformat())


@pytest.mark.fhir_server
def test_load_demo_loads_every_demo_patient(fhir, loaded):
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    records = demo_records(TODAY)
    resources = [resource for _, record in records for resource in record]

    assert sorted(search_ids(fhir.base_url, "Patient")) == sorted(record[0]["id"] for _, record in records)
    for resource_type, count in Counter(r["resourceType"] for r in resources).items():
        assert len(search_ids(fhir.base_url, resource_type)) == count, resource_type
    assert f"Loaded {len(resources)} resources from {len(records)} demo patients into {fhir.base_url}" in loaded.stdout


@pytest.mark.fhir_server
def test_load_demo_shows_its_progress_on_stderr(loaded):
    total = len(demo_records(TODAY))
    assert "Loading demo patients" in loaded.stderr
    assert f"{total}/{total}" in loaded.stderr
    assert "Loading demo patients" not in loaded.stdout


@pytest.mark.fhir_server
def test_load_demo_twice_updates_instead_of_duplicating(fhir, loaded):
    before = sorted(search_ids(fhir.base_url, "Patient"))
    again = load_demo("--fhir", fhir.base_url + "/", "--today", TODAY.isoformat())
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(search_ids(fhir.base_url, "Patient")) == before


@pytest.mark.fhir_server
@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_the_service_reads_the_loaded_demo_patients_from_the_fhir_server(fhir, loaded, tmp_path, hook):
    """Each public vignette, loaded by load-demo, read by the service through fhirServer alone."""
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    settings = Settings.from_mapping({"CDS_TODAY": TODAY.isoformat(), "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}",
                                      "CDS_FHIR_TIMEOUT": "10", "CDS_FHIR_DEADLINE": "15"})
    with TestClient(create_app(settings)) as client:
        for scenario in scenarios():
            request = vignettes.hook_request(scenario, TODAY, hook, with_prefetch=False)
            request["fhirServer"] = fhir.base_url
            response = client.post(f"/cds-services/lumbar-imaging-{hook}", json=request)
            assert response.status_code == 200, (scenario["id"], response.text)
            types = [card["source"]["topic"]["code"] for card in response.json()["cards"]]
            assert types == [EXPECTED_CARD[name] for name in scenario["expected"]["cards"]], scenario["id"]


def test_every_demo_record_fits_in_one_medplum_transaction():
    """load-demo posts each demo patient as ONE transaction (PUT by id); Medplum refuses transactions
    with more than 50 updates (HTTP 400 'Transaction contains more update operations than allowed'),
    and then nothing after that patient is loaded. A larger record needs demo_loader to split it."""
    sizes = {name: len(record) for name, record in demo_records(TODAY)}
    assert max(sizes.values()) <= MEDPLUM_MAX_UPDATES, sizes


# --- failures: a clear message and a non-zero exit ------------------------------------------------


def test_load_demo_with_nothing_listening_fails_with_a_clear_message():
    url = closed_port_url()
    result = load_demo("--fhir", url, "--today", TODAY.isoformat())
    assert result.returncode != 0
    assert f"cannot reach the FHIR server at {url}/" in result.stderr
    assert "Loaded" not in result.stdout


def test_load_demo_with_a_url_that_is_not_http_fails_with_a_clear_message():
    result = load_demo("--fhir", "fhir.example.org/r4", "--today", TODAY.isoformat())
    assert result.returncode != 0
    assert "http" in result.stderr and "fhir.example.org/r4" in result.stderr


@pytest.mark.fhir_server
def test_load_demo_refused_by_the_server_names_the_status():
    """A server that wants a token (load-demo has none to give): HTTP 401, named."""
    with fhir_server_or_skip(token="load-demo-has-no-token") as server:
        result = load_demo("--fhir", server.base_url, "--today", TODAY.isoformat())
        assert search_ids(server.base_url, "Patient", token="load-demo-has-no-token") == []
    assert result.returncode != 0
    assert "the FHIR server refused the bundle: HTTP 401" in result.stderr


def test_load_demo_errors_are_one_message_not_a_traceback():
    result = load_demo("--fhir", closed_port_url(), "--today", TODAY.isoformat())
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
