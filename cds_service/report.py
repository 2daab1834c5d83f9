"""The override report: how often each card type is overridden, why, week by week.

Clinical leads use it to tune the rules. Definitions (a card counts once however many feedback
items it received):

- shown: cards returned to the EHR; held back: cards evaluated in silent mode and not returned.
- overridden / accepted: shown cards with at least one feedback item of that outcome.
- override rate: overridden / shown (null when nothing was shown).
- no feedback: shown cards without any feedback (ignored, or the EHR sends no feedback).
- override reasons: cards overridden with each coded reason (system + code; display as sent).
- accepted suggestions: acceptances of each suggestion, named by its position in the card
  (suggestion uuids are per response; positions follow the card templates).
- comments without a coded reason: userComment given with no reason or with reason code "other".
  This is clinician free text: it belongs in the report, never in logs.
- unlinked feedback: feedback about card uuids not found in the audit.

Cards, and the feedback about them, are selected by the UTC day their decision was evaluated;
``since`` and ``until`` are inclusive. The report carries no patient identifiers.

Command line (wired by ``python -m cds_service report``):

    python -m cds_service report [--json] [--since YYYY-MM-DD] [--until YYYY-MM-DD] [--database-url URL]

``add_report_arguments(parser)`` declares these options on an argparse parser and
``main_report(args)`` runs the command from the parsed Namespace (``json``, ``since``, ``until``,
``database_url``; a missing or None ``database_url`` means CDS_DATABASE_URL from the settings) and
returns the process exit code: 0, or 2 when the database cannot be opened.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from datetime import date, datetime, timezone
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from cds_service.store import Store, StoreError, open_store

# The card types of the design, in the order the report lists them; others follow by name.
CARD_TYPES = {
    "cauda-equina-emergency": "Cauda equina emergency",
    "imaging-not-indicated": "Imaging not indicated",
    "imaging-indicated": "Imaging indicated",
    "imaging-data-incomplete": "Imaging data incomplete",
}

COUNTS = ("shown", "held_back", "overridden", "accepted", "no_feedback")


def build_report(store: Store, since: date | None = None, until: date | None = None) -> dict:
    """The report as a JSON-ready dict (see the module docstring for the definitions)."""
    return shape_report(store.report(since, until))


def shape_report(raw: dict) -> dict:
    """Turn ``Store.report()`` counts into the report: totals, rates, labels, stable order."""
    by_type: dict[str, dict] = {}
    for row in raw["cards_by_rule"]:
        entry = by_type.setdefault(row["card_type"], {"card_type": row["card_type"], "rules": []})
        entry["rules"].append(_rates({"rule": row["rule"], **_counts(row)}))
    card_types = []
    for card_type in sorted(by_type, key=_type_order):
        entry = by_type[card_type]
        entry["rules"].sort(key=lambda r: r["rule"])
        totals = {name: sum(rule[name] for rule in entry["rules"]) for name in COUNTS}
        card_types.append(_rates({"card_type": card_type, "label": label(card_type), **totals, "rules": entry["rules"]}))

    weeks: dict[str, dict] = {}
    for row in raw["cards_by_week"]:
        week = weeks.setdefault(row["week"], {"week": row["week"], "card_types": {}})
        week["card_types"][row["card_type"]] = _rates(_counts(row))
    week_rows = []
    for name in sorted(weeks):
        week = weeks[name]
        totals = {c: sum(t[c] for t in week["card_types"].values()) for c in COUNTS}
        ordered = {t: week["card_types"][t] for t in sorted(week["card_types"], key=_type_order)}
        week_rows.append(_rates({"week": name, **totals, "card_types": ordered}))

    overridden_by_type = {t["card_type"]: t["overridden"] for t in card_types}
    reasons = [
        {
            "card_type": r["card_type"],
            "system": r["system"],
            "code": r["code"],
            "display": r["display"],
            "cards": r["cards"],
            "share_of_overrides": _ratio(r["cards"], overridden_by_type.get(r["card_type"], 0)),
        }
        for r in raw["override_reasons"]
    ]
    reasons.sort(key=lambda r: (_type_order(r["card_type"]), -r["cards"], r["code"] or ""))

    accepted = sorted(
        ({"card_type": r["card_type"], "suggestion": r["position"], "accepted": r["accepted"]} for r in raw["accepted_suggestions"]),
        key=lambda r: (_type_order(r["card_type"]), r["suggestion"]),
    )

    totals = {name: sum(t[name] for t in card_types) for name in COUNTS}
    return {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "since": raw["since"],
        "until": raw["until"],
        "decisions": {
            "total": sum(raw["decisions_by_status"].values()),
            "by_status": {str(k): v for k, v in sorted(raw["decisions_by_status"].items())},
        },
        "totals": _rates(totals),
        "card_types": card_types,
        "override_reasons": reasons,
        "weeks": week_rows,
        "accepted_suggestions": accepted,
        "unmatched_suggestions": raw["unmatched_suggestions"],
        "comments_without_coded_reason": raw["comments"],
        "unlinked_feedback": raw["unlinked_feedback"],
    }


def label(card_type: str | None) -> str:
    if card_type is None:
        return "(card not in audit)"
    return CARD_TYPES.get(card_type, card_type)


def reason_label(reason: dict) -> str:
    if reason["code"] is None:
        return "(no coded reason)"
    return f"{reason['display']} ({reason['code']})" if reason["display"] else reason["code"]


def render_table(report: dict, width: int = 110) -> str:
    """The report as plain terminal tables (rich, no colour codes)."""
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    period = f"{report['since'] or 'start'} .. {report['until'] or 'today'}"
    t = report["totals"]
    console.print(
        f"Override report {period}: {report['decisions']['total']} decisions, {t['shown']} cards shown, "
        f"{t['overridden']} overridden ({_pct(t['override_rate'])}), {t['accepted']} accepted, "
        f"{t['no_feedback']} without feedback, {t['held_back']} held back (silent mode)"
    )

    table = Table(title="Override rate by card type and rule")
    for name, justify in (("Card type", "left"), ("Rule", "left"), ("Shown", "right"), ("Overridden", "right"),
                          ("Rate", "right"), ("Accepted", "right"), ("No feedback", "right"), ("Held back", "right")):
        table.add_column(name, justify=justify)
    for entry in report["card_types"]:
        table.add_row(entry["label"], "all", *_count_cells(entry), end_section=False)
        for rule in entry["rules"]:
            table.add_row("", rule["rule"], *_count_cells(rule))
        table.add_section()
    console.print(table)

    table = Table(title="Override reasons")
    table.add_column("Card type")
    table.add_column("Reason", no_wrap=True)
    table.add_column("System", overflow="fold")
    table.add_column("Cards", justify="right")
    table.add_column("Share", justify="right")
    for r in report["override_reasons"]:
        table.add_row(label(r["card_type"]), reason_label(r), r["system"] or "", str(r["cards"]), _pct(r["share_of_overrides"]))
    console.print(table)

    table = Table(title="By ISO week (week the cards were shown)")
    for name in ("Week", "Shown", "Overridden", "Rate", "Accepted", "No feedback"):
        table.add_column(name, justify="left" if name == "Week" else "right")
    for w in report["weeks"]:
        table.add_row(w["week"], str(w["shown"]), str(w["overridden"]), _pct(w["override_rate"]), str(w["accepted"]), str(w["no_feedback"]))
    console.print(table)

    table = Table(title="Accepted suggestions")
    for name in ("Card type", "Suggestion #", "Accepted"):
        table.add_column(name, justify="left" if name == "Card type" else "right")
    for a in report["accepted_suggestions"]:
        table.add_row(label(a["card_type"]), str(a["suggestion"]), str(a["accepted"]))
    console.print(table)
    if report["unmatched_suggestions"]:
        console.print(f"{report['unmatched_suggestions']} accepted suggestion id(s) did not belong to their card.")

    table = Table(title="Comments without a coded reason")
    for name in ("When (UTC)", "Card type", "Outcome", "Comment"):
        table.add_column(name)
    for c in report["comments_without_coded_reason"]:
        table.add_row(c["outcome_timestamp"][:16].replace("T", " "), label(c["card_type"]), c["outcome"], c["comment"])
    console.print(table)
    console.print(f"Feedback about cards not in the audit: {report['unlinked_feedback']}")
    return out.getvalue()


# -- command line ---------------------------------------------------------------------------


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument("--since", type=date.fromisoformat, help="first day included (YYYY-MM-DD, UTC)")
    parser.add_argument("--until", type=date.fromisoformat, help="last day included (YYYY-MM-DD, UTC)")
    parser.add_argument("--database-url", dest="database_url", help="default: CDS_DATABASE_URL")
    return parser


def main_report(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    database_url = getattr(args, "database_url", None)
    if not database_url:
        from cds_service.settings import Settings

        database_url = Settings.from_env().database_url
    since, until = _as_date(getattr(args, "since", None)), _as_date(getattr(args, "until", None))
    try:
        store = open_store(database_url)
    except StoreError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    try:
        report = build_report(store, since, until)
    except StoreError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if getattr(args, "json", False):
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        out.write(render_table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_report_arguments(argparse.ArgumentParser(prog="cds_service report", description=__doc__.split("\n")[0]))
    return main_report(parser.parse_args(argv))


# -- helpers --------------------------------------------------------------------------------


def _counts(row: dict) -> dict[str, int]:
    return {
        "shown": row["shown"],
        "held_back": row["cards"] - row["shown"],
        "overridden": row["overridden"],
        "accepted": row["accepted"],
        "no_feedback": row["no_feedback"],
    }


def _rates(entry: dict) -> dict:
    entry["override_rate"] = _ratio(entry["overridden"], entry["shown"])
    return entry


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _count_cells(entry: dict) -> list[str]:
    return [str(entry["shown"]), str(entry["overridden"]), _pct(entry["override_rate"]), str(entry["accepted"]),
            str(entry["no_feedback"]), str(entry["held_back"])]


def _type_order(card_type: str | None) -> tuple[int, str]:
    order = list(CARD_TYPES)
    if card_type in CARD_TYPES:
        return order.index(card_type), ""
    return len(order), card_type or ""


def _as_date(value: Any) -> date | None:
    if value is None or isinstance(value, date):
        return value
    return date.fromisoformat(str(value))


if __name__ == "__main__":
    raise SystemExit(main())
