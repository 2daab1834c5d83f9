"""Store tests: every test runs against SQLite (a temp file) and PostgreSQL (a fresh schema on
127.0.0.1:5432, marked ``postgres``). With CI set, a missing PostgreSQL fails the run; locally it
skips. CDS_TEST_POSTGRES_URL overrides the server URL."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from contextlib import closing, contextmanager
from datetime import datetime, timedelta, timezone
from typing import Iterator

import psycopg
import pytest

from cds_service import store as store_module
from cds_service.store import (
    AuditWriter,
    CardRecord,
    DecisionRecord,
    FeedbackResult,
    Store,
    StoreError,
    open_store,
    patient_key,
)

UTC = timezone.utc
POSTGRES_URL = os.environ.get("CDS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


# -- back-ends --------------------------------------------------------------------------------


def require_postgres() -> None:
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        message = f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def fresh_postgres_schema() -> Iterator[str]:
    """A URL whose search_path is a new, empty schema; the schema is dropped afterwards."""
    require_postgres()
    schema = f"cds_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """A URL to an empty database: a temp SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        with fresh_postgres_schema() as url:
            yield url


@pytest.fixture
def postgres_url():
    with fresh_postgres_schema() as url:
        yield url


@pytest.fixture
def store(database_url):
    opened = open_store(database_url)
    yield opened
    opened.close()


def rows(store: Store, sql: str, params: tuple = ()) -> list[tuple]:
    """Read the tables directly (the test looks under the interface on purpose)."""
    with store._transaction(write=False) as cur:
        return list(store._execute(cur, sql, params).fetchall())


# -- builders ---------------------------------------------------------------------------------


def card(uuid_: str, card_type: str = "imaging-not-indicated", *, rule: str = "W1", suggestions: tuple[str, ...] = (),
         shown: bool = True) -> CardRecord:
    return CardRecord(
        uuid=uuid_, card_type=card_type, indicator="warning", rule=rule, order_ref="ServiceRequest/mri-1",
        fact_ids=("NO-RED-FLAGS",), fact_refs=("Condition/lbp-1",), suggestion_uuids=suggestions, shown=shown,
    )


def decision(*cards: CardRecord, at: datetime | None = None, status: int = 200, mode: str = "live",
             patient: str | None = "key-1") -> DecisionRecord:
    return DecisionRecord(
        hook_instance=str(uuid.uuid4()), service_id="lumbar-imaging-order-sign", hook="order-sign",
        evaluated_at=at or datetime.now(UTC), patient_key=patient, mode=mode, knowledge_version="2026.1",
        status=status, cards=tuple(cards),
    )


def overridden(card_uuid: str, *, code: str | None = "patient-preference", display: str | None = None,
               comment: str | None = None, at: str = "2026-01-05T10:00:00Z") -> dict:
    reason: dict = {}
    if code:
        reason["reason"] = {"system": "http://example.org/override-reason", "code": code}
        if display:
            reason["reason"]["display"] = display
    if comment:
        reason["userComment"] = comment
    item = {"card": card_uuid, "outcome": "overridden", "outcomeTimestamp": at}
    if reason:
        item["overrideReason"] = reason
    return item


def accepted(card_uuid: str, *suggestions: str, at: str = "2026-01-05T10:00:00Z") -> dict:
    return {"card": card_uuid, "outcome": "accepted", "acceptedSuggestions": [{"id": s} for s in suggestions],
            "outcomeTimestamp": at}


def feedback_count(store: Store) -> int:
    return rows(store, "SELECT COUNT(*) FROM feedback")[0][0]


# -- schema -----------------------------------------------------------------------------------


def test_migrations_are_applied_once_and_rerun_is_a_no_op(database_url):
    first = open_store(database_url)
    secret = first.audit_secret
    assert first.schema_versions() == [1, 2, 3]
    assert first.migrate() == []
    first.close()

    again = open_store(database_url)
    assert again.schema_versions() == [1, 2, 3]
    assert again.audit_secret == secret  # created by the first migration only
    assert rows(again, "SELECT COUNT(*) FROM store_meta")[0][0] == 1
    again.close()


def test_workers_starting_together_migrate_once(database_url):
    stores: list[Store] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(open_store(database_url))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {s.audit_secret for s in stores} == {stores[0].audit_secret}
    assert stores[0].schema_versions() == [1, 2, 3]
    for s in stores:
        s.close()


# -- audit ------------------------------------------------------------------------------------


def test_decision_is_stored_with_its_cards_and_suggestions(store):
    store.record_decision(decision(card("c-1", suggestions=("s-1", "s-2")), card("c-2", "imaging-indicated", rule="R1")))

    assert rows(store, "SELECT status, mode, patient_key, iso_week FROM decisions")[0][:3] == (200, "live", "key-1")
    assert sorted(rows(store, "SELECT card_uuid, card_type, rule FROM cards")) == [
        ("c-1", "imaging-not-indicated", "W1"),
        ("c-2", "imaging-indicated", "R1"),
    ]
    assert rows(store, "SELECT suggestion_uuid, position FROM card_suggestions ORDER BY position") == [("s-1", 1), ("s-2", 2)]


def test_iso_week_is_that_of_the_utc_evaluation_time(store):
    # Sunday 2026-01-04 23:30 UTC is in ISO week 2026-W01; a minute after Monday 00:00 is W02.
    store.record_decision(decision(card("a"), at=datetime(2026, 1, 4, 23, 30, tzinfo=UTC)))
    store.record_decision(decision(card("b"), at=datetime(2026, 1, 4, 23, 1, tzinfo=timezone(timedelta(hours=-1)))))
    assert sorted(r[0] for r in rows(store, "SELECT iso_week FROM decisions")) == ["2026-W01", "2026-W02"]


def test_same_card_audited_twice_keeps_one_card(store):
    store.record_decision(decision(card("c-1", suggestions=("s-1",))))
    store.record_decision(decision(card("c-1", suggestions=("s-1",))))
    assert rows(store, "SELECT COUNT(*) FROM cards")[0][0] == 1
    assert rows(store, "SELECT COUNT(*) FROM decisions")[0][0] == 2


def test_one_batch_stores_every_decision_and_each_card_once_with_its_suggestions_in_order(store):
    store.record_decisions([
        decision(card("c-1", suggestions=("s-1", "s-2")), card("c-2")),
        decision(card("c-1", suggestions=("s-1", "s-2"))),  # the same hook call audited again in the batch
        decision(card("c-3", suggestions=("s-3",))),
        decision(status=412),
    ])
    assert rows(store, "SELECT COUNT(*) FROM decisions")[0][0] == 4
    assert sorted(r[0] for r in rows(store, "SELECT card_uuid FROM cards")) == ["c-1", "c-2", "c-3"]
    assert sorted(rows(store, "SELECT card_uuid, suggestion_uuid, position FROM card_suggestions")) == [
        ("c-1", "s-1", 1), ("c-1", "s-2", 2), ("c-3", "s-3", 1)]
    first_decision = rows(store, "SELECT MIN(id) FROM decisions")[0][0]
    assert rows(store, "SELECT decision_id FROM cards WHERE card_uuid = 'c-1'")[0][0] == first_decision


# -- patient key ------------------------------------------------------------------------------


def test_patient_key_is_keyed_and_never_the_id():
    key = patient_key("Patient/12345", "secret-a")
    assert len(key) == 32 and int(key, 16) >= 0
    assert "12345" not in key
    assert key == patient_key("Patient/12345", "secret-a")
    assert key != patient_key("Patient/12345", "secret-b")
    assert key != patient_key("Patient/12346", "secret-a")
    with pytest.raises(ValueError):
        patient_key("Patient/12345", "")


def test_store_patient_key_uses_the_database_secret_unless_a_key_is_configured(database_url, tmp_path):
    store = open_store(database_url)
    other = open_store(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        assert store.patient_key("p1") == patient_key("p1", store.audit_secret)
        assert store.patient_key("p1") != other.patient_key("p1")  # per-database secret
        assert store.patient_key("p1", "configured") == other.patient_key("p1", "configured") == patient_key("p1", "configured")
    finally:
        store.close()
        other.close()


# -- feedback ---------------------------------------------------------------------------------


def test_feedback_is_idempotent_on_its_natural_key(store):
    store.record_decision(decision(card("c-1", suggestions=("s-1", "s-2"))))
    items = [
        overridden("c-1", display="Patient preference"),
        overridden("c-1"),  # same reason without display (FB-07): the same item
        accepted("c-1", "s-1", "s-2"),
        accepted("c-1", "s-2", "s-1"),  # same suggestions in another order
        {**overridden("c-1"), "outcomeTimestamp": "2026-01-05T11:00:00+01:00"},  # same instant, other offset
    ]
    assert store.record_feedback("svc", items) == FeedbackResult(stored=2, duplicates=3, unknown_cards=0)
    assert store.record_feedback("svc", items) == FeedbackResult(stored=0, duplicates=5, unknown_cards=0)
    assert feedback_count(store) == 2
    assert rows(store, "SELECT COUNT(*) FROM feedback_suggestions")[0][0] == 2


def test_feedback_items_differing_in_key_fields_are_distinct(store):
    store.record_decision(decision(card("c-1", suggestions=("s-1", "s-2"))))
    result = store.record_feedback("svc", [
        overridden("c-1"),
        overridden("c-1", at="2026-01-05T10:00:01Z"),
        overridden("c-1", code="clinical-judgement"),
        accepted("c-1", "s-1"),
        accepted("c-1", "s-2"),
    ])
    assert result == FeedbackResult(stored=5, duplicates=0, unknown_cards=0)


def test_unknown_card_is_stored_flagged_and_linked_when_its_audit_arrives(store):
    result = store.record_feedback("svc", [overridden("ghost"), overridden("c-1")])
    assert result == FeedbackResult(stored=2, duplicates=0, unknown_cards=2)
    assert sorted(rows(store, "SELECT card_uuid, linked FROM feedback")) == [("c-1", False), ("ghost", False)]

    store.record_decision(decision(card("c-1")))  # the batched audit arrives after the feedback
    linked = {uuid_: bool(flag) for uuid_, flag in rows(store, "SELECT card_uuid, linked FROM feedback")}
    assert linked == {"c-1": True, "ghost": False}


def test_feedback_fields_are_kept(store):
    store.record_decision(decision(card("c-1")))
    store.record_feedback("lumbar-imaging-order-sign", [overridden("c-1", code="other", display="Other", comment="Spine surgeon asked")])
    assert rows(store, "SELECT service_id, outcome, reason_system, reason_code, reason_display, user_comment FROM feedback") == [
        ("lumbar-imaging-order-sign", "overridden", "http://example.org/override-reason", "other", "Other", "Spine surgeon asked")
    ]


def test_malformed_feedback_item_stores_nothing(store):
    with pytest.raises(ValueError):
        store.record_feedback("svc", [overridden("c-1"), {"card": "c-2", "outcome": "accepted", "outcomeTimestamp": "soon"}])
    assert feedback_count(store) == 0


DURABILITY_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from cds_service.store import open_store
    store = open_store(sys.argv[1])
    result = store.record_feedback("svc", [{"card": "c-durable", "outcome": "overridden",
                                            "outcomeTimestamp": "2026-01-05T10:00:00Z"}])
    assert result.stored == 1
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no interpreter shutdown
    """
)


def test_feedback_survives_sigkill_right_after_record_feedback_returns(database_url):
    open_store(database_url).close()  # schema in place before the child runs
    child = subprocess.run([sys.executable, "-c", DURABILITY_CHILD, database_url], capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()

    reopened = open_store(database_url)
    try:
        assert rows(reopened, "SELECT card_uuid, outcome FROM feedback") == [("c-durable", "overridden")]
    finally:
        reopened.close()


def test_sqlite_runs_in_wal_mode_with_full_synchronous_commits(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'wal.db'}")
    try:
        assert rows(store, "PRAGMA journal_mode") == [("wal",)]
        assert rows(store, "PRAGMA synchronous") == [(2,)]  # FULL
    finally:
        store.close()


WORKER_CHILD = textwrap.dedent(
    """
    import sys
    from datetime import datetime, timezone
    from cds_service.store import CardRecord, DecisionRecord, open_store
    store = open_store(sys.argv[1])
    worker = sys.argv[2]
    for i in range(40):
        uuid = f"{worker}-{i}"
        store.record_decision(DecisionRecord(uuid, "svc", "order-sign", datetime.now(timezone.utc), None, "live", "k", 200,
                                             (CardRecord(uuid, "imaging-not-indicated", "warning", "W1", None, (), (), ()),)))
        store.record_feedback("svc", [{"card": uuid, "outcome": "overridden", "outcomeTimestamp": "2026-01-05T10:00:00Z"}])
        assert store.remember_jti(f"jti-{i}", 4e9) in (True, False)
    store.close()
    """
)


def test_several_worker_processes_share_one_database(database_url):
    open_store(database_url).close()
    workers = [subprocess.Popen([sys.executable, "-c", WORKER_CHILD, database_url, f"w{n}"], stderr=subprocess.PIPE)
               for n in range(4)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr.decode()
    store = open_store(database_url)
    try:
        assert rows(store, "SELECT COUNT(*) FROM cards")[0][0] == 160
        assert rows(store, "SELECT COUNT(*) FROM feedback WHERE linked")[0][0] == 160
        assert rows(store, "SELECT COUNT(*) FROM jti_seen")[0][0] == 40
    finally:
        store.close()


# -- JWT replay cache -------------------------------------------------------------------------


def test_jti_is_new_once_until_it_expires(store):
    later = time.time() + 300
    assert store.remember_jti("https://ehr.example|jti-1", later) is True
    assert store.remember_jti("https://ehr.example|jti-1", later) is False
    assert store.remember_jti("https://ehr.example|jti-2", later) is True

    assert store.remember_jti("https://ehr.example|jti-old", time.time() - 1) is True
    assert store.remember_jti("https://ehr.example|jti-old", later) is True  # the earlier use had expired
    assert store.remember_jti("https://ehr.example|jti-old", later) is False


def test_jti_replay_is_caught_across_workers(database_url):
    stores = [open_store(database_url) for _ in range(4)]
    results: list[bool] = []
    barrier = threading.Barrier(len(stores))

    def use(s: Store) -> None:
        barrier.wait()
        results.append(s.remember_jti("iss|same-jti", time.time() + 60))

    threads = [threading.Thread(target=use, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert sorted(results) == [False, False, False, True]


# -- retention --------------------------------------------------------------------------------


def test_purge_removes_rows_older_than_the_retention(store, monkeypatch):
    old = datetime.now(UTC) - timedelta(days=400)
    store.record_decision(decision(card("old", suggestions=("old-s",)), at=old))
    store.record_decision(decision(card("new", suggestions=("new-s",))))
    monkeypatch.setattr(store_module, "_now", lambda: old)  # feedback received 400 days ago
    store.record_feedback("svc", [accepted("old", "old-s")])
    monkeypatch.undo()
    store.record_feedback("svc", [accepted("new", "new-s")])
    store.remember_jti("expired", time.time() - 10)
    store.remember_jti("live", time.time() + 300)

    # decision, card, suggestion, feedback, feedback suggestion of "old", and the expired jti
    assert store.purge(365) == 6
    assert rows(store, "SELECT card_uuid FROM cards") == [("new",)]
    assert rows(store, "SELECT card_uuid FROM feedback") == [("new",)]
    assert rows(store, "SELECT suggestion_uuid FROM card_suggestions") == [("new-s",)]
    assert rows(store, "SELECT suggestion_uuid FROM feedback_suggestions") == [("new-s",)]
    assert rows(store, "SELECT key FROM jti_seen") == [("live",)]
    assert store.purge(365) == 0
    with pytest.raises(ValueError):
        store.purge(-1)


# -- unavailable database ---------------------------------------------------------------------


def test_sqlite_locked_by_another_connection_raises_store_error(tmp_path):
    path = tmp_path / "locked.db"
    store = open_store(f"sqlite:///{path}", busy_timeout_s=0.2)
    store.record_decision(decision(card("c-1")))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="locked"):
            store.record_feedback("svc", [overridden("c-1")])
        assert time.monotonic() - started < 3
        with pytest.raises(StoreError):
            store.record_decision(decision(card("c-2")))
        with pytest.raises(StoreError):
            store.remember_jti("k", time.time() + 60)
        with pytest.raises(StoreError):
            store.purge(30)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # the lock is gone: the same store works again, nothing half-written
    assert store.record_feedback("svc", [overridden("c-1")]).stored == 1
    assert feedback_count(store) == 1
    store.close()


def test_sqlite_file_that_cannot_be_opened_raises_store_error(tmp_path):
    with pytest.raises(StoreError, match="missing-dir"):
        open_store(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.postgres
def test_postgres_on_a_closed_port_raises_store_error_without_the_password():
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{closed_port()}/test"
    with pytest.raises(StoreError) as caught:
        open_store(url, connect_timeout_s=2)
    message = str(caught.value)
    assert "s3cret-pw" not in message
    assert "127.0.0.1" in message and "***" in message


@pytest.mark.postgres
def test_postgres_connection_lost_raises_store_error_then_recovers(postgres_url):
    app_name = f"cds_lost_{uuid.uuid4().hex[:8]}"
    store = open_store(f"{postgres_url}&application_name={app_name}")
    try:
        store.record_decision(decision(card("c-1")))
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
            ).fetchall()
        assert killed == [(True,)]
        with pytest.raises(StoreError):
            store.record_feedback("svc", [overridden("c-1")])
        assert store.ping() is True  # a new connection replaced the broken one
        assert store.record_feedback("svc", [overridden("c-1")]).stored == 1
    finally:
        store.close()


def test_unsupported_url_raises_store_error_without_the_password():
    with pytest.raises(StoreError) as caught:
        open_store("mysql://root:hunter2@db/cds")
    assert "hunter2" not in str(caught.value)


def test_ping_and_closed_store(store):
    assert store.ping() is True
    store.close()
    assert store.ping() is False
    with pytest.raises(StoreError):
        store.record_feedback("svc", [overridden("c-1")])


# -- audit writer -----------------------------------------------------------------------------


class CountingStore:
    """Wraps a real store and counts the batches it is given."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.batch_sizes: list[int] = []

    def record_decisions(self, records) -> None:
        records = list(records)
        self.batch_sizes.append(len(records))
        self.inner.record_decisions(records)


def test_audit_writer_batches_and_writes_everything(store):
    counting = CountingStore(store)
    writer = AuditWriter(counting, batch_size=50, max_delay_s=0.3)
    for i in range(120):
        assert writer.submit(decision(card(f"c-{i}"))) is True
    assert writer.flush(10) is True
    writer.close()
    assert rows(store, "SELECT COUNT(*) FROM cards")[0][0] == 120
    assert sum(counting.batch_sizes) == 120 and len(counting.batch_sizes) <= 5
    assert max(counting.batch_sizes) == 50
    assert (writer.written, writer.dropped) == (120, 0)


def test_audit_writer_close_flushes_without_waiting_for_a_full_batch(store):
    writer = AuditWriter(store, max_delay_s=30)
    writer.submit(decision(card("c-1")))
    started = time.monotonic()
    assert writer.close() is True
    assert time.monotonic() - started < 3
    assert rows(store, "SELECT card_uuid FROM cards") == [("c-1",)]
    assert writer.submit(decision(card("c-2"))) is False  # closed: dropped, not raised
    assert writer.dropped == 1


def test_audit_writer_never_raises_when_the_database_is_locked(tmp_path, caplog):
    path = tmp_path / "audit.db"
    store = open_store(f"sqlite:///{path}", busy_timeout_s=0.1)
    writer = AuditWriter(store, max_delay_s=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        assert writer.submit(decision(card("c-1"), patient="secret-patient-key")) is True
        assert writer.flush(5) is True
        assert (writer.written, writer.dropped) == (0, 1)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert writer.submit(decision(card("c-2"))) is True  # the writer thread is still alive
    writer.close()
    assert writer.written == 1
    assert "dropped" in caplog.text and "secret-patient-key" not in caplog.text
    store.close()


def test_audit_writer_submit_never_blocks_when_the_queue_is_full():
    release = threading.Event()

    class StuckStore:
        def record_decisions(self, records) -> None:
            release.wait(10)

    writer = AuditWriter(StuckStore(), max_queue=2, batch_size=1, max_delay_s=0)
    try:
        started = time.monotonic()
        results = [writer.submit(decision(card(f"c-{i}"))) for i in range(20)]
        assert time.monotonic() - started < 0.5
        assert results.count(False) >= 17  # at most 1 in flight + 2 queued
        assert writer.dropped == results.count(False)
    finally:
        release.set()
        assert writer.close(5) is True


def test_audit_writer_survives_a_store_that_raises_anything():
    class BrokenStore:
        def record_decisions(self, records) -> None:
            raise RuntimeError("boom")

    writer = AuditWriter(BrokenStore(), max_delay_s=0)
    assert writer.submit(decision(card("c-1"))) is True
    assert writer.flush(5) is True
    assert writer.dropped == 1
    assert writer.submit(decision(card("c-2"))) is True
    writer.close()
    assert writer.dropped == 2


# -- the SQLite file deleted or replaced under a running store ------------------------------------


def feedback_cards(path) -> set[str]:
    """The feedback card uuids in the SQLite file at ``path``, read by a connection of its own."""
    with closing(sqlite3.connect(path)) as conn:
        return {row[0] for row in conn.execute("SELECT card_uuid FROM feedback")}


@pytest.mark.parametrize("deleted", [("", "-wal", "-shm"), ("",)], ids=["file-wal-shm", "file-only"])
def test_sqlite_file_deleted_under_the_store_is_restored_with_what_was_written_before_and_after(tmp_path, caplog, deleted):
    path = tmp_path / "store.db"
    store = open_store(f"sqlite:///{path}")
    try:
        store.record_decision(decision(card("c-before"), patient="secret-patient-key"))
        store.record_feedback("svc", [overridden("c-before")])
        shutil.copy(path, tmp_path / "main-only.db")  # the main file without its WAL
        with closing(sqlite3.connect(tmp_path / "main-only.db")) as conn:  # all so far, schema too, is in the WAL
            assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
        connection = store._pool._idle[0]
        store.record_feedback("svc", [overridden("c-before", at="2026-01-05T11:00:00Z")])
        assert store._pool._idle == [connection]  # file unchanged: the same connection, no reconnect

        for suffix in deleted:
            os.unlink(f"{path}{suffix}")
        with caplog.at_level(logging.WARNING, logger="cds_service.store"):
            store.record_decision(decision(card("c-after")))
            assert store.record_feedback("svc", [overridden("c-after")]).stored == 1

        assert feedback_cards(path) == {"c-before", "c-after"}  # another process sees the file at the path
        assert store._pool._idle[0] is not connection
    finally:
        store.close()
    assert feedback_cards(path) == {"c-before", "c-after"}
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert {row[0] for row in conn.execute("SELECT card_uuid FROM cards")} == {"c-before", "c-after"}
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"store sqlite:///{path}: the database file was missing; restored it from the open connection"]
    assert "secret-patient-key" not in caplog.text and "c-before" not in caplog.text
    assert not [p.name for p in tmp_path.iterdir() if ".restore-" in p.name]  # the copy was linked, then unlinked


@pytest.mark.parametrize("sidecars_left", [False, True], ids=["wal-shm-removed", "wal-shm-left"])
def test_sqlite_file_replaced_under_the_store_is_used_from_then_on(tmp_path, caplog, sidecars_left):
    path = tmp_path / "store.db"
    store = open_store(f"sqlite:///{path}")
    try:
        store.record_decision(decision(card("c-old-file")))
        store.record_feedback("svc", [overridden("c-old-file")])
        other = open_store(f"sqlite:///{tmp_path / 'other.db'}")
        other.record_decision(decision(card("c-other")))
        other.record_feedback("svc", [overridden("c-other")])
        other.close()

        os.replace(tmp_path / "other.db", path)
        if not sidecars_left:
            for suffix in ("-wal", "-shm"):
                os.unlink(f"{path}{suffix}")
        with caplog.at_level(logging.WARNING, logger="cds_service.store"):
            store.record_decision(decision(card("c-new")))
            store.record_feedback("svc", [overridden("c-new")])
        assert sorted(r[0] for r in rows(store, "SELECT card_uuid FROM feedback")) == ["c-new", "c-other"]
    finally:
        store.close()
    # The old connection's WAL frames, left at the path, were not read as pages of the new file.
    assert feedback_cards(path) == {"c-other", "c-new"}
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"store sqlite:///{path}: the database file was replaced; using the new file"]


def test_sqlite_file_that_cannot_be_restored_raises_store_error_and_is_restored_once_it_can(tmp_path):
    directory = tmp_path / "data"
    directory.mkdir()
    path = directory / "store.db"
    store = open_store(f"sqlite:///{path}")
    try:
        store.record_decision(decision(card("c-1")))
        store.record_feedback("svc", [overridden("c-1")])
        shutil.rmtree(directory)  # the file, its WAL and the directory the copy would go to
        with pytest.raises(StoreError, match="deleted and cannot be restored"):
            store.record_feedback("svc", [overridden("c-1", at="2026-01-05T11:00:00Z")])
        directory.mkdir()
        assert store.record_feedback("svc", [overridden("c-1", at="2026-01-05T12:00:00Z")]).stored == 1
    finally:
        store.close()
    with closing(sqlite3.connect(path)) as conn:
        assert sorted(row[0] for row in conn.execute("SELECT outcome_at FROM feedback")) == [
            "2026-01-05T10:00:00.000000+00:00", "2026-01-05T12:00:00.000000+00:00"]


def test_sqlite_memory_store_keeps_its_one_connection(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///:memory:")
    try:
        connection = store._pool._idle[0]
        store.record_decision(decision(card("c-1")))
        store.record_feedback("svc", [overridden("c-1")])
        assert rows(store, "SELECT card_uuid FROM feedback") == [("c-1",)]  # a new connection would be empty
        assert store._pool._idle == [connection]
    finally:
        store.close()
    assert list(tmp_path.iterdir()) == []
