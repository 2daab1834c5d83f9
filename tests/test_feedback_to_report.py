"""Issue 6's end-to-end promise: feedback given on a card shows up in the override report and on the
/analytics page, on SQLite and on PostgreSQL (the card comes from a real hook call, as in the demo page)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cds_service import vignettes
from cds_service.app import create_app
from cds_service.settings import Settings
from test_store import fresh_postgres_schema

REPO = Path(__file__).resolve().parent.parent
TODAY = date(2026, 11, 21)
SELECT = "/cds-services/lumbar-imaging-order-select"
VIGNETTES = {v["id"]: v for v in json.loads((REPO / "tests/data/vignettes-public.json").read_text())}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
    else:
        with fresh_postgres_schema() as url:
            yield url


def test_an_override_and_an_accepted_suggestion_reach_the_report_and_the_page(database_url):
    app = create_app(Settings.from_mapping({"CDS_DATABASE_URL": database_url, "CDS_TODAY": TODAY.isoformat()}))
    with TestClient(app) as client:
        warning = client.post(SELECT, json=vignettes.hook_request(VIGNETTES["LBP-V01"], TODAY)).json()["cards"][0]
        indicated = client.post(SELECT, json=vignettes.hook_request(VIGNETTES["LBP-V17"], TODAY)).json()["cards"][0]
        reason = warning["overrideReasons"][2]
        feedback = {"feedback": [
            {"card": warning["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-21T10:00:00Z",
             "overrideReason": {"reason": {"system": reason["system"], "code": reason["code"]}}},  # as the sandbox sends it
            {"card": indicated["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-11-21T10:01:00Z",
             "acceptedSuggestions": [{"id": indicated["suggestions"][0]["uuid"]}]},
        ]}
        assert client.post(f"{SELECT}/feedback", json=feedback).json() == {"stored": 2, "duplicates": 0}
        assert client.post(f"{SELECT}/feedback", json=feedback).json() == {"stored": 0, "duplicates": 2}
        app.state.cds.audit.flush()
        report = client.get("/analytics/report.json").json()
        page = client.get("/analytics")
    by_type = {row["card_type"]: row for row in report["card_types"]}
    assert by_type["imaging-not-indicated"]["overridden"] == 1 and by_type["imaging-not-indicated"]["override_rate"] == 1.0
    assert by_type["imaging-indicated"]["accepted"] == 1 and by_type["imaging-indicated"]["overridden"] == 0
    assert [(r["card_type"], r["code"]) for r in report["override_reasons"]] == [("imaging-not-indicated", reason["code"])]
    assert report["unlinked_feedback"] == 0
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]

    command = [sys.executable, "-m", "cds_service", "report", "--json", "--database-url", database_url]
    printed = json.loads(subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True, timeout=60).stdout)
    assert printed["card_types"] == report["card_types"]
