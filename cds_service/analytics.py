"""The analytics page: the override report as charts and tables, for clinical leads.

    app.include_router(analytics_router(lambda: store))

    GET /analytics                     the page (static HTML; charts drawn as SVG by analytics.js)
    GET /analytics/report.json         build_report() as JSON; ?since=YYYY-MM-DD&until=YYYY-MM-DD
    GET /analytics/assets/{name}       the page's script and style sheet (no CDN: works offline)

The page has no inline script or style, so it is served with a strict Content-Security-Policy
(everything from 'self'). Each chart has a text alternative and a table of the same numbers
beside it. The report has no patient identifiers, but it lists clinicians' free-text comments:
expose it to clinical leads only (behind the organisation's network or SSO), not to the EHR side.
"""

from __future__ import annotations

from datetime import date
from html import escape
from pathlib import Path
from typing import Callable

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from cds_service.report import build_report
from cds_service.store import Store, StoreError

STATIC = Path(__file__).parent / "static" / "analytics"
ASSETS = {"analytics.js": "text/javascript", "analytics.css": "text/css"}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def analytics_router(get_store: Callable[[], Store]) -> APIRouter:
    router = APIRouter(tags=["analytics"])

    @router.get("/analytics", response_class=HTMLResponse, include_in_schema=False)
    def analytics_page(request: Request) -> HTMLResponse:
        page = escape(request.scope.get("root_path", "").rstrip("/") + "/analytics")
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        html = html.replace("{{base}}", page + "/").replace("{{page}}", page)
        return HTMLResponse(html, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    @router.get("/analytics/report.json", summary="The override report")
    def analytics_report(
        since: date | None = Query(None, description="first day included (UTC)"),
        until: date | None = Query(None, description="last day included (UTC)"),
    ) -> Response:
        # A plain `def`: FastAPI runs it in its thread pool, so the blocking store calls are fine.
        try:
            report = build_report(get_store(), since, until)
        except StoreError:
            return JSONResponse({"error": "the report database is unavailable"}, status_code=503,
                                headers={"Retry-After": "30"})
        # Clinician comments inside: not for shared caches.
        return JSONResponse(report, headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    @router.get("/analytics/assets/{name}", include_in_schema=False)
    def analytics_asset(name: str) -> Response:
        if name not in ASSETS:
            return Response(status_code=404)
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache", **SECURITY_HEADERS})

    return router
