"""The summary of a run: the counters turned into the summary JSON (aggregate counts, no identifiers),
and that summary as the table printed on the terminal."""

from __future__ import annotations

import io
import re
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from .model import CARD_LABELS, CARD_ORDER, AuditPolicy, AuditRun
from .progress import peak_rss_mb


def summary_json(run: AuditRun, knowledge_version: str, policy: AuditPolicy) -> dict[str, Any]:
    s = run.summary
    counts = s["counts"]
    orders = counts["orders"]
    hedis = s["hedis"]
    denominator, numerator = hedis["denominator"], hedis["imaged_within_28_days"]
    patients = counts["patients"]
    evaluate_seconds = run.meta.get("evaluate_seconds") or 0
    workers = run.meta.get("workers") or 1
    return {
        "source": run.meta.get("source"),
        "knowledge_version": knowledge_version,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "policy": {"undated": policy.undated, "data_end": policy.data_end.isoformat() if policy.data_end else None,
                   "since": policy.since.isoformat() if policy.since else None,
                   "until": policy.until.isoformat() if policy.until else None},
        "patients": patients,
        "patients_with_orders": counts["patients_with_orders"],
        "patients_without_patient_resource": counts["patients_without_patient_resource"],
        "orders_in_scope": orders,
        "orders_revoked": counts["orders_revoked"],
        "orders_skipped": dict(sorted(s["skipped_orders"].items())),
        "card_types": {t: s["card_types"][t] for t in CARD_ORDER if s["card_types"][t]},
        "rules": {k: v for k, v in sorted(s["rules"].items(), key=lambda kv: _rule_order(kv[0]))},
        "orders_with_red_flag": counts["orders_with_red_flag"],
        "orders_with_ces_feature": counts["orders_with_ces_feature"],
        "red_flags": dict(s["red_flags"].most_common()),
        "ces_features": dict(s["ces_features"].most_common()),
        "modifiers": dict(s["modifiers"].most_common()),
        "warned": counts["warned"],
        "warned_share": round(counts["warned"] / orders, 4) if orders else None,
        "protocol_differs": counts["protocol_differs"],
        "hedis_style": {
            "new_lbp_diagnoses": hedis["new_diagnoses"],
            "outside_ages_18_75": hedis["outside_ages"],
            "window_not_complete": hedis["window_not_complete"],
            "excluded_red_flag": hedis["excluded_red_flag"],
            "denominator": denominator,
            "imaged_within_28_days": numerator,
            "imaging_rate": round(numerator / denominator, 4) if denominator else None,
            "inverted_rate": round(1 - numerator / denominator, 4) if denominator else None,
        },
        "as_of": {"resources_after_order_ignored": counts["resources_after_order"], "undated_used": counts["undated_used"],
                  "undated_dropped": counts["undated_dropped"], "conditions_active_on_order_date": counts["reactivated_conditions"]},
        "by_month": _nested(s["by_month"]),
        "by_modality": _nested(s["by_modality"]),
        "episode_days": _nested(s["episode_days"]),
        "lines_read": counts["lines_read"],
        "skipped": dict(sorted(s["skipped_lines"].items())),
        "run": {**run.meta,
                "patients_per_second": round(patients / run.meta["seconds"], 1) if run.meta.get("seconds") else None,
                "patients_per_second_per_worker_evaluating": round(patients / evaluate_seconds / workers, 1) if evaluate_seconds else None,
                # Per core, from CPU time (this process and the workers): unaffected by other load on the machine.
                "patients_per_cpu_second": round(patients / cpu_total, 1) if (cpu_total := sum(run.meta.get("cpu_seconds", {}).values())) else None,
                "peak_rss_mb": {"main": peak_rss_mb(), "largest_worker": run.meta.get("worker_peak_rss_mb", 0.0)}},
    }


def _nested(counter: Counter) -> dict[str, dict[str, int]]:
    nested: dict[str, dict[str, int]] = {}
    for key, value in sorted(counter.items()):
        outer, inner = key.split("|", 1)
        nested.setdefault(outer, {})[inner] = value
    return nested


def _rule_order(key: str) -> tuple:
    """'card|rule' in card order, then rules naturally: C1..C7, F1, R1..R13, W1, N-..."""
    card_type, rule = key.split("|", 1)
    number = re.search(r"\d+$", rule)
    return _card_rank(card_type), re.sub(r"\d+$", "", rule), int(number.group()) if number else 0, rule


def _card_rank(card_type: str) -> int:
    return CARD_ORDER.index(card_type) if card_type in CARD_ORDER else len(CARD_ORDER)


def pct(part: int, whole: int) -> str:
    """`part` as a percentage of `whole`; "-" when `whole` is 0."""
    return f"{100 * part / whole:.1f}%" if whole else "-"


def rate(value: float | None) -> str:
    """A rate of the summary as a percentage; "-" when there was no denominator."""
    return "-" if value is None else f"{100 * value:.1f}%"


def render_summary(report: dict[str, Any], width: int = 100) -> str:
    from rich.console import Console
    from rich.table import Table

    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    orders = report["orders_in_scope"]
    run = report["run"]
    console.print(f"Retrospective audit of {report['source']}: {report['patients']} patients, {orders} lumbar imaging orders "
                  f"in {run['seconds']:.1f} s ({run['workers']} worker(s))")
    table = Table(title="Summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_column("share", justify="right")
    table.add_row("Patients read", str(report["patients"]), "")
    table.add_row("Patients with lumbar imaging orders", str(report["patients_with_orders"]), "")
    table.add_row("Orders in scope", str(orders), "")
    for card_type in CARD_ORDER:
        n = report["card_types"].get(card_type, 0)
        table.add_row(f"  {CARD_LABELS[card_type]}", str(n), pct(n, orders))
    table.add_row("Orders with a red flag", str(report["orders_with_red_flag"]), pct(report["orders_with_red_flag"], orders))
    table.add_row("Orders with a cauda equina feature", str(report["orders_with_ces_feature"]), pct(report["orders_with_ces_feature"], orders))
    table.add_row("Would have been warned against", str(report["warned"]), pct(report["warned"], orders))
    table.add_row("Ordered protocol differs from the recommendation", str(report["protocol_differs"]), pct(report["protocol_differs"], orders))
    h = report["hedis_style"]
    table.add_row("HEDIS-style: new LBP diagnoses, 18-75, no red flag", str(h["denominator"]), "")
    table.add_row("  imaged within 28 days (rate; lower is better)", str(h["imaged_within_28_days"]),
                  pct(h["imaged_within_28_days"], h["denominator"]))
    table.add_row("  inverted rate (HEDIS reports this; higher is better)", "", rate(h["inverted_rate"]))
    skipped = sum(report["orders_skipped"].values())
    table.add_row("Orders not evaluated (draft, entered-in-error, no date, ...)", str(skipped), "")
    table.add_row("Resources dated after their order, ignored", str(report["as_of"]["resources_after_order_ignored"]), "")
    table.add_row(f"Undated resources {'used' if report['policy']['undated'] == 'include' else 'dropped'}",
                  str(report["as_of"]["undated_used"] or report["as_of"]["undated_dropped"]), "")
    console.print(table)
    if report["red_flags"] or report["ces_features"]:
        flags = Table(title="Red flags and cauda equina features found (orders)")
        flags.add_column("fact")
        flags.add_column("orders", justify="right")
        for name, n in list(report["ces_features"].items()) + list(report["red_flags"].items()):
            flags.add_row(name, str(n))
        console.print(flags)
    rules = Table(title="Rules that decided")
    rules.add_column("card")
    rules.add_column("rule")
    rules.add_column("orders", justify="right")
    for key, n in report["rules"].items():
        card_type, rule = key.split("|", 1)
        rules.add_row(CARD_LABELS.get(card_type, card_type), rule, str(n))
    console.print(rules)
    return out.getvalue()
