"""`python -m cds_service send`: build a spec-valid CDS Hooks request and pretty-print the cards.

For testers pointing at a deployed service: the patient record comes from a Bundle file; the draft
order is built from --order; prefetch is filled as an EHR would fill the service's templates, or,
with --fhir, left out so the service reads the record from that FHIR server itself.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from pathlib import Path

import httpx

from .offline import split_bundle
from .vignettes import PREFETCH_KEYS, searchset

SYSTEM_BY_SHAPE = [
    (re.compile(r"^\d{5}$"), "http://www.ama-assn.org/go/cpt"),
    (re.compile(r"^\d{1,7}-\d$"), "http://loinc.org"),
    (re.compile(r"^RPID\d+$", re.I), "http://radlex.org"),
    (re.compile(r"^\d{6,18}$"), "http://snomed.info/sct"),
]


def guess_system(code: str) -> str:
    for pattern, system in SYSTEM_BY_SHAPE:
        if pattern.match(code):
            return system
    raise ValueError(f"cannot tell the code system of {code!r}; pass --system")


def build_request(record: list[dict], hook: str, order_code: str, system: str | None, fhir_server: str | None) -> dict:
    patients = [r for r in record if r.get("resourceType") == "Patient"]
    if not patients or not patients[0].get("id"):
        raise ValueError("the Bundle has no Patient with an id")
    patient_id = patients[0]["id"]
    order = {
        "resourceType": "ServiceRequest",
        "id": f"send-{uuid.uuid4().hex[:12]}",
        "status": "draft",
        "intent": "order",
        "code": {"coding": [{"system": system or guess_system(order_code), "code": order_code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    context = {
        "userId": "Practitioner/cds-send",
        "patientId": patient_id,
        "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]},
    }
    if hook == "order-select":
        context["selections"] = [f"ServiceRequest/{order['id']}"]
    request: dict = {"hookInstance": str(uuid.uuid4()), "hook": hook, "context": context}
    if fhir_server:
        request["fhirServer"] = fhir_server
    else:
        prefetch: dict = {"patient": patients[0]}
        for resource_type, key in PREFETCH_KEYS.items():
            matches = [r for r in record if r.get("resourceType") == resource_type]
            prefetch[key] = searchset(matches) if matches else None
        request["prefetch"] = prefetch
    return request


def signed_jwt(key_file: str, kid: str, issuer: str, audience: str) -> str:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(Path(key_file).read_bytes(), password=None)
    algorithm = "ES384" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS384"
    now = int(time.time())
    claims = {"iss": issuer, "aud": audience, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid, "typ": "JWT"})


def send_command(args: argparse.Namespace) -> int:
    try:
        record, _ = split_bundle(json.loads(Path(args.bundle).read_text(encoding="utf-8")))
        request = build_request(record, args.hook, args.order, args.system, args.fhir)
    except (OSError, ValueError) as exc:
        print(f"send: {exc}", file=sys.stderr)
        return 2
    if args.key and not (args.kid and args.iss):
        print("send: --key needs --kid and --iss", file=sys.stderr)
        return 2
    base = args.url.rstrip("/")
    discovery = f"{base}/cds-services"
    try:
        services = httpx.get(discovery, headers=_auth(args, discovery), timeout=10)
    except httpx.HTTPError as exc:
        print(f"send: cannot reach {discovery}: {exc}", file=sys.stderr)
        return 1
    if services.status_code != 200:
        print(f"send: {discovery} answered {services.status_code}: {services.text[:300]}", file=sys.stderr)
        return 1
    try:
        service = next(s for s in services.json()["services"] if s["hook"] == args.hook)
    except (StopIteration, KeyError, TypeError, ValueError):
        print(f"send: {discovery} lists no {args.hook} service", file=sys.stderr)
        return 1
    url = f"{base}/cds-services/{service['id']}"
    try:
        response = httpx.post(url, json=request, headers=_auth(args, url), timeout=30)
    except httpx.HTTPError as exc:
        print(f"send: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    print(f"POST {url} -> {response.status_code}")
    try:
        print(json.dumps(response.json(), indent=2))
    except ValueError:
        print(response.text)
    return 0 if response.status_code == 200 else 1


def _auth(args: argparse.Namespace, audience: str) -> dict:
    if not args.key:
        return {}
    return {"Authorization": f"Bearer {signed_jwt(args.key, args.kid, args.iss, audience)}"}
