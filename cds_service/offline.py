"""`python -m cds_service evaluate FILE`: the clinical pipeline on a patient Bundle, without HTTP.

For clinicians reviewing the rules and for testers: prints the facts found (with their evidence),
the rule that fired for each draft order, and the cards.
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cards.engine import Engine, Evaluation
from fhir_mappings.knowledge import Knowledge


def split_bundle(bundle: dict) -> tuple[list[dict], dict]:
    """(patient record, draftOrders Bundle): draft ServiceRequests are the orders being placed."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ValueError("the file must hold a FHIR Bundle")
    resources = [e["resource"] for e in bundle.get("entry", []) if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
    drafts = [r for r in resources if r.get("resourceType") == "ServiceRequest" and r.get("status") == "draft"]
    record = [r for r in resources if not any(r is d for d in drafts)]
    return record, {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": d} for d in drafts]}


def evaluate_bundle_file(path: Path, today: date, as_json: bool = False) -> int:
    console = Console()
    try:
        bundle = json.loads(path.read_text(encoding="utf-8"))
        record, draft_orders = split_bundle(bundle)
    except (OSError, ValueError) as exc:
        print(f"evaluate: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    if not draft_orders["entry"]:
        print("evaluate: the Bundle has no draft ServiceRequest (status 'draft') to evaluate", file=sys.stderr)
        return 2
    engine = Engine(Knowledge.load())
    evaluation = engine.evaluate(record, draft_orders, today, hook_instance=f"evaluate:{path.name}")
    if as_json:
        print(json.dumps({"cards": evaluation.cards}, indent=2))
        return 0
    print_evaluation(console, evaluation)
    return 0


def print_evaluation(console: Console, evaluation: Evaluation) -> None:
    facts = evaluation.facts
    console.print(f"[bold]Evaluated on {facts.today.isoformat()}[/]  age: {facts.age if facts.age is not None else 'unknown'}  "
                  f"episode: {facts.episode_days if facts.episode_days is not None else 'none/unknown'} days  "
                  f"conservative care: {facts.conservative_care_days if facts.conservative_care_days is not None else 'none'} days")
    table = Table(title="Facts", show_lines=False)
    for column in ("fact", "rule", "evidence", "date"):
        table.add_column(column)
    findings = facts.ces + facts.red_flags + ([facts.conservative_care] if facts.conservative_care else []) + facts.modifiers
    if facts.episode:
        for e in facts.episode.evidence:
            table.add_row("Back pain episode", "episode", f"{e.display} ({e.reference or e.resource_type})", e.date.isoformat() if e.date else "")
    for finding in findings:
        for e in finding.evidence:
            value = f" {e.value}" if e.value else ""
            table.add_row(f"{finding.id}: {finding.label}", finding.rule, f"{e.display}{value} ({e.reference or e.resource_type})", e.date.isoformat() if e.date else "")
    console.print(table)
    for assessment in evaluation.assessments:
        console.print(f"[bold]{assessment.order.display}[/] ({assessment.order.reference}): rule {assessment.rule} -> "
                      f"{assessment.card_type or 'no card'}: {assessment.reason}")
    for order in facts.out_of_scope_orders:
        console.print(f"{order}: not lumbar spine imaging, no card")
    for card in evaluation.cards:
        console.rule(f"{card['indicator'].upper()}  {card['source']['topic']['code']}")
        console.print(card["summary"], style="bold")
        console.print(card.get("detail", ""))
        for suggestion in card.get("suggestions", []):
            console.print(f"  suggestion: {suggestion['label']}")
