"""The service as a real process on loopback, for tests that must go through uvicorn and TCP.

    with live_server(tmp_path) as base_url:
        httpx.get(base_url + "/cds-services")
        assert base_url.process.poll() is None     # still running
        print(base_url.log_text())                  # its stdout + stderr so far

`live_server` starts ``python -m cds_service serve --port <free port>`` as a subprocess of this
interpreter, with a fresh environment: no CDS_* variable of the caller leaks in, the database is a
SQLite file under the given directory, CDS_TODAY is fixed, and ``env`` adds or overrides
variables. It waits until GET /healthz answers 200, yields the base URL (a ``str``: extra
attributes ``process``, ``port`` and ``log_text()``), and stops the process on exit (SIGTERM,
then SIGKILL after a grace period). Output goes to a file, never to a pipe that could fill up.

`serve_in_thread` runs an app object under uvicorn in a thread of the test process instead (its
logs reach caplog; the browser tests use it through browser_support). `fhir_server_or_skip` starts the test FHIR server (tests/fhir_server) for one test or fixture, or
skips it where the server's node packages are not installed (a failure in CI).

Also here, for the in-process tests: `app_settings` (Settings for create_app with a temp SQLite
database and CDS_TODAY), the public vignettes, the CDS Hooks sandbox's recorded order-select calls,
and `FakeFhir`, an EHR FHIR server behind httpx.MockTransport that records every request.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

import httpx
import pytest
import uvicorn

from fhir_server import launcher

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TODAY = "2025-03-01"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class LiveServerError(RuntimeError):
    """The service process did not start (the message carries its output)."""


class LiveServerURL(str):
    """The base URL (http://127.0.0.1:PORT) of a running service process."""

    process: subprocess.Popen
    port: int
    _log: IO[str]

    def log_text(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_environment(tmp_dir: Path, today: str = DEFAULT_TODAY, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without any CDS_* variable, plus a temp SQLite database, CDS_TODAY and ``env``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    environment.update(
        CDS_DATABASE_URL=f"sqlite:///{Path(tmp_dir) / 'live-service.db'}",
        CDS_TODAY=today,
        PYTHONUNBUFFERED="1",
    )
    environment.update(env or {})
    return environment


@contextmanager
def live_server(
    tmp_dir: Path,
    *,
    today: str = DEFAULT_TODAY,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[LiveServerURL]:
    environment = service_environment(tmp_dir, today, env)
    log = open(Path(tmp_dir) / "live-service.log", "w+", encoding="utf-8", errors="replace")
    process: subprocess.Popen | None = None
    try:
        for attempt in range(3):  # the free port may be taken between free_port() and bind: retry
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, "-m", "cds_service", "serve", "--host", "127.0.0.1", "--port", str(port)],
                cwd=REPO,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            url = LiveServerURL(f"http://127.0.0.1:{port}")
            url.process, url.port, url._log = process, port, log
            if wait_healthy(url, process, startup_timeout_s):
                break
            _stop(process)
            process = None
        else:
            raise LiveServerError(f"the service did not start; its output:\n{url.log_text()[-4000:]}")
        yield url
    finally:
        if process is not None:
            _stop(process)
        log.close()


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 30.0) -> bool:
    """True once GET url/healthz answers 200; False if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def serve_in_thread(app: Any, *, startup_timeout_s: float = 10.0, **config: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) in a daemon thread, ``config`` passed to
    uvicorn.Config; yields the base URL (http://127.0.0.1:PORT) and stops the server on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-loopback", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start on loopback")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@contextmanager
def fhir_server_or_skip(token: str | None = None) -> Iterator[launcher.FhirServerProcess]:
    """A test FHIR server of its own (``start_fhir_server``), its token required when given; the test
    skipped when launcher.skip_reason() has a reason (never in CI: starting then fails loudly)."""
    if reason := launcher.skip_reason():
        pytest.skip(reason)
    with launcher.start_fhir_server(token=token) as server:
        yield server


# --- in-process: settings for create_app, and the request shapes the tests replay ----------------

SELECT_ID = "lumbar-imaging-order-select"
SIGN_ID = "lumbar-imaging-order-sign"
VIGNETTES_FILE = REPO / "tests" / "data" / "vignettes-public.json"


def app_settings(tmp_dir: Path, today: str = DEFAULT_TODAY, **env: str):
    """Settings for create_app(): a temp SQLite database, CDS_TODAY fixed; ``env`` as CDS_* names."""
    from cds_service.settings import Settings

    return Settings.from_mapping({"CDS_DATABASE_URL": f"sqlite:///{Path(tmp_dir) / 'service.db'}", "CDS_TODAY": today, **env})


def load_vignettes() -> dict[str, dict]:
    import json

    return {v["id"]: v for v in json.loads(VIGNETTES_FILE.read_text(encoding="utf-8"))}


SANDBOX_FHIR = "http://localhost:8081"  # where the sandbox's own FHIR server ran in the recorded session


def sandbox_first_order_select(fhir_server: str | None = SANDBOX_FHIR) -> dict:
    """The CDS Hooks sandbox's first PAMA order-select call, as recorded (checklist 5.4): an empty
    coding, an empty reasonCode, a Bundle without type, prefetch of `patient` and `conditions` only,
    and its FHIR server as `fhirServer` (pass None to leave it out)."""
    request = {
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "hook": "order-select",
        "context": {
            "patientId": "lbp1",
            "userId": "Practitioner/COREPRACTITIONER1",
            "selections": ["ServiceRequest/example-request-id"],
            "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": {
                "resourceType": "ServiceRequest", "id": "example-request-id", "status": "draft", "intent": "plan",
                "code": {"coding": [{}]}, "subject": {"reference": "Patient/lbp1"}, "reasonCode": [],
            }}]},
        },
        "prefetch": {
            "patient": {"resourceType": "Patient", "id": "lbp1", "gender": "male", "birthDate": "1979-04-12"},
            "conditions": {"resourceType": "Bundle", "type": "searchset", "total": 0},
        },
    }
    if fhir_server:
        request["fhirServer"] = fhir_server
    return request


def sandbox_order_select(cpt: str = "72149", reason: str | None = "23056005", fhir_server: str | None = SANDBOX_FHIR) -> dict:
    """A later sandbox order-select call: CPT code chosen, SNOMED reason (23056005 sciatica,
    192970008 cauda equina syndrome), still no Condition on the chart."""
    request = sandbox_first_order_select(fhir_server)
    request["hookInstance"] = "5b8e4b5a-3c3f-4d0e-9f57-0c1c2d3e4f50"
    order = request["context"]["draftOrders"]["entry"][0]["resource"]
    order["code"] = {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": cpt}]}
    order["reasonCode"] = [{"coding": [{"system": "http://snomed.info/sct", "code": reason}]}] if reason else []
    return request


# --- the EHR's FHIR server, faked --------------------------------------------------------------------


def searchset(*resources: dict, next_url: str | None = None) -> dict:
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(resources)}
    if resources:
        bundle["entry"] = [{"resource": r, "search": {"mode": "match"}} for r in resources]
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


class FakeFhir:
    """A FHIR server behind httpx.MockTransport: answers by resource type, records every request."""

    def __init__(self, answer: "Callable[[httpx.Request], httpx.Response] | None" = None):
        self.requests: list[httpx.Request] = []
        self.answer = answer or (lambda request: httpx.Response(200, json=searchset()))

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    def types(self) -> list[str]:
        """The resource type of each request, in order (the path segment after the base)."""
        return [next((seg for seg in request.url.path.split("/") if seg[:1].isupper()), "?") for request in self.requests]
