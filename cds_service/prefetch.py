"""Resolve every prefetch key of a service into patient data, fetching what the EHR did not send.

Per key (CDS Hooks 2.0 §Prefetch, checklist PF-04..07):
  present    a resource or a searchset Bundle: used (its `next` pages fetched from fhirServer when allowed)
  null       the EHR has no data for it: read, empty; never fetched again
  error      an OperationOutcome (bare, or an error entry of the Bundle), or a value that is not FHIR: unreadable
  absent     queried against fhirServer when the request has one; otherwise missing

Resources sent under key names this service did not ask for are used too (lenient input); when there
is no fhirServer to query, a resource type they bring counts as read (instead of a 412).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import urlsplit

from .discovery import Service, fill_template
from .fhir_client import FhirClient, read_bundle
from .protocol import HookRequest

log = logging.getLogger("cds_service.prefetch")


@dataclass
class PatientData:
    resources: list[dict] = field(default_factory=list)
    # resource type -> why it could not be read (OperationOutcome, timeout, HTTP 500, ...)
    unreadable: dict[str, str] = field(default_factory=dict)
    # resource types neither prefetched nor fetchable (no fhirServer): the 412 case
    missing: list[str] = field(default_factory=list)
    fetched_keys: list[str] = field(default_factory=list)

    @property
    def nothing_read(self) -> bool:
        return not self.resources and bool(self.unreadable or self.missing)


async def resolve_prefetch(
    request: HookRequest,
    service: Service,
    fhir: FhirClient | None,
    extra_prefixes: Sequence[str] = (),
) -> PatientData:
    data = PatientData()
    seen: set[tuple[str, str]] = set()
    types_read: set[str] = set()
    to_fetch: dict[str, str] = {}
    key_types = {key: service.resource_type(key) for key in service.prefetch}

    for key, value in request.prefetch.items():
        expected_type = key_types.get(key)
        if value is None:
            if expected_type:
                types_read.add(expected_type)
            continue
        resources, error, next_url = _unpack(value)
        _add(data, seen, resources)
        if error:
            if expected_type:
                data.unreadable[expected_type] = error
            continue
        if next_url:
            relative = _relative_to(request.fhir_server, next_url)
            if relative and fhir is not None:
                to_fetch[key] = relative
            elif expected_type:
                data.unreadable[expected_type] = "prefetch has further pages that cannot be fetched"
            continue
        if expected_type:
            types_read.add(expected_type)
        elif not (request.fhir_server and fhir is not None):
            # Sent under a key this service did not ask for: with no fhirServer to query, the types it
            # brings count as read; with one, the service's own (code-filtered) queries still run.
            types_read.update(resource["resourceType"] for resource in resources)

    for key, template in service.prefetch.items():
        resource_type = key_types[key]
        if key in request.prefetch or key in to_fetch or resource_type in types_read or resource_type in data.unreadable:
            continue
        query = fill_template(template, request.context)
        if query is None:
            data.unreadable[resource_type] = "prefetch template could not be filled from the context"
        elif request.fhir_server and fhir is not None:
            to_fetch[key] = query
        else:
            data.missing.append(resource_type)

    if to_fetch and request.fhir_server and fhir is not None:
        results = await fhir.fetch_all(request.fhir_server, to_fetch, request.access_token, extra_prefixes)
        for key, result in results.items():
            resource_type = key_types.get(key, key)
            data.fetched_keys.append(key)
            if result.resources:
                _add(data, seen, result.resources)
            if result.resources is None or result.error or result.partial:
                data.unreadable[resource_type] = result.error or "incomplete"
            else:
                types_read.add(resource_type)
                data.unreadable.pop(resource_type, None)
    return data


def _unpack(value: Any) -> tuple[list[dict], str | None, str | None]:
    """(resources, error, next page URL) of one prefetch value."""
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        return [], "prefetch value is not a FHIR resource", None
    if value["resourceType"] == "OperationOutcome":
        return [], _outcome_error(value), None
    if value["resourceType"] != "Bundle":
        return [value], None, None
    resources, errors, next_url = read_bundle(value, "malformed Bundle entry", _outcome_error)
    return resources, errors[-1] if errors else None, next_url  # the last bad entry names the error


def _add(data: PatientData, seen: set[tuple[str, str]], resources: list[dict]) -> None:
    for resource in resources:
        resource_type = resource.get("resourceType")
        resource_id = resource.get("id")
        if isinstance(resource_id, str) and resource_id:
            identity = (resource_type, resource_id)
            if identity in seen:
                continue
            seen.add(identity)
        data.resources.append(resource)


def _outcome_error(outcome: dict) -> str:
    """'OperationOutcome: <code>' of its first issue, or 'OperationOutcome'."""
    issues = outcome.get("issue")
    if isinstance(issues, list) and issues and isinstance(issues[0], dict) and isinstance(issues[0].get("code"), str):
        return f"OperationOutcome: {issues[0]['code']}"
    return "OperationOutcome"


def _relative_to(base: str | None, url: str) -> str | None:
    """The next-page URL relative to fhirServer ("Condition?...", or "?..." for the base itself plus a
    query, as HAPI's `[base]?_getpages=...` links are); None when it is elsewhere or names no page."""
    if not base:
        return None
    base_parts, url_parts = urlsplit(base.rstrip("/") + "/"), urlsplit(url)
    if (base_parts.scheme, base_parts.netloc) != (url_parts.scheme, url_parts.netloc):
        return None
    if url_parts.path == base_parts.path.rstrip("/"):
        relative = ""
    elif url_parts.path.startswith(base_parts.path):
        relative = url_parts.path[len(base_parts.path):]
    else:
        return None
    if not relative and not url_parts.query:
        return None  # the bare base is no page of a search
    return relative + (f"?{url_parts.query}" if url_parts.query else "")
