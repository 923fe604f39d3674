"""The quick-start study's `report.html` in a real browser: it renders, and says what report.json says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.ui.browser import Browser
from tests.ui.conftest import QuickStudy


def check_report(browser: Browser, html: Path, data: dict, timeout: float = 30) -> None:
    """What a reader relies on: every plot shows, no script or load error, and the best layout
    with its tokens/s as report.json has them."""
    browser.console_errors()  # earlier pages' messages
    browser.open(html.as_uri())
    best = data["best"]
    tokens = f"{best['performance']['tokens_per_s']:,.0f} tokens/s"
    text = browser.wait_for_all(["Best layout", best["key"], tokens], timeout=timeout)
    assert re.search(rf"Trial #{best['number']}\D.*{re.escape(best['key'])}", text), "best trial and layout apart"
    assert browser.driver.execute_script("return document.images.length") > 0, "the report has no plot"
    assert browser.broken_images() == [], "broken images"
    assert browser.console_errors() == [], "console errors"


@pytest.fixture(scope="module")
def report(quick_study: QuickStudy) -> tuple[Path, dict]:
    folder = quick_study.directory / "report"
    return folder / "report.html", json.loads((folder / "report.json").read_text())


def test_report_html_renders_and_matches_report_json(report, browser: Browser):
    html, data = report
    assert data["best"] is not None
    check_report(browser, html, data)
    browser.screenshot("report")


@pytest.mark.parametrize("damage", ["other best layout", "broken plot", "script error"])
def test_the_report_check_fails_on_a_damaged_report(report, browser: Browser, tmp_path, damage):
    """Test of the test: each check fails when the page lacks what it looks for."""
    html, data = report
    text = html.read_text()
    if damage == "other best layout":
        data = {**data, "best": {**data["best"], "key": "EP9_TP9_PP9_DP9/mb9/fp32/none/1f1b"}}
    elif damage == "broken plot":
        text = text.replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1)
    else:
        text = text.replace("</body>", "<script>undefined_function()</script></body>")
    damaged = tmp_path / "report.html"
    damaged.write_text(text)
    with pytest.raises(AssertionError):  # a local static page is whole once loaded: no need to wait long
        check_report(browser, damaged, data, timeout=3)
