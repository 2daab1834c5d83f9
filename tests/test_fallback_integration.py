"""Issue 4, FHIR fallback, end to end: the HTTP API against the real (Medplum, in-memory) FHIR server.

Every public vignette is loaded once into the test FHIR server as a patient record dated relative to
TODAY; the service under test evaluates with CDS_TODAY = TODAY. The central property: for every
vignette and both hooks, a request carrying the whole prefetch and a request carrying no prefetch and
only `fhirServer` give the same cards (type, rule, facts, evidence, recommended protocol: the whole
response, since the same hookInstance gives the same card uuids). Then the mixed case, paging,
the access token, partial failures, the allow-list, and a real uvicorn server on loopback.

Tests that need node carry the `fhir_server` mark. Without the node packages they are skipped,
except in CI (env CI set), where the launcher fails loudly instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import ContextManager, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from cds_service import vignettes
from cds_service.app import create_app
from cds_service.settings import Settings
from fhir_server.launcher import load_bundle
from server_support import fhir_server_or_skip, serve_in_thread

TODAY = date(2026, 11, 21)
DATA = Path(__file__).parent / "data"
VIGNETTES = json.loads((DATA / "vignettes-public.json").read_text(encoding="utf-8"))
BY_ID = {v["id"]: v for v in VIGNETTES}
HOOKS = ("order-select", "order-sign")
SERVICE = {"order-select": "lumbar-imaging-order-select", "order-sign": "lumbar-imaging-order-sign"}
EXTENSION = "org.example.lumbar-imaging-cds.assessment"
TOKEN = f"tok-{uuid.uuid4().hex}"  # distinctive: searched for in logs, bodies and the audit database
WRONG_TOKEN = f"wrong-{uuid.uuid4().hex}"
# The clinical team's expected card names -> this service's card types (source.topic.code)
EXPECTED_CARD = {
    "early-imaging-warning": "imaging-not-indicated",
    "red-flag-justified-info": "imaging-indicated",
    "cauda-equina-critical": "cauda-equina-emergency",
}
KEY_TYPES = {"patient": "Patient", **{key: rtype for rtype, key in vignettes.PREFETCH_KEYS.items()}}
NOT_INDICATED = "imaging-not-indicated"
NOT_LUMBAR = {"LBP-V38"}  # an MRI brain order: no card, and no data read for it
OPERATION_OUTCOME = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "forbidden"}]}


def settings(tmp_dir: Path, **values: str) -> Settings:
    """The service's settings for these tests. Generous FHIR time limits except where a test sets them:
    the equivalence tests are about the answers, and CI machines can be slow."""
    base = {
        "CDS_TODAY": TODAY.isoformat(),
        "CDS_DATABASE_URL": f"sqlite:///{tmp_dir / f'audit-{uuid.uuid4().hex[:8]}.db'}",
        "CDS_FHIR_TIMEOUT": "10",
        "CDS_FHIR_DEADLINE": "15",
    }
    return Settings.from_mapping({**base, **values})


def request_for(vignette: dict, hook: str = "order-select", *, prefetch_keys=None, fhir: str | None = None,
                token: str | None = None, hook_instance: str | None = None, prefetch_overrides: dict | None = None) -> dict:
    """A CDS Hooks request for the vignette: the prefetch keys listed (all when None), fhirServer and token."""
    request = vignettes.hook_request(vignette, TODAY, hook)
    if prefetch_keys is not None:
        request["prefetch"] = {key: value for key, value in request["prefetch"].items() if key in prefetch_keys}
    request["prefetch"].update(prefetch_overrides or {})
    if not request["prefetch"]:
        del request["prefetch"]
    if fhir is not None:
        request["fhirServer"] = fhir
    if token is not None:
        request["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "expires_in": 300,
                                        "scope": "patient/*.read", "subject": "lumbar-imaging-cds"}
    if hook_instance:
        request["hookInstance"] = hook_instance
    return request


def card_summary(response: httpx.Response) -> int | list[dict]:
    """The status when not 200; else per card what the assessment says (compared first, for clear diffs)."""
    if response.status_code != 200:
        return response.status_code
    summary = []
    for card in response.json()["cards"]:
        assessment = card["extension"][EXTENSION]
        summary.append({
            "type": card["source"]["topic"]["code"],
            "indicator": card["indicator"],
            "rule": assessment["rule"],
            "order": assessment.get("order"),
            "facts": sorted(assessment.get("facts", [])),
            "evidence": sorted(assessment.get("evidence", [])),
            "protocol": assessment.get("recommendedProtocol"),
            "unread": sorted(assessment.get("unread", [])),
        })
    return summary


def card_types(response: httpx.Response) -> int | list[str]:
    summary = card_summary(response)
    return summary if isinstance(summary, int) else [card["type"] for card in summary]


def assert_never_not_indicated(response: httpx.Response) -> None:
    assert response.status_code in (200, 412), response.text
    if response.status_code == 200:
        assert NOT_INDICATED not in card_types(response), response.text


class RecordingTransport(httpx.AsyncBaseTransport):
    """The real network transport, recording every request; optional faults per resource type.

    fail: resource type -> HTTP status answered without contacting the server;
    delay: resource type -> seconds to wait before forwarding;
    rewrite: function of the request URL -> the URL actually fetched (None: unchanged).
    """

    def __init__(self, fail: dict[str, int] | None = None, delay: dict[str, float] | None = None, rewrite=None) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.fail = fail or {}
        self.delay = delay or {}
        self.rewrite = rewrite
        self.requests: list[httpx.Request] = []

    @staticmethod
    def resource_type(request: httpx.Request) -> str:
        segments = [s for s in request.url.path.split("/") if s]
        return segments[0] if segments else ""

    @property
    def types(self) -> list[str]:
        return sorted(self.resource_type(r) for r in self.requests)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        resource_type = self.resource_type(request)
        if resource_type in self.delay:
            await asyncio.sleep(self.delay[resource_type])
        if resource_type in self.fail:
            return httpx.Response(self.fail[resource_type], json={**OPERATION_OUTCOME, "issue": [{"severity": "error", "code": "exception"}]})
        if self.rewrite and (target := self.rewrite(str(request.url))):
            request = httpx.Request(request.method, target, headers=request.headers)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextmanager
def faults(transport: RecordingTransport, fail=None, delay=None, rewrite=None) -> Iterator[None]:
    """Faults on a shared RecordingTransport for the duration of a block."""
    transport.fail, transport.delay, transport.rewrite = fail or {}, delay or {}, rewrite
    try:
        yield
    finally:
        transport.fail, transport.delay, transport.rewrite = {}, {}, None


@contextmanager
def service(tmp_dir: Path, transport: httpx.AsyncBaseTransport | None = None, **values: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings(tmp_dir, **values), fhir_transport=transport)) as client:
        yield client


@contextmanager
def recording_service(tmp_dir: Path, **values: str) -> Iterator[tuple[TestClient, RecordingTransport]]:
    """(client, transport): the service with a RecordingTransport, no faults yet, in front of the network."""
    transport = RecordingTransport()
    with service(tmp_dir, transport, **values) as test_client:
        yield test_client, transport


def post(client: TestClient, request: dict) -> httpx.Response:
    return client.post(f"/cds-services/{SERVICE[request['hook']]}", json=request)


def uvicorn_server(app) -> ContextManager[str]:
    """The app behind a real uvicorn server on a loopback port (a thread of this process), its logs
    (access log included) left to the root logger, where caplog sees them."""
    return serve_in_thread(app, startup_timeout_s=20, lifespan="on", log_config=None, access_log=True, timeout_keep_alive=5)


def load_vignettes(base_url: str, token: str | None = None) -> None:
    for vignette in VIGNETTES:
        load_bundle(base_url, vignettes.transaction_bundle(vignettes.patient_record(vignette, TODAY)), token=token)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def medplum():
    """The Medplum server (no token), started once, holding every public vignette's patient record."""
    with fhir_server_or_skip() as server:
        load_vignettes(server.base_url)
        yield server


@pytest.fixture(scope="module")
def medplum_token():
    """A second Medplum server that requires `Authorization: Bearer TOKEN`, with the same records."""
    with fhir_server_or_skip(token=TOKEN) as server:
        load_vignettes(server.base_url, token=TOKEN)
        yield server


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    """The service with default FHIR settings but CDS_TODAY (no allow-list: loopback only)."""
    with service(tmp_path_factory.mktemp("fallback")) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def prefetch_answers(client) -> dict[tuple[str, str], httpx.Response]:
    """(vignette id, hook) -> the answer to the prefetch-only request, hookInstance fixed per pair."""
    answers = {}
    for vignette in VIGNETTES:
        for hook in HOOKS:
            answers[vignette["id"], hook] = post(client, request_for(vignette, hook, hook_instance=hook_instance(vignette, hook)))
    return answers


def hook_instance(vignette: dict, hook: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"fallback-integration/{vignette['id']}/{hook}"))


VIGNETTE_IDS = [v["id"] for v in VIGNETTES]


# --- 1. prefetch alone == FHIR server alone, every vignette, both hooks ---------------------------


@pytest.mark.fhir_server
@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("vignette_id", VIGNETTE_IDS)
def test_fhir_server_alone_gives_the_same_cards_as_prefetch_alone(medplum, client, prefetch_answers, vignette_id, hook):
    vignette = BY_ID[vignette_id]
    from_prefetch = prefetch_answers[vignette_id, hook]
    request = request_for(vignette, hook, prefetch_keys=(), fhir=medplum.base_url, hook_instance=hook_instance(vignette, hook))
    assert "prefetch" not in request
    from_fhir = post(client, request)

    assert from_prefetch.status_code == 200, from_prefetch.text
    # Not vacuous: the prefetch answer is the clinical team's expected one...
    expected = vignette["expected"]
    assert card_types(from_prefetch) == [EXPECTED_CARD[name] for name in expected["cards"]]
    if expected["contrast"]:
        assert [c["protocol"]["contrast"] for c in card_summary(from_prefetch)] == [expected["contrast"]]
    # ... and the FHIR server's is the same, down to every byte of the cards.
    assert card_summary(from_fhir) == card_summary(from_prefetch)
    assert from_fhir.json() == from_prefetch.json()


def test_a_failing_fhir_server_would_not_pass_the_equivalence_test(client):
    """The equivalence above is not vacuous for the empty-card vignettes: with nothing readable the
    child (LBP-V39) gets 412, not the [] that the prefetch gives."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again: nothing listens there
    response = post(client, request_for(BY_ID["LBP-V39"], prefetch_keys=(), fhir=closed))
    assert response.status_code == 412, response.text
    assert "request failed (ConnectError)" in response.json()["issue"][0]["diagnostics"]


# --- 2. mixed: some keys prefetched, the rest fetched; paging from a prefetched page -------------

SPLITS = {
    "patient+conditions prefetched": ("patient", "conditions"),
    "all but patient+conditions prefetched": ("observations", "medicationRequests", "medicationStatements", "procedures", "serviceRequests"),
}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Iterator[tuple[TestClient, RecordingTransport]]:
    with recording_service(tmp_path_factory.mktemp("mixed")) as client_and_transport:
        yield client_and_transport


@pytest.mark.fhir_server
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("vignette_id", VIGNETTE_IDS)
def test_mixed_prefetch_and_fhir_server_give_the_same_cards(medplum, recorded, prefetch_answers, vignette_id, split):
    test_client, transport = recorded
    vignette = BY_ID[vignette_id]
    transport.requests.clear()
    request = request_for(vignette, prefetch_keys=SPLITS[split], fhir=medplum.base_url, hook_instance=hook_instance(vignette, "order-select"))
    response = post(test_client, request)

    assert card_summary(response) == card_summary(prefetch_answers[vignette_id, "order-select"])
    assert response.json() == prefetch_answers[vignette_id, "order-select"].json()
    # Exactly the absent keys were fetched, once each (a prefetched `null` is "no data", never fetched
    # again); nothing at all for an order that is not lumbar imaging.
    absent = sorted(KEY_TYPES[key] for key in KEY_TYPES if key not in SPLITS[split])
    assert transport.types == ([] if vignette_id in NOT_LUMBAR else absent)
    assert all(r.method == "GET" and r.url.host == "127.0.0.1" for r in transport.requests)
    assert all("authorization" not in r.headers for r in transport.requests)  # no fhirAuthorization: no header


@pytest.mark.fhir_server
def test_the_missing_keys_are_fetched_in_parallel(medplum, recorded, prefetch_answers):
    """Every query takes 1.5 s longer than usual: one after the other, seven would take 10 s or more."""
    test_client, transport = recorded
    vignette = BY_ID["LBP-V21"]
    with faults(transport, delay={resource_type: 1.5 for resource_type in KEY_TYPES.values()}):
        started = time.monotonic()
        response = post(test_client, request_for(vignette, prefetch_keys=(), fhir=medplum.base_url,
                                                 hook_instance=hook_instance(vignette, "order-select")))
        elapsed = time.monotonic() - started
    assert response.json() == prefetch_answers["LBP-V21", "order-select"].json()
    assert elapsed < 6.0, f"seven queries of 1.5 s took {elapsed:.1f} s: not in parallel"


@pytest.mark.fhir_server
def test_prefetched_first_page_and_its_next_pages_from_the_fhir_server(medplum, recorded, prefetch_answers):
    """The EHR prefetched one page of Conditions (of three); the service reads pages 2 and 3 itself."""
    test_client, transport = recorded
    vignette = BY_ID["LBP-V18"]  # three Conditions, the cancer history among them
    first_page = httpx.get(f"{medplum.base_url}/Condition", params={"patient": "lbp-v18", "_count": "1"}).json()
    assert len(first_page["entry"]) == 1 and any(link["relation"] == "next" for link in first_page["link"])
    transport.requests.clear()
    request = request_for(vignette, fhir=medplum.base_url, prefetch_overrides={"conditions": first_page},
                          hook_instance=hook_instance(vignette, "order-select"))
    response = post(test_client, request)

    assert response.json() == prefetch_answers["LBP-V18", "order-select"].json()
    assert [str(r.url.params.get("_offset")) for r in transport.requests] == ["1", "2"]
    assert transport.types == ["Condition", "Condition"]

    # Without fhirServer the same first page cannot be completed: data-incomplete, never not-indicated
    del request["fhirServer"]
    incomplete = post(test_client, request)
    assert card_types(incomplete) == ["imaging-data-incomplete"]
    assert card_summary(incomplete)[0]["unread"] == ["Condition"]


@pytest.mark.fhir_server
def test_prefetched_page_with_a_next_link_at_the_server_root(medplum, recorded):
    """HAPI-style paging: the next link is the server base itself plus a query
    (`http://host/fhir?_getpages=...`). The remaining pages are still fetched from fhirServer."""
    vignette = BY_ID["LBP-V18"]
    page1 = httpx.get(f"{medplum.base_url}/Condition", params={"patient": "lbp-v18", "_count": "1"}).json()
    page2_url = f"{medplum.base_url}/Condition?patient=lbp-v18&_count=2&_offset=1"
    page1["link"] = [{"relation": "next", "url": f"{medplum.base_url}?_getpages=abc&_getpagesoffset=1"}]

    def rewrite(url: str) -> str | None:
        return page2_url if "_getpages=abc" in url else None

    test_client, transport = recorded
    transport.requests.clear()
    with faults(transport, rewrite=rewrite):
        response = post(test_client, request_for(vignette, fhir=medplum.base_url, prefetch_overrides={"conditions": page1}))
    assert [r.url.params.get("_getpages") for r in transport.requests] == ["abc"]
    assert card_summary(response)[0]["rule"] == "R1"
    assert card_summary(response)[0]["evidence"] == ["Condition/lbp-v18-condition-1", "Condition/lbp-v18-condition-2"]


@pytest.fixture(scope="module")
def many_conditions(medplum) -> dict:
    """LBP-V30 with 449 more back pain Conditions: 451 in all, the urinary retention last, so a search
    with `_count=200` (the service's template) finds it on the third page only."""
    v30 = BY_ID["LBP-V30"]
    extra = [dict(v30["facts"][0], onsetDaysAgo=100 + n) for n in range(449)]
    vignette = dict(v30, id="LBP-V30-MANY", facts=extra + v30["facts"])
    record = vignettes.patient_record(vignette, TODAY)
    for start in range(0, len(record), 25):  # Medplum caps the updates of one transaction
        load_bundle(medplum.base_url, vignettes.transaction_bundle(record[start:start + 25]))
    return vignette


@pytest.mark.fhir_server
def test_next_links_are_followed_to_the_cauda_equina_sign_on_page_three(medplum, many_conditions, recorded):
    test_client, transport = recorded
    transport.requests.clear()
    response = post(test_client, request_for(many_conditions, prefetch_keys=(), fhir=medplum.base_url))
    summary = card_summary(response)
    assert [c["type"] for c in summary] == ["cauda-equina-emergency"], response.text
    assert summary[0]["evidence"] == ["Condition/lbp-v30-many-condition-450"]
    assert summary[0]["unread"] == []
    pages = [r for r in transport.requests if transport.resource_type(r) == "Condition"]
    assert [r.url.params.get("_offset") for r in pages] == [None, "200", "400"]


@pytest.mark.fhir_server
def test_a_page_limit_that_cuts_the_conditions_short_gives_data_incomplete(medplum, many_conditions, tmp_path):
    """CDS_FHIR_MAX_PAGES=2: the third page with the cauda equina sign is not read. What was read
    (400 back pain Conditions) would mean "not indicated"; the answer is imaging-data-incomplete."""
    with service(tmp_path, CDS_FHIR_MAX_PAGES="2") as test_client:
        response = post(test_client, request_for(many_conditions, prefetch_keys=(), fhir=medplum.base_url))
    assert_never_not_indicated(response)
    assert card_types(response) == ["imaging-data-incomplete"]
    assert card_summary(response)[0]["unread"] == ["Condition"]


# --- 3. the access token --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_service(tmp_path_factory) -> Iterator[tuple[TestClient, RecordingTransport]]:
    with recording_service(tmp_path_factory.mktemp("token")) as client_and_transport:
        yield client_and_transport


@pytest.mark.fhir_server
@pytest.mark.parametrize("vignette_id", VIGNETTE_IDS)
def test_the_access_token_is_sent_on_every_request(medplum_token, token_service, prefetch_answers, vignette_id):
    test_client, transport = token_service
    vignette = BY_ID[vignette_id]
    transport.requests.clear()
    request = request_for(vignette, "order-sign", prefetch_keys=(), fhir=medplum_token.base_url, token=TOKEN,
                          hook_instance=hook_instance(vignette, "order-sign"))
    response = post(test_client, request)
    assert response.json() == prefetch_answers[vignette_id, "order-sign"].json()
    assert len(transport.requests) == (0 if vignette_id in NOT_LUMBAR else 7)
    if vignette_id in NOT_LUMBAR:
        return
    assert {r.headers.get("authorization") for r in transport.requests} == {f"Bearer {TOKEN}"}


@pytest.mark.fhir_server
def test_the_access_token_is_sent_for_next_pages_too(medplum_token, token_service, prefetch_answers):
    """A prefetched first page; its next pages fetched from the token-protected server."""
    test_client, transport = token_service
    headers = {"Authorization": f"Bearer {TOKEN}"}
    first_page = httpx.get(f"{medplum_token.base_url}/Condition", params={"patient": "lbp-v18", "_count": "1"}, headers=headers).json()
    transport.requests.clear()
    response = post(test_client, request_for(BY_ID["LBP-V18"], fhir=medplum_token.base_url, token=TOKEN,
                                             prefetch_overrides={"conditions": first_page},
                                             hook_instance=hook_instance(BY_ID["LBP-V18"], "order-select")))
    assert response.json() == prefetch_answers["LBP-V18", "order-select"].json()
    assert transport.types == ["Condition", "Condition"]
    assert {r.headers.get("authorization") for r in transport.requests} == {f"Bearer {TOKEN}"}


@pytest.mark.fhir_server
@pytest.mark.parametrize("vignette_id", VIGNETTE_IDS)
def test_a_wrong_token_never_gives_not_indicated(medplum_token, token_service, vignette_id):
    """The FHIR server answers 401 to every query: 412 (nothing read), never a clinical answer,
    except a non-lumbar order (no card at all)."""
    test_client, _ = token_service
    response = post(test_client, request_for(BY_ID[vignette_id], prefetch_keys=(), fhir=medplum_token.base_url, token=WRONG_TOKEN))
    if vignette_id in NOT_LUMBAR:  # MRI brain: not lumbar imaging, no card whatever the data
        assert response.status_code == 200 and response.json() == {"cards": []}
        return
    assert response.status_code == 412, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    diagnostics = body["issue"][0]["diagnostics"]
    assert "Condition (HTTP 401)" in diagnostics and "Patient (HTTP 401)" in diagnostics
    assert WRONG_TOKEN not in response.text


@pytest.mark.fhir_server
@pytest.mark.parametrize("vignette_id", VIGNETTE_IDS)
def test_a_wrong_token_with_part_of_the_data_prefetched(medplum_token, token_service, prefetch_answers, vignette_id):
    """Patient and Conditions prefetched, the rest refused with 401: what would be "not indicated"
    becomes imaging-data-incomplete naming what was not read; a red flag or a cauda equina sign in
    the Conditions still counts (the critical card for CES)."""
    test_client, _ = token_service
    response = post(test_client, request_for(BY_ID[vignette_id], prefetch_keys=("patient", "conditions"),
                                             fhir=medplum_token.base_url, token=WRONG_TOKEN))
    assert_never_not_indicated(response)
    full = card_types(prefetch_answers[vignette_id, "order-select"])
    if full == [NOT_INDICATED]:
        assert card_types(response) == ["imaging-data-incomplete"]
        assert card_summary(response)[0]["unread"] == ["MedicationRequest", "MedicationStatement", "Observation", "Procedure", "ServiceRequest"]
    if full == ["cauda-equina-emergency"]:
        assert card_types(response) == ["cauda-equina-emergency"]


@pytest.mark.fhir_server
def test_the_token_never_reaches_logs_responses_or_the_audit(medplum_token, tmp_path, caplog):
    """Through a real uvicorn server, every logger at DEBUG (httpx and httpcore too), a good token,
    a wrong one and a partial failure: neither token string appears anywhere."""
    for name in ("", "cds_service", "httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access"):
        caplog.set_level(logging.DEBUG, logger=name or None)
    database = tmp_path / "audit.db"
    app = create_app(settings(tmp_path, CDS_DATABASE_URL=f"sqlite:///{database}", CDS_LOG_LEVEL="DEBUG"))
    responses, hook_instances = [], []
    with uvicorn_server(app) as base_url:
        for vignette_id, token, keys in (("LBP-V01", TOKEN, ()), ("LBP-V01", WRONG_TOKEN, ()),
                                         ("LBP-V30", WRONG_TOKEN, ("conditions",)), ("LBP-V17", TOKEN, ("patient",))):
            request = request_for(BY_ID[vignette_id], prefetch_keys=keys, fhir=medplum_token.base_url, token=token)
            hook_instances.append(request["hookInstance"])
            responses.append(httpx.post(f"{base_url}/cds-services/{SERVICE[request['hook']]}", json=request, timeout=60))
    # the app has shut down: the audit writer has flushed every decision
    assert [card_types(r) for r in responses] == [["imaging-not-indicated"], 412, ["cauda-equina-emergency"], ["imaging-indicated"]]

    assert any(r.name == "cds_service.fhir" for r in caplog.records), "the FHIR client's log was not captured"
    assert any(r.name.startswith("httpcore") for r in caplog.records), "httpcore's debug log was not captured"
    logged = caplog.text + "".join(repr(r.args) + repr(r.__dict__) for r in caplog.records)
    stored = b"".join(file.read_bytes() for file in tmp_path.iterdir())  # the SQLite database, its WAL and journal
    assert all(hook_instance.encode() in stored for hook_instance in hook_instances), "the audit was not written"
    for secret in (TOKEN, WRONG_TOKEN):
        assert secret not in logged
        assert not any(secret in r.text or secret in str(r.headers) for r in responses)
        assert secret.encode() not in stored


# --- 4. cauda equina with only part of the data readable ------------------------------------------


@pytest.mark.fhir_server
def test_ces_with_observations_refused_in_the_prefetch(medplum, client):
    """Observation prefetched as an OperationOutcome, everything else read from the FHIR server."""
    request = request_for(BY_ID["LBP-V30"], prefetch_keys=(), fhir=medplum.base_url,
                          prefetch_overrides={"observations": OPERATION_OUTCOME})
    summary = card_summary(post(client, request))
    assert [c["type"] for c in summary] == ["cauda-equina-emergency"]
    assert summary[0]["indicator"] == "critical" and summary[0]["unread"] == ["Observation"]
    assert summary[0]["evidence"] == ["Condition/lbp-v30-condition-1"]

    same_for_v01 = post(client, request_for(BY_ID["LBP-V01"], prefetch_keys=(), fhir=medplum.base_url,
                                            prefetch_overrides={"observations": OPERATION_OUTCOME}))
    assert card_types(same_for_v01) == ["imaging-data-incomplete"]


@pytest.mark.fhir_server
@pytest.mark.parametrize("status", [500, 404, 403])
def test_ces_when_the_fhir_server_fails_observation_queries(medplum, recorded, status):
    test_client, transport = recorded
    transport.requests.clear()
    with faults(transport, fail={"Observation": status}):
        ces = post(test_client, request_for(BY_ID["LBP-V30"], prefetch_keys=(), fhir=medplum.base_url))
        bilateral = post(test_client, request_for(BY_ID["LBP-V31"], "order-sign", prefetch_keys=(), fhir=medplum.base_url))
        plain = post(test_client, request_for(BY_ID["LBP-V01"], prefetch_keys=(), fhir=medplum.base_url))
    for response in (ces, bilateral):
        summary = card_summary(response)
        assert [c["type"] for c in summary] == ["cauda-equina-emergency"], response.text
        assert summary[0]["unread"] == ["Observation"]
    assert card_types(plain) == ["imaging-data-incomplete"]
    assert card_summary(plain)[0]["unread"] == ["Observation"]
    assert transport.types.count("Observation") == 3


@pytest.mark.fhir_server
def test_ces_when_observation_queries_miss_the_deadline(medplum, tmp_path):
    """The Observation query hangs; the overall deadline (not the per-request timeout, set longer
    here) cuts it: the answer comes after about the deadline, with what the other queries read."""
    transport = RecordingTransport(delay={"Observation": 120.0})
    with service(tmp_path, transport, CDS_FHIR_TIMEOUT="60", CDS_FHIR_DEADLINE="2.5") as test_client:
        started = time.monotonic()
        ces = post(test_client, request_for(BY_ID["LBP-V30"], prefetch_keys=(), fhir=medplum.base_url))
        elapsed = time.monotonic() - started
    assert card_types(ces) == ["cauda-equina-emergency"], ces.text
    assert card_summary(ces)[0]["unread"] == ["Observation"]
    assert 2.4 < elapsed < 10, f"the hook call took {elapsed:.1f} s with a 2.5 s FHIR deadline"


@pytest.mark.fhir_server
def test_ces_prefetched_conditions_and_a_fhir_server_path_that_404s(medplum, client):
    """fhirServer points at a path the server does not serve: every query 404s; the prefetched
    Conditions still give the critical card; without them, 412 (nothing read)."""
    wrong_path = f"{medplum.base_url}/no-such-base"
    ces = post(client, request_for(BY_ID["LBP-V30"], prefetch_keys=("conditions",), fhir=wrong_path))
    assert card_types(ces) == ["cauda-equina-emergency"]
    assert card_summary(ces)[0]["unread"] == ["MedicationRequest", "MedicationStatement", "Observation", "Patient", "Procedure", "ServiceRequest"]
    nothing = post(client, request_for(BY_ID["LBP-V30"], prefetch_keys=(), fhir=wrong_path))
    assert nothing.status_code == 412
    assert "HTTP 404" in nothing.json()["issue"][0]["diagnostics"]


# --- 5. the allow-list ----------------------------------------------------------------------------

OUTSIDE = "http://10.255.255.1/fhir"  # a private address: must never be contacted


def test_a_fhir_server_outside_the_allow_list_is_never_contacted(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    # The transport would forward to the network: it must see no request at all.
    with recording_service(tmp_path, CDS_FHIR_SERVER_ALLOWLIST="http://127.0.0.1:1/") as (test_client, transport):
        fhir = test_client.app.state.cds.fhir
        assert fhir.is_allowed("http://127.0.0.1:1/Patient/x")
        assert not fhir.is_allowed(OUTSIDE)
        nothing = post(test_client, request_for(BY_ID["LBP-V01"], prefetch_keys=(), fhir=OUTSIDE, token=TOKEN))
        partial = post(test_client, request_for(BY_ID["LBP-V01"], prefetch_keys=("patient", "conditions"), fhir=OUTSIDE, token=TOKEN))
        ces = post(test_client, request_for(BY_ID["LBP-V30"], "order-sign", prefetch_keys=("conditions",), fhir=OUTSIDE, token=TOKEN))
        paged = dict(vignettes.searchset([]), link=[{"relation": "next", "url": f"{OUTSIDE}/Condition?page=2"}])
        next_page = post(test_client, request_for(BY_ID["LBP-V01"], fhir=OUTSIDE, prefetch_overrides={"conditions": paged}))
    assert transport.requests == []
    assert nothing.status_code == 412
    assert "server not allowed" in nothing.json()["issue"][0]["diagnostics"]
    assert card_types(partial) == ["imaging-data-incomplete"]
    assert card_types(ces) == ["cauda-equina-emergency"]
    assert card_types(next_page) == ["imaging-data-incomplete"]
    for response in (nothing, partial, ces, next_page):
        assert_never_not_indicated(response)
    assert "error=server not allowed" in caplog.text
    assert TOKEN not in caplog.text and "10.255.255.1" not in caplog.text


@pytest.mark.fhir_server
def test_a_set_allow_list_replaces_the_loopback_default(medplum, tmp_path):
    """With an allow-list that does not name it, even the loopback test server is not contacted;
    with one that does, it is."""
    transport = RecordingTransport()
    with service(tmp_path, transport, CDS_FHIR_SERVER_ALLOWLIST="http://127.0.0.1:1/") as test_client:
        refused = post(test_client, request_for(BY_ID["LBP-V01"], prefetch_keys=(), fhir=medplum.base_url))
    assert transport.requests == [] and refused.status_code == 412

    with service(tmp_path, transport, CDS_FHIR_SERVER_ALLOWLIST=f"https://fhir.example.org/r4,{medplum.base_url}/") as test_client:
        allowed = post(test_client, request_for(BY_ID["LBP-V17"], prefetch_keys=(), fhir=medplum.base_url))
    assert card_types(allowed) == ["imaging-indicated"]
    assert len(transport.requests) == 7


# --- 6. a real uvicorn server on loopback ---------------------------------------------------------


@pytest.mark.fhir_server
def test_through_uvicorn_every_vignette_at_once(medplum, tmp_path, prefetch_answers):
    """All twelve vignettes, FHIR server only, sent concurrently over TCP to uvicorn: 84 FHIR queries
    through the one shared client; every answer equals the prefetch-only one. (The single-threaded
    test server answers them one by one: long FHIR time limits, for slow CI machines.)"""
    app = create_app(settings(tmp_path, CDS_FHIR_TIMEOUT="60", CDS_FHIR_DEADLINE="90"))

    async def send_all(base_url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
            requests = [request_for(v, "order-select", prefetch_keys=(), fhir=medplum.base_url, hook_instance=hook_instance(v, "order-select"))
                        for v in VIGNETTES]
            return await asyncio.gather(*(http.post(f"/cds-services/{SERVICE['order-select']}", json=r) for r in requests))

    with uvicorn_server(app) as base_url:
        assert httpx.get(f"{base_url}/healthz").json()["status"] == "ok"
        responses = asyncio.run(send_all(base_url))
    for vignette, response in zip(VIGNETTES, responses):
        assert response.headers["content-type"].startswith("application/json")
        assert response.json() == prefetch_answers[vignette["id"], "order-select"].json(), (vignette["id"], response.text)


# --- an order that is not lumbar imaging --------------------------------------------------------


@pytest.mark.fhir_server
def test_a_non_lumbar_order_reads_nothing_from_the_fhir_server(medplum, recorded):
    """README: orders that are not lumbar spine imaging get {"cards": []} without reading any data."""
    test_client, transport = recorded
    transport.requests.clear()
    response = post(test_client, request_for(BY_ID["LBP-V38"], prefetch_keys=(), fhir=medplum.base_url, token=TOKEN))
    assert response.status_code == 200 and response.json() == {"cards": []}
    assert transport.requests == []
