"""Fault tests through the HTTP API: the FHIR server slow, failing or answering garbage; the database
locked or gone. What must hold:

- A hook call answers within CDS_FHIR_DEADLINE + a margin, whatever the FHIR server does, and never
  says "imaging not indicated" on data it could not read: 200 with imaging-data-incomplete, or 412.
  A cauda equina sign in what could be read still gives the critical card.
- With the database unavailable (SQLite locked by another connection's BEGIN EXCLUSIVE; PostgreSQL
  stopped, played by a TCP switch in front of the machine's cluster), cards are still served (the
  audit writer drops, counts and logs), feedback answers 503 with Retry-After (never 200 and lost),
  and both recover when the fault clears: feedback 200 and in the store, the audit written again.

Every answer is also validated against cds_service/openapi.yaml (tests/test_openapi.py's ApiDocument).
The FHIR server here is a small threaded HTTP server on loopback that serves a vignette's record and
misbehaves per resource type; the service runs in-process (TestClient), with real sockets to it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
from fastapi.testclient import TestClient

from cds_service import vignettes
from cds_service.app import create_app
from cds_service.settings import Settings
from test_openapi import api_document

TODAY = date(2026, 3, 15)
REPO = Path(__file__).resolve().parent.parent
VIGNETTES = {v["id"]: v for v in json.loads((REPO / "tests" / "data" / "vignettes-public.json").read_text(encoding="utf-8"))}
NO_RED_FLAGS = VIGNETTES["LBP-V01"]  # with all its data: imaging-not-indicated
CES = VIGNETTES["LBP-V30"]  # urinary retention, a Condition: cauda-equina-emergency
CALL = "/cds-services/{service_id}"
FEEDBACK = "/cds-services/{service_id}/feedback"
SIGN = "/cds-services/lumbar-imaging-order-sign"

DEADLINE_S = 1.0
MARGIN_S = 1.0  # cancellation grace (0.2 s), the engine, the test client; generous for slow CI machines
POSTGRES_URL = os.environ.get("CDS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

API = api_document()


# ------------------------------------------------------------------------------------------------
# A FHIR server that misbehaves on demand


FAULTS = {
    "slow": "answers long after the deadline",
    "slow-body": "sends headers and half a page, then stalls past the deadline",
    "500": "HTTP 500 with an OperationOutcome",
    "503-html": "HTTP 503 with an HTML page",
    "not-json": "200 with an HTML body",
    "truncated": "200 with JSON cut off in the middle",
    "not-fhir": "200 with JSON that is not a FHIR resource",
    "not-utf8": "200 with bytes that are not UTF-8",
    "wrong-type": "200 with a Patient where a searchset Bundle was asked for",
    "outcome": "200 with a bare OperationOutcome",
    "reset": "closes the connection without answering",
    "redirect": "302 to another server",
    "huge": "200 with a body over CDS_FHIR_MAX_RESPONSE_BYTES",
    "next-loop": "a searchset whose next link points to itself",
    "bad-entries": "200 with a searchset whose entries are not resources",
}
MAX_RESPONSE_BYTES = 200_000


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the service opens one connection per query at once; the default 5 drops SYNs
    daemon_threads = True


class FaultyFhirServer:
    """Serves `record` as FHIR R4 (reads and searches by type); `faults[type]` makes one type misbehave."""

    def __init__(self, record: list[dict]) -> None:
        self.record = record
        self.faults: dict[str, str] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(self.path)
                try:
                    server.answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the service gave up on us: that is the point

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FaultyFhirServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        path = urlsplit(handler.path).path.removeprefix("/fhir/").strip("/")
        parts = path.split("/")
        resource_type = parts[0]
        fault = self.faults.get(resource_type)
        if fault:
            return self.misbehave(handler, fault, resource_type)
        matches = [r for r in self.record if r["resourceType"] == resource_type]
        if len(parts) == 2:
            found = [r for r in matches if r["id"] == parts[1]]
            if not found:
                return self.send(handler, 404, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]})
            return self.send(handler, 200, found[0])
        return self.send(handler, 200, vignettes.searchset(matches))

    def misbehave(self, handler: BaseHTTPRequestHandler, fault: str, resource_type: str) -> None:
        stall = DEADLINE_S + 2.0
        if fault == "slow":
            time.sleep(stall)
            return self.send(handler, 200, vignettes.searchset([]))
        if fault == "slow-body":
            body = json.dumps(vignettes.searchset([])).encode()
            handler.send_response(200)
            handler.send_header("Content-Type", "application/fhir+json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            time.sleep(stall)
            handler.wfile.write(body[len(body) // 2:])
            return None
        if fault == "500":
            return self.send(handler, 500, {"resourceType": "OperationOutcome", "issue": [{"severity": "fatal", "code": "exception"}]})
        if fault == "503-html":
            return self.send_raw(handler, 503, b"<html><body>Service Unavailable</body></html>", "text/html")
        if fault == "not-json":
            return self.send_raw(handler, 200, b"<html><body>Welcome to nginx!</body></html>", "application/fhir+json")
        if fault == "truncated":
            return self.send_raw(handler, 200, b'{"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {"resourceType": "Obs')
        if fault == "not-fhir":
            return self.send(handler, 200, {"data": [{"code": "R33.9"}], "status": "ok"})
        if fault == "not-utf8":
            return self.send_raw(handler, 200, b'{"resourceType": "Bundle", "type": "searchset", "entry": [\xff\xfe\x00]}')
        if fault == "wrong-type":
            return self.send(handler, 200, {"resourceType": "Patient", "id": "someone-else"})
        if fault == "outcome":
            return self.send(handler, 200, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "too-costly"}]})
        if fault == "reset":
            handler.close_connection = True
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            handler.connection.close()
            return None
        if fault == "redirect":
            handler.send_response(302)
            handler.send_header("Location", f"http://169.254.169.254/fhir/{resource_type}")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return None
        if fault == "huge":
            filler = [{"resource": {"resourceType": "Basic", "id": f"b{i}", "code": {"text": "x" * 200}}} for i in range(2000)]
            return self.send(handler, 200, {"resourceType": "Bundle", "type": "searchset", "entry": filler})
        if fault == "next-loop":
            page = vignettes.searchset([])
            page["link"] = [{"relation": "next", "url": f"{self.base_url}/{resource_type}?page=1"}]
            return self.send(handler, 200, page)
        if fault == "bad-entries":
            return self.send(handler, 200, {"resourceType": "Bundle", "type": "searchset", "total": 3,
                                            "entry": [{"resource": "Observation/1"}, 7, {"resource": {"resourceType": 5}}]})
        raise AssertionError(f"unknown fault {fault}")

    @staticmethod
    def send(handler: BaseHTTPRequestHandler, status: int, body: dict) -> None:
        FaultyFhirServer.send_raw(handler, status, json.dumps(body).encode())

    @staticmethod
    def send_raw(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str = "application/fhir+json") -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


def settings(tmp_path: Path, **values: str) -> Settings:
    return Settings.from_mapping({
        "CDS_DATABASE_URL": f"sqlite:///{tmp_path / f'faults-{uuid.uuid4().hex[:8]}.db'}",
        "CDS_TODAY": TODAY.isoformat(),
        "CDS_FHIR_DEADLINE": str(DEADLINE_S),
        "CDS_FHIR_TIMEOUT": "5",  # longer than the deadline: the deadline is what must cut a slow server
        "CDS_FHIR_MAX_RESPONSE_BYTES": str(MAX_RESPONSE_BYTES),
        **values,
    })


@pytest.fixture(scope="module")
def fhir_client(tmp_path_factory):
    with TestClient(create_app(settings(tmp_path_factory.mktemp("faults")))) as client:
        yield client


def call(client: TestClient, request: dict) -> tuple[object, float]:
    started = time.monotonic()
    response = client.post(SIGN, json=request)
    elapsed = time.monotonic() - started
    API.check_response("POST", CALL, response)
    return response, elapsed


def request_with_fhir_server(vignette: dict, server: FaultyFhirServer, keep: tuple[str, ...]) -> dict:
    """The vignette's order-sign request with only the `keep` prefetch keys; the rest from fhirServer."""
    request = vignettes.hook_request(vignette, TODAY, "order-sign")
    request["prefetch"] = {k: v for k, v in request["prefetch"].items() if k in keep}
    request["fhirServer"] = server.base_url
    return request


def card_types(response) -> list[str]:
    return [c["source"]["topic"]["code"] for c in response.json().get("cards", [])] if response.status_code == 200 else []


# ------------------------------------------------------------------------------------------------
# The FHIR server


def test_the_fault_server_serves_the_record_and_the_service_says_not_indicated(fhir_client):
    record = vignettes.patient_record(NO_RED_FLAGS, TODAY)
    with FaultyFhirServer(record) as server:
        response, elapsed = call(fhir_client, request_with_fhir_server(NO_RED_FLAGS, server, keep=()))
    assert response.status_code == 200 and card_types(response) == ["imaging-not-indicated"]
    assert len(server.requests) == 7 and elapsed < DEADLINE_S


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_one_resource_type_faulty_gives_data_incomplete_in_time(fhir_client, fault):
    """Everything prefetched but Observations, and the FHIR server misbehaves on Observation."""
    record = vignettes.patient_record(NO_RED_FLAGS, TODAY)
    with FaultyFhirServer(record) as server:
        server.faults["Observation"] = fault
        response, elapsed = call(fhir_client, request_with_fhir_server(
            NO_RED_FLAGS, server, keep=("patient", "conditions", "medicationRequests", "medicationStatements", "procedures", "serviceRequests")))
    assert elapsed < DEADLINE_S + MARGIN_S, f"{fault}: {elapsed:.2f} s"
    assert response.status_code == 200, response.text
    assert card_types(response) == ["imaging-data-incomplete"], (fault, response.text[:500])
    assert "Observation" in response.json()["cards"][0]["detail"] or "observation" in response.json()["cards"][0]["detail"].lower()


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_every_resource_type_faulty_is_never_not_indicated(fhir_client, fault):
    """Nothing prefetched; every query of the FHIR server misbehaves the same way."""
    record = vignettes.patient_record(NO_RED_FLAGS, TODAY)
    with FaultyFhirServer(record) as server:
        server.faults.update({t: fault for t in ("Patient", *vignettes.PREFETCH_KEYS)})
        response, elapsed = call(fhir_client, request_with_fhir_server(NO_RED_FLAGS, server, keep=()))
    assert elapsed < DEADLINE_S + MARGIN_S, f"{fault}: {elapsed:.2f} s"
    assert response.status_code in (200, 412), response.text
    assert "imaging-not-indicated" not in card_types(response)
    if response.status_code == 200:
        assert card_types(response) == ["imaging-data-incomplete"]


@pytest.mark.parametrize("fault", ["slow", "500", "not-json", "reset"])
def test_the_cauda_equina_card_survives_a_faulty_fhir_server(fhir_client, fault):
    """The retention is in the prefetched Conditions; everything else fails: still the critical card."""
    record = vignettes.patient_record(CES, TODAY)
    with FaultyFhirServer(record) as server:
        server.faults.update({t: fault for t in ("Observation", "MedicationRequest", "MedicationStatement", "Procedure", "ServiceRequest")})
        response, elapsed = call(fhir_client, request_with_fhir_server(CES, server, keep=("patient", "conditions")))
    assert elapsed < DEADLINE_S + MARGIN_S
    assert response.status_code == 200 and card_types(response) == ["cauda-equina-emergency"]


def test_a_slow_fhir_server_does_not_hold_up_other_calls(tmp_path):
    """Three calls stuck on a slow FHIR server and one fully prefetched call, at once: the prefetched
    one answers at once, the others at the deadline."""
    record = vignettes.patient_record(NO_RED_FLAGS, TODAY)
    results: dict[str, tuple[int, float]] = {}
    with TestClient(create_app(settings(tmp_path))) as client, FaultyFhirServer(record) as server:
        server.faults.update({t: "slow" for t in ("Patient", *vignettes.PREFETCH_KEYS)})

        def run(name: str, request: dict) -> None:
            started = time.monotonic()
            response = client.post(SIGN, json=request)
            results[name] = (response.status_code, time.monotonic() - started)

        threads = [threading.Thread(target=run, args=(f"slow-{i}", request_with_fhir_server(NO_RED_FLAGS, server, keep=()))) for i in range(3)]
        threads.append(threading.Thread(target=run, args=("prefetched", vignettes.hook_request(NO_RED_FLAGS, TODAY, "order-sign"))))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert results["prefetched"][0] == 200 and results["prefetched"][1] < 0.5 * DEADLINE_S + 0.3, results
    for i in range(3):
        status, elapsed = results[f"slow-{i}"]
        assert status in (200, 412) and elapsed < DEADLINE_S + MARGIN_S, results


# ------------------------------------------------------------------------------------------------
# The database


def feedback_for(card: dict, outcome: str = "overridden") -> dict:
    item = {"card": card["uuid"], "outcome": outcome, "outcomeTimestamp": f"2026-03-15T10:{uuid.uuid4().int % 60:02d}:00Z"}
    if outcome == "overridden":
        item["overrideReason"] = {"reason": card["overrideReasons"][0], "userComment": f"fault test {uuid.uuid4().hex[:6]}"}
    return {"feedback": [item]}


def post_feedback(client: TestClient, body: dict):
    started = time.monotonic()
    response = client.post(f"{SIGN}/feedback", json=body)
    API.check_response("POST", FEEDBACK, response)
    return response, time.monotonic() - started


def new_card(client: TestClient) -> dict:
    """A hook call that gives the imaging-not-indicated card (a new hookInstance: a new card uuid)."""
    response, elapsed = call(client, vignettes.hook_request(NO_RED_FLAGS, TODAY, "order-sign"))
    assert response.status_code == 200 and card_types(response) == ["imaging-not-indicated"], response.text
    assert elapsed < 2.5  # a card that waited for the database lock would take its 5 s busy timeout
    return response.json()["cards"][0]


def check_outage_and_recovery(client: TestClient, outage, count_feedback, caplog) -> None:
    """The common script: healthy, then the outage (cards served, audit dropped, feedback 503), then
    the recovery (feedback 200 and stored, audit written)."""
    audit = client.app.state.cds.audit
    before = new_card(client)
    response, _ = post_feedback(client, feedback_for(before))
    assert response.status_code == 200 and response.json()["stored"] == 1
    assert audit.flush(10) and audit.dropped == 0

    with outage():
        during = [new_card(client) for _ in range(3)]  # cards are served
        lost = feedback_for(during[0])
        response, elapsed = post_feedback(client, lost)
        assert response.status_code == 503, response.text
        assert elapsed < 8.0  # one 5 s SQLite busy timeout in all, queued behind the audit writer or not; PostgreSQL refuses at once
        assert int(response.headers["retry-after"]) > 0
        assert response.json()["issue"][0]["code"] == "transient"
        assert audit.flush(15)
        assert audit.dropped >= 3  # the outage's decision records: dropped and counted...
    assert "dropped" in caplog.text  # ...and logged

    # recovered: the same feedback is accepted and stored, new decisions are audited again
    response, _ = post_feedback(client, lost)
    assert response.status_code == 200 and response.json()["stored"] == 1, response.text
    assert count_feedback(during[0]["uuid"]) == 1
    assert count_feedback(before["uuid"]) == 1
    written = audit.written
    after = new_card(client)
    assert audit.flush(10) and audit.written == written + 1
    response, _ = post_feedback(client, feedback_for(after))
    assert response.status_code == 200 and response.json() == {"stored": 1, "duplicates": 0}


def test_sqlite_locked_by_another_connection(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    database = tmp_path / "locked.db"
    with TestClient(create_app(settings(tmp_path, CDS_DATABASE_URL=f"sqlite:///{database}"))) as client:

        @contextmanager
        def locked() -> Iterator[None]:
            locker = sqlite3.connect(database, isolation_level=None, timeout=0)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                yield
            finally:
                locker.rollback()
                locker.close()

        def count_feedback(card_uuid: str) -> int:
            with sqlite3.connect(database) as reader:
                return reader.execute("SELECT COUNT(*) FROM feedback WHERE card_uuid = ?", (card_uuid,)).fetchone()[0]

        check_outage_and_recovery(client, locked, count_feedback, caplog)


class TcpSwitch:
    """A TCP relay to the PostgreSQL server that can be switched off: `off()` closes every relayed
    connection and refuses new ones (connection refused), like a server that was stopped; `on()`
    listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = _free_port()
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.frozen = threading.Event()  # set: bytes are held, connections stay open (a network black hole)

    def on(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def off(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
            if listener is not None:
                listener.close()
            for conn in self.connections:
                _close(conn)
            self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self.lock:
                if self.listener is not listener:
                    _close(client), _close(upstream)
                    return
                self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.frozen.is_set() and sink.fileno() != -1:
                    time.sleep(0.05)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source), _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def fresh_postgres_schema() -> Iterator[str]:
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    schema = f"cds_faults_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield schema
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@contextmanager
def service_on_switched_postgres(tmp_path: Path) -> Iterator[tuple[TestClient, TcpSwitch, str]]:
    """(client, switch, schema): the service on a fresh PostgreSQL schema, reached through a TcpSwitch that is on."""
    upstream = urlsplit(POSTGRES_URL)
    switch = TcpSwitch((upstream.hostname, upstream.port or 5432))
    switch.on()
    with fresh_postgres_schema() as schema:
        url = f"postgresql://{upstream.username or 'postgres'}@127.0.0.1:{switch.port}{upstream.path}?options=-csearch_path%3D{schema}"
        try:
            with TestClient(create_app(settings(tmp_path, CDS_DATABASE_URL=url))) as client:
                yield client, switch, schema
        finally:
            switch.off()


@pytest.mark.postgres
def test_postgresql_stopped_and_started_again(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    with service_on_switched_postgres(tmp_path) as (client, switch, schema):

        @contextmanager
        def stopped() -> Iterator[None]:
            switch.off()
            try:
                yield
            finally:
                switch.on()

        def count_feedback(card_uuid: str) -> int:
            with psycopg.connect(POSTGRES_URL, options=f"-csearch_path={schema}") as reader:
                return reader.execute("SELECT COUNT(*) FROM feedback WHERE card_uuid = %s", (card_uuid,)).fetchone()[0]

        check_outage_and_recovery(client, stopped, count_feedback, caplog)


# When PostgreSQL stops answering on open connections (a hung server, a half-dead proxy or pooler: bytes
# accepted, nothing answered), feedback answers 503 in bounded time instead of waiting forever.
@pytest.mark.postgres
def test_postgresql_that_stops_answering_gives_503_in_bounded_time(tmp_path):
    with service_on_switched_postgres(tmp_path) as (client, switch, _):
        card = new_card(client)
        assert post_feedback(client, feedback_for(card))[0].status_code == 200
        answers: list[int] = []
        switch.frozen.set()
        try:
            worker = threading.Thread(target=lambda: answers.append(client.post(f"{SIGN}/feedback", json=feedback_for(card)).status_code), daemon=True)
            worker.start()
            worker.join(timeout=8)
            answered_in_time = list(answers)
        finally:
            switch.frozen.clear()
            worker.join(timeout=15)
        assert answered_in_time == [503]
