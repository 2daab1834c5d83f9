"""Every setting of the service, read once from the environment (and an optional file).

The README's configuration table mirrors this module: one row per field, same names, same defaults.
Values come from, in order of precedence: environment variables, then the file named by
``CDS_CONFIG_FILE`` (YAML or JSON, keys are the environment variable names), then the defaults here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from datetime import date
from pathlib import Path
from typing import Any, Mapping

import yaml


class SettingsError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    # HTTP
    public_base_url: str | None = None  # CDS_PUBLIC_BASE_URL: the URL EHRs call (JWT `aud`), e.g. https://cds.example.org
    cors_origins: tuple[str, ...] = ()  # CDS_CORS_ORIGINS: comma-separated; empty = any origin in open mode
    max_body_bytes: int = 5_000_000  # CDS_MAX_BODY_BYTES: larger request bodies get 413

    # Security
    clients_file: str | None = None  # CDS_CLIENTS_FILE: trusted EHRs (JSON/YAML); set = JWT required
    jwt_max_lifetime_s: int = 300  # CDS_JWT_MAX_LIFETIME: longest accepted exp - iat, seconds
    jwt_clock_skew_s: int = 60  # CDS_JWT_CLOCK_SKEW: tolerated clock difference, seconds

    # FHIR fallback
    fhir_server_allowlist: tuple[str, ...] = ()  # CDS_FHIR_SERVER_ALLOWLIST: URL prefixes; empty = loopback only
    fhir_timeout_s: float = 2.0  # CDS_FHIR_TIMEOUT: one FHIR request, seconds
    fhir_deadline_s: float = 3.0  # CDS_FHIR_DEADLINE: all FHIR requests of one hook call, seconds
    fhir_max_pages: int = 10  # CDS_FHIR_MAX_PAGES: `next` links followed per query
    fhir_max_response_bytes: int = 20_000_000  # CDS_FHIR_MAX_RESPONSE_BYTES: one FHIR response

    # Storage
    database_url: str = "sqlite:///cds_service.db"  # CDS_DATABASE_URL: sqlite:///path or postgresql://...
    retention_days: int = 365  # CDS_RETENTION_DAYS: audit and feedback rows older than this are purged
    audit_key: str | None = None  # CDS_AUDIT_KEY: secret for the keyed hash of patient ids in the audit

    # Clinical behaviour
    mode: str = "live"  # CDS_MODE: live | silent (silent: evaluate and audit, return no cards but critical)
    silent_suppresses_critical: bool = False  # CDS_SILENT_SUPPRESSES_CRITICAL: also hold back cauda equina cards
    silent_services: tuple[str, ...] = ()  # CDS_SILENT_SERVICES: comma-separated service ids in silent mode while the others are live
    criteria_file: str | None = None  # CDS_CRITERIA_FILE: a reviewed replacement for fhir_mappings/criteria.yaml
    today: date | None = None  # CDS_TODAY: fixed evaluation date (YYYY-MM-DD) for demos and tests

    # Operations
    log_level: str = "INFO"  # CDS_LOG_LEVEL
    demo: bool = True  # CDS_DEMO: serve the /demo page and its patients
    analytics: bool = True  # CDS_ANALYTICS: serve the /analytics override report page

    @property
    def auth_required(self) -> bool:
        return bool(self.clients_file)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        config_file = environ.get("CDS_CONFIG_FILE")
        if config_file:
            values.update(_read_config_file(config_file))
        values.update({k: v for k, v in environ.items() if k.startswith("CDS_")})
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "Settings":
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            env_name = ENV_NAMES[f.name]
            if env_name not in values or values[env_name] in (None, ""):
                continue
            kwargs[f.name] = _convert(env_name, f.type, values[env_name])
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def with_overrides(self, **changes: Any) -> "Settings":
        updated = replace(self, **changes)
        updated.validate()
        return updated

    def validate(self) -> None:
        if self.mode not in ("live", "silent"):
            raise SettingsError(f"CDS_MODE must be 'live' or 'silent', not {self.mode!r}")
        if not (self.database_url.startswith("sqlite:") or self.database_url.startswith(("postgresql:", "postgres:"))):
            raise SettingsError("CDS_DATABASE_URL must start with sqlite:/// or postgresql://")
        for name in ("max_body_bytes", "fhir_max_pages", "fhir_max_response_bytes", "jwt_max_lifetime_s"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{ENV_NAMES[name]} must be positive")
        if self.jwt_clock_skew_s < 0:
            raise SettingsError("CDS_JWT_CLOCK_SKEW must not be negative")
        if self.fhir_timeout_s <= 0 or self.fhir_deadline_s <= 0:
            raise SettingsError("CDS_FHIR_TIMEOUT and CDS_FHIR_DEADLINE must be positive")
        if self.public_base_url and not self.public_base_url.startswith(("http://", "https://")):
            raise SettingsError("CDS_PUBLIC_BASE_URL must be an http(s) URL")


ENV_NAMES: dict[str, str] = {
    "public_base_url": "CDS_PUBLIC_BASE_URL",
    "cors_origins": "CDS_CORS_ORIGINS",
    "max_body_bytes": "CDS_MAX_BODY_BYTES",
    "clients_file": "CDS_CLIENTS_FILE",
    "jwt_max_lifetime_s": "CDS_JWT_MAX_LIFETIME",
    "jwt_clock_skew_s": "CDS_JWT_CLOCK_SKEW",
    "fhir_server_allowlist": "CDS_FHIR_SERVER_ALLOWLIST",
    "fhir_timeout_s": "CDS_FHIR_TIMEOUT",
    "fhir_deadline_s": "CDS_FHIR_DEADLINE",
    "fhir_max_pages": "CDS_FHIR_MAX_PAGES",
    "fhir_max_response_bytes": "CDS_FHIR_MAX_RESPONSE_BYTES",
    "database_url": "CDS_DATABASE_URL",
    "retention_days": "CDS_RETENTION_DAYS",
    "audit_key": "CDS_AUDIT_KEY",
    "mode": "CDS_MODE",
    "silent_suppresses_critical": "CDS_SILENT_SUPPRESSES_CRITICAL",
    "silent_services": "CDS_SILENT_SERVICES",
    "criteria_file": "CDS_CRITERIA_FILE",
    "today": "CDS_TODAY",
    "log_level": "CDS_LOG_LEVEL",
    "demo": "CDS_DEMO",
    "analytics": "CDS_ANALYTICS",
}


def _convert(env_name: str, type_name: Any, raw: Any) -> Any:
    type_name = str(type_name)
    try:
        if type_name.startswith("tuple"):
            if isinstance(raw, (list, tuple)):
                return tuple(str(item).strip() for item in raw if str(item).strip())
            return _split_list(str(raw))
        if type_name == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name.startswith("date"):
            return raw if isinstance(raw, date) else date.fromisoformat(str(raw).strip())
        return str(raw).strip()
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{env_name}: cannot read {raw!r} ({exc})") from None


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"CDS_CONFIG_FILE: cannot read {path}: {exc.strerror}") from None
    data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise SettingsError("CDS_CONFIG_FILE must hold a mapping of CDS_* names to values")
    return {str(k): v for k, v in data.items()}
