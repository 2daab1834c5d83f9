"""What every part of the audit shares: the card types, the episode-duration bins, the policy, the error
for the user, and the counters a patient adds to (merged by addition, whatever the source or the workers)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import date
from typing import Any

CES = "cauda-equina-emergency"
INDICATED = "imaging-indicated"
NOT_INDICATED = "imaging-not-indicated"
INCOMPLETE = "imaging-data-incomplete"
NO_CARD = "no card"
CARD_LABELS = {
    CES: "Cauda equina emergency (critical)",
    NOT_INDICATED: "Imaging not indicated (warning)",
    INDICATED: "Imaging indicated (info)",
    INCOMPLETE: "Imaging data incomplete (info)",
    NO_CARD: "No card",
}
CARD_ORDER = (CES, NOT_INDICATED, INDICATED, INCOMPLETE, NO_CARD)

EPISODE_BINS = ((0, 7, "0-7 d"), (8, 14, "8-14 d"), (15, 28, "15-28 d"), (29, 41, "29-41 d"), (42, 90, "6-12 wk"),
                (91, 180, "3-6 mo"), (181, None, "> 6 mo"))


class AuditError(Exception):
    """The audit cannot run (bad source, refused server): the message is for the user."""


@dataclass(frozen=True)
class AuditPolicy:
    undated: str = "include"  # include | exclude
    data_end: date | None = None  # the export's date: HEDIS-style windows that end after it are left out
    since: date | None = None  # orders on or after
    until: date | None = None  # orders on or before


def new_summary() -> dict[str, Counter]:
    return {name: Counter() for name in (
        "counts", "card_types", "rules", "red_flags", "ces_features", "modifiers", "by_month", "by_modality",
        "episode_days", "skipped_orders", "skipped_lines", "hedis")}


def merge_summary(total: dict[str, Counter], part: dict[str, Counter]) -> None:
    for name, counter in part.items():
        total.setdefault(name, Counter()).update(counter)


@dataclass
class AuditRun:
    """What a source's audit returns: the merged counters and the run's metadata (timings, workers, ...)."""

    summary: dict[str, Counter]
    meta: dict[str, Any]
