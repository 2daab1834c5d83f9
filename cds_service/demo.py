"""Demo patients: the public clinical vignettes, made into FHIR records dated relative to today."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from . import vignettes

SCENARIOS_FILE = Path(__file__).parent / "demo" / "scenarios.json"


def scenarios() -> list[dict]:
    return json.loads(SCENARIOS_FILE.read_text(encoding="utf-8"))


def demo_records(today: date) -> list[tuple[str, list[dict]]]:
    """(name, patient record) for every demo patient, dates relative to `today`."""
    return [(s["id"], vignettes.patient_record(s, today)) for s in scenarios()]
