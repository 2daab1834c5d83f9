"""The whole clinical pipeline in one call: FHIR resources -> facts -> assessments -> cards. Pure.

Used by the HTTP service, by `python -m cds_service evaluate` and by the retrospective audit, so all
three give the same answer for the same record.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any, Iterable

from fhir_mappings.facts import ClinicalFacts, extract_facts, read_orders
from fhir_mappings.knowledge import Knowledge

from .decide import Assessment, assess
from .render import CardRenderer


@dataclass
class Evaluation:
    facts: ClinicalFacts
    assessments: list[Assessment]
    cards: list[dict[str, Any]]  # in assessment order, critical first

    @property
    def needs_missing_data(self) -> bool:
        """True when an order could not be assessed because data was never sent and cannot be fetched (412)."""
        return bool(self.facts.missing) and any(a.card_type == "imaging-data-incomplete" for a in self.assessments)


class Engine:
    def __init__(self, knowledge: Knowledge):
        self.knowledge = knowledge
        self.renderer = CardRenderer(knowledge)

    def has_orders_in_scope(self, draft_orders: dict, selections: tuple[str, ...] | None = None) -> bool:
        """Cheap check before any data is read: is any (selected) draft order lumbar spine imaging?"""
        orders, _ = read_orders(draft_orders, selections, self.knowledge)
        return bool(orders)

    def evaluate(
        self,
        resources: Iterable[dict],
        draft_orders: dict,
        today: date,
        hook_instance: str,
        selections: tuple[str, ...] | None = None,
        unreadable: dict[str, str] | None = None,
        missing: Iterable[str] = (),
    ) -> Evaluation:
        facts = extract_facts(resources, draft_orders, selections, today, self.knowledge, unreadable, missing)
        assessments = assess(facts, self.knowledge)
        cards = [card for a in assessments if (card := self.renderer.render(a, facts, hook_instance)) is not None]
        cards.sort(key=lambda card: {"critical": 0, "warning": 1, "info": 2}[card["indicator"]])
        return Evaluation(facts, assessments, cards)
