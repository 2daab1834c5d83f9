"""Upload demo patients (FHIR Bundles) to a FHIR R4 server: `python -m cds_service load-demo --fhir URL`.

Each bundle is POSTed to the server root as one transaction. Transaction and batch bundles go as
they are; a collection bundle becomes a transaction: PUT `Type/id` for resources with an id
(so loading twice updates instead of duplicating), POST for resources without one.
Works with any FHIR R4 server (the Medplum test server, HAPI FHIR in the compose file).
Note that HAPI, by default, refuses client-assigned ids that are purely numeric.
"""

from __future__ import annotations

from typing import Iterable

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

TIMEOUT_S = 60.0  # a first transaction on a cold HAPI server can take a while


class DemoLoadError(RuntimeError):
    """A bundle could not be loaded; the message starts with the bundle's name."""


def as_transaction(name: str, bundle: dict) -> dict:
    """The bundle as a transaction (or batch) ready to POST."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise DemoLoadError(f"{name}: not a FHIR Bundle")
    kind = bundle.get("type")
    if kind in ("transaction", "batch"):
        return bundle
    if kind != "collection":
        raise DemoLoadError(f"{name}: Bundle type {kind!r} cannot be loaded (use transaction, batch or collection)")
    entries = []
    for number, entry in enumerate(bundle.get("entry") or [], start=1):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not resource.get("resourceType"):
            raise DemoLoadError(f"{name}: entry {number} has no resource")
        if resource.get("id"):
            request = {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
        else:
            request = {"method": "POST", "url": resource["resourceType"]}
        new_entry = {"resource": resource, "request": request}
        if entry.get("fullUrl"):
            new_entry["fullUrl"] = entry["fullUrl"]
        entries.append(new_entry)
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _failure(response: httpx.Response) -> str:
    """A short description of a refused bundle: status and the OperationOutcome's first issue."""
    text = f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return text
    issues = body.get("issue") if isinstance(body, dict) else None
    if isinstance(issues, list) and issues and isinstance(issues[0], dict):
        issue = issues[0]
        detail = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
        if detail:
            text += f": {str(detail)[:300]}"
    return text


def _failed_entries(result: dict) -> list[str]:
    entries = result.get("entry") if isinstance(result, dict) else None
    statuses = [str((entry.get("response") or {}).get("status", "")) for entry in entries or [] if isinstance(entry, dict)]
    return [f"entry {n}: {status or 'no status'}" for n, status in enumerate(statuses, start=1) if not status.startswith("2")]


def _post(client: httpx.Client, url: str, name: str, bundle: dict) -> None:
    try:
        response = client.post(url, json=bundle)
    except httpx.HTTPError as exc:
        raise DemoLoadError(f"{name}: cannot reach the FHIR server at {url}: {exc}") from exc
    if response.status_code != 200:
        raise DemoLoadError(f"{name}: the FHIR server refused the bundle: {_failure(response)}")
    try:
        failed = _failed_entries(response.json())
    except ValueError:
        raise DemoLoadError(f"{name}: the FHIR server's answer is not JSON") from None
    if failed:
        raise DemoLoadError(f"{name}: {len(failed)} entries failed ({', '.join(failed[:5])})")


MAX_ENTRIES_PER_TRANSACTION = 40


def load_bundles(fhir_url: str, bundles: Iterable[tuple[str, dict]], progress: bool = True) -> int:
    """POST every (name, bundle) to `fhir_url`; return the number of resources loaded.

    Stops at the first failure with a DemoLoadError naming the bundle. The progress bar goes to stderr.
    """
    items = list(bundles)
    url = fhir_url.rstrip("/") + "/"
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    loaded = 0
    bar = Progress(
        TextColumn("[bold]Loading demo patients"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )
    with bar, httpx.Client(headers=headers, timeout=TIMEOUT_S, follow_redirects=False) as client:
        task = bar.add_task("", total=len(items))
        for name, bundle in items:
            bar.update(task, description=name)
            transaction = as_transaction(name, bundle)
            entries = transaction.get("entry") or []
            # Servers cap the operations of one transaction (Medplum: 50); entries are PUT by id with
            # plain references, so splitting keeps the result the same.
            for start in range(0, len(entries), MAX_ENTRIES_PER_TRANSACTION):
                _post(client, url, name, {**transaction, "entry": entries[start:start + MAX_ENTRIES_PER_TRANSACTION]})
            loaded += sum(1 for entry in entries if isinstance(entry, dict) and entry.get("resource"))
            bar.advance(task)
    return loaded
