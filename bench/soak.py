"""Soak test: a real server under a steady mixed load for N minutes, then a check that nothing was lost.

    python bench/soak.py                          # 10 minutes at 50 requests/s, one uvicorn worker, temp SQLite
    python bench/soak.py --minutes 0.5 --json     # the CI version (tests/test_soak.py)
    python bench/soak.py --workers 2 --database-url postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3Dsoak

The script starts `python -m cds_service serve` (the production entry point and its uvicorn settings) on a
free loopback port, sends requests at a fixed rate (open loop: one every 1/rate s, whatever the answers;
at most --max-in-flight at once), stops by itself after --minutes (or --max-requests), stops the server
gracefully (the audit writer flushes), and then opens the store with cds_service.store.open_store.

The mix (weights in MIX): order-select and order-sign calls for the 12 public vignettes, calls whose
orders are not lumbar imaging (a lab test, a chest X-ray, a medication), a few large (~280 KB) records,
malformed bodies (400 expected), discovery, and feedback on cards answered earlier (overridden with one
of the card's reasons, or accepted with its first suggestion; some repeats, which the store counts as
duplicates).

It prints the answers by kind and status, the errors (5xx, statuses other than the kind's expected one,
transport errors), latency percentiles (p50/p95/p99, per kind and overall), the server's RSS (the process
and its workers) at start, after warm-up and at the end, the audit (decisions stored vs calls that gave
cards), and the feedback check: every feedback item answered 200 must be in the store afterwards.
Exit status 1 when there was a 5xx, an unexpected status, a transport error, a lost feedback item or a
call that gave cards without its audit record (the store is healthy here: nothing may be dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cds_service import vignettes  # noqa: E402
from payloads import realistic_request  # noqa: E402

TODAY = date(2026, 3, 15)
SERVICES = {"order-select": "lumbar-imaging-order-select", "order-sign": "lumbar-imaging-order-sign"}
MIX = {  # kind: weight
    "order-select": 30,
    "order-sign": 25,
    "not-imaging": 10,
    "large-record": 2,
    "malformed": 6,
    "discovery": 2,
    "feedback": 25,
}
EXPECTED_STATUS = {"malformed": 400}  # every other kind: 200
NOT_IMAGING_ORDERS = [
    {"resourceType": "ServiceRequest", "status": "draft", "intent": "order",
     "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2", "display": "CBC panel"}]}},
    {"resourceType": "ServiceRequest", "status": "draft", "intent": "order",
     "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "71046", "display": "X-ray chest, 2 views"}]}},
    {"resourceType": "MedicationRequest", "status": "draft", "intent": "order",
     "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197806", "display": "ibuprofen 600 MG"}]}},
]
MALFORMED = [
    b"",
    b"{",
    b"[]",
    b'{"hook": "order-select"}',
    b"[" * 20_000,
    b'{"hook": "order-select", "hookInstance": "x", "context": []}',
]


# ------------------------------------------------------------------------------------------------
# The server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, workers: int, database_url: str, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    env.update(CDS_DATABASE_URL=database_url, CDS_TODAY=TODAY.isoformat(), CDS_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    log = open(log_path, "w", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "cds_service", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited at start-up:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                if workers == 1 or len(tree_pids(process.pid)) > workers:
                    return process
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(process)
    raise RuntimeError(f"the server did not answer /healthz within 60 s:\n{log_path.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> int | None:
    """SIGTERM (graceful: the lifespan closes the store after flushing the audit), SIGKILL after 20 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    return process.returncode


def tree_pids(root: int) -> list[int]:
    """The process and its descendants (uvicorn's worker processes)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children[int(fields[1])].append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return pids


def rss_mib(root: int) -> float:
    total_kib = 0
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return round(total_kib / 1024, 1)


# ------------------------------------------------------------------------------------------------
# The load

PLACEHOLDER = b"@@HOOK-INSTANCE@@"


def _encoded(request: dict) -> bytes:
    return json.dumps({**request, "hookInstance": PLACEHOLDER.decode()}).encode()


def _with_order(request: dict, order: dict, order_id: str) -> dict:
    """The request with its draft orders replaced by one order that is not lumbar imaging."""
    request = copy.deepcopy(request)
    order = {**order, "id": order_id}
    request["context"]["draftOrders"]["entry"] = [{"resource": order}]
    if "selections" in request["context"]:
        request["context"]["selections"] = [f"{order['resourceType']}/{order_id}"]
    return request


class Load:
    def __init__(self, base_url: str, seed: int) -> None:
        self.base_url = base_url
        self.rng = random.Random(seed)
        public = json.loads((ROOT / "tests" / "data" / "vignettes-public.json").read_text(encoding="utf-8"))
        # Bodies are encoded once with a placeholder for the hookInstance: the load generator shares the
        # machine with the server and must not spend its time in json.dumps (a 280 KB record takes ~10 ms).
        self.templates = {hook: [_encoded(vignettes.hook_request(v, TODAY, hook)) for v in public] for hook in SERVICES}
        self.not_imaging = {hook: [_encoded(_with_order(vignettes.hook_request(v, TODAY, hook), order, f"other-{i}"))
                                   for v in public[:4] for i, order in enumerate(NOT_IMAGING_ORDERS)] for hook in SERVICES}
        self.large = _encoded(realistic_request())
        self.cards: list[tuple[str, dict]] = []  # (service id, card) answered so far, for feedback
        self.sent_feedback: list[tuple[str, dict]] = []  # acknowledged items, some are sent again
        self.acknowledged: dict[str, set[str]] = defaultdict(set)  # card uuid -> distinct items answered 200
        self.feedback_totals = Counter()  # stored, duplicates, unknownCards as answered
        self.results: list[tuple[str, int | str, float]] = []  # (kind, status or error class, seconds)
        self.calls_with_cards: list[str] = []  # hookInstances of calls answered with cards: each must be audited
        self.sequence = 0

    def pick(self) -> str:
        kind = self.rng.choices(list(MIX), weights=list(MIX.values()))[0]
        return "order-sign" if kind == "feedback" and not self.cards else kind

    def build(self, kind: str) -> tuple[str, str, bytes | None, dict]:
        """(method, path, body, context for the answer) of one request of this kind."""
        self.sequence += 1
        if kind in SERVICES:
            hook_instance = str(uuid.uuid4())
            body = self.rng.choice(self.templates[kind]).replace(PLACEHOLDER, hook_instance.encode())
            return "POST", f"/cds-services/{SERVICES[kind]}", body, {"service": SERVICES[kind], "hookInstance": hook_instance}
        if kind == "not-imaging":
            hook = self.rng.choice(list(SERVICES))
            body = self.rng.choice(self.not_imaging[hook]).replace(PLACEHOLDER, str(uuid.uuid4()).encode())
            return "POST", f"/cds-services/{SERVICES[hook]}", body, {"service": SERVICES[hook]}
        if kind == "large-record":
            hook_instance = str(uuid.uuid4())
            body = self.large.replace(PLACEHOLDER, hook_instance.encode())
            return "POST", "/cds-services/lumbar-imaging-order-select", body, {"service": SERVICES["order-select"], "hookInstance": hook_instance}
        if kind == "malformed":
            service = self.rng.choice(list(SERVICES.values()))
            path = f"/cds-services/{service}" + self.rng.choice(["", "/feedback"])
            return "POST", path, self.rng.choice(MALFORMED), {}
        if kind == "discovery":
            return "GET", "/cds-services", None, {}
        # feedback: a new item on a card answered earlier, or (one in ten) an item acknowledged before
        if self.sent_feedback and self.rng.random() < 0.1:
            service, item = self.rng.choice(self.sent_feedback)
        else:
            service, card = self.rng.choice(self.cards)
            moment = datetime(2026, 3, 15, 8, tzinfo=timezone.utc) + timedelta(milliseconds=self.sequence)
            item = {"card": card["uuid"], "outcomeTimestamp": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")}
            suggestions = [s for s in card.get("suggestions", []) if "uuid" in s]
            if suggestions and self.rng.random() < 0.4:
                item.update(outcome="accepted", acceptedSuggestions=[{"id": suggestions[0]["uuid"]}])
            else:
                reason = self.rng.choice(card["overrideReasons"])
                item.update(outcome="overridden", overrideReason={"reason": reason, "userComment": f"soak {self.sequence}"})
        return "POST", f"/cds-services/{service}/feedback", json.dumps({"feedback": [item]}).encode(), {"service": service, "item": item}

    def record(self, kind: str, context: dict, response: httpx.Response) -> None:
        if response.status_code != 200:
            return
        if kind in ("order-select", "order-sign", "large-record") and context.get("service"):
            cards = response.json().get("cards", [])
            if cards:
                self.calls_with_cards.append(context["hookInstance"])
            self.cards.extend((context["service"], c) for c in cards if c.get("uuid") and c.get("overrideReasons"))
            del self.cards[:-2000]  # feedback goes to recent cards; keep memory flat
        elif kind == "feedback":
            item = context["item"]
            self.acknowledged[item["card"]].add(json.dumps(item, sort_keys=True))
            self.sent_feedback.append((context["service"], item))
            del self.sent_feedback[:-2000]
            self.feedback_totals.update(response.json())

    async def run(self, rate: float, seconds: float, max_requests: int, max_in_flight: int, on_progress) -> dict:
        limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
        in_flight = asyncio.Semaphore(max_in_flight)
        skipped = 0
        tasks: set[asyncio.Task] = set()
        async with httpx.AsyncClient(base_url=self.base_url, limits=limits, timeout=30.0) as client:

            async def one(kind: str) -> None:
                method, path, body, context = self.build(kind)
                started = time.perf_counter()
                try:
                    response = await client.request(method, path, content=body, headers={"content-type": "application/json"} if body is not None else None)
                except httpx.HTTPError as exc:
                    self.results.append((kind, type(exc).__name__, time.perf_counter() - started))
                    return
                finally:
                    in_flight.release()
                self.results.append((kind, response.status_code, time.perf_counter() - started))
                self.record(kind, context, response)

            start = time.monotonic()
            for index in range(max_requests):
                due = start + index / rate
                if due - start >= seconds:
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if in_flight.locked():
                    skipped += 1  # the server is behind by max_in_flight requests: do not pile up more
                    continue
                await in_flight.acquire()
                task = asyncio.create_task(one(self.pick()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                on_progress(index, time.monotonic() - start)
            if tasks:
                await asyncio.wait(tasks, timeout=60)
            elapsed = time.monotonic() - start
        return {"elapsed_s": round(elapsed, 1), "skipped_for_backpressure": skipped}


# ------------------------------------------------------------------------------------------------
# The store check


def read_store(database_url: str, card_uuids: list[str], hook_instances: list[str]) -> tuple[dict[str, int], int, int]:
    """(feedback rows per card uuid, how many of `hook_instances` have an audit record, all decisions),
    read through the service's own store (either dialect)."""
    from cds_service.store import open_store

    store = open_store(database_url)
    counts: dict[str, int] = {}
    audited = 0
    try:
        with store._transaction(write=False) as cur:  # the store has no read API for single rows: its SQL helper
            for start in range(0, len(card_uuids), 500):
                chunk = card_uuids[start:start + 500]
                sql = f"SELECT card_uuid, COUNT(*) FROM feedback WHERE card_uuid IN ({','.join('?' * len(chunk))}) GROUP BY card_uuid"
                counts.update({card: int(n) for card, n in store._execute(cur, sql, chunk).fetchall()})
            for start in range(0, len(hook_instances), 500):
                chunk = hook_instances[start:start + 500]
                sql = f"SELECT COUNT(DISTINCT hook_instance) FROM decisions WHERE hook_instance IN ({','.join('?' * len(chunk))})"
                audited += int(store._execute(cur, sql, chunk).fetchone()[0])
            decisions = int(store._execute(cur, "SELECT COUNT(*) FROM decisions").fetchone()[0])
    finally:
        store.close()
    return counts, audited, decisions


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"n": len(ordered), "p50_ms": round(pick(0.50), 1), "p95_ms": round(pick(0.95), 1),
            "p99_ms": round(pick(0.99), 1), "max_ms": round(ordered[-1] * 1000, 1), "mean_ms": round(statistics.fmean(ordered) * 1000, 1)}


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to send requests (default 10)")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second (default 50)")
    parser.add_argument("--max-requests", type=int, help="stop after this many requests (default: rate x duration)")
    parser.add_argument("--max-in-flight", type=int, default=64, help="requests outstanding at once before sends are skipped (default 64)")
    parser.add_argument("--workers", type=int, default=1, choices=(1, 2, 3, 4), help="uvicorn worker processes (default 1)")
    parser.add_argument("--database-url", help="the store (default: a temp SQLite file); a PostgreSQL URL should name an empty schema")
    parser.add_argument("--seed", type=int, default=7, help="random seed of the mix (default 7)")
    parser.add_argument("--work-dir", type=Path, help="where the server log and the temp SQLite go (default: a new temp directory, kept)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON (last line of output)")
    args = parser.parse_args(argv)

    seconds = args.minutes * 60
    max_requests = args.max_requests or int(args.rate * seconds) + 1
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="cds-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    database_url = args.database_url or f"sqlite:///{work / 'soak.db'}"
    port = free_port()
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    say(f"soak: {args.minutes:g} min at {args.rate:g} req/s, {args.workers} worker(s), store {database_url.split('?')[0]}, log {work / 'server.log'}")

    server = start_server(port, args.workers, database_url, work / "server.log")
    rss = {"start_mib": rss_mib(server.pid)}
    load = Load(f"http://127.0.0.1:{port}", args.seed)
    warm_at = max(1.0, min(60.0, seconds / 10))
    last_report = [0.0]

    def progress(index: int, elapsed: float) -> None:
        if "warm_mib" not in rss and elapsed >= warm_at:
            rss["warm_mib"] = rss_mib(server.pid)
        if elapsed - last_report[0] >= 30:
            last_report[0] = elapsed
            say(f"  {elapsed:5.0f} s  {index + 1} sent  rss {rss_mib(server.pid)} MiB")

    try:
        timing = asyncio.run(load.run(args.rate, seconds, max_requests, args.max_in_flight, progress))
        rss["end_mib"] = rss_mib(server.pid)
        rss.setdefault("warm_mib", rss["end_mib"])
    finally:
        exit_code = stop_server(server)
    server_log = (work / "server.log").read_text(encoding="utf-8", errors="replace")

    # answers
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for kind, status, _ in load.results:
        by_kind[kind][str(status)] += 1
    errors = Counter()
    for kind, status, _ in load.results:
        if not isinstance(status, int):
            errors[f"{kind}: transport {status}"] += 1
        elif status >= 500:
            errors[f"{kind}: {status}"] += 1
        elif status != EXPECTED_STATUS.get(kind, 200):
            errors[f"{kind}: unexpected {status}"] += 1
    latency = {"all": percentiles([s for _, _, s in load.results])}
    for kind in MIX:
        latency[kind] = percentiles([s for k, _, s in load.results if k == kind])

    # the store, after a graceful stop
    counts, audited, decisions = read_store(database_url, list(load.acknowledged), load.calls_with_cards)
    acknowledged_items = sum(len(items) for items in load.acknowledged.values())
    lost = {card: len(items) - counts.get(card, 0) for card, items in load.acknowledged.items() if counts.get(card, 0) < len(items)}
    summary = {
        "minutes": args.minutes, "rate": args.rate, "workers": args.workers, "database": database_url.split(":", 1)[0],
        "requests": len(load.results), "achieved_rate": round(len(load.results) / max(timing["elapsed_s"], 0.001), 1), **timing,
        "answers": {kind: dict(sorted(c.items())) for kind, c in sorted(by_kind.items())},
        "errors": dict(errors), "server_errors": sum(v for k, v in errors.items() if k.split(": ")[1][:1] == "5"),
        "latency": latency, "rss": rss,
        "feedback": {"acknowledged_items": acknowledged_items, "cards": len(load.acknowledged),
                     "stored_items": sum(min(counts.get(card, 0), len(items)) for card, items in load.acknowledged.items()),
                     "lost_items": sum(lost.values()), "answered": dict(load.feedback_totals)},
        "audit": {"calls_with_cards": len(load.calls_with_cards), "of_them_audited": audited, "decisions_stored": decisions},
        "server": {"exit_code": exit_code, "tracebacks": server_log.count("Traceback"), "unexpected": server_log.count("unexpected ")},
        "work_dir": str(work),
    }
    summary["audit"]["missing"] = summary["audit"]["calls_with_cards"] - audited
    failed = bool(errors) or summary["feedback"]["lost_items"] > 0 or summary["server"]["tracebacks"] > 0 or summary["audit"]["missing"] > 0

    say(f"\n{summary['requests']} requests in {timing['elapsed_s']} s ({summary['achieved_rate']} req/s), "
        f"{timing['skipped_for_backpressure']} skipped for backpressure")
    say("answers by kind and status: " + "; ".join(f"{k} {dict(v)}" for k, v in summary["answers"].items()))
    say(f"errors (5xx, unexpected statuses, transport): {dict(errors) or 'none'}")
    say("latency ms        p50     p95     p99     max")
    for kind, p in latency.items():
        if p.get("n"):
            say(f"  {kind:14s} {p['p50_ms']:7.1f} {p['p95_ms']:7.1f} {p['p99_ms']:7.1f} {p['max_ms']:7.1f}   (n={p['n']})")
    say(f"server RSS MiB: start {rss['start_mib']}, after warm-up {rss['warm_mib']}, end {rss['end_mib']}")
    a = summary["audit"]
    say(f"audit: {a['of_them_audited']} of the {a['calls_with_cards']} calls that gave cards have their decision record "
        f"({a['decisions_stored']} decisions in all)")
    f = summary["feedback"]
    say(f"feedback: {f['acknowledged_items']} items acknowledged (200) on {f['cards']} cards, {f['stored_items']} in the store, "
        f"{f['lost_items']} lost; answers {f['answered']}")
    say(f"server: exit {exit_code}, {summary['server']['tracebacks']} tracebacks in its log")
    say("FAILED" if failed else "OK")
    if args.json:
        print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
