"""Command line: python -m cds_service serve | evaluate | send | report | load-demo | audit

  serve       start the HTTP service (embedded defaults: SQLite, demo data, no authentication)
  evaluate    evaluate a patient Bundle from a file offline and print facts, rule and cards
  send        build a CDS Hooks request from a Bundle and send it to a running service
  report      the override report from the audit and feedback store
  load-demo   load the demo patients into a FHIR R4 server
  audit       evaluate past lumbar imaging orders from a Bulk Data export or a FHIR server (retrospective)
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import date
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cds_service", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP service")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 in containers)")
    serve.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")

    evaluate = commands.add_parser("evaluate", help="evaluate a patient Bundle from a file, offline")
    evaluate.add_argument("file", help="FHIR Bundle (JSON) with the patient record and the draft imaging ServiceRequest(s)")
    evaluate.add_argument("--today", type=date.fromisoformat, help="evaluation date (default: today)")
    evaluate.add_argument("--json", action="store_true", help="print the cards as JSON only")

    send = commands.add_parser("send", help="send a CDS Hooks request built from a Bundle to a running service")
    send.add_argument("--hook", choices=["order-select", "order-sign"], default="order-select")
    send.add_argument("--bundle", required=True, help="FHIR Bundle with the patient record")
    send.add_argument("--order", required=True, help="imaging order code, e.g. 72148 (CPT), 30679-5 (LOINC), RPID541 (RadLex)")
    send.add_argument("--system", help="code system of --order (default: guessed from the code's shape)")
    send.add_argument("--url", default="http://127.0.0.1:8080", help="service base URL (default http://127.0.0.1:8080)")
    send.add_argument("--fhir", help="send fhirServer=URL instead of prefetch, so the service reads the record itself")
    send.add_argument("--key", help="PEM private key to sign the JWT with (when the service requires authentication)")
    send.add_argument("--kid", help="JWT key id (with --key)")
    send.add_argument("--iss", help="JWT issuer (with --key)")

    report = commands.add_parser("report", help="override report from the audit and feedback store")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.add_argument("--since", type=date.fromisoformat, help="first day (YYYY-MM-DD)")
    report.add_argument("--until", type=date.fromisoformat, help="last day (YYYY-MM-DD)")
    report.add_argument("--database-url", help="default: CDS_DATABASE_URL or sqlite:///cds_service.db")

    load = commands.add_parser("load-demo", help="load the demo patients into a FHIR R4 server")
    load.add_argument("--fhir", required=True, help="FHIR server base URL, e.g. http://localhost:8081/fhir")
    load.add_argument("--today", type=date.fromisoformat, help="date the records are relative to (default: today)")

    from .retro_audit import add_audit_arguments

    add_audit_arguments(commands.add_parser("audit", help="evaluate past lumbar imaging orders (Bulk Data export folder or FHIR server URL)"))

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs request URLs, which carry patient ids
    return {"serve": _serve, "evaluate": _evaluate, "send": _send, "report": _report, "load-demo": _load_demo, "audit": _audit}[args.command](args)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .settings import Settings

    settings = Settings.from_env()
    print(f"Lumbar imaging CDS service on http://{args.host}:{args.port}  (discovery: /cds-services, demo: /demo)")
    print(f"  store: {settings.database_url}  mode: {settings.mode}  FHIR allow-list: {', '.join(settings.fhir_server_allowlist) or 'loopback only'}")
    if not settings.auth_required:
        print("  WARNING: no CDS_CLIENTS_FILE: any client may call this service without a JWT (development mode)")
    from .limits import ReadTimeoutProtocol

    uvicorn.run(
        "cds_service.asgi:app",
        http=ReadTimeoutProtocol,  # closes connections that hold a slot without sending a request
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_keep_alive=5,  # behind a load balancer: longer than its idle timeout
        timeout_graceful_shutdown=10,  # SIGTERM: in-flight requests get 10 s, then the audit queue is flushed
        limit_concurrency=200,  # per worker; each request may hold a 5 MB body
        server_header=False,
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .offline import evaluate_bundle_file

    return evaluate_bundle_file(Path(args.file), args.today or date.today(), as_json=args.json)


def _send(args: argparse.Namespace) -> int:
    from .client import send_command

    return send_command(args)


def _report(args: argparse.Namespace) -> int:
    from .report import main_report

    return main_report(args)


def _audit(args: argparse.Namespace) -> int:
    from .retro_audit import main_audit

    return main_audit(args)


def _load_demo(args: argparse.Namespace) -> int:
    from .demo import demo_records
    from .demo_loader import DemoLoadError, load_bundles
    from .vignettes import transaction_bundle

    today = args.today or date.today()
    bundles = [(name, transaction_bundle(record)) for name, record in demo_records(today)]
    try:
        count = load_bundles(args.fhir, bundles)
    except DemoLoadError as exc:
        print(f"load-demo: {exc}", file=sys.stderr)
        return 1
    print(f"Loaded {count} resources from {len(bundles)} demo patients into {args.fhir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
