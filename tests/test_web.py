"""The web page at the gateway's `/`, in a real headless browser (Debian's chromium driven by
Playwright): pick an image, ask twice (the answer streams in; the second is a cache hit), run the
moderation checks; a screenshot is saved in the test's tmp dir. The API token stays in sessionStorage."""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import pytest

from conftest import make_image

QUESTIONS = ["What is in this picture?", "What colour is it?"]
WATCH_ANSWERS = """() => {
  window.textChanges = 0;
  new MutationObserver((records) => { window.textChanges += records.length; })
    .observe(document.getElementById("answers"), {subtree: true, childList: true, characterData: true});
}"""

RECORD_CSP_VIOLATIONS = """window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => window.cspViolations.push(e.violatedDirective));"""


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not on PATH: apt-get install chromium (.ci/run installs it)")
    return path


@contextmanager
def open_page(stack):
    """(browser, page): Debian's chromium on the stack's page, CSP violations recorded, the model shown."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.add_init_script(RECORD_CSP_VIOLATIONS)
            page.goto(stack.http_url.removesuffix("/v1") + "/")
            page.wait_for_function("() => document.getElementById('model').textContent === 'qwen2_vl'")
            yield browser, page
        finally:
            browser.close()


@pytest.mark.parametrize("stack", ["qwen2_vl"], indirect=True)
def test_page_uploads_asks_twice_streams_and_moderates(stack, tmp_path):
    data = make_image(210, 160, seed=71)
    (tmp_path / "photo.png").write_bytes(data)
    with open_page(stack) as (browser, page):
        page.set_input_files("#file", str(tmp_path / "photo.png"))
        page.wait_for_function("() => !document.getElementById('ask').disabled")  # uploaded
        assert page.locator("#preview").is_visible()
        page.fill("#max-tokens", "24")
        page.evaluate(WATCH_ANSWERS)
        for n, question in enumerate(QUESTIONS, 1):
            page.fill("#question", question)
            page.click("#ask")
            page.wait_for_function(f"() => document.querySelectorAll('.answer .stats .hit, .answer .stats .miss')"
                                   f".length === {n}")
        answers = page.locator(".answer")  # newest first
        texts = [answers.nth(i).locator(".text").inner_text() for i in (1, 0)]
        assert answers.nth(1).locator(".stats .miss").count() == 1  # the first question encoded the image
        assert answers.nth(0).locator(".stats .hit").count() == 1  # the second: a cache hit
        assert "TTFT" in answers.nth(0).locator(".stats").inner_text()
        assert page.evaluate("window.textChanges") > 2 * len(QUESTIONS) + 4  # text arrived piece by piece
        page.click("#moderate")
        page.wait_for_selector("table.checks")
        rows = page.locator("table.checks tr")
        assert rows.count() == 3  # header + the two default checks
        assert rows.nth(1).locator("td").nth(1).inner_text().split()[0] in ("safe", "unsafe", "unsure")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        assert page.evaluate("window.cspViolations") == []  # the page works under its Content-Security-Policy
        # the API token: kept for the tab (sessionStorage), never in localStorage
        page.fill("#token", "vls_session-only")
        page.dispatch_event("#token", "change")
        assert page.evaluate("sessionStorage.getItem('vlsplit-token')") == "vls_session-only"
        assert page.evaluate("localStorage.getItem('vlsplit-token')") is None
        page.evaluate("localStorage.setItem('vlsplit-token', 'vls_left-by-an-old-page')")
        page.reload()
        page.wait_for_function("() => document.getElementById('model').textContent === 'qwen2_vl'")
        assert page.input_value("#token") == "vls_session-only"  # the same tab: still there
        assert page.evaluate("localStorage.getItem('vlsplit-token')") is None
        fresh = browser.new_page()  # another tab (a new session): no token
        fresh.goto(stack.http_url.removesuffix("/v1") + "/")
        assert fresh.input_value("#token") == ""
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert texts == [stack.ask(data, q, max_new_tokens=24).text for q in QUESTIONS]  # what gRPC answers
