"""The /demo page end to end in headless Chromium (Debian's, via Playwright for Python) against the
real service on loopback: every card type for its scenario, suggestions that remove, replace or
update the draft order, an override that posts feedback (checked in the store), signing with
order-sign, the request the page sends, the markdown renderer's escaping, keyboard use and contrast.
Screenshots go to test-artifacts/ (git-ignored)."""

from __future__ import annotations

import re
import sqlite3
import uuid
from datetime import date

import pytest
from playwright.sync_api import expect, sync_playwright

from browser_support import launch_chromium, screenshot_path, serve_app_on_loopback
from cds_service.app import create_app
from cds_service.settings import Settings

pytestmark = pytest.mark.browser

TODAY = date(2026, 3, 15)
MRI = "MRI lumbar spine without contrast (CPT 72148)"
SERVICE_PATH = "/cds-services/lumbar-imaging-order-select"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("demo-browser") / "demo.db"
    app = create_app(Settings(database_url=f"sqlite:///{db}", today=TODAY))
    with serve_app_on_loopback(app) as base_url:
        yield base_url, db


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    opened = context.new_page()
    problems: list[str] = []
    opened.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    opened.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    opened.goto(server[0] + "/")
    expect(opened).to_have_url(server[0] + "/demo")
    expect(opened.get_by_label("Demo patient")).to_be_enabled()
    yield opened
    context.close()
    assert not problems, problems  # no script error, no CSP violation, no failed load


def choose_patient(page, patient_id: str) -> None:
    page.get_by_label("Demo patient").select_option(patient_id)
    expect(page.locator("#patient-summary")).to_be_visible()
    expect(page.locator("#order-choices")).to_be_enabled()


def choose_order(page, name: str = MRI):
    page.get_by_role("radio", name=name).check()
    expect(page.locator("#cards").get_by_text(re.compile("^Cards on|^No cards$"))).to_be_visible()
    return page.locator("#cards article")


def feedback_rows(db) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT f.card_uuid, f.outcome, f.reason_system, f.reason_code, f.reason_display, f.user_comment, s.suggestion_uuid"
            " FROM feedback f LEFT JOIN feedback_suggestions s ON s.feedback_id = f.id ORDER BY f.id"
        ).fetchall()


def contrast(page, selector: str) -> float:
    """WCAG contrast ratio of an element's text colour on its background colour."""
    return page.eval_on_selector(selector, r"""(node) => {
        const rgb = (c) => c.match(/\d+(\.\d+)?/g).slice(0, 3).map(Number);
        const lum = ([r, g, b]) => [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
            .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
        let back = node;  // the first ancestor with an opaque background
        while (back && /^rgba\(.*,\s*0\)$|^transparent$/.test(getComputedStyle(back).backgroundColor)) back = back.parentElement;
        const [a, b] = [lum(rgb(getComputedStyle(node).color)), lum(rgb(back ? getComputedStyle(back).backgroundColor : 'rgb(255, 255, 255)'))];
        return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    }""")


# -- each card type for its scenario ---------------------------------------------------------------

CARD_SCENARIOS = [
    # (screenshot name, patient, order radio, simulated read failure, card type, indicator, badge colour)
    ("warning-not-indicated", "lbp-v01", MRI, "", "imaging-not-indicated", "warning", "rgb(245, 165, 36)"),
    ("info-indicated-fever", "lbp-v17", MRI, "", "imaging-indicated", "info", "rgb(31, 95, 168)"),
    ("critical-cauda-equina", "lbp-v30", MRI, "", "cauda-equina-emergency", "critical", "rgb(179, 38, 30)"),
    ("info-data-incomplete", "lbp-v01", MRI, "medicationStatements", "imaging-data-incomplete", "info", "rgb(31, 95, 168)"),
    ("record-cancer-history", "synth-hale", MRI, "", "imaging-indicated", "info", "rgb(31, 95, 168)"),
    ("record-failed-conservative-care", "synth-lindqvist", MRI, "", "imaging-indicated", "info", "rgb(31, 95, 168)"),
    ("record-steroids-and-fall", "synth-okafor", "X-ray lumbar spine, 2 or 3 views (CPT 72100)", "", "imaging-indicated", "info", "rgb(31, 95, 168)"),
]


@pytest.mark.parametrize("name, patient, order, failing, card_type, indicator, colour", CARD_SCENARIOS, ids=[s[0] for s in CARD_SCENARIOS])
def test_each_card_type_appears_for_its_scenario(page, name, patient, order, failing, card_type, indicator, colour):
    choose_patient(page, patient)
    if failing:
        page.locator("#developer > summary").click()
        page.get_by_label("Simulate an EHR read failure for the prefetch key").select_option(failing)
    cards = choose_order(page, order)
    expect(cards).to_have_count(1)
    card = cards.first
    expect(card).to_have_attribute("data-card-type", card_type)
    badge = card.locator(".badge")
    expect(badge).to_have_text({"critical": "Critical", "warning": "Warning", "info": "Info"}[indicator])  # not colour alone
    assert badge.evaluate("b => getComputedStyle(b).backgroundColor") == colour
    assert contrast(page, "#cards article .badge") >= 4.5
    assert contrast(page, "#cards article .card-summary") >= 4.5
    expect(card.locator(".card-source a")).to_have_attribute("href", re.compile("^https://"))
    expect(card.locator(".card-links a").first).to_have_attribute("rel", "noopener noreferrer")
    detail = card.locator("details.card-detail")
    if indicator == "critical":
        expect(detail).to_have_attribute("open", "")  # urgent: detail shown at once
    else:
        expect(detail.locator(".markdown")).to_be_hidden()  # summary first, detail on demand
        detail.locator("summary").click()
    expect(detail.locator(".markdown strong").first).to_be_visible()  # markdown rendered, not raw
    expect(page.locator("#cds-status")).to_contain_text("most urgent")
    page.screenshot(path=screenshot_path(f"demo-{name}.png"), full_page=True)


def test_no_cards_state_for_an_order_out_of_scope_and_for_a_child(page):
    choose_patient(page, "lbp-v38")
    choose_order(page, re.compile("^MRI brain"))  # the scenario's own order, offered beside the four
    expect(page.locator("#cards .no-cards")).to_contain_text("No cards")
    expect(page.locator("#cards article")).to_have_count(0)
    page.screenshot(path=screenshot_path("demo-no-cards.png"), full_page=True)
    choose_patient(page, "lbp-v39")
    choose_order(page)
    expect(page.locator("#cards .no-cards")).to_be_visible()


# -- suggestions ------------------------------------------------------------------------------------


def test_suggestion_removes_the_order_and_posts_accepted_feedback(page, server):
    choose_patient(page, "lbp-v01")
    card = choose_order(page).first
    drafts = page.locator("#draft-orders li")
    expect(drafts).to_have_count(1)
    button = card.get_by_role("button", name=re.compile("^Remove the MRI"))
    suggestion_uuid = button.get_attribute("data-suggestion")
    card_uuid = card.get_attribute("data-uuid")
    with page.expect_request(lambda r: r.url.endswith("/feedback") and r.method == "POST") as sent:
        button.click()
    body = sent.value.post_data_json
    item = body["feedback"][0]
    assert item["card"] == card_uuid and item["outcome"] == "accepted"
    assert item["acceptedSuggestions"] == [{"id": suggestion_uuid}]
    assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$", item["outcomeTimestamp"])
    expect(drafts).to_have_count(0)
    expect(page.get_by_role("button", name="Sign orders")).to_be_disabled()
    expect(page.get_by_role("radio", name=MRI)).not_to_be_checked()
    expect(card.locator(".card-outcome")).to_have_attribute("data-feedback", "sent")
    expect(card.locator(".card-outcome")).to_contain_text("Accepted")
    for other in card.locator(".card-buttons button").all():
        expect(other).to_be_disabled()  # at-most-one
    assert (card_uuid, "accepted", None, None, None, None, suggestion_uuid) in feedback_rows(server[1])
    page.screenshot(path=screenshot_path("demo-suggestion-removed.png"), full_page=True)


def test_suggestion_replaces_the_order_with_physiotherapy(page):
    choose_patient(page, "lbp-v01")
    card = choose_order(page).first
    card.get_by_role("button", name=re.compile("physiotherapy referral")).click()
    drafts = page.locator("#draft-orders li")
    expect(drafts).to_have_count(1)
    expect(drafts.first).to_contain_text("Physiotherapy referral")
    expect(page.locator("#draft-orders")).not_to_contain_text("MRI")
    assert drafts.first.get_attribute("data-order-id").startswith("demo-draft-")  # a new id for the created order


def test_suggestion_replaces_the_protocol_then_sign_fires_order_sign(page):
    choose_patient(page, "synth-hale")
    expect(page.locator("#patient-summary")).to_contain_text("Malignant neoplasm of prostate")
    card = choose_order(page).first
    card.get_by_role("button", name="Change to MRI lumbar spine without and with contrast").click()
    drafts = page.locator("#draft-orders li")
    expect(drafts).to_have_count(1)
    expect(drafts.first).to_have_attribute("data-code", "72158")
    with page.expect_request(lambda r: r.url.endswith("/cds-services/lumbar-imaging-order-sign")) as sent:
        page.get_by_role("button", name="Sign orders").click()
    request = sent.value.post_data_json
    assert request["hook"] == "order-sign" and "selections" not in request["context"]
    assert [e["resource"]["code"]["coding"][0]["code"] for e in request["context"]["draftOrders"]["entry"]] == ["72158"]
    signed_card = page.locator("#cards article")
    expect(signed_card).to_have_count(1)
    expect(page.locator("#cards .cards-heading")).to_contain_text("Cards on signing")
    expect(signed_card.first).to_have_attribute("data-card-type", "imaging-indicated")
    expect(page.locator("#sign-status")).to_contain_text("sign anyway")
    page.screenshot(path=screenshot_path("demo-sign-cards.png"), full_page=True)
    page.get_by_role("button", name="Sign anyway").click()
    expect(page.locator("#signed-orders li")).to_have_count(1)
    expect(page.locator("#draft-orders li")).to_have_count(0)
    expect(page.locator("#sign-status")).to_contain_text("Signed 1 order")


def test_critical_suggestion_makes_the_order_stat_and_adds_the_referral(page):
    choose_patient(page, "lbp-v30")
    card = choose_order(page).first
    expect(page.locator("#cds-alert")).to_contain_text("Critical: Possible cauda equina syndrome")
    card.get_by_role("button", name=re.compile("^Emergency MRI lumbar spine and same-day")).click()
    drafts = page.locator("#draft-orders li")
    expect(drafts).to_have_count(2)
    expect(drafts.first).to_contain_text("STAT")
    expect(drafts.nth(1)).to_contain_text("spinal surgery referral")
    page.screenshot(path=screenshot_path("demo-critical-accepted.png"), full_page=True)


def test_sign_without_cards_signs_at_once(page):
    choose_patient(page, "lbp-v38")
    choose_order(page, re.compile("^MRI brain"))
    page.get_by_role("button", name="Sign orders").click()
    expect(page.locator("#sign-status")).to_contain_text("Signed 1 order")
    expect(page.locator("#cards .no-cards")).to_contain_text("order-sign")


# -- override -----------------------------------------------------------------------------------------


def test_override_with_a_reason_posts_feedback(page, server):
    choose_patient(page, "lbp-v01")
    card = choose_order(page).first
    card_uuid = card.get_attribute("data-uuid")
    card.get_by_role("button", name="Override", exact=True).click()
    form = card.get_by_role("form")
    submit = form.get_by_role("button", name="Submit override")
    submit.click()
    expect(form.locator(".form-error")).to_contain_text("Choose a reason")  # nothing posted without a reason
    form.get_by_label("Surgery or injection candidate").check()
    comment = f"Seen by spine surgeon {uuid.uuid4().hex[:6]}; <b>not</b> HTML"
    form.get_by_label("Comment (optional)").fill(comment)
    page.screenshot(path=screenshot_path("demo-override-form.png"), full_page=True)
    with page.expect_response(lambda r: r.url.endswith("/feedback")) as answered:
        submit.click()
    response = answered.value
    assert response.status == 200 and response.json()["stored"] == 1
    item = response.request.post_data_json["feedback"][0]
    assert item["card"] == card_uuid and item["outcome"] == "overridden"
    assert item["overrideReason"] == {
        "reason": {"system": "https://lumbar-imaging-cds.example.org/fhir/CodeSystem/override-reason",
                   "code": "surgery-or-injection-candidate", "display": "Surgery or injection candidate"},
        "userComment": comment,
    }
    outcome = card.locator(".card-outcome")
    expect(outcome).to_contain_text("Overridden: Surgery or injection candidate")
    expect(outcome).to_contain_text("Feedback sent")
    expect(outcome).to_be_focused()
    assert (card_uuid, "overridden", item["overrideReason"]["reason"]["system"], "surgery-or-injection-candidate",
            "Surgery or injection candidate", comment, None) in feedback_rows(server[1])
    page.screenshot(path=screenshot_path("demo-overridden.png"), full_page=True)


def test_a_card_overridden_at_selection_is_marked_on_signing(page):
    choose_patient(page, "lbp-v01")
    card = choose_order(page).first
    card.get_by_role("button", name="Override", exact=True).click()
    card.get_by_label("Red flag present but not recorded in the chart").check()
    with page.expect_response(lambda r: r.url.endswith("/feedback")):
        card.get_by_role("button", name="Submit override").click()
    page.get_by_role("button", name="Sign orders").click()
    expect(page.locator("#cards .cards-heading")).to_contain_text("Cards on signing")
    expect(page.locator("#cards article .card-repeat")).to_contain_text("overridden (Red flag present but not recorded in the chart)")


# -- the request, the renderer, the keyboard -------------------------------------------------------------


def test_order_select_request_is_what_an_ehr_sends(page, server):
    choose_patient(page, "synth-hale")
    with page.expect_request(lambda r: r.url.endswith(SERVICE_PATH)) as sent:
        choose_order(page)
    request = sent.value.post_data_json
    assert request["hook"] == "order-select"
    assert uuid.UUID(request["hookInstance"]).version == 4
    context = request["context"]
    assert context["userId"] == "Practitioner/demo-clinician" and context["patientId"] == "synth-hale"
    draft = context["draftOrders"]["entry"][0]["resource"]
    assert context["selections"] == [f"ServiceRequest/{draft['id']}"]
    assert draft["status"] == "draft" and draft["code"]["coding"][0]["code"] == "72148"
    discovery = page.evaluate("fetch('../cds-services').then(r => r.json())")
    templates = next(s for s in discovery["services"] if s["hook"] == "order-select")["prefetch"]
    prefetch = request["prefetch"]
    assert set(prefetch) == set(templates)
    assert prefetch["patient"]["resourceType"] == "Patient" and prefetch["patient"]["id"] == "synth-hale"
    record = page.evaluate("fetch('patients/synth-hale').then(r => r.json())")
    for key, kind in (("conditions", "Condition"), ("observations", "Observation"), ("medicationRequests", "MedicationRequest"),
                      ("procedures", "Procedure"), ("serviceRequests", "ServiceRequest")):
        sent_ids = sorted(e["resource"]["id"] for e in prefetch[key]["entry"])
        assert prefetch[key]["type"] == "searchset"
        assert sent_ids == sorted(e["resource"]["id"] for e in record["entry"] if e["resource"]["resourceType"] == kind), key
    assert prefetch["medicationStatements"] is None  # no data: null, not absent
    assert not any(e["resource"]["resourceType"] in ("Encounter", "Immunization") for v in prefetch.values() if v and "entry" in v for e in v["entry"])


def test_markdown_renderer_escapes_html_and_unsafe_links(page):
    html = page.evaluate("""() => {
        const box = document.createElement('div');
        box.appendChild(CdsMarkdown.render(
          '# Head\\n\\n<img src=x onerror="window.pwned=1"> **bold** *em* `code <b>`\\n' +
          '[bad](javascript:alert(1)) [good](https://example.org/a_b) <script>alert(1)</script>\\n\\n' +
          '- one\\n- two\\n  - nested\\n\\n1. first\\n2. second\\n\\n| a | b |\\n|---|--:|\\n| 1 | 2 |\\n\\n> quote\\n\\n```\\n<i>x</i>\\n```'));
        return box.innerHTML;
    }""")
    assert "<img" not in html and "<script" not in html and "<i>" not in html and "<b>" not in html
    assert "&lt;img src=x onerror=" in html and "&lt;script&gt;" in html
    assert "<h4>Head</h4>" in html and "<strong>bold</strong>" in html and "<em>em</em>" in html
    assert "<code>code &lt;b&gt;</code>" in html
    assert 'href="javascript' not in html and "<span>bad</span>" in html
    assert '<a href="https://example.org/a_b" target="_blank" rel="noopener noreferrer">good</a>' in html
    assert "<ul><li>one</li><li>two<ul><li>nested</li></ul></li></ul>" in html
    assert "<ol><li>first</li><li>second</li></ol>" in html
    assert '<th scope="col">a</th>' in html and '<td class="align-right">2</td>' in html
    assert "<blockquote><p>quote</p></blockquote>" in html and "<pre><code>&lt;i&gt;x&lt;/i&gt;</code></pre>" in html
    assert page.evaluate("window.pwned") is None


def test_keyboard_only_flow(page):
    select = page.get_by_label("Demo patient")
    select.focus()
    select.select_option("lbp-v01")  # what a keyboard user does with the native list
    expect(page.locator("#patient-summary")).to_be_visible()
    radio = page.get_by_role("radio", name=MRI)
    radio.focus()
    page.keyboard.press("Space")
    card = page.locator("#cards article").first
    expect(card).to_be_visible()
    override = card.get_by_role("button", name="Override", exact=True)
    override.focus()
    page.keyboard.press("Enter")
    expect(override).to_have_attribute("aria-expanded", "true")
    first_reason = card.get_by_label("Red flag present but not recorded in the chart")
    expect(first_reason).to_be_focused()  # focus moves into the form
    page.keyboard.press("Space")
    expect(first_reason).to_be_checked()
    cancel = card.get_by_role("button", name="Cancel")
    cancel.focus()
    page.keyboard.press("Enter")
    expect(override).to_be_focused()  # and back to the button that opened it
    suggestion = card.get_by_role("button", name=re.compile("physiotherapy referral"))
    suggestion.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#draft-orders")).to_contain_text("Physiotherapy referral")
    page.keyboard.press("Tab")
    focused = page.evaluate("document.activeElement && document.activeElement.tagName")
    assert focused in ("BUTTON", "A", "SUMMARY", "BODY")
