"""The clinical team's public vignettes, end to end through the HTTP API (both hooks).

Each vignette is turned into a CDS Hooks request (cds_service/vignettes.py: full prefetch, one draft
order) and posted to the order-select and order-sign services of an app built from settings with a
fixed "today". The expected card ids map to the service's card types (source.topic.code); every
expected red flag must be among the card's assessment facts; the recommended contrast must match when
the vignette names one.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from scenarios import VIGNETTE_CARD_IDS, assessment, card_types, hook_request, public_vignettes

VIGNETTES = public_vignettes()
SERVICES = {"order-select": "lumbar-imaging-order-select", "order-sign": "lumbar-imaging-order-sign"}


def post(client: TestClient, vignette: dict, hook: str) -> dict:
    response = client.post(f"/cds-services/{SERVICES[hook]}", json=hook_request(vignette, hook=hook))
    assert response.status_code == 200, response.text
    return response.json()


def test_the_public_vignettes_cover_every_card_type_and_no_card():
    expected = {tuple(v["expected"]["cards"]) for v in VIGNETTES}
    assert expected == {("cauda-equina-critical",), ("red-flag-justified-info",), ("early-imaging-warning",), ()}
    assert len(VIGNETTES) == 12


@pytest.mark.parametrize("hook", sorted(SERVICES))
@pytest.mark.parametrize("vignette", VIGNETTES, ids=[v["id"] for v in VIGNETTES])
def test_vignette(client, vignette, hook):
    body = post(client, vignette, hook)
    expected = vignette["expected"]
    assert card_types(body["cards"]) == [VIGNETTE_CARD_IDS[c] for c in expected["cards"]], expected["reason"]
    if not expected["cards"]:
        assert body == {"cards": []}
        return
    card = body["cards"][0]
    found = assessment(card)
    assert set(expected["redFlags"]) <= set(found.get("facts", ())), (expected["redFlags"], found)
    assert found["order"] == "ServiceRequest/draft-imaging-1"
    if expected["cards"] == ["early-imaging-warning"]:
        assert "recommendedProtocol" not in found and found["rule"] == "W1"
        return
    protocol = found["recommendedProtocol"]
    if expected["contrast"] is not None:
        assert protocol == {**protocol, "modality": "MR", "contrast": expected["contrast"]}
    if vignette["order"]["code"] in ("72100",):  # radiography ordered: no contrast to recommend
        assert protocol["modality"] == "XR" and "contrast" not in protocol and protocol["orderMatches"] is True


@pytest.mark.parametrize("vignette", [v for v in VIGNETTES if v["expected"]["contrast"]], ids=lambda v: v["id"])
def test_a_contrast_different_from_the_order_comes_with_a_replacement_suggestion(client, vignette):
    card = post(client, vignette, "order-sign")["cards"][0]
    ordered_without = vignette["order"]["code"] in ("72148", "30679-5")
    if vignette["expected"]["contrast"] == "with-and-without" and ordered_without:
        replacement = card["suggestions"][0]
        created = [a["resource"] for a in replacement["actions"] if a["type"] == "create"]
        deleted = [a["resourceId"] for a in replacement["actions"] if a["type"] == "delete"]
        assert deleted == ["ServiceRequest/draft-imaging-1"]
        assert created[0]["code"]["coding"][0]["code"] in ("72158", "24967-2")
        assert assessment(card)["recommendedProtocol"]["orderMatches"] is False
    else:
        assert "suggestions" not in card
        assert assessment(card)["recommendedProtocol"]["orderMatches"] is True


def test_both_hooks_give_the_same_card_for_the_same_patient(client):
    for vignette in VIGNETTES:
        select = post(client, vignette, "order-select")["cards"]
        sign = post(client, vignette, "order-sign")["cards"]
        strip = lambda cards: [{k: v for k, v in c.items() if k not in ("uuid", "suggestions")} for c in cards]  # noqa: E731
        assert strip(select) == strip(sign), vignette["id"]


def test_pad_vignette_carries_the_vascular_mimic_note(client):
    vignette = next(v for v in VIGNETTES if v["id"] == "LBP-V14")
    card = post(client, vignette, "order-sign")["cards"][0]
    assert "ankle-brachial index" in card["detail"]


def test_retention_vignette_card_asks_for_an_emergency_mri_and_referral(client):
    vignette = next(v for v in VIGNETTES if v["id"] == "LBP-V30")
    card = post(client, vignette, "order-sign")["cards"][0]
    assert card["indicator"] == "critical"
    recommended = [s for s in card["suggestions"] if s.get("isRecommended")]
    assert len(recommended) == 1
    kinds = [(a["type"], a["resource"].get("priority")) for a in recommended[0]["actions"]]
    assert kinds == [("update", "stat"), ("create", "stat")]
