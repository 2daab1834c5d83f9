"""Schemathesis against the live service: every operation of cds_service/openapi.yaml, bounded.

A real server (``python -m cds_service serve``: uvicorn, open mode, temp SQLite, tests/server_support.py)
serves /openapi.json; the schemathesis CLI loads the document from it and runs its four phases
(explicit examples, coverage, fuzzing, stateful) with every check but ``ignored_auth`` (open mode):

  not_a_server_error            no 5xx, ever
  response_schema_conformance   every response body validates against the document (card rules included)
  status_code_conformance, content_type_conformance, response_headers_conformance
  negative_data_rejection       a request the document calls invalid is refused with a 4xx
  positive_data_acceptance      a request the document calls valid is answered 2xx, or 412 (data not
                                available is a valid answer to a valid request)
  unsupported_method, ...

Bounded for CI: about 2,000 cases in 60-80 s on two cores. Two schemathesis processes run side by side
(their generation is CPU-bound, one core each; the server is mostly idle): "calls" fuzzes the service
call, "rest" every other operation plus the stateful sequences over all of them. The per-operation
example counts are in ``config_toml``. The seed is fixed so CI replays the same cases; set CDS_FUZZ_SEED
to explore (any integer, or "random") and CDS_FUZZ_SCALE to multiply the example counts, e.g.

    CDS_FUZZ_SEED=random CDS_FUZZ_SCALE=10 .venv/bin/pytest tests/test_fuzz_api.py -s

This file is also the schemathesis hooks module (SCHEMATHESIS_HOOKS): loaded by the CLI under the name
``_schemathesis_hooks`` it registers ``map_case``, which (1) sets the request's ``hook`` to the hook of
the service in the path (the document cannot tie a body field to a path parameter; a mismatch is a 400
tested elsewhere) and (2) adds a lumbar MRI order to half of the generated draftOrders, so generated
requests reach the engine with generated prefetch instead of stopping at "no lumbar imaging order".
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path


SERVICE_HOOKS = {"lumbar-imaging-order-select": "order-select", "lumbar-imaging-order-sign": "order-sign"}
GRAFTED_ORDER = {
    "resourceType": "ServiceRequest",
    "id": "fuzz-lumbar-mri",
    "status": "draft",
    "intent": "order",
    "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "72148"}]},
}


def align_case(case) -> None:
    """Make a generated service call target its own service's hook, and (for half of them, chosen by the
    hookInstance so the run stays reproducible) carry a lumbar MRI order among the generated ones."""
    body = copy.deepcopy(case.body)  # generated bodies may share objects with other cases
    service_id = (case.path_parameters or {}).get("service_id")
    if not isinstance(body, dict) or service_id not in SERVICE_HOOKS or case.path.endswith("/feedback"):
        return
    if body.get("hook") in SERVICE_HOOKS.values():
        body["hook"] = SERVICE_HOOKS[service_id]
    context = body.get("context")
    draft_orders = context.get("draftOrders") if isinstance(context, dict) else None
    entries = draft_orders.get("entry") if isinstance(draft_orders, dict) else None
    if isinstance(entries, list) and {"resource": GRAFTED_ORDER} not in entries and zlib.crc32(str(body.get("hookInstance")).encode()) % 2 == 0:
        entries.append({"resource": GRAFTED_ORDER})
        if isinstance(context.get("selections"), list):
            context["selections"].append("ServiceRequest/fuzz-lumbar-mri")
    case.body = body  # re-set: schemathesis re-validates the case's positive/negative label


if __name__ == "_schemathesis_hooks":  # loaded by the schemathesis CLI through SCHEMATHESIS_HOOKS
    import schemathesis

    @schemathesis.hook
    def map_case(context, case):
        align_case(case)
        return case

    @schemathesis.hook
    def before_add_examples(context, examples):
        for case in examples:  # the explicit examples of the document do not pass through map_case
            align_case(case)


# ------------------------------------------------------------------------------------------------
# The pytest test (collected by pytest only)

SCALE = float(os.environ.get("CDS_FUZZ_SCALE", "1"))
SEED = os.environ.get("CDS_FUZZ_SEED", "20261121")
BUDGET_S = 180.0  # a schemathesis run that takes twice this long is stopped (a hang, not a speed check)
SERVICE_CALL = "/cds-services/{service_id}"


def examples(count: int) -> int:
    return max(1, round(count * SCALE))


COMMON_TOML = """
request-timeout = 15
max-failures = 20

[generation]
database = "none"

[checks]
enabled = true
ignored_auth.enabled = false
# 412 (the data needed is not available) is a valid answer to a valid request.
positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "412", "429"]

[phases.stateful]
max-steps = 6
# Stateful steps are not passed through map_case: their hook may not be their service's (a 400).
checks.positive_data_acceptance.enabled = false
"""

# Pages and reports outside the CDS Hooks API, whose query parameters FastAPI parses: it also reads a
# date as a Unix timestamp ("?until=0"), so a request the document calls invalid may be accepted.
NON_CDS_TOML = """
[[operations]]
include-tag = ["analytics", "demo", "operations"]
generation.max-examples = {n}
checks.negative_data_rejection.enabled = false
"""


def config_toml(part: str) -> str:
    """Schemathesis configuration of one of the two runs, which go on in parallel (one per core):
    "calls" fuzzes the service call, "rest" every other operation and the stateful sequences of all."""
    if part == "calls":
        return COMMON_TOML + f"""
[[operations]]
include-path = "{SERVICE_CALL}"
generation.max-examples = {examples(850)}
"""
    return COMMON_TOML + f"""
[phases.stateful.generation]
max-examples = {examples(25)}

[[operations]]
include-path = "{SERVICE_CALL}"
phases.examples.enabled = false
phases.coverage.enabled = false
phases.fuzzing.enabled = false

[[operations]]
include-path = "/cds-services/{{service_id}}/feedback"
generation.max-examples = {examples(300)}

[[operations]]
include-path = "/cds-services"
generation.max-examples = {examples(20)}
""" + NON_CDS_TOML.format(n=examples(15))


def start_schemathesis(base_url: str, work_dir: Path, part: str) -> tuple[subprocess.Popen, Path, Path]:
    config = work_dir / f"schemathesis-{part}.toml"
    config.write_text(config_toml(part), encoding="utf-8")
    report = work_dir / f"schemathesis-{part}.json"
    output = work_dir / f"schemathesis-{part}.out"
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{base_url}/openapi.json",
        "--workers", "1", "--no-color", "--report", "json", "--report-json-path", str(report), "--output-truncate", "false",
    ]
    if part == "calls":
        command += ["--include-operation-id", "callService", "--phases", "examples,coverage,fuzzing"]
    if SEED != "random":
        command += ["--seed", SEED]
    environment = {**os.environ, "SCHEMATHESIS_HOOKS": str(Path(__file__).resolve())}
    with open(output, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, cwd=work_dir, env=environment, stdout=out, stderr=subprocess.STDOUT)
    return process, report, output


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path):
    from server_support import live_server

    started = time.monotonic()
    env = {"CDS_LOG_LEVEL": "WARNING", "CDS_FHIR_TIMEOUT": "1", "CDS_FHIR_DEADLINE": "1.5"}
    with live_server(tmp_path, env=env) as base_url:
        runs = {part: start_schemathesis(base_url, tmp_path, part) for part in ("calls", "rest")}
        for process, _, _ in runs.values():
            try:
                process.wait(timeout=BUDGET_S * 2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        fuzz_s = time.monotonic() - started
        server_log = base_url.log_text()
        alive = base_url.process.poll() is None
    total_s = time.monotonic() - started

    reports = {part: json.loads(report.read_text()) if report.exists() else {} for part, (_, report, _) in runs.items()}
    outputs = "\n".join(f"=== schemathesis {part} ===\n{out.read_text()[-15000:]}" for part, (_, _, out) in runs.items())
    cases = sum(r.get("test_cases", {}).get("generated", 0) for r in reports.values())
    tested = sum(r.get("operations", {}).get("tested", 0) for r in reports.values())
    failures = [f for r in reports.values() for f in r.get("failures", [])]
    errors = [e for r in reports.values() for e in r.get("errors", [])]
    summary = (f"schemathesis: {cases} cases over {tested} operations, {len(failures)} failure kinds, {len(errors)} errors, "
               f"{fuzz_s:.1f} s (whole test {total_s:.1f} s), seeds {[r.get('seed') for r in reports.values()]}")
    print(summary)
    details = f"{summary}\n{outputs}\n--- server log (tail) ---\n{server_log[-4000:]}"
    assert all(reports.values()), details
    assert alive, details
    assert all(process.returncode == 0 for process, _, _ in runs.values()) and not failures and not errors, details
    assert "Traceback" not in server_log and "unexpected" not in server_log, details
    from test_openapi import api_document

    operations = len(api_document().operations())
    assert [r["operations"]["tested"] for r in reports.values()] == [1, operations], details  # the call apart; all in "rest"
    if SCALE == 1:
        assert cases >= 1500, details  # the bound was not silently cut down


# Found while fuzzing by hand (the date generator rarely reaches it): Store.report adds a day to `until`,
# which overflows on the last representable date. Bug in Store.report, cds_service/store/ (fixed).

def test_report_until_the_last_representable_day_is_not_a_server_error(tmp_path):
    from fastapi.testclient import TestClient

    from cds_service.app import create_app
    from server_support import app_settings

    with TestClient(create_app(app_settings(tmp_path)), raise_server_exceptions=False) as client:
        assert client.get("/analytics/report.json?until=9999-12-31").status_code < 500
