"""The FHIR fallback client: run prefetch queries the EHR did not answer against its `fhirServer`.

Rules (CDS Hooks 2.0 §FHIR Resource Access; checklist PF-06, PF-09, PF-10, SEC-15):
- Only allow-listed servers are contacted (URL prefixes, compared by scheme, host, port and path
  segments; no userinfo). With no allow-list at all, loopback only, for development.
- Every query of one hook call runs in parallel, each request bounded by `fhir_timeout_s`, the
  whole call by `fhir_deadline_s`.
- `next` links are followed up to `fhir_max_pages` pages, only on the same server, never twice.
- Redirects are not followed; any status but 200 fails the query; responses are size-capped.
- The access token goes in the Authorization header of each request and nowhere else: it is
  not kept on the client, not logged, not put in any error text.
- Log lines carry the key, the query's resource type, the outcome, pages and milliseconds:
  never URLs (they hold patient ids) and never resource contents. httpx's own request log
  (URLs at INFO) is raised to WARNING unless the "httpx" logger was configured explicitly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

import httpx

from .http_body import read_capped

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("cds_service.fhir")

CANCEL_GRACE_S = 0.2  # time given to cancelled requests to unwind after the deadline
_AUTHORITY = re.compile(r"^[^:/?#]*:?/*([^/?#]*)")


@dataclass(frozen=True)
class QueryResult:
    key: str
    resources: list[dict] | None  # every resource of every page; [resource] for a read; None on failure
    error: str | None  # short reason, safe to log and show; None on success
    pages: int = 0
    partial: bool = False  # pages were read, then a failure: `resources` holds what was read


class _Failed(Exception):
    """A query failed for a reason that is safe to log and show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Progress:
    resources: list[dict] = field(default_factory=list)
    pages: int = 0


@dataclass(frozen=True)
class _Place:
    """Where a URL points: what the allow-list and same-server checks compare."""

    scheme: str
    host: str
    port: int
    path: str  # raw (still percent-encoded) path, no query, no trailing slash

    def is_under(self, prefix: "_Place") -> bool:
        if (self.scheme, self.host, self.port) != (prefix.scheme, prefix.host, prefix.port):
            return False
        return self.path == prefix.path or self.path.startswith(prefix.path + "/")


def _place(url: str) -> _Place | None:
    """Parse with httpx's own parser (the one that sends the request); None when unusable."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return None
    if parsed.scheme not in ("http", "https") or not parsed.host or parsed.userinfo:
        return None
    if "@" in _AUTHORITY.match(url).group(1):
        return None  # any userinfo, even an empty one ("http://@host/"), is refused
    if any(segment in (".", "..") for segment in parsed.path.split("/")):
        return None  # percent-encoded dot segments that the server could decode
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    raw_path = parsed.raw_path.split(b"?", 1)[0].decode("ascii")
    return _Place(parsed.scheme, parsed.host.lower(), port, raw_path.rstrip("/"))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _query_type(query: str) -> str:
    """The resource type a query is about: the only part of it that may be logged."""
    first = query.lstrip("/").split("?", 1)[0].split("/", 1)[0]
    return first if re.fullmatch(r"[A-Z][A-Za-z]{0,63}", first) else "?"


def _is_read(query: str) -> bool:
    segments = query.lstrip("/").split("?", 1)[0].strip("/").split("/")
    return len(segments) == 2 and not segments[1].startswith(("_", "$"))


def _outcome_error(outcome: dict) -> str:
    """'OperationOutcome: <code>' of its first error or fatal issue (a code safe to log), else 'OperationOutcome'."""
    errors = _error_issues(outcome)
    code = errors[0].get("code") if errors else None
    return f"OperationOutcome: {code}" if isinstance(code, str) and re.fullmatch(r"[a-z-]{1,40}", code) else "OperationOutcome"


def _error_issues(outcome: dict) -> list[dict]:
    issues = outcome.get("issue")
    issues = [i for i in issues if isinstance(i, dict)] if isinstance(issues, list) else []
    return [i for i in issues if i.get("severity") in ("error", "fatal")]


def read_bundle(bundle: dict, malformed: str, outcome_error: Callable[[dict], str]) -> tuple[list[dict], list[str], str | None]:
    """(resources, errors, next link) of a Bundle, the one reader of both searchset pages and prefetched
    Bundles: the entries' resources but the OperationOutcomes (search.mode "outcome"); in entry order, an
    error per entry that holds no resource (`malformed`: garbage is unreadable data, never "no data") and
    per OperationOutcome entry with an error or fatal issue (`outcome_error(outcome)`); its last `next` link."""
    resources: list[dict] = []
    errors: list[str] = []
    entries = bundle.get("entry")
    for entry in entries if isinstance(entries, list) else []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            errors.append(malformed)
        elif resource["resourceType"] == "OperationOutcome":
            if _error_issues(resource):
                errors.append(outcome_error(resource))
        else:
            resources.append(resource)
    next_url = None
    links = bundle.get("link")
    for link in links if isinstance(links, list) else []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            next_url = link["url"]
    return resources, errors, next_url


def _read_result(body: dict, query: str) -> dict:
    if body["resourceType"] == "OperationOutcome":
        raise _Failed(_outcome_error(body))
    if body["resourceType"] != _query_type(query):
        raise _Failed("unexpected resource type")
    return body


def _search_page(body: dict) -> tuple[list[dict], str | None]:
    """(resources, next link) of one searchset page; fails on an OperationOutcome or the first bad entry."""
    if body["resourceType"] == "OperationOutcome":
        raise _Failed(_outcome_error(body))
    if body["resourceType"] != "Bundle" or body.get("type") != "searchset":
        raise _Failed("not a searchset Bundle")
    resources, errors, next_url = read_bundle(body, "malformed searchset entry", _outcome_error)
    if errors:
        raise _Failed(errors[0])
    return resources, next_url


class FhirClient:
    def __init__(self, settings: "Settings", transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        # httpx logs every request URL at INFO; FHIR URLs carry patient ids. Quiet it unless
        # someone configured that logger on purpose.
        httpx_log = logging.getLogger("httpx")
        if httpx_log.level == logging.NOTSET:
            httpx_log.setLevel(logging.WARNING)
        self._transport = transport  # injected by tests (a MockTransport); never closed here
        self._ssl = httpx.create_ssl_context()  # built once: a client per hook call is then cheap

    @asynccontextmanager
    async def _call_client(self) -> AsyncIterator[httpx.AsyncClient]:
        """A connection pool for one hook call, closed when the call ends (quickly: a hanging server's
        connection is not waited for). One pool for every call would let one hanging FHIR server hold
        connections other calls wait for, and httpcore 1.0 can leave a cancelled request's connection in a
        shared pool for good (encode/httpcore#1093). An injected transport (tests) is left open."""
        client = httpx.AsyncClient(
            transport=self._transport,
            verify=self._ssl,
            follow_redirects=False,
            timeout=httpx.Timeout(self.settings.fhir_timeout_s),
            limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
            trust_env=False,  # no proxies or .netrc credentials from the environment on token-bearing calls
        )
        try:
            yield client
        finally:
            if self._transport is None:
                try:
                    async with asyncio.timeout(CANCEL_GRACE_S):
                        await client.aclose()
                except Exception:  # noqa: BLE001 - a close that fails or times out must not fail the hook call
                    log.debug("fhir client pool not closed cleanly")

    def is_allowed(self, url: str, extra_prefixes: Sequence[str] = ()) -> bool:
        place = _place(url)
        if place is None:
            return False
        prefixes = [*self.settings.fhir_server_allowlist, *extra_prefixes]
        if not prefixes:
            return _is_loopback(place.host)
        return any(prefix_place is not None and place.is_under(prefix_place) for prefix_place in map(_place, prefixes))

    async def fetch_all(
        self,
        fhir_server: str,
        queries: dict[str, str],
        access_token: str | None,
        extra_prefixes: Sequence[str] = (),
    ) -> dict[str, QueryResult]:
        if not self.is_allowed(fhir_server, extra_prefixes):
            for key, query in queries.items():
                log.warning("fhir query key=%s type=%s error=server not allowed pages=0 ms=0", key, _query_type(query))
            return {key: QueryResult(key, None, "server not allowed") for key in queries}

        if not queries:
            return {}
        headers = {"Accept": "application/fhir+json"}
        if access_token:
            headers["Authorization"] = f"Bearer {access_token}"
        started = time.monotonic()
        progress = {key: _Progress() for key in queries}
        async with self._call_client() as client:
            tasks = {
                key: asyncio.create_task(self._fetch_one(client, key, fhir_server, query, headers, extra_prefixes, progress[key]))
                for key, query in queries.items()
            }
            _, pending = await asyncio.wait(tasks.values(), timeout=self.settings.fhir_deadline_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=CANCEL_GRACE_S)

        results = {}
        for key, task in tasks.items():
            if task in pending:
                results[key] = self._finish(key, queries[key], progress[key], "deadline exceeded", started)
            else:
                results[key] = task.result()
        return results

    async def get_json(self, url: str, headers: dict[str, str]) -> dict:
        """One GET outside a hook call (the retrospective audit's paging), with its own short-lived pool."""
        async with self._call_client() as client:
            return await self._get_json(client, url, headers)

    async def aclose(self) -> None:
        """Nothing to close: each hook call closes its own pool."""

    async def _fetch_one(
        self,
        client: httpx.AsyncClient,
        key: str,
        fhir_server: str,
        query: str,
        headers: dict[str, str],
        extra_prefixes: Sequence[str],
        progress: _Progress,
    ) -> QueryResult:
        started = time.monotonic()
        try:
            await self._fetch_pages(client, fhir_server, query, headers, extra_prefixes, progress)
            error = None
        except _Failed as failure:
            error = failure.reason
        except (httpx.TimeoutException, TimeoutError):
            error = "timeout"
        except Exception as exc:  # connection refused, protocol errors...: the class name only, no URL
            error = f"request failed ({type(exc).__name__})"
        return self._finish(key, query, progress, error, started)

    async def _fetch_pages(
        self,
        client: httpx.AsyncClient,
        fhir_server: str,
        query: str,
        headers: dict[str, str],
        extra_prefixes: Sequence[str],
        progress: _Progress,
    ) -> None:
        base = _place(fhir_server)
        url = fhir_server.rstrip("/") + "/" + query.lstrip("/")
        place = _place(url)
        if base is None or place is None or not place.is_under(base):
            raise _Failed("server not allowed")  # e.g. a query with ../ that leaves the server's base path

        if _is_read(query):
            body = await self._get_json(client, url, headers)
            progress.resources.append(_read_result(body, query))
            progress.pages = 1
            return

        seen = set()
        while True:
            seen.add(str(httpx.URL(url)))
            resources, next_url = _search_page(await self._get_json(client, url, headers))
            progress.resources.extend(resources)
            progress.pages += 1
            if next_url is None:
                return
            next_url = str(httpx.URL(url).join(next_url))
            next_place = _place(next_url)
            if next_place is None or not next_place.is_under(base) or not self.is_allowed(next_url, extra_prefixes):
                raise _Failed("next link to another server")
            if next_url in seen:
                raise _Failed("paging loop")
            if progress.pages >= self.settings.fhir_max_pages:
                raise _Failed("too many pages")
            url = next_url

    async def _get_json(self, client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> dict:
        async with asyncio.timeout(self.settings.fhir_timeout_s):
            async with client.stream("GET", url, headers=headers) as response:
                if response.status_code != 200:
                    raise _Failed(f"HTTP {response.status_code}")
                body = await read_capped(response, self.settings.fhir_max_response_bytes)
                if body is None:
                    raise _Failed("response too large")
        try:
            data: Any = json.loads(body)
        except (ValueError, RecursionError):
            raise _Failed("not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
            raise _Failed("not a FHIR resource")
        return data

    @staticmethod
    def _finish(key: str, query: str, progress: _Progress, error: str | None, started: float) -> QueryResult:
        elapsed_ms = round((time.monotonic() - started) * 1000)
        level = logging.INFO if error is None else logging.WARNING
        log.log(
            level,
            "fhir query key=%s type=%s %s pages=%d ms=%d",
            key,
            _query_type(query),
            "ok" if error is None else f"error={error}",
            progress.pages,
            elapsed_ms,
        )
        if error is None:
            return QueryResult(key, list(progress.resources), None, progress.pages)
        if progress.pages:
            return QueryResult(key, list(progress.resources), error, progress.pages, partial=True)
        return QueryResult(key, None, error, progress.pages)
