"""The service as users run it: `python -m cds_service serve` in its own process, over real TCP.

One server for the module (tests/server_support.live_server): discovery, the public vignettes,
4xx answers, 413 on a 6 MB body (declared and chunked), CORS preflight, and a batch of garbage
(bad JSON, deep nesting, broken HTTP, clients hanging up mid-body) after which the same process
still answers a valid call, with no 500 and no traceback in its log.
"""

from __future__ import annotations

import json
import socket
import time
from datetime import date
from typing import Iterator

import httpx
import pytest

from cds_service import vignettes
from server_support import DEFAULT_TODAY, SELECT_ID, SIGN_ID, LiveServerURL, live_server, load_vignettes

TODAY = date.fromisoformat(DEFAULT_TODAY)
VIGNETTES = load_vignettes()
EXPECTED_TOPIC = {"early-imaging-warning": "imaging-not-indicated", "red-flag-justified-info": "imaging-indicated",
                  "cauda-equina-critical": "cauda-equina-emergency"}
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServerURL]:
    with live_server(tmp_path_factory.mktemp("live")) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=10.0) as client:
        yield client


def select_url(server: str) -> str:
    return f"{server}/cds-services/{SELECT_ID}"


def assert_outcome(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["diagnostics"]
    return body


def test_health_and_discovery(http):
    health = http.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    discovery = http.get("/cds-services")
    assert discovery.status_code == 200 and discovery.headers["content-type"].startswith("application/json")
    services = discovery.json()["services"]
    assert {(s["id"], s["hook"]) for s in services} == {(SELECT_ID, "order-select"), (SIGN_ID, "order-sign")}
    assert all(s["prefetch"] and s["description"] and s["title"] for s in services)


@pytest.mark.parametrize("vignette_id", sorted(VIGNETTES))
def test_public_vignette_gets_the_expected_card_over_http(http, vignette_id):
    vignette = VIGNETTES[vignette_id]
    expected = [EXPECTED_TOPIC[name] for name in vignette["expected"]["cards"]]
    for hook, service_id in (("order-select", SELECT_ID), ("order-sign", SIGN_ID)):
        response = http.post(f"/cds-services/{service_id}", json=vignettes.hook_request(vignette, TODAY, hook=hook))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert [card["source"]["topic"]["code"] for card in response.json()["cards"]] == expected, hook


def test_malformed_json_is_400(http):
    body = assert_outcome(http.post(f"/cds-services/{SELECT_ID}", content=b'{"hook": "order-select",', headers=JSON_HEADERS), 400)
    assert "JSON" in body["issue"][0]["diagnostics"]


def test_missing_field_unknown_service_and_wrong_method(http):
    request = vignettes.hook_request(VIGNETTES["LBP-V01"], TODAY)
    del request["context"]["selections"]
    assert_outcome(http.post(f"/cds-services/{SELECT_ID}", json=request), 400)
    assert_outcome(http.post("/cds-services/no-such-service", json=request), 404)
    assert_outcome(http.get(f"/cds-services/{SELECT_ID}"), 405)


def test_412_when_data_is_neither_sent_nor_fetchable(http):
    request = vignettes.hook_request(VIGNETTES["LBP-V01"], TODAY, with_prefetch=False)
    assert_outcome(http.post(f"/cds-services/{SELECT_ID}", json=request), 412)


def test_six_megabyte_body_is_413(http, server):
    padding = "x" * 6_000_000
    body = json.dumps({**vignettes.hook_request(VIGNETTES["LBP-V01"], TODAY), "padding": padding}).encode()
    assert_outcome(http.post(f"/cds-services/{SELECT_ID}", content=body, headers=JSON_HEADERS), 413)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]

    with httpx.Client(timeout=10.0) as fresh:  # the server may close the connection after a 413
        response = fresh.post(select_url(server), content=chunks(), headers=JSON_HEADERS)
    assert "content-length" not in response.request.headers
    assert_outcome(response, 413)
    assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize("path", ["/cds-services", f"/cds-services/{SELECT_ID}", f"/cds-services/{SIGN_ID}/feedback"])
def test_cors_preflight(http, path):
    response = http.options(path, headers={"Origin": "http://localhost:8080", "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": "authorization,content-type"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "http://localhost:8080")
    assert "POST" in response.headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}


def test_feedback_over_http(http):
    cards = http.post(f"/cds-services/{SELECT_ID}", json=vignettes.hook_request(VIGNETTES["LBP-V01"], TODAY)).json()["cards"]
    item = {"card": cards[0]["uuid"], "outcome": "overridden", "outcomeTimestamp": "2025-03-01T10:00:00.000Z",
            "overrideReason": {"reason": {"code": "red-flag", "system": "http://example.org/override"}}}
    assert http.post(f"/cds-services/{SELECT_ID}/feedback", json={"feedback": [item]}).status_code == 200
    assert_outcome(http.post(f"/cds-services/{SELECT_ID}/feedback", json={"feedback": []}), 400)


GARBAGE_BODIES = [
    b"", b"{", b"}", b"[]", b"null", b"0", b'"', b"\x00" * 100, bytes(range(256)), b"\xff\xfe{}", b"{" * 100_000,
    b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b'{"hook": 1e999999}', b'{"hook": ' + b"9" * 100_000 + b"}",
    b'{"hook": "order-select", "hookInstance": "x", "context": {"patientId": "\\ud800", "userId": "u", "selections": [], "draftOrders": {}}}',
    b'{"hook": "order-select", "hookInstance": "x", "context": {"patientId": "p", "userId": "u", "selections": [], "draftOrders": {"entry": [1, null, "x", {"resource": []}]}}}',
    b'{"hook": "order-select", "hookInstance": "x", "context": {"patientId": "p", "userId": "u", "selections": [], "draftOrders": {}}, "prefetch": {"patient": "x", "conditions": [1]}}',
    json.dumps({"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "9999-12-31T23:59:59-12:00"}]}).encode(),
]


def raw_exchange(port: int, data: bytes, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        if not read:
            return b""
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
        return b"".join(chunks)


def test_server_keeps_serving_after_garbage(http, server):
    statuses = []
    for path in (f"/cds-services/{SELECT_ID}", f"/cds-services/{SIGN_ID}", f"/cds-services/{SELECT_ID}/feedback"):
        for body in GARBAGE_BODIES:
            response = http.post(path, content=body, headers=JSON_HEADERS)
            statuses.append(response.status_code)
            assert response.status_code < 500, (path, body[:40], response.status_code, response.text[:200])
            assert response.headers["content-type"].startswith("application/json")
    port = server.port
    # broken HTTP: not HTTP at all, headers that never end, a body cut short, an absurd Content-Length
    raw_exchange(port, b"GARBAGE\r\n\r\n")
    raw_exchange(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200))  # a TLS ClientHello to a plain-HTTP port
    raw_exchange(port, b"POST /cds-services/" + SELECT_ID.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    raw_exchange(port, b"POST /cds-services/" + SELECT_ID.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"hook\":", read=False)
    raw_exchange(port, b"POST /cds-services/" + SELECT_ID.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    raw_exchange(port, b"POST /cds-services/" + SELECT_ID.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n")
    raw_exchange(port, b"GET /cds-services/%00%ff/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n")

    time.sleep(0.2)
    assert server.process.poll() is None, server.log_text()[-3000:]
    response = http.post(f"/cds-services/{SELECT_ID}", json=vignettes.hook_request(VIGNETTES["LBP-V30"], TODAY))
    assert response.status_code == 200
    assert [card["indicator"] for card in response.json()["cards"]] == ["critical"]
    log = server.log_text()
    assert "Traceback" not in log and "unexpected" not in log, log[-3000:]
    assert "status=500" not in log


def test_many_concurrent_calls_all_succeed(server):
    requests = [vignettes.hook_request(VIGNETTES[v], TODAY) for v in sorted(VIGNETTES)] * 4

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server, timeout=20.0) as client:
            responses = await asyncio.gather(*(client.post(f"/cds-services/{SELECT_ID}", json=r) for r in requests))
        return [r.status_code for r in responses]

    import asyncio

    assert set(asyncio.run(run())) == {200}
