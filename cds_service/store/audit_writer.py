"""Audit writer: the hook hot path hands records to a queue; one thread writes them in batches."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

from .records import DecisionRecord

if TYPE_CHECKING:
    from . import Store

log = logging.getLogger("cds_service.store")  # the name it logged under when the store was one module


class AuditWriter:
    """Background batching of ``Store.record_decisions``.

    ``submit`` never blocks and never raises: when the queue is full, or when a batch cannot be
    written (database down or locked), the records are dropped, counted in ``dropped`` and
    logged (counts only, no patient data); cards keep being served."""

    def __init__(self, store: Store, *, max_queue: int = 10_000, batch_size: int = 200, max_delay_s: float = 0.2):
        self._store = store
        self._queue: queue.Queue[DecisionRecord] = queue.Queue(maxsize=max_queue)
        self._batch_size = batch_size
        self._max_delay_s = max_delay_s
        self._pending = 0  # submitted and not yet written or dropped
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._hurry = threading.Event()  # set by flush/close: write what is queued without waiting for more
        self.written = 0
        self.dropped = 0
        self.batches = 0
        self._last_drop_log = float("-inf")
        self._thread = threading.Thread(target=self._run, name="cds-audit-writer", daemon=True)
        self._thread.start()

    def submit(self, record: DecisionRecord) -> bool:
        """Queue a record; False when it was dropped (queue full or writer closed)."""
        try:
            if not self._stopping.is_set():
                with self._cond:
                    self._queue.put_nowait(record)
                    self._pending += 1
                return True
        except queue.Full:
            pass
        except Exception:  # noqa: BLE001 - the hot path must never fail because of the audit
            log.exception("audit submit failed")
        self._count_dropped(1, "audit queue full or writer closed")
        return False

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._pending > 0:
                self._hurry.set()
            while self._pending > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Flush, then stop the thread. Later submits are dropped. False if the flush timed out."""
        flushed = self.flush(timeout)
        self._stopping.set()
        self._thread.join(timeout=max(self._max_delay_s * 2, 0.5))
        return flushed

    def _run(self) -> None:
        while not (self._stopping.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._write(self._gather(first))

    def _gather(self, first: DecisionRecord) -> list[DecisionRecord]:
        """A batch: up to batch_size records. Unless a full batch is already queued (or a flush is waiting),
        the writer first sleeps max_delay_s while records accumulate: records arriving meanwhile do not wake
        it, so under load the thread asks for the GIL once per batch, not once per request."""
        if self._queue.qsize() + 1 < self._batch_size and not self._hurry.is_set():
            self._hurry.wait(self._max_delay_s)
        batch = [first]
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, batch: list[DecisionRecord]) -> None:
        try:
            self._store.record_decisions(batch)
            written = len(batch)
        except Exception as exc:  # noqa: BLE001 - StoreError or a bad record: drop, count, go on
            written = 0
            self._count_dropped(len(batch), f"audit batch not written ({type(exc).__name__})")
        with self._cond:
            self.written += written
            self.batches += 1
            self._pending -= len(batch)
            if self._pending == 0:
                self._hurry.clear()
            self._cond.notify_all()

    def _count_dropped(self, count: int, why: str) -> None:
        """Count dropped records; log the first drop and then at most one line per 10 seconds
        (counts and error classes only: a record holds clinical data, its text is never logged)."""
        with self._cond:
            self.dropped += count
            total = self.dropped
            now = time.monotonic()
            if now - self._last_drop_log < 10.0:
                return
            self._last_drop_log = now
        log.warning("%s: %d decision record(s) dropped, %d in total", why, count, total)
