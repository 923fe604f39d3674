"""Headless Chromium from Debian's packages (`chromium`, `chromium-driver`), driven by Selenium.

Nothing is downloaded at run time: the browser and its driver are the system's (.ci/run
installs them). The flags are the ones a root user in a container needs, plus everything that
would reach the network on its own turned off.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"  # git-ignored; CI keeps it
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1600,1000")


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing: apt-get install -y chromium chromium-driver (.ci/run does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is missing: pip install -e '.[test]'"
    return None


class Browser:
    """One Chromium with a fresh profile; pages are checked by their rendered text."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="autotune-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(60)

    def open(self, url: str) -> None:
        self.driver.get(url)

    def text(self) -> str:
        return self.driver.find_element("tag name", "body").text

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = 60.0) -> str:
        """The page's text once `check` accepts it; fails naming `what` and showing the page."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            try:
                text = self.text()
            except Exception:  # the page is being replaced
                text = ""
            if check(text):
                return text
            time.sleep(0.5)
        raise AssertionError(f"the page at {self.driver.current_url} never showed {what}; it showed:\n{text[:3000]}")

    def wait_for_all(self, needles: list[str], timeout: float = 60.0) -> str:
        """The page's text once it contains every one of `needles`."""
        try:
            return self.wait_for(lambda t: all(n in t for n in needles), f"all of {needles}", timeout)
        except AssertionError as exc:
            missing = [n for n in needles if n not in self.text()]
            raise AssertionError(f"{exc}\nmissing: {missing}") from None

    def console_errors(self) -> list[str]:
        """The page's console errors since the last call (failed loads, script errors)."""
        return [e["message"] for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def click_near(self, text: str, tag: str = "button") -> None:
        """Click the first `tag` in the smallest element around the one that reads `text`
        (a table row's expander, say)."""
        clicked = self.driver.execute_script(
            """const [text, tag] = arguments;
            const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_ELEMENT);
            let node;
            while ((node = walker.nextNode())) {
              if (node.children.length === 0 && node.textContent.trim() === text) {
                for (let up = node.parentElement; up; up = up.parentElement) {
                  const target = up.querySelector(tag);
                  if (target) { target.click(); return true; }
                }
              }
            }
            return false;""", text, tag)
        assert clicked, f"no {tag} near {text!r} on {self.driver.current_url}"

    def wait_for_element(self, css: str, what: str, timeout: float = 60.0) -> None:
        """Until an element matching `css` is on the page and has a size (a plot drawn, not its
        loading placeholder); fails naming `what`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            drawn = self.driver.execute_script(
                "const e = document.querySelector(arguments[0]);"
                "if (!e) return false; const r = e.getBoundingClientRect(); return r.width > 50 && r.height > 50;",
                css)
            if drawn:
                return
            time.sleep(0.5)
        raise AssertionError(f"the page at {self.driver.current_url} never drew {what} ({css})")

    def wait_for_element_gone(self, css: str, what: str, timeout: float = 30.0) -> None:
        """Until no element matching `css` takes room on the page (removed, or folded away)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.driver.execute_script(
                    "return [...document.querySelectorAll(arguments[0])].some(e => {"
                    "const r = e.getBoundingClientRect(); return r.width > 20 && r.height > 20; });", css):
                return
            time.sleep(0.3)
        raise AssertionError(f"the page at {self.driver.current_url} never showed {what}: {css} is still there")

    def click_if_there(self, css: str) -> bool:
        """Click the element matching `css` (a panel's close button, say); False when there is none."""
        return bool(self.driver.execute_script(
            "const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e;", css))

    def broken_images(self) -> list[str]:
        """Images that did not load (missing file, bad data URI)."""
        return self.driver.execute_script(
            "return [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))"
            ".map(i => (i.alt || '') + ' ' + i.src.slice(0, 60));")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="package")
def browser():
    why = missing()
    if why:
        pytest.skip(why)
    b = Browser()
    yield b
    b.close()
