"""Service definitions (from services.yaml) and prefetch templates.

Templates are checked at start-up against the CDS Hooks 2.0 token rules: only root-level context fields
that the hook marks as tokens, or the 2.0 user tokens. `@codes(GROUP, ...)` is expanded from the value sets.
"""

from __future__ import annotations

import re
from urllib.parse import quote
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from fhir_mappings.codes import CodeIndex

from .protocol import HOOK_DEFINITIONS

SERVICES_FILE = Path(__file__).with_name("services.yaml")
USER_TOKENS = ("userPractitionerId", "userPractitionerRoleId", "userPatientId", "userRelatedPersonId")
_TOKEN = re.compile(r"\{\{\s*([^}]*?)\s*\}\}")
_CODES = re.compile(r"@codes\(([^)]*)\)")
# The resource types each prefetch key brings; used to pool data sent under other key names.
_TEMPLATE_TYPE = re.compile(r"^([A-Z][A-Za-z]+)[/?]")


@dataclass(frozen=True)
class Service:
    id: str
    hook: str
    title: str
    description: str
    prefetch: Mapping[str, str]
    usage_requirements: str | None = None

    def discovery_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"hook": self.hook, "id": self.id, "title": self.title, "description": self.description}
        if self.prefetch:  # OPTIONAL: omitted rather than {} (CDS Hooks 2.0 "Use of JSON")
            entry["prefetch"] = dict(self.prefetch)
        if self.usage_requirements:
            entry["usageRequirements"] = self.usage_requirements
        return entry

    def resource_type(self, key: str) -> str:
        match = _TEMPLATE_TYPE.match(self.prefetch[key])
        return match.group(1) if match else key


def load_services(codes: CodeIndex, path: Path = SERVICES_FILE) -> dict[str, Service]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    services: dict[str, Service] = {}
    for raw in data["services"]:
        hook = raw["hook"]
        if hook not in HOOK_DEFINITIONS:
            raise ValueError(f"services.yaml: service {raw['id']!r} uses unknown hook {hook!r}")
        prefetch = {key: _expand_codes(template, codes) for key, template in (raw.get("prefetch") or {}).items()}
        for key, template in prefetch.items():
            check_template(hook, key, template)
        if raw["id"] in services or not re.fullmatch(r"[A-Za-z0-9._~-]+", raw["id"]):
            raise ValueError(f"services.yaml: service id {raw['id']!r} is duplicated or not URL-safe")
        texts = {name: " ".join(str(raw.get(name) or "").split()) for name in ("title", "description")}
        for name, text in texts.items():
            if not text:  # description is REQUIRED, title RECOMMENDED; an empty string is never sent (2.0 "Use of JSON")
                raise ValueError(f"services.yaml: service {raw['id']!r} needs a non-empty {name}")
        services[raw["id"]] = Service(
            id=raw["id"],
            hook=hook,
            title=texts["title"],
            description=texts["description"],
            prefetch=prefetch,
            usage_requirements=" ".join(raw["usageRequirements"].split()) if raw.get("usageRequirements") else None,
        )
    return services


# CDS Hooks 2.0 §Prefetch query restrictions: read, type-level search, references, token equality
# (optionally :in), dates with eq/lt/gt/ge/le, _count, _sort. `_id` and `_lastUpdated` are a token
# and a date parameter, so they fit the subset too; every other `_` parameter does not.
_ALLOWED_SPECIAL = ("_count", "_sort", "_id", "_lastUpdated")
_ALLOWED_MODIFIERS = ("in",)
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_FORBIDDEN_PREFIX = re.compile(r"^(ne|sa|eb|ap)(?=[0-9{])")


def check_template(hook: str, key: str, template: str) -> None:
    """Raise ValueError unless ``template`` is a relative FHIR read or search URL within the 2.0
    token rules and query subset (checklist DISC-08, PF-02, PF-03)."""
    allowed = {f"context.{name}" for name, spec in HOOK_DEFINITIONS[hook]["context"].items() if spec.get("token")}
    allowed.update(USER_TOKENS)
    for token in _TOKEN.findall(template):
        if token not in allowed:
            raise ValueError(f"prefetch {key!r}: token {{{{{token}}}}} is not a CDS Hooks 2.0 token of {hook}")
    bare = _TOKEN.sub("TOKEN", template)
    if "{{" in bare or "}}" in bare:
        raise ValueError(f"prefetch {key!r}: unbalanced token braces")
    if template.startswith("/") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", template):
        raise ValueError(f"prefetch {key!r}: templates are relative FHIR URLs")
    path, has_query, query = bare.partition("?")
    segments = path.split("/")
    if not _RESOURCE_TYPE.fullmatch(segments[0]):
        raise ValueError(f"prefetch {key!r}: must start with a FHIR resource type")
    if has_query and len(segments) != 1:
        raise ValueError(f"prefetch {key!r}: only type-level searches are in the CDS Hooks 2.0 query subset")
    if not has_query and (len(segments) != 2 or not segments[1] or segments[1].startswith(("_", "$"))):
        raise ValueError(f"prefetch {key!r}: a template without a query must be an instance read, Type/{{{{id}}}}")
    if not has_query:
        return
    for parameter in query.split("&"):
        name, has_value, value = parameter.partition("=")
        base, _, modifier = name.partition(":")
        if not has_value or not base or not value:
            raise ValueError(f"prefetch {key!r}: search parameter {parameter!r} has no name or value")
        if "." in name:
            raise ValueError(f"prefetch {key!r}: chained parameter {name!r} is outside the CDS Hooks 2.0 query subset")
        if base.startswith("_") and base not in _ALLOWED_SPECIAL:
            raise ValueError(f"prefetch {key!r}: {base} is outside the CDS Hooks 2.0 query subset")
        if modifier and modifier not in _ALLOWED_MODIFIERS:
            raise ValueError(f"prefetch {key!r}: modifier :{modifier} is outside the CDS Hooks 2.0 query subset")
        for item in value.split(","):
            if _FORBIDDEN_PREFIX.match(item):
                raise ValueError(f"prefetch {key!r}: prefix {item[:2]!r} is outside the CDS Hooks 2.0 query subset")


def fill_template(template: str, context: Mapping[str, Any]) -> str | None:
    """Substitute {{context.x}} and user tokens; None when a token cannot be resolved."""
    user_id = context.get("userId") if isinstance(context.get("userId"), str) else ""
    user_type, _, user_ref_id = user_id.partition("/")
    user_tokens = {
        "userPractitionerId": user_ref_id if user_type == "Practitioner" else None,
        "userPractitionerRoleId": user_ref_id if user_type == "PractitionerRole" else None,
        "userPatientId": user_ref_id if user_type == "Patient" else None,
        "userRelatedPersonId": user_ref_id if user_type == "RelatedPerson" else None,
    }
    missing = False

    def substitute(match: re.Match) -> str:
        nonlocal missing
        token = match.group(1)
        value = context.get(token[len("context."):]) if token.startswith("context.") else user_tokens.get(token)
        if not isinstance(value, str) or not value:
            missing = True
            return ""
        return quote(value, safe="")

    filled = _TOKEN.sub(substitute, template)
    return None if missing else filled


def _expand_codes(template: str, codes: CodeIndex) -> str:
    def expand(match: re.Match) -> str:
        tokens: list[str] = []
        for group in (g.strip() for g in match.group(1).split(",")):
            for entry in codes.group_codes(group):
                token = f"{entry['system']}|{entry['code']}"
                if token not in tokens:
                    tokens.append(token)
        return ",".join(tokens)

    return _CODES.sub(expand, template)
