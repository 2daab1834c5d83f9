"""Silent mode through the HTTP API: evaluate and audit every call as in live mode, show nothing but
the cauda equina card (unless CDS_SILENT_SUPPRESSES_CRITICAL), and let the override report and the
/analytics page count what was held back.

CDS_MODE=silent silences every service; CDS_SILENT_SERVICES=<id,...> silences only the services it
names while the others stay live.
"""

from __future__ import annotations

import sqlite3

import pytest
from fastapi.testclient import TestClient

from cds_service.app import create_app
from cds_service.report import build_report
from cds_service.settings import Settings, SettingsError
from scenarios import TODAY, VIGNETTE_CARD_IDS, card_types, hook_request, public_vignettes

SELECT = "lumbar-imaging-order-select"
SIGN = "lumbar-imaging-order-sign"
CES = "cauda-equina-emergency"
VIGNETTES = public_vignettes()


def expected_types(vignette: dict) -> list[str]:
    return [VIGNETTE_CARD_IDS[c] for c in vignette["expected"]["cards"]]


WARNING_OR_INFO = [v for v in VIGNETTES if expected_types(v) and CES not in expected_types(v)]
CES_VIGNETTES = [v for v in VIGNETTES if expected_types(v) == [CES]]


def make_client(tmp_path, **env: str) -> TestClient:
    values = {"CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}", "CDS_TODAY": TODAY.isoformat(), **env}
    return TestClient(create_app(Settings.from_mapping(values)))


def post(client: TestClient, vignette: dict, service: str = SIGN) -> dict:
    hook = "order-select" if service == SELECT else "order-sign"
    response = client.post(f"/cds-services/{service}", json=hook_request(vignette, hook=hook))
    assert response.status_code == 200, response.text
    return response.json()


def audit_cards(client: TestClient) -> list[dict]:
    """Every audited card in call order: service, mode, card type, indicator, shown (read from the SQLite file)."""
    state = client.app.state.cds
    assert state.audit.flush()
    path = state.settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT d.service_id, d.mode, c.card_type, c.indicator, c.shown FROM cards c"
            " JOIN decisions d ON d.id = c.decision_id ORDER BY d.id, c.card_uuid"
        ).fetchall()
    return [dict(zip(("service", "mode", "card_type", "indicator", "shown"), (s, m, t, i, bool(sh)))) for s, m, t, i, sh in rows]


def test_the_public_vignettes_give_warning_info_and_cauda_equina_cases():
    assert {t for v in WARNING_OR_INFO for t in expected_types(v)} == {"imaging-indicated", "imaging-not-indicated"}
    assert CES_VIGNETTES


def test_silent_mode_returns_no_warning_or_info_card_and_audits_them_as_held_back(tmp_path):
    with make_client(tmp_path, CDS_MODE="silent") as client:
        for vignette in WARNING_OR_INFO:
            assert post(client, vignette) == {"cards": []}, vignette["id"]
        rows = audit_cards(client)
        # Evaluated exactly as in live mode: one card per vignette, of the expected type, none shown.
        assert [r["card_type"] for r in rows] == [t for v in WARNING_OR_INFO for t in expected_types(v)]
        assert all(r["shown"] is False and r["mode"] == "silent" for r in rows)

        report = build_report(client.app.state.cds.store)
        assert report["totals"]["held_back"] == len(WARNING_OR_INFO)
        assert report["totals"]["shown"] == 0 and report["totals"]["override_rate"] is None
        by_type = {t["card_type"]: t for t in report["card_types"]}
        for card_type in ("imaging-indicated", "imaging-not-indicated"):
            expected = sum(expected_types(v).count(card_type) for v in WARNING_OR_INFO)
            assert by_type[card_type]["held_back"] == expected and by_type[card_type]["shown"] == 0

        # The /analytics page's data says the same (what would have been shown).
        page_data = client.get("/analytics/report.json").json()
        assert page_data["totals"]["held_back"] == len(WARNING_OR_INFO)
        assert "Held back" in client.get("/analytics/assets/analytics.js").text


def test_live_mode_shows_the_same_cards(tmp_path):
    with make_client(tmp_path) as client:
        for vignette in WARNING_OR_INFO:
            assert card_types(post(client, vignette)["cards"]) == expected_types(vignette)
        rows = audit_cards(client)
        assert rows and all(r["shown"] is True and r["mode"] == "live" for r in rows)
        assert build_report(client.app.state.cds.store)["totals"]["held_back"] == 0


@pytest.mark.parametrize("vignette", CES_VIGNETTES, ids=lambda v: v["id"])
def test_silent_mode_still_returns_the_cauda_equina_card(tmp_path, vignette):
    with make_client(tmp_path, CDS_MODE="silent") as client:
        for service in (SELECT, SIGN):
            body = post(client, vignette, service)
            assert card_types(body["cards"]) == [CES]
            assert body["cards"][0]["indicator"] == "critical"
        rows = audit_cards(client)
        assert [(r["card_type"], r["shown"], r["mode"]) for r in rows] == [(CES, True, "silent")] * 2
        report = build_report(client.app.state.cds.store)
        assert report["totals"]["shown"] == 2 and report["totals"]["held_back"] == 0


@pytest.mark.parametrize("vignette", CES_VIGNETTES, ids=lambda v: v["id"])
def test_the_cauda_equina_card_is_held_back_only_when_configured(tmp_path, vignette):
    with make_client(tmp_path, CDS_MODE="silent", CDS_SILENT_SUPPRESSES_CRITICAL="true") as client:
        assert post(client, vignette) == {"cards": []}
        rows = audit_cards(client)
        assert [(r["card_type"], r["indicator"], r["shown"]) for r in rows] == [(CES, "critical", False)]
        assert build_report(client.app.state.cds.store)["totals"]["held_back"] == 1
    # The setting alone does nothing in live mode.
    (tmp_path / "live").mkdir()
    with make_client(tmp_path / "live", CDS_SILENT_SUPPRESSES_CRITICAL="true") as client:
        assert card_types(post(client, vignette)["cards"]) == [CES]


def test_silent_services_silence_only_the_services_named(tmp_path):
    warning = next(v for v in WARNING_OR_INFO if expected_types(v) == ["imaging-not-indicated"])
    ces = CES_VIGNETTES[0]
    with make_client(tmp_path, CDS_SILENT_SERVICES=SELECT) as client:
        assert post(client, warning, SELECT) == {"cards": []}
        assert card_types(post(client, warning, SIGN)["cards"]) == ["imaging-not-indicated"]
        assert card_types(post(client, ces, SELECT)["cards"]) == [CES]  # critical still shown in the silent service
        rows = audit_cards(client)
        assert [(r["service"], r["mode"], r["shown"]) for r in rows] == [
            (SELECT, "silent", False), (SIGN, "live", True), (SELECT, "silent", True)]
        report = build_report(client.app.state.cds.store)
        assert (report["totals"]["shown"], report["totals"]["held_back"]) == (2, 1)


def test_silent_services_with_suppressed_critical(tmp_path):
    ces = CES_VIGNETTES[0]
    with make_client(tmp_path, CDS_SILENT_SERVICES=f"{SIGN}", CDS_SILENT_SUPPRESSES_CRITICAL="1") as client:
        assert post(client, ces, SIGN) == {"cards": []}
        assert card_types(post(client, ces, SELECT)["cards"]) == [CES]


def test_silent_services_setting_is_read_as_a_list_and_unknown_ids_fail_at_start_up(tmp_path):
    settings = Settings.from_env({"CDS_SILENT_SERVICES": f" {SELECT} , {SIGN},"})
    assert settings.silent_services == (SELECT, SIGN)
    assert Settings.from_env({}).silent_services == ()
    with pytest.raises(SettingsError, match="lumbar-imaging-order-sing"):
        create_app(Settings.from_mapping({"CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
                                          "CDS_SILENT_SERVICES": "lumbar-imaging-order-sing"}))
