"""Headless Chromium and a loopback server for browser tests (analytics page, demo page).

    with serve_app_on_loopback(app) as base_url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page()
        page.goto(base_url + "/analytics")
        ...
        browser.close()

Chromium is Debian's package (/usr/bin/chromium; CDS_TEST_CHROMIUM overrides the path), driven by
Playwright for Python; `playwright install` is never used. Without Chromium the test skips
locally and fails when CI is set. Mark such tests ``@pytest.mark.browser``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ContextManager

import pytest

from server_support import serve_in_thread

CHROMIUM_PATH = os.environ.get("CDS_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def require_chromium() -> None:
    if Path(CHROMIUM_PATH).is_file():
        return
    message = f"Chromium not found at {CHROMIUM_PATH} (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def launch_chromium(playwright: Any, **options: Any) -> Any:
    """A headless Chromium Browser from a sync_playwright() instance; close it when done."""
    require_chromium()
    return playwright.chromium.launch(executable_path=CHROMIUM_PATH, args=CHROMIUM_ARGS, headless=True, **options)


def serve_app_on_loopback(app: Any, *, startup_timeout_s: float = 10.0) -> ContextManager[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) in a background thread, quietly (warnings
    only, no access log); yields the base URL (http://127.0.0.1:PORT) and stops the server on exit."""
    return serve_in_thread(app, startup_timeout_s=startup_timeout_s, log_level="warning", access_log=False)


def screenshot_path(name: str) -> Path:
    """test-artifacts/<name> (git-ignored), the directory created if needed."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name
