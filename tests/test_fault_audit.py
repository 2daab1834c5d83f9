"""Faults against a REAL server (``python -m cds_service serve`` through server_support.live_server) that
tests/test_faults.py does not cover: more connections than uvicorn's limit_concurrency, bodies that are
chunked, compressed, enormous in count of objects or cut off by the client, a FHIR fallback server that
never answers or never stops answering under 50 concurrent calls, and the SQLite file deleted under the
running service. (Fixed since: the FHIR client's shared pool leaked a slot for each request cancelled while
it waited for a connection, httpcore 1.0.9 encode/httpcore#1093, until every fallback read timed out; each hook
call now has its own pool, closed when the call ends. And idle TCP connections counted against
limit_concurrency and were never closed, so 200 sockets that sent nothing locked every other client out; the
service's protocol now closes a connection that has not sent its headers within 5 s. And the SQLite file
deleted while the service ran took every acknowledged feedback with it: the store now notices the missing file
when it takes a pooled connection and restores it from the open connection, WAL content included.)

The servers run on the hook date of the data they receive: PAYLOAD_TODAY for the realistic payload (bench/payloads.py),
TODAY for the public vignettes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import sqlite3
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from cds_service import vignettes
from cds_service.fhir_client import FhirClient
from cds_service.settings import Settings
from server_support import live_server

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from payloads import TODAY as PAYLOAD_TODAY, realistic_request  # noqa: E402

TODAY = date(2026, 3, 15)  # the vignettes' hook date; PAYLOAD_TODAY is the realistic payload's
SELECT = "/cds-services/lumbar-imaging-order-select"
SIGN = "/cds-services/lumbar-imaging-order-sign"
JSON_HEADERS = {"content-type": "application/json"}
VIGNETTES = {v["id"]: v for v in json.loads((REPO / "tests" / "data" / "vignettes-public.json").read_text(encoding="utf-8"))}
LIMIT_CONCURRENCY = 200  # cds_service/__main__.py
KEEP_ALIVE_S = 5  # cds_service/__main__.py timeout_keep_alive


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """One real service process for the tests that leave it healthy (each checks that it is)."""
    with live_server(tmp_path_factory.mktemp("fault-audit"), today=PAYLOAD_TODAY.isoformat()) as url:
        yield url


def error_lines(url) -> list[str]:
    return [line for line in url.log_text().splitlines() if " ERROR " in line or "Traceback" in line]


def realistic_body(hook_instance: str | None = None) -> bytes:
    request = realistic_request()
    request["hookInstance"] = hook_instance or str(uuid.uuid4())
    return json.dumps(request).encode()


def raw_exchange(port: int, data: bytes, read_timeout: float = 10.0) -> bytes:
    """Send `data` on a fresh connection (ignoring a reset once the server answered), return what it answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
        except (ConnectionResetError, socket.timeout):
            pass
        return answer


# ------------------------------------------------------------------------------------------------
# Load and bodies: all found to hold


def test_350_concurrent_realistic_calls_get_200_or_a_clean_503_and_the_server_recovers(server):
    body = realistic_body()

    async def run() -> list[int | str]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=350, max_keepalive_connections=0)) as client:
            async def one() -> int | str:
                try:
                    return (await client.post(server + SELECT, content=body, headers=JSON_HEADERS)).status_code
                except httpx.HTTPError as exc:
                    return type(exc).__name__
            return await asyncio.gather(*(one() for _ in range(350)))

    statuses = asyncio.run(run())
    assert set(statuses) <= {200, 503}, statuses  # never a hang (30 s timeout), a reset or a 5xx other than 503
    assert statuses.count(200) >= 100
    after = httpx.post(server + SELECT, content=body, headers=JSON_HEADERS, timeout=10)
    assert after.status_code == 200 and after.json()["cards"]
    assert error_lines(server) == []


def test_chunked_body_over_the_limit_gets_413_and_a_declared_2gb_body_is_refused_unread(server):
    port = int(server.rsplit(":", 1)[1])
    head = f"POST {SELECT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    piece = b"[" + b"1," * 32767 + b"1]"
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    answer = raw_exchange(port, head + chunk * (20_000_000 // len(piece)) + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    declared = f"POST {SELECT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2000000000\r\n\r\n{{".encode()
    assert raw_exchange(port, declared).startswith(b"HTTP/1.1 413")
    assert httpx.get(server + "/healthz", timeout=5).status_code == 200


def test_gzip_content_encoding_is_a_clean_400_not_a_500(server):
    response = httpx.post(server + SELECT, content=gzip.compress(realistic_body()),
                          headers={**JSON_HEADERS, "content-encoding": "gzip"}, timeout=10)
    assert response.status_code == 400, response.text[:300]
    assert response.json()["resourceType"] == "OperationOutcome"


def test_100000_small_objects_below_5_mb_are_answered(server):
    request = realistic_request()
    request["hookInstance"] = str(uuid.uuid4())
    request["prefetch"]["observations"] = {"resourceType": "Bundle", "type": "searchset",
                                           "entry": [{"resource": {"resourceType": "Observation"}} for _ in range(100_000)]}
    body = json.dumps(request, separators=(",", ":")).encode()
    assert len(body) < 5_000_000
    response = httpx.post(server + SELECT, content=body, headers=JSON_HEADERS, timeout=30)
    assert response.status_code == 200 and response.json()["cards"], response.text[:300]
    assert httpx.get(server + "/healthz", timeout=5).status_code == 200


def test_clients_that_disconnect_mid_request_leave_no_error_and_no_leak(server):
    port = int(server.rsplit(":", 1)[1])
    body = realistic_body()
    head = f"POST {SELECT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    for cut in (0, 1000, 100_000, len(body)):  # headers only, part of the body, all of it without reading
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(head + body[:cut])
    time.sleep(0.5)
    assert httpx.post(server + SELECT, content=body, headers=JSON_HEADERS, timeout=10).status_code == 200
    assert error_lines(server) == []


# ------------------------------------------------------------------------------------------------
# Idle connections and limit_concurrency: broken


def test_idle_connections_do_not_lock_the_service_out(tmp_path):
    """Connections that send nothing, or stop inside their headers, are closed after the header read timeout
    (cds_service.limits.ReadTimeoutProtocol), so they cannot hold uvicorn's limit_concurrency slots."""
    with live_server(tmp_path) as url:
        idle = [socket.create_connection(("127.0.0.1", url.port)) for _ in range(LIMIT_CONCURRENCY)]
        for sock in idle[:20]:
            sock.sendall(b"POST /cds-services/lumbar-imaging-order-sign HTTP/1.1\r\nHost: x\r\nContent-")  # stops mid-header
        try:
            time.sleep(KEEP_ALIVE_S + 1.5)  # longer than any idle timeout the service documents
            assert httpx.get(url + "/healthz", timeout=5).status_code == 200
            for sock in idle[:5] + idle[-5:]:
                sock.settimeout(2)
                assert sock.recv(1) == b""  # closed by the service
        finally:
            for sock in idle:
                sock.close()


# ------------------------------------------------------------------------------------------------
# FHIR fallback server that never answers or never stops


class MisbehavingFhir:
    """Loopback FHIR server: 'hang' accepts and never answers; 'infinite' streams a chunked body forever;
    'good' answers an empty searchset (a Patient for reads)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MisbehavingFhir":
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _shutdown(self) -> None:
        self.server.close()
        handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.mode == "hang":
                    await asyncio.sleep(3600)
                elif self.mode == "infinite":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\n\r\n")
                    chunk = b" " * 16384
                    while True:
                        writer.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                        await writer.drain()
                        await asyncio.sleep(0.001)
                else:
                    read = b"/Patient/" in head.split(b" ", 2)[1]
                    body = json.dumps({"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-01-01"} if read
                                      else {"resourceType": "Bundle", "type": "searchset", "total": 0}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                    await writer.drain()
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - the client went away, or the test is over
            pass
        finally:
            writer.close()


def fallback_request(fhir_server: str, patient: str = "p1") -> bytes:
    request = realistic_request()
    request.update(hookInstance=str(uuid.uuid4()), prefetch={}, fhirServer=fhir_server)
    request["context"]["patientId"] = patient
    return json.dumps(request).encode()


@pytest.mark.parametrize("mode", ["hang", "infinite"])
def test_50_concurrent_calls_on_a_hanging_or_endless_fhir_server_answer_within_the_deadline(tmp_path, mode):
    deadline_s = 1.0
    with MisbehavingFhir(mode) as fhir, live_server(tmp_path, today=PAYLOAD_TODAY.isoformat(), env={"CDS_FHIR_DEADLINE": str(deadline_s), "CDS_FHIR_TIMEOUT": "0.8",
                                                                     "CDS_FHIR_MAX_RESPONSE_BYTES": "2000000"}) as url:
        async def run() -> list[tuple[int, float]]:
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
                async def one(i: int) -> tuple[int, float]:
                    started = time.monotonic()
                    response = await client.post(url + SELECT, content=fallback_request(fhir.base_url, f"p{i}"), headers=JSON_HEADERS)
                    return response.status_code, time.monotonic() - started
                return await asyncio.gather(*(one(i) for i in range(50)))

        answers = asyncio.run(run())
        assert {status for status, _ in answers} <= {200, 412}, answers
        # Bounded, not fast: without the deadline these calls would wait for the hour-long hang or the
        # endless stream; the margin absorbs 50 streams fighting the service for 2 cores on a busy machine.
        assert max(elapsed for _, elapsed in answers) < deadline_s + 4.0, answers
        assert error_lines(url) == []


def test_the_fhir_client_still_reads_a_healthy_server_after_deadlines_on_a_hanging_one(tmp_path):
    settings = Settings.from_mapping({"CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "CDS_FHIR_TIMEOUT": "0.3", "CDS_FHIR_DEADLINE": "0.5"})

    async def run() -> dict:
        client = FhirClient(settings)
        try:
            with MisbehavingFhir("hang") as hang, MisbehavingFhir("good") as good:
                for _ in range(3):  # hook calls of several EHRs at once, more queries than the pool's 20 connections
                    await asyncio.gather(*(client.fetch_all(hang.base_url, {f"k{i}": f"Condition?patient=p{i}" for i in range(7)}, None)
                                           for _ in range(8)))
                return await client.fetch_all(good.base_url, {"patient": "Patient/p1", "conditions": "Condition?patient=p1"}, None)
        finally:
            await client.aclose()

    results = asyncio.run(run())
    assert {key: result.error for key, result in results.items()} == {"patient": None, "conditions": None}


# ------------------------------------------------------------------------------------------------
# The SQLite file deleted under the running service


def sign_request(vignette_id: str = "LBP-V30") -> dict:
    request = vignettes.hook_request(VIGNETTES[vignette_id], TODAY, "order-sign")
    request["hookInstance"] = str(uuid.uuid4())
    return request


def feedback_on_new_card(url: str) -> tuple[str, int]:
    card = httpx.post(url + SIGN, json=sign_request(), timeout=10).json()["cards"][0]
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-03-15T08:00:00Z",
            "overrideReason": {"reason": card["overrideReasons"][0]}}
    return card["uuid"], httpx.post(url + SIGN + "/feedback", json={"feedback": [item]}, timeout=10).status_code


def test_feedback_acknowledged_after_the_database_file_is_deleted_is_not_lost(tmp_path):
    database = tmp_path / "live-service.db"
    acknowledged = []
    with live_server(tmp_path, today=TODAY.isoformat()) as url:
        card, status = feedback_on_new_card(url)
        assert status == 200
        acknowledged.append(card)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        for _ in range(3):
            card, status = feedback_on_new_card(url)  # hook calls keep answering (the card is there)
            assert status in (200, 503)
            if status == 200:
                acknowledged.append(card)
    assert database.exists(), f"{len(acknowledged)} acknowledged feedback items were stored in a deleted file"
    with sqlite3.connect(database) as connection:
        stored = {row[0] for row in connection.execute("SELECT card_uuid FROM feedback")}
    assert set(acknowledged) <= stored
