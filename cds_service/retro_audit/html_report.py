"""The HTML report: one self-contained page (inline SVG charts, no script, nothing fetched) of the summary's
aggregate counts, without patient identifiers."""

from __future__ import annotations

import html
from typing import Any

from .model import CARD_LABELS, CARD_ORDER, CES, EPISODE_BINS, INCOMPLETE, INDICATED, NO_CARD, NOT_INDICATED
from .summary import pct, rate

CARD_COLOURS = {CES: "#b3261e", NOT_INDICATED: "#c77700", INDICATED: "#1a5fb4", INCOMPLETE: "#6b6b6b", NO_CARD: "#b8bec6"}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _none(title: str) -> str:
    return f"<p class='empty'>{_e(title)}: none.</p>"


def _svg(title: str, width: int, height: int) -> str:
    return (f"<svg role='img' aria-label='{_e(title)}' viewBox='0 0 {width} {height}' width='{width}' height='{height}' "
            f"xmlns='http://www.w3.org/2000/svg'><title>{_e(title)}</title>")


def _hbar_chart(title: str, items: list[tuple[str, int, str]], total: int | None = None) -> str:
    if not items:
        return _none(title)
    label_width, bar_width, row = 300, 380, 26
    height = row * len(items) + 10
    top = max(v for _, v, _ in items) or 1
    parts = [_svg(title, label_width + bar_width + 110, height)]
    for i, (label, value, colour) in enumerate(items):
        y = 5 + i * row
        width = max(round(bar_width * value / top), 1 if value else 0)
        share = f" ({100 * value / total:.1f}%)" if total else ""
        parts.append(f"<text x='{label_width - 8}' y='{y + 16}' text-anchor='end' class='lbl'>{_e(label)}</text>"
                     f"<rect x='{label_width}' y='{y + 3}' width='{width}' height='{row - 8}' fill='{colour}'>"
                     f"<title>{_e(label)}: {value}{share}</title></rect>"
                     f"<text x='{label_width + width + 6}' y='{y + 16}' class='val'>{value}{_e(share)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _stacked_columns(title: str, categories: list[str], series: list[tuple[str, str, list[int]]]) -> str:
    if not categories:
        return _none(title)
    left, plot_h, bottom, top_pad = 44, 220, 100, 10
    column = max(min(46, 860 // max(len(categories), 1)), 8)
    width = left + column * len(categories) + 70
    totals = [sum(values[i] for _, _, values in series) for i in range(len(categories))]
    top = max(totals) or 1
    parts = [_svg(title, width, plot_h + bottom + top_pad)]
    for fraction in (0, 0.5, 1):
        y = top_pad + plot_h - plot_h * fraction
        parts.append(f"<line x1='{left}' x2='{width - 60}' y1='{y:.1f}' y2='{y:.1f}' class='grid'/>"
                     f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end' class='val'>{round(top * fraction)}</text>")
    for i, category in enumerate(categories):
        x = left + i * column + 2
        y = top_pad + plot_h
        for name, colour, values in series:
            value = values[i]
            if not value:
                continue
            h = plot_h * value / top
            y -= h
            parts.append(f"<rect x='{x}' y='{y:.1f}' width='{column - 4}' height='{h:.1f}' fill='{colour}'>"
                         f"<title>{_e(category)}, {_e(name)}: {value}</title></rect>")
        parts.append(f"<text transform='translate({x + column / 2 - 2},{top_pad + plot_h + 8}) rotate(50)' class='tick'>{_e(category)}</text>")
    parts.append("</svg>")
    legend = "".join(f"<span class='key'><i style='background:{colour}'></i>{_e(name)}</span>" for name, colour, _ in series)
    return "".join(parts) + f"<div class='legend'>{legend}</div>"


def _card_series(counts: dict[str, dict[str, int]], categories: list[str]) -> list[tuple[str, str, list[int]]]:
    """For a stacked chart: each card type that occurs, with its label, colour and count in each category."""
    return [(CARD_LABELS[t], CARD_COLOURS[t], [counts[c].get(t, 0) for c in categories]) for t in CARD_ORDER
            if any(counts[c].get(t, 0) for c in categories)]


def _table(headers: list[str], rows: list[list[Any]], caption: str) -> str:
    head = "".join(f"<th scope='col'>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><caption>{_e(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d1d1f;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
.tiles{display:flex;flex-wrap:wrap;gap:.8rem}.tile{border:1px solid #ddd;border-radius:6px;padding:.6rem .9rem;min-width:150px}
.tile b{display:block;font-size:1.5rem}.tile span{color:#555;font-size:.85rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
td:first-child,th:first-child{text-align:left;white-space:nowrap}caption{text-align:left;font-weight:600;padding:.3rem 0}
svg{max-width:100%;height:auto}.lbl,.val,.tick{font-size:12px;fill:#333}.grid{stroke:#e3e3e3}
.legend{font-size:.85rem;margin:.3rem 0 .8rem}.key{margin-right:1rem}.key i{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:-1px}
.note{color:#444;font-size:.9rem}.empty{color:#666}details{margin:.5rem 0}
"""


def render_html(report: dict[str, Any]) -> str:
    orders = report["orders_in_scope"]
    h = report["hedis_style"]
    run = report["run"]
    tiles = [
        ("Orders in scope", orders),
        ("Would have been warned against", f"{report['warned']} ({pct(report['warned'], orders)})"),
        ("Red flag found", f"{report['orders_with_red_flag']} ({pct(report['orders_with_red_flag'], orders)})"),
        ("Cauda equina emergency", report["card_types"].get(CES, 0)),
        ("HEDIS-style imaging ≤ 28 d", "-" if h["imaging_rate"] is None else f"{100 * h['imaging_rate']:.1f}% of {h['denominator']}"),
    ]
    cards = [(CARD_LABELS[t], report["card_types"].get(t, 0), CARD_COLOURS[t]) for t in CARD_ORDER]
    rule_rows = [[CARD_LABELS.get(k.split("|")[0], k.split("|")[0]), k.split("|")[1], n, pct(n, orders)] for k, n in report["rules"].items()]
    months = sorted(report["by_month"])
    month_series = _card_series(report["by_month"], months)
    bins = [label for _, _, label in EPISODE_BINS] + ["no dated episode"]
    bins = [b for b in bins if b in report["episode_days"]]
    bin_series = _card_series(report["episode_days"], bins)
    flags = [(name, n, CARD_COLOURS[CES]) for name, n in report["ces_features"].items()] + \
            [(name, n, CARD_COLOURS[INDICATED]) for name, n in report["red_flags"].items()]
    modalities = sorted(report["by_modality"])
    modality_rows = [[m] + [report["by_modality"][m].get(t, 0) for t in CARD_ORDER] + [sum(report["by_modality"][m].values())]
                     for m in modalities]
    skipped = [[k, v] for k, v in report["orders_skipped"].items() if v]
    as_of = report["as_of"]
    policy = report["policy"]
    body = [
        "<h1>Lumbar imaging orders: retrospective audit</h1>",
        f"<p class='note'>Source: {_e(report['source'])}. Knowledge {_e(report['knowledge_version'])}. "
        f"Generated {_e(report['generated_at'])}. {report['patients']} patients, {orders} orders, {run['seconds']:.1f} s on "
        f"{run['workers']} worker(s). Aggregate counts only: no patient identifiers.</p>",
        "<div class='tiles'>" + "".join(f"<div class='tile'><b>{_e(v)}</b><span>{_e(k)}</span></div>" for k, v in tiles) + "</div>",
        "<h2>The card each order would have received</h2>",
        _hbar_chart("Orders by card", cards, orders),
        _table(["Card", "Rule", "Orders", "Share"], rule_rows, "Orders by card and deciding rule (criteria.md section 3)"),
        "<h2>Orders by month</h2>",
        _stacked_columns("Orders by month of the order, by card", months, month_series),
        "<details><summary>The numbers by month</summary>",
        _table(["Month"] + [CARD_LABELS[t] for t in CARD_ORDER],
               [[m] + [report["by_month"][m].get(t, 0) for t in CARD_ORDER] for m in months], "Orders by month"),
        "</details>",
        "<h2>Back pain duration when the order was placed</h2>",
        _stacked_columns("Days since the episode began, by card", bins, bin_series),
        "<h2>Red flags and cauda equina features found</h2>",
        _hbar_chart("Orders with each fact (an order may have several)", flags, orders),
        "<h2>Modality ordered</h2>",
        _table(["Modality"] + [CARD_LABELS[t] for t in CARD_ORDER] + ["All"], modality_rows, "Orders by modality and card"),
        f"<p class='note'>The ordered protocol differs from the recommended one in {report['protocol_differs']} orders "
        f"({pct(report['protocol_differs'], orders)}).</p>",
        "<h2>HEDIS-style rate: imaging within 28 days of a new low back pain diagnosis</h2>",
        _table(["", "Count"], [
            ["New back pain diagnoses (none in the 180 days before)", h["new_lbp_diagnoses"]],
            ["  outside ages 18-75", h["outside_ages_18_75"]],
            ["  28-day window not complete in the data", h["window_not_complete"]],
            ["  excluded: red flag or cauda equina feature by day 28", h["excluded_red_flag"]],
            ["Denominator", h["denominator"]],
            ["Imaged (lumbar X-ray, CT or MRI ordered, not revoked) within 28 days", h["imaged_within_28_days"]],
            ["Imaging rate (lower is better)", rate(h["imaging_rate"])],
            ["Inverted rate, as HEDIS reports it (higher is better)", rate(h["inverted_rate"])],
        ], "HEDIS-style, not the NCQA measure"),
        "<p class='note'>Not the licensed NCQA measure: the diagnosis date is the Condition's recordedDate (else onset), "
        "exclusions are this service's red flags and cauda equina features (criteria.yaml) evaluated on the record as it "
        "was 28 days after the diagnosis, the age is taken at the diagnosis, enrolment and encounter types are not "
        "checked, and an imaging order (not a claim) is the numerator event.</p>",
        "<h2>Method</h2>",
        "<ul class='note'>"
        "<li>Each order is evaluated by the service's own engine with today = the order's date and the patient's record "
        "as it was that day: resources dated after the order are ignored "
        f"({as_of['resources_after_order_ignored']} in all); conditions that resolved after the order are read as active "
        f"({as_of['conditions_active_on_order_date']}).</li>"
        f"<li>Undated resources: {_e(policy['undated'])}d ({as_of['undated_used'] if policy['undated'] == 'include' else as_of['undated_dropped']}).</li>"
        "<li>Orders in scope: ServiceRequests coded as lumbar spine MRI, CT or X-ray, with a date, not draft or "
        "entered-in-error; revoked orders are in scope (the hook fired when they were placed) but are not imaging for the "
        "HEDIS-style rate.</li></ul>",
        _table(["Order not evaluated", "Orders"], skipped, "Orders left out") if skipped else "",
    ]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
            "<title>Lumbar imaging retrospective audit</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
