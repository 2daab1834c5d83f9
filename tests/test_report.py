"""The override report, from a known set of decisions and feedback, on SQLite and PostgreSQL.

The data set (January 2026; ISO week 2026-W02 starts Monday 5 January, W03 on the 12th):

    decision  when (UTC)          cards (type, rule, suggestions)            feedback
    D1        W02 Mon 10:00       n1 not-indicated W1 [n1s1 n1s2]            overridden patient-preference (+comment) ×2 (same item)
    D2        W02 Tue             n2 not-indicated W1 [n2s1]                 overridden patient-preference (no display);
                                                                              overridden clinical-judgement, later
    D3        W02 Wed             n3 not-indicated W2 [n3s1]                 accepted n3s1
    D4        W03 Mon             n4 not-indicated W1                        overridden, no reason, comment
    D5        W03 Tue             i1 indicated R1; c1 cauda C3 [c1s1]        i1 overridden "other" + comment; c1 accepted c1s1
    D6        W03 Wed, silent     n5 not-indicated W1, held back             -
    D7        W03 Wed, 412        -                                          -
    D9        W03 Thu             i2 indicated R2 [i2s1]                     accepted "not-a-suggestion"
    D10       W03 Sun 23:59:59    c2 cauda C1                                -
    D8        2025-12-20          n6 not-indicated W1                        overridden patient-preference   (before `since`)
    D11       2026-02-01 00:10    n7 not-indicated W1                        -                               (after `until`)
    -         -                   ghost (not audited)                        overridden, no reason, comment "who?"
"""

from __future__ import annotations

import argparse
import io
import json
from datetime import date, datetime, timezone

import pytest

from cds_service.report import build_report, main_report, render_table, shape_report
from cds_service.store import open_store
from test_store import accepted, card, database_url, decision, overridden  # noqa: F401 - database_url is a fixture

UTC = timezone.utc
JANUARY = (date(2026, 1, 1), date(2026, 1, 31))


def at(day: int, hour: int = 10, minute: int = 0, second: int = 0, month: int = 1, year: int = 2026) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def fill_known_dataset(store) -> None:
    nii, ind, cauda = "imaging-not-indicated", "imaging-indicated", "cauda-equina-emergency"
    for record in [
        decision(card("n1", nii, rule="W1", suggestions=("n1s1", "n1s2")), at=at(5)),
        decision(card("n2", nii, rule="W1", suggestions=("n2s1",)), at=at(6)),
        decision(card("n3", nii, rule="W2", suggestions=("n3s1",)), at=at(7)),
        decision(card("n4", nii, rule="W1"), at=at(12)),
        decision(card("i1", ind, rule="R1"), card("c1", cauda, rule="C3", suggestions=("c1s1",)), at=at(13)),
        decision(card("n5", nii, rule="W1", shown=False), at=at(14), mode="silent"),
        decision(at=at(14, 11), status=412),
        decision(card("i2", ind, rule="R2", suggestions=("i2s1",)), at=at(15)),
        decision(card("c2", cauda, rule="C1"), at=at(18, 23, 59, 59)),
        decision(card("n6", nii, rule="W1"), at=at(20, month=12, year=2025)),
        decision(card("n7", nii, rule="W1"), at=at(1, 0, 10, month=2)),
    ]:
        store.record_decision(record)
    preference = overridden("n1", display="Patient preference", comment="Patient anxious", at="2026-01-05T10:05:00Z")
    store.record_feedback("lumbar-imaging-order-sign", [
        preference,
        preference,
        overridden("n2", at="2026-01-06T10:05:00Z"),
        overridden("n2", code="clinical-judgement", display="Clinical judgement", at="2026-01-06T11:00:00Z"),
        accepted("n3", "n3s1", at="2026-01-07T10:01:00Z"),
        overridden("n4", code=None, comment="Seen by spine surgeon, wants MRI", at="2026-01-12T10:03:00Z"),
        overridden("i1", code="other", display="Other", comment="Ordered by neurosurgery", at="2026-01-13T10:02:00Z"),
        accepted("c1", "c1s1", at="2026-01-13T10:03:00Z"),
        accepted("i2", "not-a-suggestion", at="2026-01-15T10:01:00Z"),
        overridden("n6", at="2025-12-20T10:01:00Z"),
        overridden("ghost", code=None, comment="who?", at="2026-01-14T09:00:00Z"),
    ])


@pytest.fixture
def filled_url(database_url):
    store = open_store(database_url)
    fill_known_dataset(store)
    store.close()
    return database_url


@pytest.fixture
def january(filled_url):
    store = open_store(filled_url)
    try:
        yield build_report(store, *JANUARY)
    finally:
        store.close()


def by_type(report: dict) -> dict[str, dict]:
    return {entry["card_type"]: entry for entry in report["card_types"]}


def counts(entry: dict) -> tuple:
    return entry["shown"], entry["held_back"], entry["overridden"], entry["accepted"], entry["no_feedback"], entry["override_rate"]


def test_override_rate_per_card_type(january):
    types = by_type(january)
    assert list(types) == ["cauda-equina-emergency", "imaging-not-indicated", "imaging-indicated"]
    #                                                    shown held over acc  nofb  rate
    assert counts(types["imaging-not-indicated"]) == (4, 1, 3, 1, 0, 0.75)
    assert counts(types["imaging-indicated"]) == (2, 0, 1, 1, 0, 0.5)
    assert counts(types["cauda-equina-emergency"]) == (2, 0, 0, 1, 1, 0.0)
    assert counts(january["totals"]) == (8, 1, 4, 3, 1, 0.5)
    assert types["imaging-not-indicated"]["label"] == "Imaging not indicated"


def test_override_rate_per_rule(january):
    rules = {r["rule"]: counts(r) for r in by_type(january)["imaging-not-indicated"]["rules"]}
    assert rules == {"W1": (3, 1, 3, 0, 0, 1.0), "W2": (1, 0, 0, 1, 0, 0.0)}


def test_decisions_by_status(january):
    assert january["decisions"] == {"total": 9, "by_status": {"200": 8, "412": 1}}


def test_override_reasons_count_cards_and_match_on_system_and_code(january):
    reasons = [(r["card_type"], r["code"], r["display"], r["cards"], r["share_of_overrides"]) for r in january["override_reasons"]]
    assert reasons == [
        ("imaging-not-indicated", "patient-preference", "Patient preference", 2, 0.6667),
        ("imaging-not-indicated", None, None, 1, 0.3333),
        ("imaging-not-indicated", "clinical-judgement", "Clinical judgement", 1, 0.3333),
        ("imaging-indicated", "other", "Other", 1, 1.0),
    ]


def test_per_iso_week(january):
    weeks = [(w["week"], w["shown"], w["held_back"], w["overridden"], w["accepted"], w["no_feedback"], w["override_rate"])
             for w in january["weeks"]]
    assert weeks == [
        ("2026-W02", 3, 0, 2, 1, 0, 0.6667),
        ("2026-W03", 5, 1, 2, 2, 1, 0.4),
    ]
    w03 = january["weeks"][1]["card_types"]
    assert w03["imaging-indicated"]["override_rate"] == 0.5
    assert w03["cauda-equina-emergency"]["no_feedback"] == 1


def test_accepted_suggestions_are_joined_to_their_card_type(january):
    assert january["accepted_suggestions"] == [
        {"card_type": "cauda-equina-emergency", "suggestion": 1, "accepted": 1},
        {"card_type": "imaging-not-indicated", "suggestion": 1, "accepted": 1},
    ]
    assert january["unmatched_suggestions"] == 1  # i2's accepted id is not one of its suggestions


def test_comments_without_a_coded_reason_are_listed(january):
    comments = [(c["card_type"], c["reason_code"], c["comment"]) for c in january["comments_without_coded_reason"]]
    assert comments == [
        ("imaging-not-indicated", None, "Seen by spine surgeon, wants MRI"),
        ("imaging-indicated", "other", "Ordered by neurosurgery"),
        (None, None, "who?"),
    ]  # n1's comment came with a coded reason: not listed
    assert january["unlinked_feedback"] == 1


def test_period_bounds_select_cards_by_their_evaluation_day(filled_url):
    store = open_store(filled_url)
    try:
        everything = build_report(store)
        december = build_report(store, date(2025, 12, 1), date(2025, 12, 31))
        one_day = build_report(store, date(2026, 1, 18), date(2026, 1, 18))
    finally:
        store.close()
    assert counts(by_type(everything)["imaging-not-indicated"]) == (6, 1, 4, 1, 1, 0.6667)  # + n6 overridden, n7 silent
    assert [w["week"] for w in everything["weeks"]] == ["2025-W51", "2026-W02", "2026-W03", "2026-W05"]
    assert counts(december["totals"]) == (1, 0, 1, 0, 0, 1.0)
    assert counts(one_day["totals"]) == (1, 0, 0, 0, 1, 0.0)  # c2 at 23:59:59 UTC on the 18th
    assert (december["since"], december["until"]) == ("2025-12-01", "2025-12-31")


def test_empty_store_gives_an_empty_report_without_rates(database_url):
    store = open_store(database_url)
    try:
        report = build_report(store)
    finally:
        store.close()
    assert report["card_types"] == [] and report["weeks"] == []
    assert report["totals"]["override_rate"] is None
    assert "Override report" in render_table(report)


def test_report_has_no_patient_identifiers(january):
    text = json.dumps(january)
    assert "key-1" not in text  # the audit's patient key
    assert "ServiceRequest" not in text and "Condition/" not in text


def test_render_table_shows_the_numbers(january):
    text = render_table(january)
    assert "8 cards shown, 4 overridden (50.0%)" in text
    assert "Imaging not indicated" in text and "75.0%" in text
    assert "Patient preference (patient-preference)" in text
    assert "2026-W03" in text and "40.0%" in text
    assert "Ordered by neurosurgery" in text
    assert "Feedback about cards not in the audit: 1" in text


def test_command_line_json_and_tables(filled_url):
    out = io.StringIO()
    args = argparse.Namespace(json=True, since="2026-01-01", until="2026-01-31", database_url=filled_url)
    assert main_report(args, out) == 0
    report = json.loads(out.getvalue())
    assert report["totals"]["override_rate"] == 0.5

    out = io.StringIO()
    args = argparse.Namespace(json=False, since=date(2026, 1, 1), until=None, database_url=filled_url)
    assert main_report(args, out) == 0
    assert "Override report 2026-01-01 .. today" in out.getvalue()


def test_command_line_reports_an_unavailable_database(tmp_path, capsys):
    args = argparse.Namespace(json=False, since=None, until=None, database_url=f"sqlite:///{tmp_path / 'no' / 'such.db'}")
    assert main_report(args, io.StringIO()) == 2
    assert "cannot open the store" in capsys.readouterr().err


def test_shape_report_orders_unknown_card_types_last():
    raw = {
        "since": None, "until": None, "decisions_by_status": {},
        "cards_by_rule": [
            {"card_type": "zz-new-type", "rule": "X1", "cards": 1, "shown": 1, "overridden": 0, "accepted": 0, "no_feedback": 1},
            {"card_type": "imaging-indicated", "rule": "R1", "cards": 1, "shown": 1, "overridden": 1, "accepted": 0, "no_feedback": 0},
        ],
        "cards_by_week": [], "override_reasons": [], "accepted_suggestions": [], "unmatched_suggestions": 0,
        "comments": [], "unlinked_feedback": 0,
    }
    report = shape_report(raw)
    assert [t["card_type"] for t in report["card_types"]] == ["imaging-indicated", "zz-new-type"]
    assert report["card_types"][1]["label"] == "zz-new-type"
