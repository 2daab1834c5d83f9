"""CDS Hooks 2.0 wire format: request validation, feedback validation, error bodies, response encoding.

Strict on what the specification requires (400 with a message naming the field), lenient on content
(real clients send ``"coding": [{}]``, ``"reasonCode": []`` and Bundles without ``type``).
Error bodies are FHIR OperationOutcomes, as CDS Hooks 3.0 recommends and 2.0 allows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import msgspec
import yaml

from fhir_mappings.facts import RESOURCE_ELEMENTS

HOOK_DEFINITIONS: dict[str, dict[str, dict[str, Any]]] = yaml.safe_load(
    (Path(__file__).with_name("hooks.yaml")).read_text(encoding="utf-8")
)["hooks"]

MAX_DRAFT_ORDERS = 500  # orders in one hook call; an order set is tens, not thousands

_JSON_TYPES = {"string": str, "array": list, "object": dict, "boolean": bool}
_JSON_TYPE_NAMES = {str: "a string", list: "an array", dict: "an object", bool: "a boolean"}

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

# The hook request as the service reads it. A prefetched resource (or Bundle entry's resource) keeps only
# the elements the engine and prefetch.py read; msgspec skips the others (names, narrative, notes, reference
# ranges, ...) without building them, which for a real record is a third of the decoding and freeing work.
# A TypedDict decodes to a plain dict. Whatever does not fit this shape (a prefetch value that is not an
# object, malformed JSON, ...) is decoded again by the generic decoder, whose answers are the rules below.
_PrefetchResource = TypedDict(  # type: ignore[misc]
    "_PrefetchResource",
    {**{name: Any for name in RESOURCE_ELEMENTS}, "entry": "list[_PrefetchEntry]", "link": Any, "issue": Any},
    total=False,
)
_PrefetchEntry = TypedDict("_PrefetchEntry", {"resource": _PrefetchResource}, total=False)  # type: ignore[misc]
_HookRequestBody = TypedDict(  # type: ignore[misc]
    "_HookRequestBody",
    {"hook": Any, "hookInstance": Any, "context": Any, "fhirServer": Any, "fhirAuthorization": Any,
     "prefetch": "dict[str, _PrefetchResource | None] | None"},
    total=False,
)
_hook_request_decoder = msgspec.json.Decoder(_HookRequestBody)


class ProtocolError(Exception):
    """A request the service will not process; becomes a 4xx OperationOutcome."""

    def __init__(self, status: int, message: str, field: str | None = None, code: str = "invalid"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.code = code


def operation_outcome(message: str, field: str | None = None, code: str = "invalid", severity: str = "error") -> dict:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": message}
    if field:
        issue["expression"] = [field]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def error_body(error: ProtocolError) -> bytes:
    return _encoder.encode(operation_outcome(error.message, error.field, error.code))


def decode_json_object(body: bytes, what: str = "request body") -> dict:
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]  # a UTF-8 byte order mark: RFC 8259 lets parsers ignore it; some clients send one
    if not body or not body.strip():
        raise ProtocolError(400, f"The {what} is empty; expected a JSON object.")
    try:
        value = _decoder.decode(body)
    except RecursionError:
        raise ProtocolError(400, f"The {what} is nested too deeply.") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(400, f"The {what} is not valid JSON: {exc}.", code="structure") from None
    except UnicodeDecodeError:
        raise ProtocolError(400, f"The {what} is not valid UTF-8.", code="structure") from None
    if not isinstance(value, dict):
        raise ProtocolError(400, f"The {what} must be a JSON object, not {_describe(value)}.", code="structure")
    return value


@dataclass(frozen=True)
class HookRequest:
    hook: str
    hook_instance: str
    context: dict
    prefetch: dict
    fhir_server: str | None
    access_token: str | None
    patient_id: str
    user_id: str | None
    selections: tuple[str, ...] | None
    draft_orders: dict


def parse_hook_request(body: bytes, service_hook: str) -> HookRequest:
    """Validate a CDS Hooks 2.0 service request for a service registered on ``service_hook``."""
    request = _decode_hook_request(body)
    hook = _required(request, "hook", str)
    hook_instance = _required(request, "hookInstance", str)
    if not hook_instance.strip():
        raise ProtocolError(400, "'hookInstance' must not be empty.", "hookInstance")
    if _CONTROL.search(hook_instance):
        # it is logged on every line and stored in the audit: no line breaks, no NUL (PostgreSQL text)
        raise ProtocolError(400, "'hookInstance' must not contain control characters.", "hookInstance")
    if hook != service_hook:
        raise ProtocolError(400, f"This service answers the '{service_hook}' hook, not '{hook}'.", "hook")
    context = _required(request, "context", dict)
    definition = HOOK_DEFINITIONS[hook]
    for name, spec in definition["context"].items():
        expected = _JSON_TYPES[spec["type"]]
        if name not in context or context[name] is None:
            if spec.get("required"):
                raise ProtocolError(400, f"The '{hook}' context requires '{name}'.", f"context.{name}")
            continue
        if not isinstance(context[name], expected):
            raise ProtocolError(
                400, f"'context.{name}' must be {_JSON_TYPE_NAMES[expected]}, not {_describe(context[name])}.", f"context.{name}"
            )
    if not context["patientId"].strip():
        raise ProtocolError(400, "'context.patientId' must not be empty.", "context.patientId")
    selections = context.get("selections")
    if selections is not None and not all(isinstance(item, str) for item in selections):
        raise ProtocolError(400, "'context.selections' must be an array of strings such as 'ServiceRequest/123'.", "context.selections")
    draft_orders = context["draftOrders"]
    if draft_orders.get("resourceType") not in (None, "Bundle"):
        raise ProtocolError(400, "'context.draftOrders' must be a FHIR Bundle.", "context.draftOrders")
    if not isinstance(draft_orders.get("entry", []), list):
        raise ProtocolError(400, "'context.draftOrders.entry' must be an array.", "context.draftOrders.entry")
    # One ordering session, not a bulk feed: every in-scope order costs an assessment and a card.
    if len(draft_orders.get("entry") or ()) > MAX_DRAFT_ORDERS:
        raise ProtocolError(400, f"'context.draftOrders.entry' holds more than {MAX_DRAFT_ORDERS} orders.", "context.draftOrders.entry")
    if selections is not None and len(selections) > MAX_DRAFT_ORDERS:
        raise ProtocolError(400, f"'context.selections' holds more than {MAX_DRAFT_ORDERS} references.", "context.selections")

    prefetch = request.get("prefetch")
    if prefetch is None:
        prefetch = {}
    elif not isinstance(prefetch, dict):
        raise ProtocolError(400, f"'prefetch' must be an object, not {_describe(prefetch)}.", "prefetch")

    fhir_server = request.get("fhirServer")
    if fhir_server is not None and (not isinstance(fhir_server, str) or not fhir_server.startswith(("http://", "https://"))):
        raise ProtocolError(400, "'fhirServer' must be an http(s) URL.", "fhirServer")
    authorization = request.get("fhirAuthorization")
    access_token = None
    if authorization is not None:
        if not isinstance(authorization, dict):
            raise ProtocolError(400, "'fhirAuthorization' must be an object.", "fhirAuthorization")
        if not fhir_server:
            raise ProtocolError(400, "'fhirAuthorization' requires 'fhirServer'.", "fhirServer")
        token = authorization.get("access_token")
        if isinstance(token, str) and token:
            access_token = token

    return HookRequest(
        hook=hook,
        hook_instance=hook_instance,
        context=context,
        prefetch=prefetch,
        fhir_server=fhir_server.rstrip("/") if fhir_server else None,
        access_token=access_token,
        patient_id=context["patientId"].strip(),
        user_id=context.get("userId"),
        selections=resolve_selections(selections, draft_orders) if selections is not None else None,
        draft_orders=draft_orders,
    )


# `Type/id` at the end of a FHIR reference: after a base URL, before `/_history/version`.
_RELATIVE_REFERENCE = re.compile(r"(?:^|/)([A-Z][A-Za-z]{1,63}/[A-Za-z0-9.-]{1,64})(?:/_history/[A-Za-z0-9.-]{1,64})?$")


def resolve_selections(selections: list[str], draft_orders: dict) -> tuple[str, ...]:
    """The selections, plus every name of each draft order they select (order-select §selections).

    The hook asks for `Type/id` references, but a selection may reach the service as an absolute
    reference (`{fhirServer}/ServiceRequest/1`), a versioned one (`.../_history/2`) or a `urn:uuid`
    that is an entry's `fullUrl`, and an entry may carry its identity only in `fullUrl`. A selection
    names an entry when they share a name (the reference itself, its `Type/id` part, the entry's
    `fullUrl` or `resourceType/id`); the entry's `Type/id` and `fullUrl` are then added, so the engine,
    which matches on those, advises on the selected orders only. Unmatched selections are kept as sent."""
    resolved = list(dict.fromkeys(selections))
    known = set(resolved)
    wanted = set(resolved)
    for selection in resolved:
        if match := _RELATIVE_REFERENCE.search(selection):
            wanted.add(match.group(1))
    entries = draft_orders.get("entry")
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict):
            continue
        names = []
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and full_url:
            names.append(full_url)
            if match := _RELATIVE_REFERENCE.search(full_url):
                names.append(match.group(1))
        resource = entry.get("resource")
        if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str) and isinstance(resource.get("id"), str) and resource["id"]:
            names.append(f"{resource['resourceType']}/{resource['id']}")
        if wanted.intersection(names):
            for name in names:
                if name not in known:
                    known.add(name)
                    resolved.append(name)
    return tuple(resolved)


def _decode_hook_request(body: bytes) -> dict:
    """The request decoded with only what the service reads; anything else that is not a plain success goes
    through decode_json_object, so malformed bodies are answered exactly as before."""
    if not body.isascii():
        try:
            body.decode("utf-8")  # msgspec does not check the UTF-8 of the strings it skips
        except UnicodeDecodeError:
            return decode_json_object(body)
    try:
        return _hook_request_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return decode_json_object(body)


FEEDBACK_OUTCOMES = ("accepted", "overridden")


def parse_feedback(body: bytes) -> list[dict]:
    """Validate a CDS Hooks 2.0 feedback body; returns the feedback items."""
    request = decode_json_object(body)
    items = _required(request, "feedback", list)
    if not items:
        raise ProtocolError(400, "'feedback' must hold at least one item.", "feedback")
    for index, item in enumerate(items):
        where = f"feedback[{index}]"
        if not isinstance(item, dict):
            raise ProtocolError(400, f"'{where}' must be an object.", where)
        card = _required(item, "card", str, where)
        if not card.strip() or "\x00" in card:
            raise ProtocolError(400, f"'{where}.card' must be the card's uuid.", f"{where}.card")
        outcome = _required(item, "outcome", str, where)
        if outcome not in FEEDBACK_OUTCOMES:
            raise ProtocolError(400, f"'{where}.outcome' must be 'accepted' or 'overridden', not {outcome!r}.", f"{where}.outcome")
        timestamp = _required(item, "outcomeTimestamp", str, where).upper()  # RFC 3339 §5.6: "t" and "z" may be lower case
        if not _looks_like_datetime(timestamp):
            raise ProtocolError(400, f"'{where}.outcomeTimestamp' must be an ISO 8601 date-time.", f"{where}.outcomeTimestamp")
        item["outcomeTimestamp"] = timestamp  # one spelling per instant: the store's idempotency key reads it
        accepted = item.get("acceptedSuggestions")
        if outcome == "accepted":
            if not isinstance(accepted, list) or not accepted:
                raise ProtocolError(400, f"'{where}.acceptedSuggestions' is required when the outcome is 'accepted'.", f"{where}.acceptedSuggestions")
        if accepted is not None:
            if not isinstance(accepted, list) or not all(isinstance(s, dict) and _is_text(s.get("id")) for s in accepted):
                raise ProtocolError(400, f"'{where}.acceptedSuggestions' must be an array of {{\"id\": <suggestion uuid>}}.", f"{where}.acceptedSuggestions")
        reason = item.get("overrideReason")
        if reason is not None:
            if not isinstance(reason, dict):
                raise ProtocolError(400, f"'{where}.overrideReason' must be an object.", f"{where}.overrideReason")
            coding = reason.get("reason")
            if coding is not None and not (
                isinstance(coding, dict)
                and _is_text(coding.get("code"))
                and all(coding.get(name) is None or _is_text(coding[name]) for name in ("system", "display"))
            ):
                # system may be absent (lenient), display is optional (the sandbox sends code + system only)
                raise ProtocolError(400, f"'{where}.overrideReason.reason' must be a Coding with a code (and string system, display).",
                                    f"{where}.overrideReason.reason")
            comment = reason.get("userComment")
            if comment is not None and (not isinstance(comment, str) or "\x00" in comment):
                raise ProtocolError(400, f"'{where}.overrideReason.userComment' must be a string.", f"{where}.overrideReason.userComment")
            if coding is None and not comment:
                raise ProtocolError(400, f"'{where}.overrideReason' needs a 'reason' or a 'userComment'.", f"{where}.overrideReason")
    return items


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def encode_cds_response(response: dict) -> bytes:
    """Serialise a CDS Hooks response with no null and no empty value anywhere, except ``"cards": []``."""
    pruned = prune(response)
    if not isinstance(pruned, dict):
        pruned = {}
    pruned.setdefault("cards", [])
    return _encoder.encode(pruned)


def prune(value: Any) -> Any:
    """Drop None, "", [] and {} recursively (CDS Hooks 2.0 'Use of JSON')."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            item = prune(item)
            if item is not None:
                out[key] = item
        return out or None
    if isinstance(value, list):
        out_list = [p for p in (prune(item) for item in value) if p is not None]
        return out_list or None
    if value == "":
        return None
    return value


def _required(obj: dict, name: str, kind: type, parent: str | None = None) -> Any:
    field = f"{parent}.{name}" if parent else name
    if name not in obj or obj[name] is None:
        raise ProtocolError(400, f"'{field}' is required.", field)
    if not isinstance(obj[name], kind) or (kind is str and isinstance(obj[name], bool)):
        raise ProtocolError(400, f"'{field}' must be {_JSON_TYPE_NAMES[kind]}, not {_describe(obj[name])}.", field)
    return obj[name]


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 3339 date-time (what clients send: `new Date().toISOString()`); offset optional (read as UTC).
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2})?")


def _is_text(value: Any) -> bool:
    """A non-empty string that a database text column can hold (no NUL)."""
    return isinstance(value, str) and bool(value.strip()) and "\x00" not in value


def _looks_like_datetime(text: str) -> bool:
    """An RFC 3339 date-time that can be expressed in UTC (year 9999 at -12:00 cannot)."""
    from datetime import datetime, timezone

    if not _DATE_TIME.fullmatch(text):
        return False
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if value.tzinfo is not None:
            value.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return False
    return True
