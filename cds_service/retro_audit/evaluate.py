"""Pass 2 over an export folder: for one range of patient hashes, the shards' patient-ordered lines merged
(heapq.merge) so that one patient's lines arrive together, that patient audited, then dropped; Medications
referenced by the patient's orders read from the shards' side tables. Run in worker processes."""

from __future__ import annotations

import heapq
import math
import sqlite3
import time
from collections import Counter
from itertools import groupby
from typing import Any

import msgspec

from cards.engine import Engine
from fhir_mappings.knowledge import Knowledge

from .model import AuditPolicy, merge_summary, new_summary
from .patient import audit_patient
from .progress import peak_rss_mb
from .references import medication_reference, unique

PATIENTS_PER_PARTITION = 256
HASH_SPACE = 1 << 32

_worker: dict[str, Any] = {}  # this process's shard readers, engine, policy and Medication cache (init_evaluator)


def hash_ranges(partitions: int) -> list[tuple[int, int]]:
    step = math.ceil(HASH_SPACE / partitions)
    return [(low, min(low + step, HASH_SPACE)) for low in range(0, HASH_SPACE, step)]


def init_evaluator(shards: list[str], criteria_file: str | None, policy: AuditPolicy) -> None:
    _worker["readers"] = [sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True) for path in shards]
    _worker["engine"] = Engine(Knowledge.load(criteria_file))
    _worker["policy"] = policy
    _worker["medications"] = {}


def audit_partition(bounds: tuple[int, int]) -> tuple[list[dict], dict[str, Counter], float, float]:
    """Pass 2 on one hash range: merge the shards' patient-ordered lines, audit one patient at a time.
    Returns the rows, the counts, this worker's peak RSS (MB) and the CPU seconds spent."""
    low, high = bounds
    cpu_started = time.process_time()
    readers: list[sqlite3.Connection] = _worker["readers"]
    engine: Engine = _worker["engine"]
    policy: AuditPolicy = _worker["policy"]
    cursors = [conn.execute("SELECT h, patient, line FROM lines WHERE h >= ? AND h < ? ORDER BY h, patient", (low, high))
               for conn in readers]
    merged = heapq.merge(*cursors, key=lambda row: (row[0], row[1]))
    rows: list[dict] = []
    summary = new_summary()
    for _, group in groupby(merged, key=lambda row: (row[0], row[1])):
        resources = []
        for _, _, line in group:
            try:
                resources.append(msgspec.json.decode(line))
            except msgspec.DecodeError:
                summary["skipped_lines"]["not JSON"] += 1
        resources.extend(_referenced_medications(resources, readers))
        result = audit_patient(resources, engine, policy)
        rows.extend(result.rows)
        merge_summary(summary, result.summary)
    return rows, summary, peak_rss_mb(), time.process_time() - cpu_started


def _referenced_medications(resources: list[dict], readers: list[sqlite3.Connection]) -> list[dict]:
    cache: dict[str, dict | None] = _worker["medications"]
    found = []
    for resource in resources:
        target = medication_reference(resource)
        if target is None:
            continue
        medication_id = target.rstrip("/").split("/")[-1]
        if medication_id not in cache:
            if len(cache) > 10_000:
                cache.clear()
            cache[medication_id] = None
            for conn in readers:
                hit = conn.execute("SELECT line FROM refs WHERE type = 'Medication' AND id = ? LIMIT 1", (medication_id,)).fetchone()
                if hit:
                    cache[medication_id] = msgspec.json.decode(hit[0])
                    break
        if cache[medication_id] is not None:
            found.append(cache[medication_id])
    return unique(found)


def close_readers() -> None:
    for conn in _worker.pop("readers", []):
        conn.close()
