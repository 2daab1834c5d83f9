"""Demo patients: the public clinical vignettes and a few full synthetic records, as FHIR records dated
relative to today.

Two kinds, one list (`demo_patients()`):
  vignette  the public vignettes (demo/scenarios.json): one resource per fact, dates "N days ago"
  record    full synthetic charts with years of history (demo/patients/*.json): FHIR Bundles written
            as of an anchor date (Bundle.meta extension `demo-anchor-date`); every date in them is
            shifted by (today - anchor) when loaded, so "3 weeks ago" stays 3 weeks ago and they never
            go stale. Ages stay the same: birth dates shift too.

Used by the /demo page (cds_service/demo_page.py) and `python -m cds_service load-demo`.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import vignettes

DEMO_DIR = Path(__file__).parent / "demo"
SCENARIOS_FILE = DEMO_DIR / "scenarios.json"
PATIENTS_DIR = DEMO_DIR / "patients"

EXTENSION_BASE = "https://lumbar-imaging-cds.example.org/fhir/StructureDefinition/"
ANCHOR_URL = EXTENSION_BASE + "demo-anchor-date"
LABEL_URL = EXTENSION_BASE + "demo-label"
SUMMARY_URL = EXTENSION_BASE + "demo-summary"
ORDER_URL = EXTENSION_BASE + "demo-order"
EXPECTED_URL = EXTENSION_BASE + "demo-expected-card"

# The vignettes' expected cards use the clinical team's first card names.
VIGNETTE_CARD_NAMES = {
    "early-imaging-warning": "imaging-not-indicated",
    "red-flag-justified-info": "imaging-indicated",
    "cauda-equina-critical": "cauda-equina-emergency",
}

# A FHIR date or dateTime with at least a full date: YYYY-MM-DD, optionally followed by a time.
_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})(T[0-9:.]+(?:Z|[+-]\d{2}:\d{2})?)?$")


@dataclass(frozen=True)
class DemoPatient:
    id: str  # the Patient.id, also the URL segment of /demo/patients/{id}
    kind: str  # "record" (full synthetic chart) or "vignette"
    label: str
    summary: str
    order: dict  # the scenario's imaging order (a Coding)
    expected_card: str | None  # the card type expected for `order`; None: no card
    source: Any  # the vignette (dict) or the record file (Path)

    def record(self, today: date) -> list[dict]:
        """The chart: Patient first, every date relative to `today`."""
        if self.kind == "vignette":
            return vignettes.patient_record(self.source, today)
        bundle = shifted_bundle(_read_record_file(self.source), today)
        return [entry["resource"] for entry in bundle.get("entry", [])]

    def age(self, today: date) -> int | None:
        return age_on(self.record(today)[0].get("birthDate"), today)

    def sex(self) -> str:
        if self.kind == "vignette":
            return self.source.get("sex") or "unknown"
        return _read_record_file(self.source)["entry"][0]["resource"].get("gender") or "unknown"


def scenarios() -> list[dict]:
    return json.loads(SCENARIOS_FILE.read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _read_record_file_cached(path: str, mtime: float) -> str:
    return Path(path).read_text(encoding="utf-8")


def _read_record_file(path: Path) -> dict:
    return json.loads(_read_record_file_cached(str(path), path.stat().st_mtime))


def record_files() -> list[Path]:
    return sorted(PATIENTS_DIR.glob("*.json"))


def _meta_extension(bundle: dict, url: str) -> Any:
    for extension in (bundle.get("meta") or {}).get("extension") or []:
        if extension.get("url") == url:
            for key, value in extension.items():
                if key.startswith("value"):
                    return value
    return None


def demo_patients() -> list[DemoPatient]:
    """Every demo patient: the full synthetic records first, then the vignettes."""
    patients = []
    for path in record_files():
        bundle = _read_record_file(path)
        patient = bundle["entry"][0]["resource"]
        patients.append(DemoPatient(
            id=patient["id"],
            kind="record",
            label=_meta_extension(bundle, LABEL_URL) or patient["id"],
            summary=_meta_extension(bundle, SUMMARY_URL) or "",
            order=_meta_extension(bundle, ORDER_URL),
            expected_card=_meta_extension(bundle, EXPECTED_URL),
            source=path,
        ))
    for scenario in scenarios():
        cards = [VIGNETTE_CARD_NAMES.get(c, c) for c in scenario.get("expected", {}).get("cards", [])]
        patients.append(DemoPatient(
            id=vignettes.patient_resource(scenario, date.today())["id"],
            kind="vignette",
            label=_vignette_label(scenario),
            summary=scenario.get("description", ""),
            order=scenario["order"],
            expected_card=cards[0] if cards else None,
            source=scenario,
        ))
    return patients


def find_patient(patient_id: str) -> DemoPatient | None:
    return next((p for p in demo_patients() if p.id == patient_id), None)


def demo_records(today: date) -> list[tuple[str, list[dict]]]:
    """(name, patient record) for every demo patient, dates relative to `today`."""
    return [(p.id, p.record(today)) for p in demo_patients()]


def record_bundle(patient: DemoPatient, today: date) -> dict:
    """The patient's chart as a FHIR collection Bundle (Patient first); `timestamp` is the demo's today."""
    record = patient.record(today)
    return {
        "resourceType": "Bundle",
        "id": f"demo-{patient.id}",
        "type": "collection",
        "timestamp": f"{today.isoformat()}T00:00:00Z",
        "total": len(record),
        "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, r['resourceType'] + '/' + r['id'])}", "resource": r}
            for r in record
        ],
    }


def shifted_bundle(bundle: dict, today: date) -> dict:
    """A copy of a record Bundle with every date moved by (today - its anchor date); meta left as is."""
    anchor = _meta_extension(bundle, ANCHOR_URL)
    if not anchor:
        raise ValueError(f"demo record {bundle.get('id')!r} has no {ANCHOR_URL} extension in Bundle.meta")
    delta = today - date.fromisoformat(anchor)
    shifted = {key: (value if key == "meta" else _shift(copy.deepcopy(value), delta)) for key, value in bundle.items()}
    return shifted


def _shift(value: Any, delta: timedelta) -> Any:
    if isinstance(value, dict):
        return {key: _shift(item, delta) for key, item in value.items()}
    if isinstance(value, list):
        return [_shift(item, delta) for item in value]
    if isinstance(value, str):
        match = _DATE.match(value)
        if match:
            return (date.fromisoformat(match.group(1)) + delta).isoformat() + (match.group(2) or "")
    return value


def age_on(birth_date: str | None, today: date) -> int | None:
    if not birth_date:
        return None
    born = date.fromisoformat(birth_date[:10])
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def _vignette_label(scenario: dict) -> str:
    description = scenario.get("description", "")
    head, colon, _ = description.partition(":")
    if not colon or len(head) > 60:
        head = re.split(r"[;,]", description, maxsplit=1)[0]
    sex = {"male": "M", "female": "F"}.get(scenario.get("sex") or "", "")
    return f"{scenario['id']} ({scenario.get('age')} {sex}): {head.strip()}".replace(" )", ")")
