"""`python -m cds_service audit`: the arguments, the run they describe (the source chosen, the output files
written), and the terminal summary; an AuditError is printed as `audit: <message>` with exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

from fhir_mappings import fhir_values as fv
from fhir_mappings.knowledge import Knowledge

from .export import audit_export, default_workers
from .fhir_server import audit_fhir_server
from .html_report import render_html
from .model import AuditError, AuditPolicy
from .summary import render_summary, summary_json
from .writers import ResultWriter


def add_audit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("source", help="FHIR Bulk Data export folder (NDJSON) or FHIR R4 server base URL")
    parser.add_argument("--out", type=Path, help="per-order results: CSV if the name ends in .csv, else NDJSON")
    parser.add_argument("--html", type=Path, help="HTML report with charts (self-contained)")
    parser.add_argument("--summary-json", type=Path, help="the summary as JSON")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes for an export (default: every core this process may use)")
    parser.add_argument("--token", help="FHIR server access token (sent as a Bearer token, never logged)")
    parser.add_argument("--token-file", type=Path, help="read the access token from this file (keeps it out of the process list)")
    parser.add_argument("--undated", choices=("include", "exclude"), default="include",
                        help="resources with no clinical date: used (default) or dropped")
    parser.add_argument("--data-end", type=date.fromisoformat,
                        help="last date the data covers (HEDIS-style windows ending later are left out); default: the "
                             "export manifest's transactionTime, else today")
    parser.add_argument("--since", type=date.fromisoformat, help="only orders on or after this date")
    parser.add_argument("--until", type=date.fromisoformat, help="only orders on or before this date")
    parser.add_argument("--tmp-dir", help="where the temporary patient partitions go (about the export's size)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    return parser


def run_audit(args: argparse.Namespace) -> dict[str, Any]:
    """Run the audit the arguments describe; write --out, --html, --summary-json; return the summary."""
    from ..settings import Settings

    settings = Settings.from_env()
    knowledge = Knowledge.load(settings.criteria_file)
    source = str(args.source)
    is_url = source.startswith(("http://", "https://"))
    data_end = args.data_end or (None if is_url else _manifest_date(Path(source))) or date.today()
    policy = AuditPolicy(undated=args.undated, data_end=data_end, since=args.since, until=args.until)
    token = args.token
    if getattr(args, "token_file", None):
        token = args.token_file.read_text(encoding="utf-8").strip()
    writer = ResultWriter(args.out)
    try:
        if is_url:
            run = audit_fhir_server(source, writer, policy, token, settings.criteria_file, quiet=args.quiet, settings=settings)
        else:
            path = Path(source)
            if not path.exists():
                raise AuditError(f"{source}: no such folder")
            run = audit_export(path, writer, policy, max(1, args.workers), settings.criteria_file, args.tmp_dir, quiet=args.quiet)
    finally:
        writer.close()
    report = summary_json(run, knowledge.version, policy)
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.html:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(render_html(report), encoding="utf-8")
    return report


def _manifest_date(source: Path) -> date | None:
    manifest = source / "manifest.json" if source.is_dir() else None
    if manifest is None or not manifest.is_file():
        return None
    try:
        return fv.parse_date(json.loads(manifest.read_text(encoding="utf-8")).get("transactionTime"))
    except (OSError, ValueError, AttributeError):
        return None


def main_audit(args: argparse.Namespace) -> int:
    try:
        report = run_audit(args)
    except AuditError as exc:
        print(f"audit: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(render_summary(report), end="")
        for name, path in (("per-order results", args.out), ("HTML report", args.html), ("summary", args.summary_json)):
            if path:
                print(f"{name}: {path}")
    return 0
