"""The retrospective audit (`python -m cds_service audit SOURCE`) on generated Bulk Data exports.

- One command: a generated export of 300 patients audited by a subprocess, per-order NDJSON, HTML
  report and summary written; all card types and the no-card cases occur.
- The same answers as the HTTP service: every audited order is sent, one by one, as an order-sign
  hook call whose prefetch is the patient's record as it stood on the order's date (restated here
  independently of the audit's code) and with the service's "today" set to the order's date.
- Nothing recorded after the order counts: a cancer diagnosis dated after a warned-against order
  leaves its result unchanged; the same diagnosis dated before it makes imaging indicated.
- Memory stays flat: the peak RSS of the audit of 1500 patients is that of 300 patients, not 5 times it.
- A FHIR server as the source (the Medplum test server, token required) gives the export's results.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cds_service import retro_audit
from cds_service.app import create_app
from cds_service.settings import Settings
from fhir_server import launcher

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "scripts" / "generate_export.py"
EXTENSION_KEY = "org.example.lumbar-imaging-cds.assessment"
SEED = 11
ALL_RULES = {f"C{i}" for i in range(1, 8)} | {f"R{i}" for i in range(1, 14)} | {"F1", "W1", "N-child", "N-no-episode", "N-unknown-duration"}


def generate(out: Path, patients: int, seed: int = SEED, lines_per_file: int = 5000) -> Path:
    subprocess.run([sys.executable, str(GENERATOR), "--patients", str(patients), "--seed", str(seed), "--out", str(out),
                    "--lines-per-file", str(lines_per_file)], check=True, capture_output=True, cwd=REPO, timeout=120)
    return out


def audit_command(source: Path | str, out_dir: Path, *extra: str) -> tuple[list[dict], dict, str]:
    """Run `python -m cds_service audit` as a user would; (per-order rows, summary, HTML)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cds_service", "audit", str(source), "--out", str(out_dir / "orders.ndjson"),
               "--html", str(out_dir / "report.html"), "--summary-json", str(out_dir / "summary.json"), *extra]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=180,
                          env={**_clean_env(), "COLUMNS": "120"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out_dir / "orders.ndjson").read_text().splitlines()]
    return rows, json.loads((out_dir / "summary.json").read_text()), (out_dir / "report.html").read_text()


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}


def audit_in_process(source: Path | str, out: Path, **options) -> tuple[list[dict], dict]:
    args = argparse.Namespace(source=str(source), out=out, html=None, summary_json=None, workers=1, token=None, token_file=None,
                              undated="include", data_end=None, since=None, until=None, tmp_dir=None, quiet=True)
    for name, value in options.items():
        setattr(args, name, value)
    summary = retro_audit.run_audit(args)
    return [json.loads(line) for line in out.read_text().splitlines()], summary


def read_export(folder: Path) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """(patient id -> resources, Medication id -> Medication): the whole export in memory (small tests only)."""
    by_patient: dict[str, list[dict]] = defaultdict(list)
    medications = {}
    for path in sorted(folder.glob("*.ndjson")):
        for line in path.read_text().splitlines():
            resource = json.loads(line)
            kind = resource["resourceType"]
            if kind == "Medication":
                medications[resource["id"]] = resource
            elif kind == "Patient":
                by_patient[resource["id"]].append(resource)
            elif isinstance(resource.get("subject"), dict):
                by_patient[resource["subject"]["reference"].split("/")[-1]].append(resource)
    return by_patient, medications


@pytest.fixture(scope="module")
def export300(tmp_path_factory) -> Path:
    # Small files: several NDJSON files per resource type, as large $export outputs are.
    return generate(tmp_path_factory.mktemp("export300"), 300, lines_per_file=400)


@pytest.fixture(scope="module")
def audit300(export300, tmp_path_factory):
    return audit_command(export300, tmp_path_factory.mktemp("audit300"), "--workers", "2", "--quiet")


# -- the generator ----------------------------------------------------------------------------------------


def test_the_generator_writes_a_bulk_export_reproducibly(export300, tmp_path):
    names = {p.name for p in export300.glob("*.ndjson")}
    assert {"Patient.ndjson", "Condition.ndjson", "Condition-2.ndjson", "Observation-2.ndjson", "ServiceRequest.ndjson",
            "Medication.ndjson", "Encounter.ndjson"} <= names
    manifest = json.loads((export300 / "manifest.json").read_text())
    assert {o["url"] for o in manifest["output"]} == names and manifest["extension"]["patients"] == 300
    assert len((export300 / "Patient.ndjson").read_text().splitlines()) == 300

    small = generate(tmp_path / "a", 60)
    again = generate(tmp_path / "b", 60)
    other = generate(tmp_path / "c", 60, seed=SEED + 1)
    assert all((small / n).read_bytes() == (again / n).read_bytes() for n in {p.name for p in small.glob("*.ndjson")})
    assert (small / "Patient.ndjson").read_bytes() != (other / "Patient.ndjson").read_bytes()
    # Patient i is the same whatever the export's size: the 60-patient export starts the 300-patient one.
    assert (export300 / "Patient.ndjson").read_text().splitlines()[:60] == (small / "Patient.ndjson").read_text().splitlines()


# -- one command ----------------------------------------------------------------------------------------


def test_the_audit_runs_in_one_command(audit300, export300):
    rows, summary, page = audit300
    assert summary["patients"] == 300
    assert summary["orders_in_scope"] == len(rows) > 100
    assert summary["orders_skipped"].get("status draft", 0) + summary["orders_skipped"].get("status entered-in-error", 0) > 0
    assert set(summary["card_types"]) >= {"cauda-equina-emergency", "imaging-not-indicated", "imaging-indicated", "no card"}
    assert summary["warned"] == sum(r["card_type"] == "imaging-not-indicated" for r in rows)
    assert summary["orders_with_red_flag"] == sum(bool(r["red_flags"]) for r in rows)
    assert sum(summary["card_types"].values()) == len(rows)
    hedis = summary["hedis_style"]
    assert 0 < hedis["imaged_within_28_days"] < hedis["denominator"] < hedis["new_lbp_diagnoses"]
    assert hedis["imaging_rate"] == round(hedis["imaged_within_28_days"] / hedis["denominator"], 4)
    assert summary["as_of"]["resources_after_order_ignored"] > 0
    assert summary["skipped"]["Encounter (file not read, bytes)"] > 0
    assert summary["run"]["workers"] == 2
    # Sorted by (hash of patient id, patient id, order date): the same whatever the number of workers.
    keys = [(retro_audit.patient_hash(r["patient_id"]), r["patient_id"], r["order_date"]) for r in rows]
    assert keys == sorted(keys)

    # The HTML report: self-contained charts, no script, nothing fetched, no patient identifiers.
    assert page.count("<svg") >= 4 and "<script" not in page.lower()
    assert "src=" not in page and "href=" not in page and "@import" not in page
    assert not any(r["patient_id"] in page or r["order_id"] in page for r in rows)
    assert "Would have been warned against" in page and "HEDIS-style" in page


def test_csv_output_and_terminal_summary(export300, tmp_path):
    command = [sys.executable, "-m", "cds_service", "audit", str(export300), "--out", str(tmp_path / "orders.csv"), "--workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, env={**_clean_env(), "COLUMNS": "120"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Orders in scope" in done.stdout and "Would have been warned against" in done.stdout
    header, *lines = (tmp_path / "orders.csv").read_text().splitlines()
    assert header.split(",")[:3] == ["patient_id", "order_id", "order_date"] and len(lines) > 100


def test_gzipped_ndjson_gives_the_same_results(audit300, export300, tmp_path):
    for path in export300.glob("*.ndjson"):
        with gzip.open(tmp_path / f"{path.name}.gz", "wb") as out:
            out.write(path.read_bytes())
    rows, summary = audit_in_process(tmp_path, tmp_path / "orders.ndjson")
    assert rows == audit300[0]
    assert summary["card_types"] == audit300[1]["card_types"]


def test_a_source_that_is_not_an_export_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cds_service", "audit", str(tmp_path), "--quiet"], capture_output=True,
                          text=True, cwd=REPO, timeout=60, env=_clean_env())
    assert done.returncode == 2 and "no .ndjson files" in done.stderr


# -- the same answers as the HTTP service -----------------------------------------------------------------


def _moment(value: str) -> tuple[date, datetime | None]:
    day = date.fromisoformat(value[:10])
    if "T" in value:
        return day, datetime.fromisoformat(value.replace("Z", "+00:00"))
    return day, None


def _after(value: str | None, order: tuple[date, datetime | None]) -> bool:
    if value is None:
        return False
    day, instant = _moment(value)
    if day != order[0]:
        return day > order[0]
    return instant is not None and order[1] is not None and instant > order[1]


def record_on(resources: list[dict], order: dict) -> list[dict]:
    """The record as it stood when `order` was placed, restated for the test (see retro_audit's docstring)."""
    when = _moment(order["authoredOn"])
    record = []
    for resource in resources:
        if resource is order:
            continue
        dates = {
            "Condition": [resource.get("onsetDateTime"), resource.get("recordedDate")],
            "Observation": [resource.get("effectiveDateTime"), resource.get("issued")],
            "MedicationRequest": [resource.get("authoredOn")],
            "Procedure": [resource.get("performedDateTime"), (resource.get("performedPeriod") or {}).get("start")],
            "ServiceRequest": [resource.get("authoredOn")],
        }.get(resource["resourceType"], [])
        if any(_after(d, when) for d in dates):
            continue
        if resource["resourceType"] == "Condition" and _after(resource.get("abatementDateTime"), when):
            resource = {k: v for k, v in resource.items() if k != "abatementDateTime"}
            resource["clinicalStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}
        record.append(resource)
    return record


def searchset(resources: list[dict], included: list[dict] = ()) -> dict | None:
    if not resources:
        return None
    entries = [{"resource": r, "search": {"mode": "match"}} for r in resources]
    entries += [{"resource": r, "search": {"mode": "include"}} for r in included]
    return {"resourceType": "Bundle", "type": "searchset", "entry": entries}


def hook_call(record: list[dict], order: dict, medications: dict[str, dict]) -> dict:
    patient = next(r for r in record if r["resourceType"] == "Patient")
    of = lambda kind: [r for r in record if r["resourceType"] == kind]  # noqa: E731
    referenced = {r["medicationReference"]["reference"].split("/")[-1] for r in of("MedicationRequest") if "medicationReference" in r}
    draft = {**copy.deepcopy(order), "status": "draft"}
    return {
        "hook": "order-sign",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/auditor", "patientId": patient["id"],
                    "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": draft}]}},
        "prefetch": {
            "patient": patient,
            "conditions": searchset(of("Condition")),
            "observations": searchset(of("Observation")),
            "medicationRequests": searchset(of("MedicationRequest"), [medications[m] for m in sorted(referenced)]),
            "medicationStatements": searchset(of("MedicationStatement")),
            "procedures": searchset(of("Procedure")),
            "serviceRequests": searchset(of("ServiceRequest")),
        },
    }


def test_per_order_results_agree_with_the_http_api(audit300, export300, tmp_path):
    rows, _, _ = audit300
    by_patient, medications = read_export(export300)
    app = create_app(Settings.from_mapping({"CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}"}))
    compared = defaultdict(int)
    with TestClient(app) as client:
        state = client.app.state.cds
        for row in rows:
            resources = by_patient[row["patient_id"]]
            order = next(r for r in resources if r["id"] == row["order_id"])
            state.today = lambda day=date.fromisoformat(row["order_date"]): day  # the service's "today" = the order's date
            response = client.post("/cds-services/lumbar-imaging-order-sign",
                                   json=hook_call(record_on(resources, order), order, medications))
            assert response.status_code == 200, response.text
            cards = response.json()["cards"]
            where = f"patient {row['patient_id']} order {row['order_id']} on {row['order_date']}"
            if not row["card_type"]:
                assert cards == [], where
                compared["no card"] += 1
                continue
            assert [c["source"]["topic"]["code"] for c in cards] == [row["card_type"]], where
            assert cards[0]["indicator"] == row["indicator"] and cards[0]["summary"] == row["summary"], where
            found = cards[0]["extension"][EXTENSION_KEY]
            assert (found["rule"], found.get("facts", [])) == (row["rule"], row["facts"]), where
            protocol = found.get("recommendedProtocol")
            expected = None if row["recommended_modality"] is None else {k: v for k, v in {
                "modality": row["recommended_modality"], "contrast": row["recommended_contrast"],
                "orderMatches": row["order_matches_recommendation"]}.items() if v is not None}  # the service prunes nulls
            assert protocol == expected, where
            compared[row["card_type"]] += 1
    assert sum(compared.values()) == len(rows)
    assert set(compared) == {"cauda-equina-emergency", "imaging-not-indicated", "imaging-indicated", "no card"}


# -- nothing recorded after the order counts --------------------------------------------------------------


def one_patient_export(source: Path, patient_id: str, folder: Path, extra: list[dict]) -> Path:
    """An export of one patient's lines (and the Medication catalogue), plus `extra` resources."""
    folder.mkdir()
    by_patient, medications = read_export(source)
    lines = [json.dumps(r) for r in by_patient[patient_id] + list(medications.values()) + extra]
    (folder / "All.ndjson").write_text("\n".join(lines) + "\n")
    return folder


def cancer(patient_id: str, onset: str, recorded: str | None = None) -> dict:
    condition = {"resourceType": "Condition", "id": f"late-{uuid.uuid4()}", "subject": {"reference": f"Patient/{patient_id}"},
                 "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                 "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "C79.51",
                                      "display": "Secondary malignant neoplasm of bone"}]},
                 "onsetDateTime": onset}
    if recorded:
        condition["recordedDate"] = recorded
    return condition


def test_nothing_recorded_after_the_order_counts(audit300, export300, tmp_path):
    rows, _, _ = audit300
    warned = next(r for r in rows if r["rule"] == "W1" and r["order_status"] == "completed")
    patient, order_day = warned["patient_id"], date.fromisoformat(warned["order_date"])
    by_patient, _ = read_export(export300)
    authored = next(r for r in by_patient[patient] if r["id"] == warned["order_id"])["authoredOn"]
    later_same_day = f"{order_day.isoformat()}T23:59:00-05:00"
    assert authored < later_same_day

    def result(name: str, extra: list[dict]) -> dict:
        folder = one_patient_export(export300, patient, tmp_path / name, extra)
        results, _ = audit_in_process(folder, tmp_path / f"{name}.ndjson")
        return next(r for r in results if r["order_id"] == warned["order_id"])

    def decision(row: dict) -> tuple:
        return row["card_type"], row["rule"], row["facts"], row["red_flags"], row["summary"]

    baseline = result("baseline", [])
    assert decision(baseline) == decision(warned)
    after = [
        cancer(patient, (order_day + timedelta(days=1)).isoformat()),  # diagnosed the next day
        cancer(patient, (order_day - timedelta(days=30)).isoformat(), recorded=(order_day + timedelta(days=3)).isoformat()),  # coded later
        cancer(patient, later_same_day),  # hours after the order
    ]
    unchanged = result("after", after)
    assert decision(unchanged) == decision(warned)
    assert unchanged["resources_after_order"] == baseline["resources_after_order"] + 3

    before = result("before", [cancer(patient, (order_day - timedelta(days=1)).isoformat())])
    assert (before["card_type"], before["rule"], before["red_flags"]) == ("imaging-indicated", "R1", ["RF-CANCER"])
    same_day = result("same-day", [cancer(patient, order_day.isoformat())])  # a date without a time counts on its day
    assert same_day["rule"] == "R1"
    undated = cancer(patient, "")
    del undated["onsetDateTime"]
    assert result("undated", [undated])["rule"] == "R1"  # undated: included by default (documented)
    folder = one_patient_export(export300, patient, tmp_path / "undated-excluded", [undated])
    excluded, _ = audit_in_process(folder, tmp_path / "undated-excluded.ndjson", undated="exclude")
    assert decision(next(r for r in excluded if r["order_id"] == warned["order_id"])) == decision(warned)


def test_a_condition_resolved_after_the_order_was_current_on_its_date():
    today = retro_audit.Moment(date(2025, 3, 10), None)
    resolved_later = {"resourceType": "Condition", "onsetDateTime": "2025-03-01", "abatementDateTime": "2025-05-01",
                      "clinicalStatus": {"coding": [{"code": "resolved"}]}}
    resolved_before = {**resolved_later, "abatementDateTime": "2025-03-05"}
    record, stats = retro_audit.record_as_of([resolved_later, resolved_before], today)
    assert record[0]["clinicalStatus"]["coding"][0]["code"] == "active" and "abatementDateTime" not in record[0]
    assert record[1] is resolved_before and stats.reactivated == 1


# -- memory stays flat ------------------------------------------------------------------------------------


def test_memory_stays_flat_and_every_rule_occurs(audit300, export300, tmp_path):
    # Seed 7 is one whose 1500 patients include every rule (the rarest, C7 and R9, are ~0.2% of orders).
    export1500 = generate(tmp_path / "export1500", 1500, seed=7)
    rows, summary, _ = audit_command(export1500, tmp_path / "audit1500", "--workers", "2", "--quiet")
    _, small, _ = audit300
    assert summary["patients"] == 1500 and summary["run"]["bytes"] > 4 * small["run"]["bytes"]
    big_rss, small_rss = summary["run"]["peak_rss_mb"], small["run"]["peak_rss_mb"]
    for process in ("main", "largest_worker"):
        # One patient per worker at a time: ~5x the data, about the same peak (interpreter + knowledge).
        assert big_rss[process] < small_rss[process] * 1.25 + 8, (process, small_rss, big_rss)
    assert ALL_RULES <= {key.split("|")[1] for key in summary["rules"]}, sorted(summary["rules"])


# -- a FHIR server as the source --------------------------------------------------------------------------


@pytest.mark.fhir_server
def test_a_fhir_server_source_gives_the_exports_results(tmp_path):
    if reason := launcher.skip_reason():
        pytest.skip(reason)
    export = generate(tmp_path / "export", 24, seed=5)
    by_patient, medications = read_export(export)
    expected, _ = audit_in_process(export, tmp_path / "from-export.ndjson")
    assert len(expected) >= 10
    token = "audit-secret"
    with launcher.start_fhir_server(token=token) as server:
        entries = [r for resources in by_patient.values() for r in resources if r["resourceType"] != "Encounter"]
        entries += list(medications.values())
        for start in range(0, len(entries), 40):  # the test server takes transactions of about 40 entries
            batch = entries[start:start + 40]
            launcher.load_bundle(server.base_url, {
                "resourceType": "Bundle", "type": "transaction",
                "entry": [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in batch]},
                token=token)
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        got, summary = audit_in_process(server.base_url, tmp_path / "from-server.ndjson", token_file=token_file)
        with pytest.raises(retro_audit.AuditError, match="HTTP 401"):
            audit_in_process(server.base_url, tmp_path / "refused.ndjson", token="wrong")

    decision = ("patient_id", "order_id", "order_date", "card_type", "rule", "facts", "red_flags", "ces_features", "modifiers",
                "recommended_contrast", "episode_start", "conservative_care_days", "new_lbp_diagnosis", "hedis_counted", "unread")
    key = lambda r: (r["patient_id"], r["order_id"])  # noqa: E731
    assert [[r[f] for f in decision] for r in sorted(got, key=key)] == [[r[f] for f in decision] for r in sorted(expected, key=key)]
    assert summary["patients_with_orders"] == len({r["patient_id"] for r in expected})


def test_a_fhir_server_outside_the_allow_list_is_refused(tmp_path):
    with pytest.raises(retro_audit.AuditError, match="not an allowed FHIR server"):
        audit_in_process("https://fhir.example.org/r4", tmp_path / "x.ndjson")


def test_a_fhir_query_that_fails_makes_its_type_unreadable_and_the_token_goes_in_the_header_only(tmp_path):
    """FHIR source without node: an httpx MockTransport as the server. Observation search fails (HTTP 500):
    the order that would have been warned against gets imaging-data-incomplete, as in a hook call."""
    import httpx

    base = "http://127.0.0.1:9/fhir"
    seen: list[httpx.Request] = []
    order = {"resourceType": "ServiceRequest", "id": "o1", "status": "completed", "intent": "order",
             "subject": {"reference": "Patient/p1"}, "authoredOn": "2025-03-01T10:00:00Z",
             "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "72148"}]}}
    episode = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}, "onsetDateTime": "2025-02-20",
               "code": {"coding": [{"system": "http://snomed.info/sct", "code": "279039007"}]}}

    def bundle(resources: list[dict], next_url: str | None = None) -> dict:
        body = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}
        if next_url:
            body["link"] = [{"relation": "next", "url": next_url}]
        return body

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path.removeprefix("/fhir/")
        if path == "ServiceRequest" and "code" in request.url.params:
            return httpx.Response(200, json=bundle([order], f"{base}/ServiceRequest?page=2"))
        if path == "ServiceRequest" and request.url.params.get("page") == "2":
            return httpx.Response(200, json=bundle([{**order, "id": "o2", "authoredOn": "2025-03-02"}]))
        if path == "Patient/p1":
            return httpx.Response(200, json={"resourceType": "Patient", "id": "p1", "birthDate": "1980-01-01"})
        if path == "Observation":
            return httpx.Response(500, json={"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]})
        if path == "Condition":
            return httpx.Response(200, json=bundle([episode]))
        if path == "ServiceRequest":
            return httpx.Response(200, json=bundle([order, {**order, "id": "o2", "authoredOn": "2025-03-02"}]))
        return httpx.Response(200, json=bundle([]))

    writer = retro_audit.ResultWriter(tmp_path / "rows.ndjson")
    try:
        retro_audit.audit_fhir_server(base, writer, retro_audit.AuditPolicy(data_end=date(2025, 12, 31)), token="t0ken",
                                      settings=Settings.from_mapping({}), transport=httpx.MockTransport(handler))
    finally:
        writer.close()
    rows = [json.loads(line) for line in (tmp_path / "rows.ndjson").read_text().splitlines()]
    assert [(r["order_id"], r["card_type"], r["unread"]) for r in rows] == [
        ("o1", "imaging-data-incomplete", ["Observation"]), ("o2", "imaging-data-incomplete", ["Observation"])]
    assert all(r.headers["authorization"] == "Bearer t0ken" for r in seen)
    assert all("t0ken" not in str(r.url) for r in seen)
    assert sum(r.url.path == "/fhir/Patient/p1" for r in seen) == 1  # the patient's record is read once for both orders


def test_a_next_link_to_another_server_stops_the_fhir_audit(tmp_path):
    import httpx

    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "entry": [],
                                         "link": [{"relation": "next", "url": "http://evil.example/fhir/ServiceRequest?page=2"}]})

    writer = retro_audit.ResultWriter(None)
    with pytest.raises(retro_audit.AuditError, match="leaves the FHIR server"):
        retro_audit.audit_fhir_server("http://127.0.0.1:9/fhir", writer, retro_audit.AuditPolicy(), token="t",
                                      settings=Settings.from_mapping({}), transport=httpx.MockTransport(handler))
    assert hosts == ["127.0.0.1"]
