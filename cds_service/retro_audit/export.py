"""An export folder audited on all cores: pass 1 (shards.py) and pass 2 (evaluate.py) mapped over a pool of
worker processes (spawned, so they import what they run), the rows written in partition order, so the
output is sorted by (patient hash, patient id) whatever the number of workers."""

from __future__ import annotations

import math
import multiprocessing
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from .evaluate import PATIENTS_PER_PARTITION, audit_partition, close_readers, hash_ranges, init_evaluator
from .model import AuditPolicy, AuditRun, merge_summary, new_summary
from .progress import progress_bar
from .shards import CHUNK_BYTES, close_shard_writer, export_files, index_shard, partition_chunk, plan_chunks
from .writers import ResultWriter

PARALLEL_PARTITION_BYTES = 64 * 1024 * 1024


def audit_export(source: Path, writer: ResultWriter, policy: AuditPolicy, workers: int, criteria_file: str | None = None,
                 tmp_dir: str | None = None, quiet: bool = True, chunk_bytes: int = CHUNK_BYTES) -> AuditRun:
    files = export_files(source)
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = new_summary()
    chunks, skipped_files = plan_chunks(files, chunk_bytes)
    for kind, size in skipped_files.items():
        summary["skipped_lines"][f"{kind} (file not read, bytes)"] += size
    total_bytes = sum(end - start for _, start, end in chunks)
    meta: dict[str, Any] = {"source": str(source), "files": len(files), "bytes": total_bytes, "workers": workers}
    with tempfile.TemporaryDirectory(prefix="lumbar-audit-", dir=tmp_dir) as work:
        tasks = [(path, start, end, work) for path, start, end in chunks]
        patients_seen = 0
        worker_peak = 0.0
        cpu: Counter = Counter()
        progress = progress_bar(quiet)
        # A pool costs ~0.4 s to start: partitioning runs in this process below PARALLEL_PARTITION_BYTES.
        pool = _pool(workers) if workers > 1 and len(tasks) > 1 and total_bytes >= PARALLEL_PARTITION_BYTES else None
        try:
            with progress:
                task = progress.add_task("Partitioning by patient", total=total_bytes or 1, unit="bytes")
                for stats in _map(pool, partition_chunk, tasks, ordered=False):
                    if pool is not None:
                        worker_peak = max(worker_peak, stats["peak_rss_mb"])
                        cpu["workers"] += stats["cpu_seconds"]
                    summary["counts"]["lines_read"] += stats["lines"]
                    summary["skipped_lines"].update(stats["skipped"])
                    patients_seen += stats["patients"]
                    progress.advance(task, stats["bytes"])
                if pool is None:
                    close_shard_writer()
                shards = sorted(str(p) for p in Path(work).glob("shard-*.db"))
                task = progress.add_task("Indexing", total=len(shards) or 1, unit="shards")
                for _ in _map(pool, index_shard, shards, ordered=False):
                    progress.advance(task)
        except BaseException:
            _stop(pool, failed=True)
            close_shard_writer()
            raise
        _stop(pool)
        close_shard_writer()
        partition_started = time.perf_counter()
        meta["partition_seconds"] = round(partition_started - started, 3)
        partitions = max(workers * 4, math.ceil(patients_seen / PATIENTS_PER_PARTITION), 1)
        ranges = hash_ranges(partitions)
        progress = progress_bar(quiet)
        if workers > 1 and shards:
            pool = _pool(workers, init_evaluator, (shards, criteria_file, policy))
        else:
            pool = None
            init_evaluator(shards, criteria_file, policy)
        try:
            with progress:
                task = progress.add_task("Evaluating orders", total=max(patients_seen, 1), unit="patients")
                for rows, part, peak, cpu_seconds in (_map(pool, audit_partition, ranges) if shards else ()):
                    if pool is not None:
                        cpu["workers"] += cpu_seconds
                        worker_peak = max(worker_peak, peak)
                    writer.write(rows)
                    merge_summary(summary, part)
                    progress.update(task, completed=min(summary["counts"]["patients"], max(patients_seen, 1)))
        except BaseException:
            _stop(pool, failed=True)
            raise
        finally:
            close_readers()
        _stop(pool)
        meta["evaluate_seconds"] = round(time.perf_counter() - partition_started, 3)
        meta["partitions"] = partitions
        meta["worker_peak_rss_mb"] = worker_peak
        cpu["main"] = time.process_time() - cpu_started  # reading, partitioning and evaluating when not in a pool; writing
        meta["cpu_seconds"] = {name: round(value, 3) for name, value in sorted(cpu.items())}
        meta["temp_bytes"] = sum(Path(s).stat().st_size for s in shards)
    meta["seconds"] = round(time.perf_counter() - started, 3)
    return AuditRun(summary, meta)


def _stop(pool, failed: bool = False) -> None:
    if pool is None:
        return
    if failed:
        pool.terminate()  # an error or Ctrl-C: do not wait for the queued work
    else:
        pool.close()
    pool.join()


def default_workers() -> int:
    """The cores this process may run on (the affinity mask in a container), else the machine's count."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()):
    # spawn: workers start clean (no inherited threads or locks), whatever the caller runs.
    return multiprocessing.get_context("spawn").Pool(workers, initializer=initializer, initargs=initargs)


def _map(pool, function: Callable, tasks: list, ordered: bool = True) -> Iterator:
    if pool is None:
        return map(function, tasks)
    return pool.imap(function, tasks) if ordered else pool.imap_unordered(function, tasks)
