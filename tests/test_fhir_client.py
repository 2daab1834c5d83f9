"""The FHIR fallback client (cds_service/fhir_client.py): mocked servers, then the real test server."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Awaitable, Callable

import httpx
import pytest

from cds_service.fhir_client import FhirClient, QueryResult
from cds_service.settings import Settings
from fhir_server import launcher
from fhir_server.launcher import load_bundle, start_fhir_server

BASE = "https://fhir.example.org/r4"
TOKEN = "tok-9f8e7d6c5b4a-secret"
PATIENT_ID = "pat-4711-xyz"

Handler = Callable[[httpx.Request], "httpx.Response | Awaitable[httpx.Response]"]


def settings(**overrides) -> Settings:
    values = dict(
        fhir_server_allowlist=(BASE,),
        fhir_timeout_s=1.0,
        fhir_deadline_s=2.0,
        fhir_max_pages=10,
        fhir_max_response_bytes=1_000_000,
    )
    values.update(overrides)
    return Settings(**values)


class FakeServer:
    """A MockTransport that answers from a URL -> response table and records every request."""

    def __init__(self, routes: dict[str, Handler | httpx.Response | dict] | None = None) -> None:
        self.routes = routes or {}
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        route = self.routes.get(str(request.url))
        if route is None:
            return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]})
        if isinstance(route, dict):
            return httpx.Response(200, json=route)
        if isinstance(route, httpx.Response):
            return route
        response = route(request)
        return await response if asyncio.iscoroutine(response) else response

    @property
    def hosts(self) -> set[str]:
        return {request.url.host for request in self.requests}


def fetch(
    server: FakeServer,
    queries: dict[str, str],
    token: str | None = TOKEN,
    fhir_server: str = BASE,
    extra_prefixes: tuple[str, ...] = (),
    **setting_overrides,
) -> dict[str, QueryResult]:
    async def run() -> dict[str, QueryResult]:
        client = FhirClient(settings(**setting_overrides), transport=httpx.MockTransport(server))
        try:
            return await client.fetch_all(fhir_server, queries, token, extra_prefixes)
        finally:
            await client.aclose()

    return asyncio.run(run())


def searchset(*resources: dict, next_url: str | None = None, outcome: dict | None = None) -> dict:
    entries = [{"resource": resource, "search": {"mode": "match"}} for resource in resources]
    if outcome:
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": entries}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def condition(n: int) -> dict:
    return {"resourceType": "Condition", "id": f"c{n}", "subject": {"reference": f"Patient/{PATIENT_ID}"}}


def outcome(severity: str, code: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code}]}


CONDITIONS_URL = f"{BASE}/Condition?patient={PATIENT_ID}"
CONDITIONS = {"conditions": f"Condition?patient={PATIENT_ID}"}


# --- success -------------------------------------------------------------------------------------


def test_search_returns_resources_and_sends_headers():
    server = FakeServer({CONDITIONS_URL: searchset(condition(1), condition(2))})
    result = fetch(server, CONDITIONS)["conditions"]
    assert result == QueryResult("conditions", [condition(1), condition(2)], None, pages=1)
    [request] = server.requests
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Accept"] == "application/fhir+json"


def test_read_returns_the_single_resource():
    patient = {"resourceType": "Patient", "id": PATIENT_ID}
    server = FakeServer({f"{BASE}/Patient/{PATIENT_ID}": patient})
    result = fetch(server, {"patient": f"Patient/{PATIENT_ID}"})["patient"]
    assert result.resources == [patient] and result.error is None and result.pages == 1


def test_no_token_means_no_authorization_header():
    server = FakeServer({CONDITIONS_URL: searchset(condition(1))})
    assert fetch(server, CONDITIONS, token=None)["conditions"].error is None
    assert "Authorization" not in server.requests[0].headers


def test_empty_queries_make_no_requests():
    server = FakeServer()
    assert fetch(server, {}) == {}
    assert server.requests == []


def test_paging_follows_next_links_with_the_token_on_every_page():
    page2, page3 = f"{CONDITIONS_URL}&_offset=2", f"{CONDITIONS_URL}&_offset=4"
    server = FakeServer(
        {
            CONDITIONS_URL: searchset(condition(1), condition(2), next_url=page2),
            page2: searchset(condition(3), condition(4), next_url=page3),
            page3: searchset(condition(5)),
        }
    )
    result = fetch(server, CONDITIONS)["conditions"]
    assert result.error is None and result.pages == 3 and not result.partial
    assert [r["id"] for r in result.resources] == ["c1", "c2", "c3", "c4", "c5"]
    assert [str(r.url) for r in server.requests] == [CONDITIONS_URL, page2, page3]
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in server.requests)


def test_relative_next_link_is_resolved_on_the_same_server():
    page2 = f"{CONDITIONS_URL}&_offset=1"
    server = FakeServer(
        {CONDITIONS_URL: searchset(condition(1), next_url=f"Condition?patient={PATIENT_ID}&_offset=1"), page2: searchset(condition(2))}
    )
    result = fetch(server, CONDITIONS)["conditions"]
    assert result.error is None and [r["id"] for r in result.resources] == ["c1", "c2"]


def test_warning_outcome_entries_are_dropped_not_failures():
    server = FakeServer({CONDITIONS_URL: searchset(condition(1), outcome=outcome("warning", "informational"))})
    result = fetch(server, CONDITIONS)["conditions"]
    assert result.error is None and result.resources == [condition(1)]


# --- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 404, 500, 503])
def test_http_error_status_fails_the_query(status):
    server = FakeServer({CONDITIONS_URL: httpx.Response(status, json=outcome("error", "exception"))})
    assert fetch(server, CONDITIONS)["conditions"] == QueryResult("conditions", None, f"HTTP {status}")


def test_read_of_a_missing_resource_fails():
    server = FakeServer()
    result = fetch(server, {"patient": "Patient/nobody"})["patient"]
    assert result == QueryResult("patient", None, "HTTP 404")


def test_redirect_is_not_followed():
    target = "https://elsewhere.example.net/r4/Condition"
    server = FakeServer({CONDITIONS_URL: httpx.Response(302, headers={"Location": target}), target: searchset()})
    assert fetch(server, CONDITIONS)["conditions"].error == "HTTP 302"
    assert server.hosts == {"fhir.example.org"}


def test_transport_timeout_is_reported_as_timeout():
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    server = FakeServer({CONDITIONS_URL: timeout})
    assert fetch(server, CONDITIONS)["conditions"] == QueryResult("conditions", None, "timeout")


def test_slow_request_hits_the_per_request_timeout():
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(1.0)
        return httpx.Response(200, json=searchset())

    server = FakeServer({CONDITIONS_URL: slow})
    started = time.monotonic()
    result = fetch(server, CONDITIONS, fhir_timeout_s=0.2, fhir_deadline_s=5.0)["conditions"]
    assert result.error == "timeout"
    assert time.monotonic() - started < 0.8


def test_connection_failure_names_only_the_error_class():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot connect to {request.url}", request=request)

    server = FakeServer({CONDITIONS_URL: refuse})
    result = fetch(server, CONDITIONS)["conditions"]
    assert result.error == "request failed (ConnectError)"


def test_hanging_server_is_cut_at_the_deadline_and_other_keys_still_answer():
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200, json=searchset())

    patient = {"resourceType": "Patient", "id": PATIENT_ID}
    server = FakeServer({CONDITIONS_URL: hang, f"{BASE}/Patient/{PATIENT_ID}": patient})
    started = time.monotonic()
    results = fetch(
        server,
        {**CONDITIONS, "patient": f"Patient/{PATIENT_ID}"},
        fhir_timeout_s=10.0,
        fhir_deadline_s=0.5,
    )
    assert time.monotonic() - started < 0.5 + 0.5
    assert results["conditions"] == QueryResult("conditions", None, "deadline exceeded")
    assert results["patient"].resources == [patient]


def test_deadline_after_some_pages_keeps_what_was_read_as_partial():
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200, json=searchset())

    page2 = f"{CONDITIONS_URL}&_offset=1"
    server = FakeServer({CONDITIONS_URL: searchset(condition(1), next_url=page2), page2: hang})
    result = fetch(server, CONDITIONS, fhir_timeout_s=10.0, fhir_deadline_s=0.4)["conditions"]
    assert result == QueryResult("conditions", [condition(1)], "deadline exceeded", pages=1, partial=True)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"<html>not json</html>", "not JSON"),
        (b'{"resourceType": "Bundle", "type": "searchset", ', "not JSON"),
        (b"[1, 2, 3]", "not a FHIR resource"),
        (b'{"hello": "world"}', "not a FHIR resource"),
        (b'{"resourceType": "Bundle", "type": "collection"}', "not a searchset Bundle"),
        (b'{"resourceType": "Patient", "id": "x"}', "not a searchset Bundle"),
    ],
)
def test_unusable_body_fails_the_query(body, error):
    server = FakeServer({CONDITIONS_URL: httpx.Response(200, content=body)})
    assert fetch(server, CONDITIONS)["conditions"] == QueryResult("conditions", None, error)


def test_read_answering_another_resource_type_fails():
    server = FakeServer({f"{BASE}/Patient/{PATIENT_ID}": {"resourceType": "Practitioner", "id": "x"}})
    assert fetch(server, {"patient": f"Patient/{PATIENT_ID}"})["patient"].error == "unexpected resource type"


def test_bare_operation_outcome_fails_the_query():
    server = FakeServer({CONDITIONS_URL: outcome("error", "processing")})
    assert fetch(server, CONDITIONS)["conditions"] == QueryResult("conditions", None, "OperationOutcome: processing")


def test_bare_operation_outcome_on_a_read_fails_the_query():
    server = FakeServer({f"{BASE}/Patient/{PATIENT_ID}": outcome("fatal", "security")})
    assert fetch(server, {"patient": f"Patient/{PATIENT_ID}"})["patient"].error == "OperationOutcome: security"


def test_error_outcome_entry_in_a_searchset_fails_the_query():
    server = FakeServer({CONDITIONS_URL: searchset(condition(1), outcome=outcome("error", "too-costly"))})
    result = fetch(server, CONDITIONS)["conditions"]
    assert result == QueryResult("conditions", None, "OperationOutcome: too-costly")


def test_paging_loop_is_detected():
    page2 = f"{CONDITIONS_URL}&page=2"
    server = FakeServer(
        {CONDITIONS_URL: searchset(condition(1), next_url=page2), page2: searchset(condition(2), next_url=CONDITIONS_URL)}
    )
    result = fetch(server, CONDITIONS)["conditions"]
    assert result == QueryResult("conditions", [condition(1), condition(2)], "paging loop", pages=2, partial=True)
    assert len(server.requests) == 2


def test_page_limit():
    pages = [f"{CONDITIONS_URL}&page={n}" for n in range(2, 6)]
    routes = {CONDITIONS_URL: searchset(condition(1), next_url=pages[0])}
    routes.update({url: searchset(condition(n + 2), next_url=f"{CONDITIONS_URL}&page={n + 3}") for n, url in enumerate(pages)})
    server = FakeServer(routes)
    result = fetch(server, CONDITIONS, fhir_max_pages=3)["conditions"]
    assert result.error == "too many pages" and result.partial and result.pages == 3
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    "next_url",
    [
        f"https://evil.example.net/r4/Condition?patient={PATIENT_ID}&page=2",
        f"http://fhir.example.org/r4/Condition?patient={PATIENT_ID}&page=2",  # same host, other scheme
        f"https://fhir.example.org:8443/r4/Condition?patient={PATIENT_ID}&page=2",  # other port
        f"https://fhir.example.org/admin/Condition?patient={PATIENT_ID}&page=2",  # outside the base path
        f"https://fhir.example.org.evil.example.net/r4/Condition?patient={PATIENT_ID}",
        f"https://user@fhir.example.org/r4/Condition?patient={PATIENT_ID}&page=2",
    ],
)
def test_next_link_off_the_server_is_not_followed(next_url):
    server = FakeServer({CONDITIONS_URL: searchset(condition(1), next_url=next_url), next_url: searchset(condition(2))})
    result = fetch(server, CONDITIONS)["conditions"]
    assert result == QueryResult("conditions", [condition(1)], "next link to another server", pages=1, partial=True)
    assert [str(r.url) for r in server.requests] == [CONDITIONS_URL]


def test_next_link_to_another_allowed_server_is_still_not_followed():
    other = "https://other.example.org/fhir"
    next_url = f"{other}/Condition?page=2"
    server = FakeServer({CONDITIONS_URL: searchset(condition(1), next_url=next_url), next_url: searchset()})
    result = fetch(server, CONDITIONS, fhir_server_allowlist=(BASE, other))["conditions"]
    assert result.error == "next link to another server"
    assert server.hosts == {"fhir.example.org"}


def test_response_size_is_capped_by_content_length():
    big = searchset(*[condition(n) for n in range(200)])
    server = FakeServer({CONDITIONS_URL: big})
    assert fetch(server, CONDITIONS, fhir_max_response_bytes=2_000)["conditions"].error == "response too large"


def test_response_size_is_capped_while_streaming():
    chunks_sent = []

    async def endless():
        yield b'{"resourceType": "Bundle", "type": "searchset", "entry": ['
        for _ in range(10_000):
            chunks_sent.append(1)
            yield b'{"resource": {"resourceType": "Condition"}},' * 10

    server = FakeServer({CONDITIONS_URL: lambda request: httpx.Response(200, content=endless())})
    assert fetch(server, CONDITIONS, fhir_max_response_bytes=20_000)["conditions"].error == "response too large"
    assert len(chunks_sent) < 100  # reading stopped early


# --- the allow-list ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fhir_server",
    [
        "http://169.254.169.254/latest/meta-data",
        "https://fhir.example.org.evil.example.net/r4",
        "https://fhir.example.org/r4x",
        "https://fhir.example.org/R4",
        "https://fhir.example.org/",
        "https://fhir.example.org:8443/r4",
        "http://fhir.example.org/r4",
        "https://user:pass@fhir.example.org/r4",
        "https://@fhir.example.org/r4",
        "https://evil.example.net\\@fhir.example.org/r4",
        "https://fhir.example.org/r4/%2e%2e/admin",
        "file:///etc/passwd",
        "not a url",
        "",
    ],
)
def test_server_outside_the_allow_list_is_never_contacted(fhir_server):
    server = FakeServer()
    results = fetch(server, {**CONDITIONS, "patient": "Patient/1"}, fhir_server=fhir_server)
    assert results == {
        "conditions": QueryResult("conditions", None, "server not allowed"),
        "patient": QueryResult("patient", None, "server not allowed"),
    }
    assert server.requests == []


@pytest.mark.parametrize(
    "fhir_server", [BASE, BASE + "/", "https://FHIR.example.org/r4", "https://fhir.example.org:443/r4"]
)
def test_allowed_spellings_of_the_server(fhir_server):
    server = FakeServer({CONDITIONS_URL: searchset(condition(1))})
    assert fetch(server, CONDITIONS, fhir_server=fhir_server)["conditions"].error is None


def test_query_cannot_climb_out_of_the_base_path():
    server = FakeServer()
    result = fetch(server, {"x": "../admin/Patient"})["x"]
    assert result.error == "server not allowed"
    assert server.requests == []


def test_extra_prefixes_allow_the_clients_own_server():
    own = "https://ehr.hospital.example/fhir"
    url = f"{own}/Condition?patient={PATIENT_ID}"
    server = FakeServer({url: searchset(condition(1))})
    assert fetch(server, CONDITIONS, fhir_server=own)["conditions"].error == "server not allowed"
    assert fetch(server, CONDITIONS, fhir_server=own, extra_prefixes=(own,))["conditions"].error is None


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://fhir.example.org/r4", True),
        ("https://fhir.example.org/r4/Patient/1", True),
        ("https://fhir.example.org/r4x", False),
        ("https://fhir.example.org.evil.com/r4", False),
        ("https://evil.com/https://fhir.example.org/r4", False),
        ("https://a@fhir.example.org/r4", False),
        ("https://fhir.example.org/r4/../secret", False),
    ],
)
def test_is_allowed_compares_parsed_prefixes(url, allowed):
    client = FhirClient(settings())
    assert client.is_allowed(url) is allowed
    asyncio.run(client.aclose())


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:8080/fhir", True),
        ("http://127.1.2.3/", True),
        ("http://localhost:8080/", True),
        ("https://[::1]:8443/fhir", True),
        ("http://169.254.169.254/", False),
        ("http://10.0.0.5/fhir", False),
        ("http://localhost.evil.com/", False),
        ("http://2130706433/", False),  # 127.0.0.1 as a number: refused rather than decoded
        ("https://fhir.example.org/r4", False),
    ],
)
def test_empty_allow_list_means_loopback_only(url, allowed):
    client = FhirClient(settings(fhir_server_allowlist=()))
    assert client.is_allowed(url) is allowed
    asyncio.run(client.aclose())


# --- logs, concurrency ---------------------------------------------------------------------------


def test_token_and_patient_ids_stay_out_of_logs_and_results(caplog):
    caplog.set_level(logging.DEBUG)
    page2 = f"{CONDITIONS_URL}&_offset=1"

    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout(f"timed out {request.url} {request.headers}", request=request)

    server = FakeServer(
        {
            CONDITIONS_URL: searchset(condition(1), next_url=page2),
            page2: searchset(condition(2)),
            f"{BASE}/Patient/{PATIENT_ID}": httpx.Response(500, text=f"boom {TOKEN}"),
            f"{BASE}/Observation?patient={PATIENT_ID}": timeout,
            f"{BASE}/MedicationRequest?patient={PATIENT_ID}": outcome("error", "forbidden"),
        }
    )
    results = fetch(
        server,
        {
            **CONDITIONS,
            "patient": f"Patient/{PATIENT_ID}",
            "observations": f"Observation?patient={PATIENT_ID}",
            "medications": f"MedicationRequest?patient={PATIENT_ID}",
        },
    )
    assert [results[k].error for k in ("conditions", "patient", "observations", "medications")] == [
        None,
        "HTTP 500",
        "timeout",
        "OperationOutcome: forbidden",
    ]
    assert len(server.requests) == 5
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(results)
    assert PATIENT_ID not in caplog.text  # nor in httpx's request log
    fhir_records = [r.getMessage() for r in caplog.records if r.name == "cds_service.fhir"]
    assert len(fhir_records) == 4
    assert any("key=conditions type=Condition ok pages=2" in line for line in fhir_records)
    assert not any(PATIENT_ID in line or "http" in line for line in fhir_records)


def test_queries_run_in_parallel():
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.6)
        return httpx.Response(200, json=searchset())

    queries = {f"k{n}": f"Condition?code={n}" for n in range(3)}
    server = FakeServer({f"{BASE}/{query}": slow for query in queries.values()})
    started = time.monotonic()
    results = fetch(server, queries, fhir_timeout_s=2.0, fhir_deadline_s=5.0)
    elapsed = time.monotonic() - started
    assert all(result.error is None for result in results.values())
    assert elapsed < 1.5, f"3 queries of 0.6 s took {elapsed:.2f} s: not concurrent (in turn: 1.8 s)"


# --- against the real test FHIR server (Medplum, in memory) --------------------------------------


@pytest.fixture(scope="module")
def medplum():
    if reason := launcher.skip_reason():
        pytest.skip(reason)
    with start_fhir_server(token=TOKEN) as server:
        yield server


def fetch_real(base_url: str, queries: dict[str, str], token: str | None, **overrides) -> dict[str, QueryResult]:
    async def run() -> dict[str, QueryResult]:
        client = FhirClient(settings(fhir_server_allowlist=(), **overrides))  # empty list: loopback allowed
        try:
            return await client.fetch_all(base_url, queries, token)
        finally:
            await client.aclose()

    return asyncio.run(run())


@pytest.mark.fhir_server
def test_real_server_search_with_paging_and_read(medplum):
    patient_id = f"p-{uuid.uuid4().hex[:16]}"
    entries = [
        {"resource": {"resourceType": "Patient", "id": patient_id}, "request": {"method": "PUT", "url": f"Patient/{patient_id}"}}
    ]
    for n in range(5):
        resource = {"resourceType": "Condition", "subject": {"reference": f"Patient/{patient_id}"}, "note": [{"text": str(n)}]}
        entries.append({"resource": resource, "request": {"method": "POST", "url": "Condition"}})
    load_bundle(medplum.base_url, {"resourceType": "Bundle", "type": "transaction", "entry": entries}, token=TOKEN)

    results = fetch_real(
        medplum.base_url,
        {"conditions": f"Condition?patient={patient_id}&_count=2", "patient": f"Patient/{patient_id}"},
        TOKEN,
    )
    conditions = results["conditions"]
    assert conditions.error is None and conditions.pages == 3 and not conditions.partial
    assert sorted(r["note"][0]["text"] for r in conditions.resources) == ["0", "1", "2", "3", "4"]
    assert results["patient"].resources[0]["id"] == patient_id


@pytest.mark.fhir_server
def test_real_server_refuses_a_wrong_token_and_limits_pages(medplum):
    results = fetch_real(medplum.base_url, {"patients": "Patient?_count=1"}, "not-the-token")
    assert results["patients"] == QueryResult("patients", None, "HTTP 401")

    for n in range(3):
        load_bundle(
            medplum.base_url,
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [{"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}}],
            },
            token=TOKEN,
        )
    limited = fetch_real(medplum.base_url, {"patients": "Patient?_count=1"}, TOKEN, fhir_max_pages=2)["patients"]
    assert limited.error == "too many pages" and limited.pages == 2 and limited.partial


@pytest.mark.fhir_server
def test_real_server_read_of_missing_resource(medplum):
    result = fetch_real(medplum.base_url, {"patient": f"Patient/{uuid.uuid4()}"}, TOKEN)["patient"]
    assert result == QueryResult("patient", None, "HTTP 404")
