// Draws the override report (report.json) as SVG charts with tables of the same numbers.
// No libraries, no network beyond this server. Text goes into the page with textContent only:
// the report holds clinicians' free-text comments.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";

  const pct = (rate) => (rate === null || rate === undefined ? "–" : (rate * 100).toFixed(1) + "%");

  function el(name, attrs, text) {
    const node = document.createElement(name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svgEl(name, attrs, text) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  let chartCount = 0;

  // An SVG with role="img", a <title> and a <desc> that says in words what the bars show.
  function svgFrame(width, height, title, description) {
    const id = "chart-" + ++chartCount;
    const svg = svgEl("svg", {
      viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
      "aria-labelledby": `${id}-title ${id}-desc`, class: "chart-svg",
    });
    svg.appendChild(svgEl("title", { id: `${id}-title` }, title));
    svg.appendChild(svgEl("desc", { id: `${id}-desc` }, description));
    return svg;
  }

  // Horizontal bars, each with its label above it (labels of any length stay readable):
  // items [{label, value, text}], value in [0, max].
  function horizontalBars(items, { title, max, description }) {
    const barWidth = 420, valueWidth = 150, row = 46;
    const svg = svgFrame(barWidth + valueWidth, items.length * row + 6, title, description);
    items.forEach((item, i) => {
      const y = 4 + i * row;
      const width = max > 0 ? Math.max((item.value / max) * barWidth, item.value > 0 ? 2 : 0) : 0;
      svg.appendChild(svgEl("text", { x: 0, y: y + 13, class: "label" }, item.label));
      svg.appendChild(svgEl("rect", { x: 0, y: y + 19, width: barWidth, height: 18, class: "track" }));
      const bar = svgEl("rect", { x: 0, y: y + 19, width: width.toFixed(1), height: 18, class: "bar",
                                  "data-label": item.label, "data-value": item.value });
      bar.appendChild(svgEl("title", {}, `${item.label}: ${item.text}`));
      svg.appendChild(bar);
      svg.appendChild(svgEl("text", { x: barWidth + 8, y: y + 33, class: "value" }, item.text));
    });
    return svg;
  }

  // Vertical columns over time: items [{label, value (0..1), text}].
  function columns(items, { title, description }) {
    const left = 44, plotHeight = 180, top = 20, colWidth = Math.max(28, Math.min(70, 640 / Math.max(items.length, 1)));
    const width = left + items.length * colWidth + 10, height = top + plotHeight + 50;
    const svg = svgFrame(Math.max(width, 360), height, title, description);
    for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
      const y = top + plotHeight * (1 - tick);
      svg.appendChild(svgEl("line", { x1: left, x2: Math.max(width, 360) - 10, y1: y, y2: y, class: "grid" }));
      svg.appendChild(svgEl("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "axis" }, tick * 100 + "%"));
    }
    items.forEach((item, i) => {
      const x = left + i * colWidth + colWidth * 0.15, w = colWidth * 0.7;
      const h = item.value === null ? 0 : plotHeight * item.value;
      const bar = svgEl("rect", { x: x.toFixed(1), y: (top + plotHeight - h).toFixed(1), width: w.toFixed(1),
                                  height: h.toFixed(1), class: "bar", "data-label": item.label,
                                  "data-value": item.value === null ? "" : item.value });
      bar.appendChild(svgEl("title", {}, `${item.label}: ${item.text}`));
      svg.appendChild(bar);
      svg.appendChild(svgEl("text", { x: x + w / 2, y: top + plotHeight - h - 4, "text-anchor": "middle", class: "value" },
                            pct(item.value)));
      svg.appendChild(svgEl("text", { x: x + w / 2, y: top + plotHeight + 16, "text-anchor": "middle", class: "axis" },
                            item.label.replace(/^\d{4}-/, "")));
    });
    svg.appendChild(svgEl("text", { x: left, y: height - 8, class: "axis" }, "ISO week; bar height = override rate"));
    return svg;
  }

  // A table with a caption; rows are arrays of cells ({text, header, className} or plain values).
  function table(caption, headers, rows, numericFrom) {
    const t = el("table");
    t.appendChild(el("caption", {}, caption));
    const head = t.appendChild(el("thead")).appendChild(el("tr"));
    headers.forEach((h, i) => head.appendChild(el("th", { scope: "col", class: i >= numericFrom ? "num" : "" }, h)));
    const body = t.appendChild(el("tbody"));
    for (const cells of rows) {
      const tr = body.appendChild(el("tr"));
      cells.forEach((cell, i) => {
        const spec = cell !== null && typeof cell === "object" ? cell : { text: cell };
        const name = spec.header ? "th" : "td";
        const attrs = { class: [i >= numericFrom ? "num" : "", spec.className || ""].join(" ").trim() };
        if (spec.header) attrs.scope = "row";
        tr.appendChild(el(name, attrs, spec.text ?? ""));
      });
    }
    return t;
  }

  function show(id, chart, tableNode) {
    const section = document.getElementById(id);
    if (chart) section.querySelector(".chart").replaceChildren(chart);
    section.querySelector(".table").replaceChildren(tableNode);
    section.hidden = false;
  }

  const typeLabel = (report, type) => {
    if (type === null) return "(card not in audit)";
    const found = report.card_types.find((t) => t.card_type === type);
    return found ? found.label : type;
  };
  const reasonLabel = (r) => (r.code === null ? "(no coded reason)" : r.display ? `${r.display} (${r.code})` : r.code);

  function render(report) {
    const t = report.totals;
    const summary = document.getElementById("summary-list");
    summary.replaceChildren();
    const period = `${report.since || "first record"} to ${report.until || "today"}`;
    for (const [term, value] of [
      ["Period (UTC days)", period], ["Hook calls audited", report.decisions.total], ["Cards shown", t.shown],
      ["Overridden", `${t.overridden} (${pct(t.override_rate)})`], ["Accepted", t.accepted],
      ["Without feedback", t.no_feedback], ["Held back (silent mode)", t.held_back],
    ]) {
      summary.appendChild(el("dt", {}, term));
      summary.appendChild(el("dd", {}, value));
    }
    document.getElementById("summary").hidden = false;

    const types = report.card_types;
    show("card-types",
      types.length ? horizontalBars(
        types.map((c) => ({ label: c.label, value: c.override_rate || 0,
                            text: `${pct(c.override_rate)} (${c.overridden} of ${c.shown})` })),
        { title: "Override rate by card type", max: 1,
          description: types.map((c) => `${c.label}: ${pct(c.override_rate)} overridden, ${c.overridden} of ${c.shown} cards shown`).join("; ") })
        : el("p", {}, "No cards in this period."),
      table("Cards by type and rule", ["Card type", "Rule", "Shown", "Overridden", "Override rate", "Accepted", "No feedback", "Held back"],
        types.flatMap((c) => [
          [{ text: c.label, header: true }, "all", c.shown, c.overridden, pct(c.override_rate), c.accepted, c.no_feedback, c.held_back],
          ...c.rules.map((r) => [{ text: "", className: "sub" }, r.rule, r.shown, r.overridden, pct(r.override_rate), r.accepted, r.no_feedback, r.held_back]),
        ]), 2));

    const reasons = report.override_reasons;
    const maxReason = Math.max(0, ...reasons.map((r) => r.cards));
    show("reasons",
      reasons.length ? horizontalBars(
        reasons.map((r) => ({ label: `${typeLabel(report, r.card_type)}: ${reasonLabel(r)}`, value: r.cards,
                              text: `${r.cards} card${r.cards === 1 ? "" : "s"} (${pct(r.share_of_overrides)})` })),
        { title: "Override reasons", max: maxReason,
          description: reasons.map((r) => `${typeLabel(report, r.card_type)}, ${reasonLabel(r)}: ${r.cards} cards`).join("; ") })
        : el("p", {}, "No overrides in this period."),
      table("Cards overridden per reason", ["Card type", "Reason", "Code system", "Cards", "Share of the type's overrides"],
        reasons.map((r) => [typeLabel(report, r.card_type), reasonLabel(r), r.system || "", r.cards, pct(r.share_of_overrides)]), 3));

    const weeks = report.weeks;
    show("weeks",
      weeks.length ? columns(
        weeks.map((w) => ({ label: w.week, value: w.override_rate, text: `${pct(w.override_rate)} (${w.overridden} of ${w.shown})` })),
        { title: "Override rate by ISO week",
          description: weeks.map((w) => `${w.week}: ${pct(w.override_rate)}, ${w.overridden} of ${w.shown}`).join("; ") })
        : el("p", {}, "No cards in this period."),
      table("Cards by ISO week", ["Week", "Shown", "Overridden", "Override rate", "Accepted", "No feedback"],
        weeks.map((w) => [{ text: w.week, header: true }, w.shown, w.overridden, pct(w.override_rate), w.accepted, w.no_feedback]), 1));

    show("suggestions", null,
      report.accepted_suggestions.length
        ? table("Accepted suggestions (by position in the card)", ["Card type", "Suggestion #", "Times accepted"],
            report.accepted_suggestions.map((a) => [typeLabel(report, a.card_type), a.suggestion, a.accepted]), 1)
        : el("p", {}, "No accepted suggestions in this period."));

    const comments = report.comments_without_coded_reason;
    show("comments", null,
      comments.length
        ? table("Comments", ["When (UTC)", "Card type", "Outcome", "Comment"],
            comments.map((c) => [c.outcome_timestamp.slice(0, 16).replace("T", " "), typeLabel(report, c.card_type), c.outcome,
                                 { text: c.comment, className: "comment" }]), 99)
        : el("p", {}, "No comments without a coded reason in this period."));

    document.getElementById("footnote").textContent =
      `Feedback about cards not in the audit: ${report.unlinked_feedback}. ` +
      `Accepted suggestion ids not belonging to their card: ${report.unmatched_suggestions}. ` +
      `Generated ${report.generated_at}.`;
  }

  async function load() {
    const status = document.getElementById("status");
    const params = new URLSearchParams(window.location.search);
    for (const name of ["since", "until"]) {
      const value = params.get(name);
      if (value) document.getElementById(name).value = value;
    }
    const query = new URLSearchParams();
    for (const name of ["since", "until"]) if (params.get(name)) query.set(name, params.get(name));
    try {
      const response = await fetch("report.json" + (query.toString() ? "?" + query : ""), { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(response.status === 503 ? "the report database is unavailable" : `HTTP ${response.status}`);
      render(await response.json());
      status.textContent = "Report loaded.";
      status.classList.add("done");
    } catch (error) {
      status.setAttribute("role", "alert");
      status.textContent = `The report could not be loaded: ${error.message}.`;
    }
  }

  document.addEventListener("DOMContentLoaded", load);
})();
