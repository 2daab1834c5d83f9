"""create_app(settings): the HTTP edge. Routes and middleware; the work is done by the modules they call.

POST /cds-services/{id}
  protocol.parse_hook_request   400 on a malformed request
  auth.authenticate             401 when a trusted EHR's JWT is required and missing or invalid
  prefetch.resolve_prefetch     prefetch keys, FHIR fallback for the absent ones
  cards.engine.Engine           facts -> assessments -> cards (pure)
  412                           when the decision needs data that was neither sent nor fetchable
  audit                         one decision record per call, written in the background
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from contextlib import asynccontextmanager
from functools import partial
from datetime import date, datetime, timezone
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from cards.engine import Engine, Evaluation
from fhir_mappings.knowledge import Knowledge

from . import __version__
from .auth import AuthError, Authenticator, StoreReplayCache, expected_audience
from .analytics import analytics_router
from .discovery import Service, load_services
from .fhir_client import FhirClient
from .limits import BodySizeLimit, ErrorContainment
from .prefetch import resolve_prefetch
from .protocol import ProtocolError, encode, encode_cds_response, error_body, operation_outcome, parse_feedback, parse_hook_request
from .settings import Settings, SettingsError
from .store import AuditWriter, CardRecord, DecisionRecord, StoreError, open_store

log = logging.getLogger("cds_service")

JSON = "application/json"
NO_CARDS = b'{"cards":[]}'
STORE_TIMEOUT_S = 5.0  # longest wait for the database on a request (then 503)
LARGE_RECORD = 2000  # resources; above this the engine runs in a worker thread
SWITCH_INTERVAL_S = 0.0005  # GIL hand-over interval (Python's default is 0.005)
GC_YOUNG_THRESHOLD = 10_000  # allocations between young-generation collections (Python's default is 700)


class ServiceState:
    """Everything a request needs, built once at start-up."""

    def __init__(self, settings: Settings, fhir_transport: Any = None):
        self.settings = settings
        self.knowledge = Knowledge.load(settings.criteria_file)
        self.engine = Engine(self.knowledge)
        self.services: dict[str, Service] = load_services(self.knowledge.codes)
        if unknown := sorted(set(settings.silent_services) - set(self.services)):  # a typo must not leave a service live
            raise SettingsError(f"CDS_SILENT_SERVICES names unknown service ids: {', '.join(unknown)}")
        self.store = open_store(settings.database_url)
        self.audit = AuditWriter(self.store)
        self.authenticator = Authenticator(settings, replay_cache=StoreReplayCache(self.store))
        self.fhir = FhirClient(settings, transport=fhir_transport)
        self.discovery_body = encode({"services": [s.discovery_entry() for s in self.services.values()]})

    def today(self) -> date:
        return self.settings.today or date.today()

    async def close(self) -> None:
        await self.fhir.aclose()
        await self.authenticator.aclose()
        self.audit.close()
        self.store.close()


def create_app(settings: Settings | None = None, *, fhir_transport: Any = None) -> FastAPI:
    settings = settings or Settings.from_env()
    state = ServiceState(settings, fhir_transport)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.auth_required:
            log.warning("CDS_CLIENTS_FILE is not set: the service accepts calls from any client without authentication (development mode)")
        elif not settings.public_base_url:
            log.warning("CDS_PUBLIC_BASE_URL is not set: the JWT audience is taken from the request's Host header; set it in production")
        await run_in_threadpool(_purge, state)
        gc.collect()
        gc.freeze()  # start-up objects leave the collector's generations: no long GC pauses on the hot path
        # A realistic hook request decodes into ~6,000 containers, freed by reference counting; at the default
        # gen-0 threshold (700) each request would run ~9 young collections over objects that are still live.
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        # The audit writer thread needs the GIL for each database call; at the default 5 ms switch interval a
        # busy event loop starves it (its queue then grows). 0.5 ms lets it keep up at full load.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        yield
        await state.close()

    app = FastAPI(
        redirect_slashes=False,
        title="Lumbar spine imaging CDS service",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.cds = state
    # The last middleware added is the outermost: CORS wraps the size limit and the error containment,
    # so a 413 or a 500 is readable by browsers.
    app.add_middleware(ErrorContainment)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    origins = list(settings.cors_origins) or ([] if settings.auth_required else ["*"])
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["Retry-After", "WWW-Authenticate"],
        # open (development) mode: a public page such as the hosted CDS Hooks sandbox may call this service on
        # a private or loopback address (Chromium's Private Network Access preflight)
        allow_private_network=not settings.auth_required,
        max_age=600,
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        messages = {404: "No such endpoint.", 405: "Method not allowed on this endpoint."}
        message = messages.get(exc.status_code, str(exc.detail))
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        headers = {"Allow": exc.headers["Allow"]} if exc.headers and "Allow" in exc.headers else None
        return Response(encode(operation_outcome(message, code=code)), exc.status_code, headers=headers, media_type=JSON)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return Response(encode(operation_outcome("Internal error; the request was not processed.", code="exception")), 500, media_type=JSON)

    async def authenticate(request: Request):
        """The calling EHR (None in open mode); raises AuthError (401) or StoreError (503, replay cache down)."""
        if not state.authenticator.required:
            return None  # open mode: nothing is checked, so no audience is built either
        audience = expected_audience(settings, str(request.url))
        return await state.authenticator.authenticate(audience, request.headers.getlist("authorization"))

    def refused(request: Request, exc: Exception) -> Response:
        if isinstance(exc, StoreError):
            log.error("authentication unavailable: replay cache store is down")
            return Response(encode(operation_outcome("Authentication is temporarily unavailable; please retry.", code="transient")),
                            503, headers={"Retry-After": "5"}, media_type=JSON)
        challenge = 'Bearer realm="cds-services"'
        if request.headers.get("authorization") is not None:
            challenge += ', error="invalid_token"'
        return Response(encode(operation_outcome("Authentication failed.", code="login")), 401,
                        headers={"WWW-Authenticate": challenge}, media_type=JSON)

    def error(exc: ProtocolError) -> Response:
        return Response(error_body(exc), exc.status, media_type=JSON)

    @app.api_route("/cds-services", methods=["GET", "HEAD"])
    @app.api_route("/cds-services/", methods=["GET", "HEAD"], include_in_schema=False)  # a base URL written with a slash
    async def discovery(request: Request) -> Response:
        try:
            await authenticate(request)
        except (AuthError, StoreError) as exc:
            return refused(request, exc)
        return Response(state.discovery_body, media_type=JSON)

    @app.post("/cds-services/{service_id}")
    async def call_service(service_id: str, request: Request) -> Response:
        started = time.perf_counter()
        try:
            client = await authenticate(request)
        except (AuthError, StoreError) as exc:
            return refused(request, exc)
        service = state.services.get(service_id)
        if service is None:
            return error(ProtocolError(404, f"No CDS service with id '{service_id}'.", code="not-found"))
        try:
            hook_request = parse_hook_request(await request.body(), service.hook)
        except ProtocolError as exc:
            log.info("service=%s rejected %d: %s", service_id, exc.status, exc.field or "body")
            return error(exc)

        selections = hook_request.selections if hook_request.hook == "order-select" else None
        if not state.engine.has_orders_in_scope(hook_request.draft_orders, selections):
            log.info("hookInstance=%s service=%s status=200 cards=none (no lumbar imaging order)", hook_request.hook_instance[:64], service_id)
            return Response(NO_CARDS, media_type=JSON)
        data = await resolve_prefetch(hook_request, service, state.fhir, client.fhir_servers if client else ())
        evaluate = partial(
            state.engine.evaluate,
            data.resources,
            hook_request.draft_orders,
            state.today(),
            hook_request.hook_instance,
            selections=selections,
            unreadable=data.unreadable,
            missing=data.missing,
        )
        # A usual record is evaluated on the event loop (about a millisecond); a very large one in a
        # worker thread, so it cannot hold up other calls and health checks.
        evaluation = evaluate() if len(data.resources) <= LARGE_RECORD else await run_in_threadpool(evaluate)
        has_ces = any(card["indicator"] == "critical" for card in evaluation.cards)
        if not has_ces and (evaluation.needs_missing_data or (data.nothing_read and evaluation.facts.orders)):
            status, body = 412, _precondition_failed(data.missing, data.unreadable)
            shown: list[dict] = []
        else:
            status = 200
            shown = _shown_cards(evaluation.cards, settings, service.id)
            body = encode_cds_response({"cards": shown})
        _audit(state, service, hook_request, evaluation, shown, status)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "hookInstance=%s service=%s status=%d cards=%s fetched=%d elapsed_ms=%.1f",
                hook_request.hook_instance[:64], service_id, status,
                ",".join(c["source"]["topic"]["code"] for c in evaluation.cards) or "none",
                len(data.fetched_keys), (time.perf_counter() - started) * 1000,
            )
        return Response(body, status, media_type=JSON)

    @app.post("/cds-services/{service_id}/feedback")
    async def feedback(service_id: str, request: Request) -> Response:
        try:
            await authenticate(request)
        except (AuthError, StoreError) as exc:
            return refused(request, exc)
        if service_id not in state.services:
            return error(ProtocolError(404, f"No CDS service with id '{service_id}'.", code="not-found"))
        try:
            items = parse_feedback(await request.body())
        except ProtocolError as exc:
            return error(exc)
        try:
            with anyio.fail_after(STORE_TIMEOUT_S):  # the thread is abandoned if the database hangs
                result = await anyio.to_thread.run_sync(state.store.record_feedback, service_id, items, abandon_on_cancel=True)
        except (StoreError, TimeoutError):
            log.error("feedback for service=%s not stored: database unavailable", service_id)
            return Response(encode(operation_outcome("Feedback could not be stored; please retry.", code="transient")), 503,
                            headers={"Retry-After": "5"}, media_type=JSON)
        log.info("feedback service=%s stored=%d duplicates=%d unknown_cards=%d", service_id, result.stored, result.duplicates, result.unknown_cards)
        return Response(encode({"stored": result.stored, "duplicates": result.duplicates}), media_type=JSON)

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def health() -> Response:
        body: dict[str, Any] = {
            "status": "ok",
            "version": __version__,
            "knowledgeVersion": state.knowledge.version,
            "mode": settings.mode,
            "authentication": "required" if settings.auth_required else "disabled (development mode: set CDS_CLIENTS_FILE)",
            "services": list(state.services),
        }
        if not settings.auth_required:
            body["warnings"] = ["Authentication is disabled: any client can call this service."]
        return Response(encode(body), media_type=JSON)

    if settings.analytics:
        app.include_router(analytics_router(lambda: state.store))
    if settings.demo:
        from .demo_page import demo_router
        app.include_router(demo_router(lambda: state))

    # The hand-maintained OpenAPI 3.1 description (cds_service/openapi.yaml), read once, served as JSON.
    from pathlib import Path

    import yaml

    openapi_body = encode(yaml.safe_load(Path(__file__).with_name("openapi.yaml").read_text(encoding="utf-8")))

    @app.api_route("/openapi.json", methods=["GET", "HEAD"])
    async def openapi_document() -> Response:
        return Response(openapi_body, media_type=JSON)

    return app


def _purge(state: ServiceState) -> None:
    """Retention: drop audit and feedback rows older than CDS_RETENTION_DAYS (at start-up)."""
    try:
        removed = state.store.purge(state.settings.retention_days)
        if removed:
            log.info("retention: removed %d rows older than %d days", removed, state.settings.retention_days)
    except StoreError:
        log.error("retention purge skipped: database unavailable")


def _is_silent(settings: Settings, service_id: str) -> bool:
    """CDS_MODE=silent silences every service; CDS_SILENT_SERVICES only the services it names."""
    return settings.mode == "silent" or service_id in settings.silent_services


def _shown_cards(cards: list[dict], settings: Settings, service_id: str) -> list[dict]:
    """Silent mode returns nothing but the cauda equina card (unless configured to hold that back too)."""
    if not _is_silent(settings, service_id):
        return cards
    if settings.silent_suppresses_critical:
        return []
    return [card for card in cards if card["indicator"] == "critical"]


def _precondition_failed(missing: list[str], unreadable: dict[str, str]) -> bytes:
    parts = []
    if missing:
        parts.append("not prefetched and no fhirServer to read them from: " + ", ".join(sorted(missing)))
    if unreadable:
        parts.append("could not be read: " + ", ".join(f"{k} ({v})" for k, v in sorted(unreadable.items())))
    message = "The data needed to assess this order is not available; " + "; ".join(parts) + "."
    return encode(operation_outcome(message, code="incomplete"))


def _audit(state: ServiceState, service: Service, request, evaluation: Evaluation, shown: list[dict], status: int) -> None:
    shown_ids = {card["uuid"] for card in shown}
    extension_key = state.engine.renderer.common["extension_key"]
    records = []
    for card in evaluation.cards:
        assessment = card["extension"][extension_key]
        records.append(CardRecord(
            uuid=card["uuid"],
            card_type=card["source"]["topic"]["code"],
            indicator=card["indicator"],
            rule=assessment["rule"],
            order_ref=assessment.get("order"),
            fact_ids=tuple(assessment.get("facts", ())),
            fact_refs=tuple(assessment.get("evidence", ())),
            suggestion_uuids=tuple(s["uuid"] for s in card.get("suggestions", ())),
            shown=status == 200 and card["uuid"] in shown_ids,
        ))
    state.audit.submit(DecisionRecord(
        hook_instance=request.hook_instance,
        service_id=service.id,
        hook=request.hook,
        evaluated_at=datetime.now(timezone.utc),
        patient_key=state.store.patient_key(request.patient_id, state.settings.audit_key),
        mode="silent" if _is_silent(state.settings, service.id) else "live",
        knowledge_version=state.knowledge.version,
        status=status,
        cards=tuple(records),
    ))
