"""The command line: `evaluate` offline and `send` against a real service (open and JWT-authenticated)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from cds_service import vignettes
from server_support import live_server

REPO = Path(__file__).resolve().parent.parent
TODAY = date(2026, 11, 21)
VIGNETTES = {v["id"]: v for v in json.loads((REPO / "tests/data/vignettes-public.json").read_text())}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cds_service", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def bundle_file(tmp_path: Path, vignette_id: str, with_order: bool) -> Path:
    vignette = VIGNETTES[vignette_id]
    record = vignettes.patient_record(vignette, TODAY)
    if with_order:
        record.append(vignettes.draft_order(vignette, record[0]["id"]))
    path = tmp_path / f"{vignette_id}.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in record]}))
    return path


@pytest.mark.parametrize("vignette_id, card_type, rule", [
    ("LBP-V01", "imaging-not-indicated", "W1"),
    ("LBP-V18", "imaging-indicated", "R1"),
    ("LBP-V30", "cauda-equina-emergency", "C3"),
])
def test_evaluate_prints_facts_rule_and_cards(tmp_path, vignette_id, card_type, rule):
    result = run_cli("evaluate", str(bundle_file(tmp_path, vignette_id, True)), "--today", TODAY.isoformat())
    assert result.returncode == 0, result.stderr
    assert f"rule {rule} -> {card_type}" in " ".join(result.stdout.split())
    as_json = run_cli("evaluate", str(bundle_file(tmp_path, vignette_id, True)), "--today", TODAY.isoformat(), "--json")
    assert [c["source"]["topic"]["code"] for c in json.loads(as_json.stdout)["cards"]] == [card_type]


def test_evaluate_explains_a_bundle_without_a_draft_order(tmp_path):
    result = run_cli("evaluate", str(bundle_file(tmp_path, "LBP-V01", False)))
    assert result.returncode == 2
    assert "no draft ServiceRequest" in result.stderr


def test_evaluate_explains_an_unreadable_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = run_cli("evaluate", str(bad))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_send_builds_a_valid_request_and_prints_the_cards(tmp_path):
    with live_server(tmp_path, today=TODAY.isoformat()) as base_url:
        result = run_cli("send", "--bundle", str(bundle_file(tmp_path, "LBP-V17", False)), "--order", "72148", "--url", base_url)
        assert result.returncode == 0, result.stdout + result.stderr
        body = json.loads(result.stdout.split("\n", 1)[1])
        assert [c["source"]["topic"]["code"] for c in body["cards"]] == ["imaging-indicated"]
        sign = run_cli("send", "--hook", "order-sign", "--bundle", str(bundle_file(tmp_path, "LBP-V30", False)), "--order", "30679-5", "--url", base_url)
        assert "cauda-equina-emergency" in sign.stdout


def test_send_signs_the_jwt_when_the_service_requires_it(tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    key_file = tmp_path / "ehr-key.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="ehr-key-1", use="sig", alg="ES384")
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps({"clients": [{"issuer": "https://ehr.example.org", "jwks": {"keys": [jwk]}}]}))
    with live_server(tmp_path, today=TODAY.isoformat(), env={"CDS_CLIENTS_FILE": str(clients)}) as base_url:
        patient = str(bundle_file(tmp_path, "LBP-V01", False))
        unsigned = run_cli("send", "--bundle", patient, "--order", "72148", "--url", base_url)
        assert unsigned.returncode == 1 and "answered 401" in unsigned.stderr and "cannot reach" not in unsigned.stderr
        half = run_cli("send", "--bundle", patient, "--order", "72148", "--url", base_url, "--key", str(key_file))
        assert half.returncode == 2 and "--key needs --kid and --iss" in half.stderr
        signed = run_cli("send", "--bundle", patient, "--order", "72148", "--url", base_url,
                         "--key", str(key_file), "--kid", "ehr-key-1", "--iss", "https://ehr.example.org")
        assert signed.returncode == 0, signed.stdout + signed.stderr
        assert "imaging-not-indicated" in signed.stdout


def test_send_refuses_a_code_it_cannot_place(tmp_path):
    result = run_cli("send", "--bundle", str(bundle_file(tmp_path, "LBP-V01", False)), "--order", "lumbar-mri", "--url", "http://127.0.0.1:9")
    assert result.returncode == 2 and "--system" in result.stderr


def test_send_says_when_the_service_cannot_be_reached(tmp_path):
    result = run_cli("send", "--bundle", str(bundle_file(tmp_path, "LBP-V01", False)), "--order", "72148", "--url", "http://127.0.0.1:9")
    assert result.returncode == 1 and "cannot reach http://127.0.0.1:9/cds-services" in result.stderr
