"""The /demo page: a small mock EHR in the browser, the first thing a new user opens.

    if settings.demo:
        app.include_router(demo_router(lambda: state))

    GET /                        redirect to /demo
    GET /demo                    the page (static HTML; behaviour in demo.js, no build step, no CDN)
    GET /demo/static/{name}      its script, markdown renderer, style sheet and icon
    GET /demo/patients           the demo patients: id, label, age, sex, one-line summary, scenario order
    GET /demo/patients/{id}      one patient's chart as a FHIR collection Bundle, dated relative to the
                                 service's today (CDS_TODAY or the server's date)
    GET /demo/fhir/...           the same charts as a tiny read-only FHIR R4 server (metadata, read,
                                 search by patient, _id and code; POST _search), so the CDS Hooks
                                 sandbox can be pointed at this service alone (fhirServiceUrl)

The page calls the service's own CDS Hooks endpoints (same origin) exactly as an EHR would: discovery,
order-select with prefetch filled from the discovery templates, feedback, order-sign. It has no
inline script or style and is served with a strict Content-Security-Policy. The patients are
synthetic; the page is for demonstration and training, not for real patients.
"""

from __future__ import annotations

from datetime import date
from functools import lru_cache
from html import escape
from pathlib import Path
from typing import Any, Callable

from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from . import demo
from .protocol import encode, operation_outcome

STATIC = Path(__file__).parent / "static" / "demo"
ASSETS = {"demo.js": "text/javascript", "markdown.js": "text/javascript", "demo.css": "text/css", "favicon.svg": "image/svg+xml"}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' https:; "
        "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
FHIR_JSON = "application/fhir+json"


def demo_router(get_state: Callable[[], Any]) -> APIRouter:
    """`get_state()` returns the service's ServiceState (for its settings' today)."""
    router = APIRouter(tags=["demo"])

    def today() -> date:
        return get_state().settings.today or date.today()

    @router.get("/", include_in_schema=False)
    @router.get("/demo/", include_in_schema=False)
    def root(request: Request) -> Response:
        return RedirectResponse(_root(request) + "/demo", status_code=307)

    @router.get("/demo", response_class=HTMLResponse, include_in_schema=False)
    def demo_page(request: Request) -> HTMLResponse:
        base = escape(_root(request) + "/demo/")
        html = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{base}}", base)
        return HTMLResponse(html, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    @router.get("/demo/static/{name}", include_in_schema=False)
    def demo_asset(name: str) -> Response:
        if name not in ASSETS:
            return _not_found("No such demo asset.")
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    @router.get("/demo/patients", summary="The demo patients")
    def demo_patients() -> Response:
        day = today()
        patients = [
            {
                "id": p.id,
                "label": p.label,
                "age": p.age(day),
                "sex": p.sex(),
                "summary": p.summary,
                "kind": p.kind,
                "order": p.order,
                "expectedCard": p.expected_card,
            }
            for p in demo.demo_patients()
        ]
        return Response(encode(patients), media_type="application/json", headers={"Cache-Control": "no-store"})

    @router.get("/demo/patients/{patient_id}", summary="One demo patient's chart as a FHIR Bundle")
    def demo_patient(patient_id: str) -> Response:
        patient = demo.find_patient(patient_id)
        if patient is None:
            return _not_found(f"No demo patient with id '{patient_id}'.")
        bundle = demo.record_bundle(patient, today())
        return Response(encode(bundle), media_type=FHIR_JSON, headers={"Cache-Control": "no-store"})

    # -- a read-only FHIR R4 facade over the demo charts, for the CDS Hooks sandbox ----------------

    @router.get("/demo/fhir/metadata", summary="CapabilityStatement of the demo FHIR server")
    def fhir_metadata() -> Response:
        return _fhir(_capability_statement(today()))

    @router.get("/demo/fhir/{resource_type}", summary="FHIR search over the demo charts")
    def fhir_search(resource_type: str, request: Request) -> Response:
        return _fhir(_search(request, resource_type, list(request.query_params.multi_items()), today()))

    @router.post("/demo/fhir/{resource_type}/_search", summary="FHIR search over the demo charts (POST)")
    async def fhir_search_post(resource_type: str, request: Request) -> Response:
        body = (await request.body()).decode("utf-8", "replace")
        params = list(request.query_params.multi_items()) + parse_qsl(body, keep_blank_values=True)
        return _fhir(_search(request, resource_type, params, today()))

    @router.get("/demo/fhir/{resource_type}/{resource_id}", summary="FHIR read from the demo charts")
    def fhir_read(resource_type: str, resource_id: str) -> Response:
        resource = _index(today()).get((resource_type, resource_id))
        if resource is None:
            return _not_found(f"{resource_type}/{resource_id} is not a demo resource.")
        return _fhir(resource)

    return router


FHIR_TYPES = ("Patient", "Condition", "Observation", "MedicationRequest", "MedicationStatement", "Procedure",
              "ServiceRequest", "Encounter", "Immunization")


@lru_cache(maxsize=4)
def _index(day: date) -> dict[tuple[str, str], dict]:
    """(type, id) -> resource over every demo chart, dated relative to `day`."""
    index: dict[tuple[str, str], dict] = {}
    for _, record in demo.demo_records(day):
        for resource in record:
            index[(resource["resourceType"], resource["id"])] = resource
    return index


def _search(request: Request, resource_type: str, params: list[tuple[str, str]], day: date) -> dict:
    """A searchset Bundle: `patient`/`subject` (id or Patient/id), `_id` and `code` (token lists:
    system|code or code) are evaluated; other parameters are ignored, as FHIR servers may."""
    wanted: dict[str, list[str]] = {}
    for name, value in params:
        wanted.setdefault(name.split(":")[0], []).extend(v.strip() for v in value.split(",") if v.strip())
    matches = [r for (kind, _), r in _index(day).items() if kind == resource_type]
    for patient in wanted.get("patient", []) + wanted.get("subject", []):
        reference = patient if "/" in patient else f"Patient/{patient}"
        if resource_type == "Patient":
            matches = [r for r in matches if f"Patient/{r['id']}" == reference]
        else:
            matches = [r for r in matches if (r.get("subject") or r.get("patient") or {}).get("reference") == reference]
    if "_id" in wanted:
        matches = [r for r in matches if r["id"] in wanted["_id"]]
    if "code" in wanted:
        tokens = set(wanted["code"])
        matches = [r for r in matches if any(
            f"{c.get('system', '')}|{c.get('code')}" in tokens or c.get("code") in tokens
            for c in (r.get("code") or r.get("medicationCodeableConcept") or {}).get("coding", [])
        )]
    count = wanted.get("_count")
    if count and count[0].isdigit():
        matches = matches[: int(count[0])]
    base = str(request.base_url).rstrip("/") + "/demo/fhir"
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(matches),
        "link": [{"relation": "self", "url": str(request.url)}],
        "entry": [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in matches],
    }


def _capability_statement(day: date) -> dict:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": day.isoformat(),
        "kind": "instance",
        "software": {"name": "Lumbar imaging CDS demo FHIR server (read-only, synthetic patients)"},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "resource": [
                {"type": kind, "interaction": [{"code": "read"}, {"code": "search-type"}],
                 "searchParam": [{"name": name, "type": "token" if name in ("code", "_id") else "reference"}
                                 for name in (("_id",) if kind == "Patient" else ("patient", "_id", "code"))]}
                for kind in FHIR_TYPES
            ],
        }],
    }


def _fhir(body: dict) -> Response:
    return Response(encode(body), media_type=FHIR_JSON, headers={"Cache-Control": "no-store"})


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _not_found(message: str) -> Response:
    return Response(encode(operation_outcome(message, code="not-found")), 404, media_type=FHIR_JSON)
