"""The reviewed knowledge the engine evaluates: value sets (code index) and criteria, loaded once."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .codes import CodeIndex

CRITERIA_FILE = Path(__file__).with_name("criteria.yaml")


@dataclass(frozen=True)
class Knowledge:
    codes: CodeIndex
    criteria: dict[str, Any]
    version: str  # criteria version + value set hash + criteria file hash: recorded in every audit row

    @classmethod
    def load(cls, criteria_file: str | Path | None = None, valueset_dir: str | Path | None = None) -> "Knowledge":
        path = Path(criteria_file) if criteria_file else CRITERIA_FILE
        text = path.read_text(encoding="utf-8")
        criteria = yaml.safe_load(text)
        codes = CodeIndex.load(valueset_dir)
        check_criteria(criteria, codes)
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        return cls(codes=codes, criteria=criteria, version=f"{criteria['version']}+vs.{codes.version}+cr.{digest}")

    def guideline(self, guideline_id: str) -> dict[str, str]:
        return self.criteria["guidelines"][guideline_id]


def check_criteria(criteria: dict[str, Any], codes: CodeIndex) -> None:
    """Fail at start-up, with the entry named, when the criteria file refers to something that does not exist."""
    known_groups = set(codes.group_names())
    guidelines = criteria["guidelines"]
    entries = [criteria["episode"], criteria["conservative_care"], *criteria["ces_features"], *criteria["red_flags"], *criteria["modifiers"]]
    for entry in entries:
        for group in entry.get("groups", []):
            if group not in known_groups:
                raise ValueError(f"criteria: {entry['id']} names unknown code group {group}")
        for guideline in entry.get("guidelines", []):
            if guideline not in guidelines:
                raise ValueError(f"criteria: {entry['id']} cites unknown guideline {guideline}")
        if entry.get("protocol") not in (None, "without", "with-and-without"):
            raise ValueError(f"criteria: {entry['id']} has unknown protocol {entry['protocol']}")
    for guideline in criteria["ces_guidelines"]:
        if guideline not in guidelines:
            raise ValueError(f"criteria: ces_guidelines cites unknown guideline {guideline}")
    for group in criteria["orders"]["groups"]:
        if group not in known_groups:
            raise ValueError(f"criteria: orders names unknown code group {group}")
