"""Start the in-memory Medplum FHIR server (server.mjs) from Python tests.

    with start_fhir_server(token="secret") as fhir:
        load_bundle(fhir.base_url, bundle, token="secret")
        httpx.get(f"{fhir.base_url}/Patient", headers={"Authorization": "Bearer secret"})

Needs node and the packages: ``npm ci --prefix tests/fhir_server``.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import IO

import httpx

SERVER_DIR = Path(__file__).resolve().parent
SERVER_SCRIPT = SERVER_DIR / "server.mjs"
NODE_MODULES = SERVER_DIR / "node_modules"
INSTALL_HINT = "run `npm ci --prefix tests/fhir_server`"
STARTUP_TIMEOUT_S = 30.0


class FhirServerError(RuntimeError):
    """The test FHIR server could not be started or refused a request."""


def node_modules_installed() -> bool:
    return (NODE_MODULES / "@medplum" / "fhir-router" / "package.json").is_file()


def skip_reason() -> str | None:
    """Why tests needing this server may be skipped here: packages absent and not in CI.

    In CI (env CI set) there is never a reason: starting the server then fails loudly.
    """
    if node_modules_installed() or os.environ.get("CI"):
        return None
    return f"test FHIR server packages not installed ({INSTALL_HINT}); set CI=1 to make this a failure"


class FhirServerProcess:
    """A running server.mjs on 127.0.0.1; a context manager that stops the process on exit."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.port: int | None = None
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise FhirServerError("the FHIR server is not running")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FhirServerProcess":
        if not node_modules_installed():
            raise FhirServerError(f"the test FHIR server's packages are missing: {INSTALL_HINT}")
        node = shutil.which("node")
        if node is None:
            raise FhirServerError("node is not on PATH; the test FHIR server needs Node.js 20 or later")
        command = [node, "--experimental-websocket", str(SERVER_SCRIPT), "--port", "0"]
        if self.token is not None:
            command += ["--token", self.token]
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self._process = subprocess.Popen(
            command,
            cwd=SERVER_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, "NODE_NO_WARNINGS": "1"},
        )
        try:
            self.port = self._wait_for_port(self._process)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_port(self, process: subprocess.Popen[str]) -> int:
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_forward_lines, args=(process.stdout, lines), daemon=True).start()
        try:
            line = lines.get(timeout=STARTUP_TIMEOUT_S)
        except queue.Empty:
            raise FhirServerError(f"the FHIR server did not start within {STARTUP_TIMEOUT_S:.0f} s") from None
        if line is None or not line.startswith("LISTENING "):
            process.kill()
            process.wait(timeout=5)
            raise FhirServerError(f"the FHIR server failed to start: {(line or '').strip()} {self.stderr_text()}")
        return int(line.split()[1])

    def stderr_text(self) -> str:
        """What the server wrote on stderr so far (last 2000 characters), for failure messages."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read()[-2000:].strip()

    def stop(self) -> None:
        process, self._process = self._process, None
        self.port = None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> "FhirServerProcess":
        if self._process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _forward_lines(stream: IO[str] | None, lines: "queue.Queue[str | None]") -> None:
    """Hand stdout lines to the waiting thread; None when the stream ends (process gone)."""
    if stream is None:
        lines.put(None)
        return
    for line in stream:
        lines.put(line)
    lines.put(None)


def start_fhir_server(token: str | None = None) -> FhirServerProcess:
    """Start the server and wait until it listens. Use as a context manager to stop it."""
    return FhirServerProcess(token).start()


def load_bundle(base_url: str, bundle: dict, token: str | None = None) -> dict:
    """POST a transaction (or batch) Bundle to the server root; return the response Bundle.

    Raises FhirServerError if the server refuses it or any entry did not succeed.
    """
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    response = httpx.post(base_url.rstrip("/") + "/", json=bundle, headers=headers, timeout=30.0)
    if response.status_code != 200:
        raise FhirServerError(f"bundle refused: HTTP {response.status_code}: {response.text[:500]}")
    result = response.json()
    failed = [
        entry.get("response", {}).get("status", "?")
        for entry in result.get("entry", [])
        if not str(entry.get("response", {}).get("status", "")).startswith("2")
    ]
    if failed:
        raise FhirServerError(f"{len(failed)} bundle entries failed: statuses {failed}")
    return result
