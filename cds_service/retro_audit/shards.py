"""Pass 1 over an export folder: the files cut into line-aligned byte ranges, each line of a type the audit
reads appended to this process's SQLite shard keyed by (crc32(patient id), patient id), Medication lines to
a side table; then each shard indexed by patient (SQLite's external sort). Run in worker processes."""

from __future__ import annotations

import gzip
import os
import re
import sqlite3
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import msgspec

from .model import AuditError
from .progress import peak_rss_mb
from .references import referenced_patient

# The resource types the engine reads, and the catalogue type they reference.
PATIENT_TYPES = ("Patient", "Condition", "Observation", "MedicationRequest", "MedicationStatement", "Procedure", "ServiceRequest")
REFERENCED_TYPES = ("Medication",)

CHUNK_BYTES = 32 * 1024 * 1024
INSERT_BATCH = 2000


class _Head(msgspec.Struct):
    resourceType: Any = None
    id: Any = None
    subject: Any = None
    patient: Any = None


_HEAD = msgspec.json.Decoder(_Head)
_NAME_TYPE = re.compile(r"^(?:\d+[._-])?([A-Z][A-Za-z]+)(?:[._-]\d+)*\.ndjson(?:\.gz)?$")
_worker: dict[str, Any] = {}  # this process's shard writer, from its first chunk until close_shard_writer()


def export_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    files = sorted(p for p in source.iterdir() if p.is_file() and (p.name.endswith(".ndjson") or p.name.endswith(".ndjson.gz")))
    if not files:
        raise AuditError(f"{source}: no .ndjson files (a FHIR Bulk Data export folder was expected)")
    return files


def plan_chunks(files: list[Path], chunk_bytes: int = CHUNK_BYTES) -> tuple[list[tuple[str, int, int]], Counter]:
    """Line-aligned byte ranges of every file that may hold a type the audit reads; skipped files by type."""
    chunks: list[tuple[str, int, int]] = []
    skipped: Counter = Counter()
    for path in files:
        named = _NAME_TYPE.match(path.name)
        if named and named.group(1) in _KNOWN_OTHER_TYPES:  # one type per file (Bulk Data): not read at all
            skipped[named.group(1)] += path.stat().st_size
            continue
        size = path.stat().st_size
        if path.name.endswith(".gz") or size <= chunk_bytes:
            chunks.append((str(path), 0, size))
            continue
        start = 0
        with open(path, "rb") as handle:
            while start < size:
                handle.seek(min(start + chunk_bytes, size))
                if handle.tell() < size:
                    handle.readline()
                end = min(handle.tell(), size)
                chunks.append((str(path), start, end))
                start = end
    return chunks, skipped


# Types a Bulk export commonly holds that the audit never reads: their files are skipped unread.
_KNOWN_OTHER_TYPES = frozenset((
    "Encounter", "AllergyIntolerance", "CarePlan", "CareTeam", "Claim", "Coverage", "Device", "DiagnosticReport",
    "DocumentReference", "ExplanationOfBenefit", "Goal", "ImagingStudy", "Immunization", "Location", "MedicationAdministration",
    "MedicationDispense", "Organization", "Practitioner", "PractitionerRole", "Provenance", "RelatedPerson", "Group",
    "Specimen", "SupplyDelivery", "Media", "QuestionnaireResponse", "Appointment", "Communication", "Consent",
    "FamilyMemberHistory", "Flag", "List", "NutritionOrder", "RiskAssessment", "Schedule", "Slot", "Task",
))


def _open_shard(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=OFF")
    return conn


def _shard_writer(tmp_dir: str) -> sqlite3.Connection:
    conn = _worker.get("writer")
    if conn is None:
        conn = _open_shard(Path(tmp_dir) / f"shard-{os.getpid()}.db")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("CREATE TABLE IF NOT EXISTS lines (h INTEGER NOT NULL, patient TEXT NOT NULL, line BLOB NOT NULL)")
        conn.execute("CREATE TABLE IF NOT EXISTS refs (type TEXT NOT NULL, id TEXT NOT NULL, line BLOB NOT NULL)")
        _worker["writer"] = conn
    return conn


def close_shard_writer() -> None:
    conn = _worker.pop("writer", None)
    if conn is not None:
        conn.close()


def patient_hash(patient_id: str) -> int:
    return zlib.crc32(patient_id.encode("utf-8"))


def partition_chunk(task: tuple[str, int, int, str]) -> dict[str, Any]:
    """Pass 1 on one byte range: each line of a type the audit reads into this worker's shard."""
    path, start, end, tmp_dir = task
    cpu_started = time.process_time()
    conn = _shard_writer(tmp_dir)
    stats: dict[str, Any] = {"bytes": end - start, "lines": 0, "patients": 0, "skipped": Counter()}
    rows: list[tuple[int, str, bytes]] = []
    refs: list[tuple[str, str, bytes]] = []
    conn.execute("BEGIN")
    try:
        for line in _read_lines(path, start, end):
            stats["lines"] += 1
            try:
                head = _HEAD.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                stats["skipped"]["not a FHIR resource (JSON error)"] += 1
                continue
            kind = head.resourceType
            if not isinstance(kind, str):
                stats["skipped"]["no resourceType"] += 1
                continue
            if kind in REFERENCED_TYPES:
                if isinstance(head.id, str) and head.id:
                    refs.append((kind, head.id, line))
                    _insert(conn, "refs", refs, INSERT_BATCH)
                continue
            if kind not in PATIENT_TYPES:
                stats["skipped"][kind] += 1
                continue
            if kind == "Patient":
                patient = head.id if isinstance(head.id, str) and head.id else None
                stats["patients"] += patient is not None
            else:
                patient = referenced_patient((head.subject, head.patient))
            if patient is None:
                stats["skipped"][f"{kind} without a Patient reference"] += 1
                continue
            rows.append((patient_hash(patient), patient, line))
            _insert(conn, "lines", rows, INSERT_BATCH)
        _insert(conn, "lines", rows)
        _insert(conn, "refs", refs)
        conn.execute("COMMIT")
    except BaseException:
        try:
            conn.execute("ROLLBACK")  # the shard is temporary: a failed chunk fails the whole audit anyway
        except sqlite3.Error:
            pass
        raise
    stats["peak_rss_mb"] = peak_rss_mb()
    stats["cpu_seconds"] = time.process_time() - cpu_started
    return stats


def _insert(conn: sqlite3.Connection, table: str, batch: list[tuple], at_least: int = 1) -> None:
    """The batch into the table once it holds `at_least` rows; the batch is then emptied."""
    if len(batch) >= at_least:
        conn.executemany(f"INSERT INTO {table} VALUES (?, ?, ?)", batch)
        batch.clear()


def _read_lines(path: str, start: int, end: int) -> Iterator[bytes]:
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as handle:
            for line in handle:
                if line.strip():
                    yield line.strip()
        return
    with open(path, "rb") as handle:
        handle.seek(start)
        position = start
        while position < end:
            line = handle.readline()
            if not line:
                break
            position += len(line)
            line = line.strip()
            if line:
                yield line


def index_shard(path: str) -> str:
    conn = _open_shard(path)
    try:
        conn.execute("CREATE INDEX IF NOT EXISTS lines_by_patient ON lines (h, patient)")
        conn.execute("CREATE INDEX IF NOT EXISTS refs_by_id ON refs (type, id)")
    finally:
        conn.close()
    return path
