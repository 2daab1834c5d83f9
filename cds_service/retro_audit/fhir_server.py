"""A FHIR R4 server as the source: `ServiceRequest?code=<lumbar imaging codes>` paged through, and for each
new patient the service's own prefetch queries (services.yaml) run through `FhirClient` (allow-list, no
redirects, size caps, `next` links only on the same server, the token in the Authorization header only,
never logged). A query that fails makes its resource type unreadable for that patient, as in a hook call."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from typing import Any

from cards.engine import Engine
from fhir_mappings.knowledge import Knowledge

from .model import AuditError, AuditPolicy, AuditRun, merge_summary, new_summary
from .patient import audit_patient
from .progress import progress_bar
from .references import medication_reference, patient_reference
from .writers import ResultWriter


def audit_fhir_server(base_url: str, writer: ResultWriter, policy: AuditPolicy, token: str | None = None,
                      criteria_file: str | None = None, quiet: bool = True, concurrency: int = 8,
                      settings: Any = None, transport: Any = None) -> AuditRun:
    return asyncio.run(_audit_fhir_server(base_url, writer, policy, token, criteria_file, quiet, concurrency, settings, transport))


async def _audit_fhir_server(base_url: str, writer: ResultWriter, policy: AuditPolicy, token: str | None,
                             criteria_file: str | None, quiet: bool, concurrency: int, settings: Any, transport: Any) -> AuditRun:
    import httpx

    from ..discovery import fill_template, load_services
    from ..fhir_client import FhirClient, _place, _search_page
    from ..settings import Settings

    started = time.perf_counter()
    base_url = base_url.rstrip("/")
    settings = settings or Settings.from_env()
    # Bulk reading: longer per-request limits than a hook call's (the allow-list and caps stay).
    settings = settings.with_overrides(fhir_timeout_s=max(settings.fhir_timeout_s, 30.0),
                                       fhir_deadline_s=max(settings.fhir_deadline_s, 300.0),
                                       fhir_max_pages=max(settings.fhir_max_pages, 100))
    knowledge = Knowledge.load(criteria_file or settings.criteria_file)
    engine = Engine(knowledge)
    service = load_services(knowledge.codes)["lumbar-imaging-order-sign"]
    client = FhirClient(settings, transport=transport)
    summary = new_summary()
    meta: dict[str, Any] = {"source": _redact(base_url), "workers": 1, "concurrency": concurrency}
    if not client.is_allowed(base_url):
        await client.aclose()
        raise AuditError(f"{_redact(base_url)} is not an allowed FHIR server (CDS_FHIR_SERVER_ALLOWLIST; loopback only when unset)")
    headers = {"Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    tokens = ",".join(f"{c['system']}|{c['code']}" for group in knowledge.criteria["orders"]["groups"]
                      for c in knowledge.codes.group_codes(group))
    url = f"{base_url}/ServiceRequest?code={tokens}&_count=100"
    base_place = _place(base_url)
    seen_pages: set[str] = set()
    done: set[str] = set()
    semaphore = asyncio.Semaphore(concurrency)

    async def one_patient(patient_id: str) -> tuple[list[dict], dict[str, Counter]]:
        async with semaphore:
            context = {"patientId": patient_id, "userId": "Device/retro-audit"}
            queries = {key: fill_template(template, context) for key, template in service.prefetch.items()}
            results = await client.fetch_all(base_url, {k: q for k, q in queries.items() if q}, token)
            resources: list[dict] = []
            unreadable: dict[str, str] = {}
            for key, result in results.items():
                resources.extend(result.resources or ())
                if result.resources is None or result.error or result.partial:
                    unreadable[service.resource_type(key)] = result.error or "incomplete"
            medications = {_medication_id(r) for r in resources} - {None} - {r.get("id") for r in resources if r.get("resourceType") == "Medication"}
            if medications:
                reads = await client.fetch_all(base_url, {f"medication-{i}": f"Medication/{m}" for i, m in enumerate(sorted(medications))}, token)
                for result in reads.values():
                    resources.extend(result.resources or ())
                    if result.error:
                        unreadable["MedicationRequest"] = "a referenced Medication could not be read"
        audit = audit_patient(resources, engine, policy, unreadable or None)
        return audit.rows, audit.summary

    progress = progress_bar(quiet)
    try:
        with progress:
            task = progress.add_task("Evaluating orders", total=None, unit="patients")
            pages = 0
            while url:
                seen_pages.add(url)
                try:
                    body = await client.get_json(url, headers)
                    orders, next_url = _search_page(body)
                except Exception as exc:  # the reason only: never the URL (patient ids) or the token
                    raise AuditError(f"the ServiceRequest search failed after {pages} page(s): {getattr(exc, 'reason', type(exc).__name__)}") from None
                pages += 1
                new_patients = []
                for order in orders:
                    patient_id = patient_reference(order)
                    if patient_id and patient_id not in done:
                        done.add(patient_id)
                        new_patients.append(patient_id)
                for rows, part in await asyncio.gather(*(one_patient(p) for p in new_patients)):
                    writer.write(rows)
                    merge_summary(summary, part)
                progress.update(task, completed=len(done))
                url = None
                if next_url:
                    absolute = str(httpx.URL(base_url + "/").join(next_url))
                    place = _place(absolute)
                    if place is None or base_place is None or not place.is_under(base_place) or not client.is_allowed(absolute):
                        raise AuditError("the ServiceRequest search's next link leaves the FHIR server")
                    if absolute in seen_pages:
                        raise AuditError("the ServiceRequest search's next links loop")
                    url = absolute
    finally:
        await client.aclose()
    meta["pages"] = pages
    meta["seconds"] = round(time.perf_counter() - started, 3)
    meta["evaluate_seconds"] = meta["seconds"]
    return AuditRun(summary, meta)


def _medication_id(resource: dict) -> str | None:
    """The id of the Medication a resource references as Medication/<id> (None for contained or other references)."""
    target = medication_reference(resource)
    if target is None:
        return None
    parts = target.rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "Medication" else None


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url)
