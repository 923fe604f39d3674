"""`autotune dashboard` serves the quick-start study in optuna-dashboard; its trial table lists every trial."""

from __future__ import annotations

import optuna
import pytest

from autotune.search.searcher import RECORD_ATTR, open_storage
from tests.faults import free_port
from tests.ui.browser import Browser
from tests.ui.conftest import QuickStudy
from tests.ui.servers import Served

pytest.importorskip("optuna_dashboard", reason="optional: pip install 'autotune[ui]'")


@pytest.fixture(scope="module")
def dashboard(quick_study: QuickStudy):
    served = Served(["dashboard", quick_study.name, "--port", str(free_port())], quick_study.folder)
    yield served
    served.stop()


def test_trials_carry_what_the_dashboard_shows(quick_study: QuickStudy):
    storage = open_storage(str(quick_study.directory / "optuna.journal"))
    study = optuna.load_study(study_name=quick_study.name, storage=storage)
    recorded = [t for t in study.trials if RECORD_ATTR in t.user_attrs]
    assert recorded
    for t in recorded:
        assert {"layout_key", "status", "reason"} <= set(t.user_attrs), t.user_attrs
        if t.user_attrs["status"] != "invalid":  # a layout that breaks a rule has no prediction
            assert t.user_attrs["pred_peak_mem_mb"] > 0, t.user_attrs
        if t.user_attrs["status"] == "ok":
            assert t.user_attrs["peak_mem_mb"] > 0


def test_the_trial_list_shows_every_trial(dashboard, quick_study: QuickStudy, browser: Browser):
    assert len(dashboard.lines) == 1 and dashboard.lines[0].startswith(f"Optuna dashboard on {dashboard.url}")
    assert dashboard.url.startswith("http://127.0.0.1:")
    storage = open_storage(str(quick_study.directory / "optuna.journal"))
    trials = optuna.load_study(study_name=quick_study.name, storage=storage).trials
    browser.open(f"{dashboard.url}/trials")
    # The list of every trial, and the first one's details with autotune's attributes.
    text = browser.wait_for(
        lambda t: f"{len(trials)} Trials" in t and {f"Trial {tr.number}" for tr in trials} <= set(t.splitlines())
        and "User Attributes" in t, f"{len(trials)} Trials, each listed, and user attributes", timeout=180)
    first = trials[0].user_attrs
    assert f"status {first['status']}" in text, text[-3000:]
    assert "layout_key" not in first or f"layout_key {first['layout_key']}" in text, text[-3000:]
    browser.screenshot("dashboard-trials")
    assert dashboard.stop() == 0 and len(dashboard.lines) == 1, dashboard.lines
