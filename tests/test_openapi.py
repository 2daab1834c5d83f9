"""cds_service/openapi.yaml, the OpenAPI 3.1 description of the service, kept in step with the code.

- The document is valid OpenAPI 3.1 and /openapi.json serves exactly it.
- Every route of the app is a path (and method) of the document, and every path of the document is a route.
- Every response produced here through the HTTP API validates (jsonschema, Draft 2020-12, formats
  checked) against the document's schema for its path, method, status and media type: discovery, the
  12 public vignettes on both hooks, feedback on every card they give (each suggestion accepted, each
  override reason), silent mode, 412, data incomplete, 400/404/413, 401 in authenticated mode.
  Undocumented statuses fail.
- The card schema has teeth: a valid card broken in each CDS Hooks 2.0 rule no longer validates.
- The request schemas agree with protocol.py on a set of hand-written requests (schemathesis explores
  the rest against a live server: tests/test_fuzz_api.py).

`ApiDocument` is also used by tests/test_faults.py to validate the answers given under faults (503...).
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator, FormatChecker

from cds_service import vignettes
from cds_service.app import create_app
from cds_service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DOCUMENT_FILE = REPO / "cds_service" / "openapi.yaml"
TODAY = date(2026, 3, 15)
VIGNETTES = json.loads((REPO / "tests" / "data" / "vignettes-public.json").read_text(encoding="utf-8"))
SERVICES = {"order-select": "lumbar-imaging-order-select", "order-sign": "lumbar-imaging-order-sign"}
EXTENSION = "org.example.lumbar-imaging-cds.assessment"


class ApiDocument:
    """The OpenAPI document, with jsonschema validators for its request and response schemas."""

    def __init__(self, document: dict) -> None:
        self.document = document
        self.validated: set[tuple[str, str, str]] = set()  # (method, path template, status) checked so far

    def schema_validator(self, pointer: str) -> Draft202012Validator:
        """A validator for the schema at `pointer` (a JSON pointer into the document): refs resolve in it."""
        root = {"$ref": pointer, "components": self.document["components"], "paths": self.document["paths"]}
        return Draft202012Validator(root, format_checker=FormatChecker())

    def response_validator(self, method: str, path: str, status: int, media_type: str = "application/json"):
        responses = self.document["paths"][path][method.lower()]["responses"]
        assert str(status) in responses, f"{method} {path}: status {status} is not documented"
        response = responses[str(status)]
        if "$ref" in response:
            response = self.resolve(response["$ref"])
        content = response.get("content", {})
        assert media_type in content, f"{method} {path} {status}: media type {media_type} is not documented ({sorted(content)})"
        return self.schema_validator(_pointer_to_schema(path, method, status, media_type, response, self))

    def resolve(self, ref: str) -> Any:
        node: Any = self.document
        for part in ref.lstrip("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def check_response(self, method: str, path: str, response) -> Any:
        """Validate an httpx/TestClient response against the document; returns the decoded body."""
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        if not response.content:
            responses = self.document["paths"][path][method.lower()]["responses"]
            assert str(response.status_code) in responses, f"{method} {path}: status {response.status_code} is not documented"
            self.validated.add((method.upper(), path, str(response.status_code)))
            return None
        body = response.json()
        errors = sorted(self.response_validator(method, path, response.status_code, media_type).iter_errors(body), key=str)
        assert not errors, f"{method} {path} {response.status_code}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors[:5])
        self.validated.add((method.upper(), path, str(response.status_code)))
        return body

    def schema_errors(self, name: str, value: Any) -> list[str]:
        validator = self.schema_validator(f"#/components/schemas/{name}")
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(value)]

    def operations(self) -> set[tuple[str, str]]:
        methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
        return {(m.upper(), path) for path, item in self.document["paths"].items() for m in item if m in methods}


def _pointer_to_schema(path: str, method: str, status: int, media_type: str, response: dict, api: ApiDocument) -> str:
    ref = api.document["paths"][path][method.lower()]["responses"][str(status)].get("$ref")
    escaped_media = media_type.replace("~", "~0").replace("/", "~1")
    if ref:
        return f"{ref}/content/{escaped_media}/schema"
    escaped_path = path.replace("~", "~0").replace("/", "~1")
    return f"#/paths/{escaped_path}/{method.lower()}/responses/{status}/content/{escaped_media}/schema"


@lru_cache(maxsize=1)
def load_document() -> dict:
    # Through JSON, as the service serves it (YAML dates and the like would not survive).
    return json.loads(json.dumps(yaml.safe_load(DOCUMENT_FILE.read_text(encoding="utf-8"))))


def api_document() -> ApiDocument:
    return ApiDocument(load_document())


def app_routes(app) -> set[tuple[str, str]]:
    """(METHOD, path) of every route of a FastAPI app, routers included (FastAPI 0.165 keeps included
    routers as wrappers with their own route contexts)."""
    found: set[tuple[str, str]] = set()

    def walk(routes, prefix: str = "") -> None:
        for route in routes:
            contexts = getattr(route, "effective_route_contexts", None)
            if contexts is not None:
                for context in (contexts() if callable(contexts) else contexts):
                    found.update((m, prefix + context.path) for m in context.methods or ())
            elif hasattr(route, "methods") and hasattr(route, "path"):
                found.update((m, prefix + route.path) for m in route.methods or ())
            elif hasattr(route, "routes"):
                walk(route.routes, prefix + getattr(route, "path", ""))

    walk(app.routes)
    return {(m, p) for m, p in found if m != "HEAD"}


def settings(tmp_path: Path, **values: str) -> Settings:
    return Settings.from_mapping({
        "CDS_DATABASE_URL": f"sqlite:///{tmp_path / f'openapi-{uuid.uuid4().hex[:8]}.db'}",
        "CDS_TODAY": TODAY.isoformat(),
        **values,
    })


def request_for(vignette: dict, hook: str) -> dict:
    return vignettes.hook_request(vignette, TODAY, hook)


@pytest.fixture(scope="module")
def api() -> ApiDocument:
    return api_document()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(create_app(settings(tmp_path_factory.mktemp("openapi")))) as test_client:
        yield test_client


# ------------------------------------------------------------------------------------------------
# The document itself


def test_the_document_is_valid_openapi_3_1():
    from schemathesis.specs.openapi.definitions import OPENAPI_31  # the OAS 3.1 meta-schema schemathesis ships

    document = load_document()
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in Draft202012Validator(OPENAPI_31).iter_errors(document)]
    assert not errors
    assert document["openapi"].startswith("3.1.")
    from cds_service import __version__

    assert document["info"]["version"] == __version__  # bump both together
    for name, schema in document["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
    # every $ref resolves
    api = api_document()
    text = json.dumps(document)
    for ref in set(part.split('"')[0] for part in text.split('"$ref": "')[1:]):
        api.resolve(ref)


def test_openapi_json_serves_the_document(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == load_document()


def test_every_route_of_the_app_is_in_the_document_and_every_path_is_a_route(client, api):
    routes = app_routes(client.app)
    documented = api.operations()
    assert routes - documented == set(), "routes missing from cds_service/openapi.yaml"
    assert documented - routes == set(), "paths in cds_service/openapi.yaml the app does not have"
    assert ("POST", "/cds-services/{service_id}") in routes and ("GET", "/openapi.json") in routes


def test_path_parameter_enums_are_the_services_of_discovery(client, api):
    services = [s["id"] for s in client.get("/cds-services").json()["services"]]
    assert api.document["components"]["parameters"]["ServiceId"]["schema"]["enum"] == services
    hooks = api.document["components"]["schemas"]["CdsServiceRequest"]["properties"]["hook"]["enum"]
    assert sorted(hooks) == sorted(s["hook"] for s in client.get("/cds-services").json()["services"])


# ------------------------------------------------------------------------------------------------
# Every response the public vignettes produce, and the error answers


def test_every_response_for_the_public_vignettes_validates(client, api):
    CALL, FEEDBACK = "/cds-services/{service_id}", "/cds-services/{service_id}/feedback"
    api.check_response("GET", "/cds-services", client.get("/cds-services"))
    api.check_response("GET", "/cds-services/", client.get("/cds-services/"))
    api.check_response("GET", "/healthz", client.get("/healthz"))
    api.check_response("GET", "/openapi.json", client.get("/openapi.json"))

    card_types = set()
    for vignette in VIGNETTES:
        for hook, service_id in SERVICES.items():
            response = client.post(f"/cds-services/{service_id}", json=request_for(vignette, hook))
            assert response.status_code == 200, response.text
            body = api.check_response("POST", CALL, response)
            for card in body["cards"]:
                card_types.add(card["source"]["topic"]["code"])
                feedback = [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-03-15T10:00:00Z",
                             "overrideReason": {"reason": reason, "userComment": "fine"}} for reason in card.get("overrideReasons", [])]
                feedback += [{"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-03-15T10:01:00.123Z",
                              "acceptedSuggestions": [{"id": s["uuid"]}]} for s in card.get("suggestions", []) if "uuid" in s]
                if feedback:
                    result = api.check_response("POST", FEEDBACK, client.post(f"/cds-services/{service_id}/feedback", json={"feedback": feedback}))
                    assert result["stored"] + result["duplicates"] == len(feedback)
    assert card_types == {"cauda-equina-emergency", "imaging-indicated", "imaging-not-indicated"}

    # 412: nothing prefetched and no fhirServer; data incomplete: a key that could not be read
    request = request_for(VIGNETTES[0], "order-sign")
    del request["prefetch"]
    response = client.post("/cds-services/lumbar-imaging-order-sign", json=request)
    assert response.status_code == 412
    api.check_response("POST", CALL, response)
    request = request_for(VIGNETTES[0], "order-sign")
    request["prefetch"]["conditions"] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "forbidden"}]}
    body = api.check_response("POST", CALL, client.post("/cds-services/lumbar-imaging-order-sign", json=request))
    assert [c["source"]["topic"]["code"] for c in body["cards"]] == ["imaging-data-incomplete"]

    # 400, 404, 413
    bad_bodies = [b"", b"[]", b"{", b"[" * 100_000, json.dumps({"hook": "order-sign"}).encode(),
                  json.dumps({**request_for(VIGNETTES[0], "order-sign"), "hook": "order-select"}).encode()]
    for bad in bad_bodies:
        response = client.post("/cds-services/lumbar-imaging-order-sign", content=bad, headers={"content-type": "application/json"})
        assert response.status_code == 400, bad[:50]
        api.check_response("POST", CALL, response)
        response = client.post("/cds-services/lumbar-imaging-order-sign/feedback", content=bad, headers={"content-type": "application/json"})
        assert response.status_code == 400
        api.check_response("POST", FEEDBACK, response)
    for path in ("/cds-services/no-such-service", "/cds-services/no-such-service/feedback"):
        response = client.post(path, json={})
        assert response.status_code == 404
        api.check_response("POST", CALL if not path.endswith("/feedback") else FEEDBACK, response)
    too_large = b'{"pad": "' + b"x" * 5_000_001 + b'"}'
    for path, template in (("/cds-services/lumbar-imaging-order-sign", CALL), ("/cds-services/lumbar-imaging-order-sign/feedback", FEEDBACK)):
        response = client.post(path, content=too_large, headers={"content-type": "application/json"})
        assert response.status_code == 413
        api.check_response("POST", template, response)

    # the pages and reports beside the API
    api.check_response("GET", "/analytics/report.json", client.get("/analytics/report.json"))
    api.check_response("GET", "/analytics/report.json", client.get("/analytics/report.json?since=yesterday"))
    api.check_response("GET", "/demo/patients", client.get("/demo/patients"))
    patient = client.get("/demo/patients").json()[0]["id"]
    api.check_response("GET", "/demo/patients/{patient_id}", client.get(f"/demo/patients/{patient}"))
    api.check_response("GET", "/demo/patients/{patient_id}", client.get("/demo/patients/nobody"))
    api.check_response("GET", "/demo/static/{name}", client.get("/demo/static/nothing.js"))
    api.check_response("GET", "/analytics/assets/{name}", client.get("/analytics/assets/nothing.js"))

    # Every documented answer of the CDS Hooks endpoints was seen, except those only faults or
    # authenticated mode give: they are checked in the tests below and in tests/test_faults.py.
    documented = {(m, p, s) for (m, p) in api.operations() if p.startswith("/cds-services")
                  for s in api.document["paths"][p][m.lower()]["responses"]}
    elsewhere = {("GET", "/cds-services", "401"), ("POST", CALL, "401"), ("POST", FEEDBACK, "401"),
                 ("GET", "/cds-services", "503"), ("POST", CALL, "503"), ("POST", FEEDBACK, "503"),
                 ("GET", "/cds-services/", "401"), ("GET", "/cds-services/", "503")}
    assert documented - api.validated == elsewhere


def test_silent_mode_answers_validate(tmp_path, api):
    with TestClient(create_app(settings(tmp_path, CDS_MODE="silent"))) as silent:
        shown = []
        for vignette in VIGNETTES:
            response = silent.post("/cds-services/lumbar-imaging-order-sign", json=request_for(vignette, "order-sign"))
            shown += api.check_response("POST", "/cds-services/{service_id}", response)["cards"]
    assert {c["indicator"] for c in shown} == {"critical"}


def test_authenticated_mode_refusals_validate(tmp_path, api):
    jwks = json.loads((REPO / "tests" / "data" / "sandbox-jwks.json").read_text(encoding="utf-8"))
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps({"clients": [{"issuer": "https://ehr.example.org", "jwks": jwks}]}), encoding="utf-8")
    with TestClient(create_app(settings(tmp_path, CDS_CLIENTS_FILE=str(clients)))) as secured:
        for method, path, template in (
            ("GET", "/cds-services", "/cds-services"),
            ("GET", "/cds-services/", "/cds-services/"),
            ("POST", "/cds-services/lumbar-imaging-order-sign", "/cds-services/{service_id}"),
            ("POST", "/cds-services/lumbar-imaging-order-sign/feedback", "/cds-services/{service_id}/feedback"),
        ):
            for headers in ({}, {"Authorization": "Bearer not-a-jwt"}):
                response = secured.request(method, path, json={} if method == "POST" else None, headers=headers)
                assert response.status_code == 401
                api.check_response(method, template, response)
                assert response.headers["www-authenticate"].startswith("Bearer ")


# ------------------------------------------------------------------------------------------------
# The card schema enforces the CDS Hooks 2.0 rules


@pytest.fixture(scope="module")
def sample_cards(client) -> dict[str, dict]:
    cards = {}
    for vignette in VIGNETTES:
        for card in client.post("/cds-services/lumbar-imaging-order-sign", json=request_for(vignette, "order-sign")).json()["cards"]:
            cards.setdefault(card["source"]["topic"]["code"], card)
    return cards


def _broken(card: dict, change) -> dict:
    card = copy.deepcopy(card)
    change(card)
    return card


BREAKS = {
    "summary of 140 characters": lambda c: c.update(summary="x" * 140),
    "empty summary": lambda c: c.update(summary=""),
    "pre-2.0 indicator": lambda c: c.update(indicator="hard-stop"),
    "no indicator": lambda c: c.pop("indicator"),
    "no source": lambda c: c.pop("source"),
    "source without label": lambda c: c["source"].pop("label"),
    "suggestions without selectionBehavior": lambda c: c.pop("selectionBehavior"),
    "unknown selectionBehavior": lambda c: c.update(selectionBehavior="all"),
    "two recommended with at-most-one": lambda c: [s.update(isRecommended=True) for s in c["suggestions"]],
    "override reason without display": lambda c: c["overrideReasons"][0].pop("display"),
    "override reason without system": lambda c: c["overrideReasons"][0].pop("system"),
    "link type not absolute|smart": lambda c: c["links"][0].update(type="external"),
    "link without type": lambda c: c["links"][0].pop("type"),
    "appContext on an absolute link": lambda c: c["links"][0].update(appContext="x"),
    "action type not create|update|delete": lambda c: c["suggestions"][0]["actions"][0].update(type="remove"),
    "delete without resourceId": lambda c: next(a for s in c["suggestions"] for a in s["actions"] if a["type"] == "delete").pop("resourceId"),
    "create without resource": lambda c: next(a for s in c["suggestions"] for a in s["actions"] if a["type"] == "create").pop("resource"),
    "action without description": lambda c: c["suggestions"][0]["actions"][0].pop("description"),
    "suggestion without label": lambda c: c["suggestions"][0].pop("label"),
    "null detail": lambda c: c.update(detail=None),
    "null deep in an extension": lambda c: c["extension"][EXTENSION].update(rule=None),
    "empty list": lambda c: c.update(links=[]),
    "empty object in a resource": lambda c: next(a for s in c["suggestions"] for a in s["actions"] if a["type"] == "create")["resource"].update(meta={}),
    "empty string in a resource": lambda c: next(a for s in c["suggestions"] for a in s["actions"] if a["type"] == "create")["resource"].update(status=""),
    "unknown card member": lambda c: c.update(severity="high"),
    "card uuid not a uuid": lambda c: c.update(uuid="card-1"),
}


def test_the_sample_cards_are_valid(api, sample_cards):
    assert set(sample_cards) == {"cauda-equina-emergency", "imaging-indicated", "imaging-not-indicated"}
    for card in sample_cards.values():
        assert api.schema_errors("Card", card) == []


@pytest.mark.parametrize("rule", sorted(BREAKS))
def test_a_card_breaking_a_cds_hooks_rule_is_invalid(api, sample_cards, rule):
    card = _broken(sample_cards["imaging-not-indicated"], BREAKS[rule])
    assert api.schema_errors("Card", card), rule
    assert api.schema_errors("CdsServiceResponse", {"cards": [card]}), rule


def test_update_actions_carry_the_whole_resource_with_its_id(api, sample_cards):
    card = sample_cards["cauda-equina-emergency"]
    update = next(a for s in card["suggestions"] for a in s["actions"] if a["type"] == "update")
    assert api.schema_errors("Action", update) == []
    del update["resource"]["id"]
    assert api.schema_errors("Action", update)


def test_empty_cards_is_the_only_empty_value_allowed(api):
    assert api.schema_errors("CdsServiceResponse", {"cards": []}) == []
    assert api.schema_errors("CdsServiceResponse", {"cards": [], "systemActions": []})
    assert api.schema_errors("CdsServiceResponse", {})


# ------------------------------------------------------------------------------------------------
# The request schemas say what protocol.py accepts


def _valid_request() -> dict:
    return request_for(VIGNETTES[0], "order-select")


REQUESTS = {
    "vignette": (_valid_request, True),
    "extension and unknown members": (lambda: {**_valid_request(), "extension": {"org.example": {"x": 1}}, "other": [1]}, True),
    "null prefetch": (lambda: {**_valid_request(), "prefetch": None}, True),
    "null encounterId": (lambda: _set(_valid_request(), ["context", "encounterId"], None), True),
    "fhirServer with fhirAuthorization": (lambda: {**_valid_request(), "fhirServer": "http://127.0.0.1:9/fhir",
                                                   "fhirAuthorization": {"access_token": "t", "token_type": "Bearer"}}, True),
    "draftOrders without resourceType": (lambda: _set(_valid_request(), ["context", "draftOrders", "resourceType"], None), True),
    "no hook": (lambda: _drop(_valid_request(), ["hook"]), False),
    "unknown hook": (lambda: {**_valid_request(), "hook": "patient-view"}, False),
    "blank hookInstance": (lambda: {**_valid_request(), "hookInstance": " \u3000"}, False),
    "hookInstance with a line break": (lambda: {**_valid_request(), "hookInstance": "a\nb"}, False),
    "no context": (lambda: _drop(_valid_request(), ["context"]), False),
    "no selections on order-select": (lambda: _drop(_valid_request(), ["context", "selections"]), False),
    "null userId": (lambda: _set(_valid_request(), ["context", "userId"], None), False),
    "blank patientId": (lambda: _set(_valid_request(), ["context", "patientId"], "\t "), False),
    "selections not strings": (lambda: _set(_valid_request(), ["context", "selections"], [1]), False),
    "draftOrders not a Bundle": (lambda: _set(_valid_request(), ["context", "draftOrders", "resourceType"], "List"), False),
    "draftOrders entry not an array": (lambda: _set(_valid_request(), ["context", "draftOrders", "entry"], {}), False),
    "prefetch not an object": (lambda: {**_valid_request(), "prefetch": []}, False),
    "fhirServer not http(s)": (lambda: {**_valid_request(), "fhirServer": "file:///etc"}, False),
    "fhirAuthorization without fhirServer": (lambda: {**_valid_request(), "fhirAuthorization": {"access_token": "t"}}, False),
}


def _set(request: dict, path: list[str], value: Any) -> dict:
    node = request
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return request


def _drop(request: dict, path: list[str]) -> dict:
    node = request
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return request


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_the_request_schema_and_the_service_agree(client, api, name):
    build, valid = REQUESTS[name]
    request = build()
    assert (api.schema_errors("CdsServiceRequest", request) == []) is valid, api.schema_errors("CdsServiceRequest", request)
    response = client.post("/cds-services/lumbar-imaging-order-select", json=request)
    assert (response.status_code in (200, 412)) is valid, response.text
    api.check_response("POST", "/cds-services/{service_id}", response)


FEEDBACK = {
    "overridden with a reason": ({"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2026-03-15T10:00:00Z",
                                  "overrideReason": {"reason": {"system": "s", "code": "other"}}}, True),
    "overridden, comment only, no offset": ({"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2026-03-15 10:00",
                                             "overrideReason": {"userComment": "x"}}, True),
    "overridden without a reason": ({"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2026-03-15T10:00:00+01:00"}, True),
    "accepted": ({"card": "c1", "outcome": "accepted", "outcomeTimestamp": "2026-03-15T10:00:00.123456789Z",
                  "acceptedSuggestions": [{"id": "s1"}]}, True),
    "lower-case t and z (RFC 3339 5.6)": ({"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2026-03-15t10:00:00z"}, True),
    "29 February of a leap year": ({"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2024-02-29T10:00Z"}, True),
    "29 February of another year": ({"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2025-02-29T10:00Z"}, False),
    "accepted without suggestions": ({"card": "c1", "outcome": "accepted", "outcomeTimestamp": "2026-03-15T10:00:00Z"}, False),
    "accepted with an empty list": ({"card": "c1", "outcome": "accepted", "outcomeTimestamp": "2026-03-15T10:00:00Z", "acceptedSuggestions": []}, False),
    "unknown outcome": ({"card": "c1", "outcome": "dismissed", "outcomeTimestamp": "2026-03-15T10:00:00Z"}, False),
    "timestamp not a date-time": ({"card": "c1", "outcome": "overridden", "outcomeTimestamp": "yesterday"}, False),
    "hour 24": ({"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2026-03-15T24:00:00Z"}, False),
    "blank card": ({"card": " ", "outcome": "overridden", "outcomeTimestamp": "2026-03-15T10:00:00Z"}, False),
    "card with NUL": ({"card": "c\u00001", "outcome": "overridden", "outcomeTimestamp": "2026-03-15T10:00:00Z"}, False),
    "override reason without code": ({"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2026-03-15T10:00:00Z",
                                      "overrideReason": {"reason": {"system": "s"}}}, False),
    "override reason empty": ({"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2026-03-15T10:00:00Z",
                               "overrideReason": {"userComment": ""}}, False),
}


@pytest.mark.parametrize("name", sorted(FEEDBACK))
def test_the_feedback_schema_and_the_service_agree(client, api, name):
    item, valid = FEEDBACK[name]
    request = {"feedback": [item]}
    assert (api.schema_errors("FeedbackRequest", request) == []) is valid, api.schema_errors("FeedbackRequest", request)
    response = client.post("/cds-services/lumbar-imaging-order-select/feedback", json=request)
    assert (response.status_code == 200) is valid, response.text
    api.check_response("POST", "/cds-services/{service_id}/feedback", response)
