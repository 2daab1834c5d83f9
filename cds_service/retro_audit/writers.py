"""The per-order results file: one row per audited order, streamed as CSV (name ends in .csv) or NDJSON.
The rows carry the source's patient and order ids: the file is to be handled like the export itself."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

CSV_COLUMNS = (
    "patient_id", "order_id", "order_date", "order_status", "order_system", "order_code", "order_display", "modality",
    "ordered_contrast", "card_type", "indicator", "rule", "reason", "summary", "facts", "red_flags", "ces_features",
    "modifiers", "recommended_modality", "recommended_contrast", "order_matches_recommendation", "warned", "age",
    "episode_start", "episode_days", "conservative_care_days", "new_lbp_diagnosis", "hedis_counted", "unread",
    "resources_used", "resources_after_order", "undated_used", "reactivated_conditions",
)


class ResultWriter:
    """Per-order rows to CSV (name ends in .csv) or NDJSON, streamed."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.count = 0
        self._handle = None
        self._csv = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "w", encoding="utf-8", newline="")
        if path.suffix.lower() == ".csv":
            self._csv = csv.DictWriter(self._handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            self._csv.writeheader()

    def write(self, rows: list[dict]) -> None:
        self.count += len(rows)
        if self._handle is None:
            return
        for row in rows:
            if self._csv is not None:
                self._csv.writerow({k: _csv_value(v) for k, v in row.items()})
            else:
                self._handle.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _csv_value(value: Any) -> Any:
    if isinstance(value, list):
        return ";".join(map(str, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value
