"""The analytics page: the router over HTTP, then the page in headless Chromium against a real
uvicorn on loopback, over a SQLite store holding the known data set of test_report."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from browser_support import launch_chromium, screenshot_path, serve_app_on_loopback
from cds_service.analytics import STATIC, analytics_router
from cds_service.report import build_report
from cds_service.store import StoreError, open_store
from test_report import JANUARY, fill_known_dataset
from test_store import card, decision, overridden


@pytest.fixture
def store(tmp_path):
    opened = open_store(f"sqlite:///{tmp_path / 'analytics.db'}")
    fill_known_dataset(opened)
    yield opened
    opened.close()


def app_for(get_store) -> FastAPI:
    app = FastAPI()
    app.include_router(analytics_router(get_store))
    return app


def unavailable_store():
    raise StoreError("database sqlite:///x unavailable: OperationalError: database is locked")


# -- the router -------------------------------------------------------------------------------


def test_report_json_is_the_report_for_the_period(store):
    client = TestClient(app_for(lambda: store))
    response = client.get("/analytics/report.json", params={"since": "2026-01-01", "until": "2026-01-31"})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    expected = build_report(store, *JANUARY)
    assert {k: v for k, v in body.items() if k != "generated_at"} == {k: v for k, v in expected.items() if k != "generated_at"}
    assert client.get("/analytics/report.json", params={"since": "January"}).status_code == 422


def test_report_json_answers_503_when_the_store_is_unavailable():
    client = TestClient(app_for(unavailable_store))
    response = client.get("/analytics/report.json")
    assert response.status_code == 503
    assert "locked" not in response.text  # no internals in the answer


def test_page_is_self_contained_with_a_strict_content_security_policy(store):
    client = TestClient(app_for(lambda: store))
    page = client.get("/analytics")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<base href="/analytics/">' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    script = client.get("/analytics/assets/analytics.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "http" not in script.text.replace("http://www.w3.org/2000/svg", "")
    assert client.get("/analytics/assets/analytics.css").status_code == 200
    assert client.get("/analytics/assets/index.html").status_code == 404
    assert (STATIC / ".." / ".." / "app.py").is_file()  # the file a traversal would reach exists
    assert client.get("/analytics/assets/..%2F..%2Fapp.py").status_code == 404


def test_page_base_follows_the_root_path(store):
    client = TestClient(app_for(lambda: store), root_path="/cds")
    assert '<base href="/cds/analytics/">' in client.get("/analytics").text


# -- in Chromium ------------------------------------------------------------------------------


def open_page(browser, url: str, outside: list[str], errors: list[str]):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    base = url.split("/analytics")[0]

    def only_loopback(route):
        if route.request.url.startswith(base):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_loopback)
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    return page


def bar_values(page, section: str) -> dict[str, str]:
    return page.eval_on_selector_all(
        f"#{section} svg rect.bar",
        "bars => Object.fromEntries(bars.map(b => [b.dataset.label, b.dataset.value]))",
    )


def cell_rows(page, section: str) -> list[list[str]]:
    return page.eval_on_selector_all(
        f"#{section} table tbody tr", "rows => rows.map(r => [...r.children].map(c => c.textContent))"
    )


@pytest.mark.browser
def test_charts_and_numbers_appear_offline(store):
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    errors: list[str] = []
    with serve_app_on_loopback(app_for(lambda: store)) as base_url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = open_page(browser, f"{base_url}/analytics?since=2026-01-01&until=2026-01-31", outside, errors)
            page.wait_for_selector("#status.done", state="attached", timeout=10_000)

            assert bar_values(page, "card-types") == {
                "Cauda equina emergency": "0", "Imaging not indicated": "0.75", "Imaging indicated": "0.5",
            }
            assert page.get_attribute("#card-types svg", "role") == "img"
            assert "Imaging not indicated: 75.0% overridden, 3 of 4 cards shown" in page.text_content("#card-types svg desc")
            assert ["Imaging not indicated", "all", "4", "3", "75.0%", "1", "0", "1"] in cell_rows(page, "card-types")
            assert ["", "W1", "3", "3", "100.0%", "0", "0", "1"] in cell_rows(page, "card-types")

            assert bar_values(page, "reasons") == {
                "Imaging not indicated: Patient preference (patient-preference)": "2",
                "Imaging not indicated: (no coded reason)": "1",
                "Imaging not indicated: Clinical judgement (clinical-judgement)": "1",
                "Imaging indicated: Other (other)": "1",
            }
            assert bar_values(page, "weeks") == {"2026-W02": "0.6667", "2026-W03": "0.4"}
            assert cell_rows(page, "weeks") == [["2026-W02", "3", "2", "66.7%", "1", "0"],
                                                ["2026-W03", "5", "2", "40.0%", "2", "1"]]
            assert [row[3] for row in cell_rows(page, "comments")] == [
                "Seen by spine surgeon, wants MRI", "Ordered by neurosurgery", "who?"]
            assert ["Cauda equina emergency", "1", "1"] in cell_rows(page, "suggestions")
            summary = page.eval_on_selector_all(
                "#summary dt", "terms => Object.fromEntries(terms.map(t => [t.textContent, t.nextElementSibling.textContent]))")
            assert summary["Cards shown"] == "8" and summary["Overridden"] == "4 (50.0%)"
            assert page.input_value("#since") == "2026-01-01"
            page.screenshot(path=str(screenshot_path("analytics.png")), full_page=True)

            # The period form: clear the dates and show everything (December and February too).
            page.fill("#since", "")
            page.fill("#until", "")
            page.click("#period button")
            page.wait_for_selector("#status.done", state="attached", timeout=10_000)
            assert bar_values(page, "card-types")["Imaging not indicated"] == "0.6667"
            assert [row[0] for row in cell_rows(page, "weeks")] == ["2025-W51", "2026-W02", "2026-W03", "2026-W05"]
        finally:
            browser.close()
    assert outside == []
    assert errors == []


@pytest.mark.browser
def test_page_says_when_the_report_is_unavailable():
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    errors: list[str] = []
    with serve_app_on_loopback(app_for(unavailable_store)) as base_url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = open_page(browser, f"{base_url}/analytics", outside, errors)
            page.wait_for_selector("#status[role=alert]", timeout=10_000)
            assert "the report database is unavailable" in page.text_content("#status")
            assert page.is_hidden("#card-types")
        finally:
            browser.close()
    assert outside == []


@pytest.mark.browser
def test_clinician_text_is_shown_as_text_never_as_markup(tmp_path):
    from playwright.sync_api import sync_playwright

    hostile = '<img src=x onerror="document.title=\'pwned\'"><b>bold</b>'
    store = open_store(f"sqlite:///{tmp_path / 'hostile.db'}")
    store.record_decision(decision(card("c-1")))
    store.record_feedback("svc", [overridden("c-1", code=None, comment=hostile)])
    outside: list[str] = []
    errors: list[str] = []
    try:
        with serve_app_on_loopback(app_for(lambda: store)) as base_url, sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = open_page(browser, f"{base_url}/analytics", outside, errors)
                page.wait_for_selector("#status.done", state="attached", timeout=10_000)
                assert page.text_content("#comments td.comment") == hostile
                assert page.query_selector("#comments img") is None and page.query_selector("#comments b") is None
                assert page.title() != "pwned"
            finally:
                browser.close()
    finally:
        store.close()
    assert outside == []
