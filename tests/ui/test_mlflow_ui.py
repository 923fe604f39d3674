"""The MLflow UI that `autotune ui` opens, in a real browser, on the quick-start study's runs."""

from __future__ import annotations

import json
import urllib.parse

import pytest

from tests.faults import free_port
from tests.ui.browser import Browser
from tests.ui.conftest import QuickStudy
from tests.ui.servers import Served

PARAMS = ["ep", "tp", "pp", "dp", "micro_batch_size", "precision"]
PAGE_S = 180  # a page of the MLflow UI on a loaded 2-core machine
ASSISTANT = '[data-assistant-ui="true"]'  # MLflow 3's assistant side panel, open on a first visit


@pytest.fixture(scope="module")
def ui(quick_study: QuickStudy):
    served = Served(["ui", "--port", str(free_port()), "--tracking-uri", quick_study.tracking_uri],
                    quick_study.folder)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def runs(quick_study: QuickStudy):
    import mlflow

    client = mlflow.MlflowClient(quick_study.tracking_uri)
    experiment = client.get_experiment_by_name("autotune-quickstart")
    all_runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in all_runs if r.info.run_name == f"study-{quick_study.name}")
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return experiment, parent, children


def lines(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines()}


def test_experiment_parent_and_child_runs_are_listed(ui, runs, browser: Browser):
    experiment, parent, children = runs
    browser.open(f"{ui.url}/#/experiments")
    browser.wait_for_all([experiment.name], PAGE_S)
    browser.screenshot("mlflow-experiments")
    browser.open(f"{ui.url}/#/experiments/{experiment.experiment_id}/runs")
    browser.wait_for_all([parent.info.run_name, f"{1 + len(children)} matching runs"], PAGE_S)
    # Child runs are folded under their parent until it is expanded.
    browser.click_near(parent.info.run_name, "button")
    browser.wait_for_all([c.info.run_name for c in children], PAGE_S)
    browser.screenshot("mlflow-runs")


def shows_a_trial(text: str) -> bool:
    """A trial's run page: its layout's params, its throughput and memory, and its status tag."""
    return {*PARAMS, "tokens_per_s", "peak_mem_bytes", "status"} <= lines(text)


def test_a_child_run_page_shows_its_layout_metrics_and_status(ui, runs, browser: Browser):
    experiment, _, children = runs
    run = next(c for c in children if c.data.tags.get("status") == "ok")
    browser.open(f"{ui.url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}")
    text = browser.wait_for(shows_a_trial, "the layout's params, tokens_per_s, peak_mem_bytes and the status tag",
                            PAGE_S)
    assert ": ok" in lines(text) and str(int(run.data.metrics["peak_mem_bytes"])) in lines(text)
    browser.screenshot("mlflow-run")


def test_the_run_page_check_fails_on_a_page_without_them(ui, runs, browser: Browser):
    """Test of the test: the study's parent run has no layout, metrics or status, and the check says so."""
    experiment, parent, _ = runs
    browser.open(f"{ui.url}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}")
    browser.wait_for_all([parent.info.run_name, "memory_cap"], PAGE_S)  # the page is there
    with pytest.raises(AssertionError, match="never showed the layout"):
        browser.wait_for(shows_a_trial, "the layout's params", timeout=5)


def test_the_compare_view_of_two_child_runs_renders(ui, runs, browser: Browser):
    experiment, _, children = runs
    # Two measured trials where there are (a busy machine may time one out), else any two.
    two = sorted(children, key=lambda c: c.data.tags.get("status") != "ok")[:2]
    assert len(two) == 2
    query = urllib.parse.urlencode({"runs": json.dumps([r.info.run_id for r in two]),
                                    "experiments": json.dumps([experiment.experiment_id])})
    browser.open(f"{ui.url}/#/compare-runs?{query}")
    browser.wait_for_all(["Comparing 2 Runs", *(r.info.run_name for r in two), "micro_batch_size"],
                         PAGE_S)
    # The parallel-coordinates plot of the two layouts drawn (Plotly's SVG), not its placeholder;
    # MLflow's assistant panel closed, as a user would, for the README's picture (docs/mlflow-compare.png).
    browser.wait_for_element(".js-plotly-plot .main-svg", "the parallel coordinates plot", PAGE_S)
    close = ASSISTANT + ' button[aria-label="Close"]'
    if browser.click_if_there(close):
        browser.wait_for_element_gone(close, "MLflow's assistant panel closing", 30)
    browser.screenshot("mlflow-compare")


def test_ui_printed_one_line_with_the_url(ui, quick_study: QuickStudy):
    # After every page above was served: uvicorn's and MLflow's lines went to the log.
    assert len(ui.lines) == 1 and ui.lines[0].startswith(f"MLflow UI on {ui.url} for sqlite:///"), ui.lines
    assert ui.stop() == 0
    log = (quick_study.folder / "autotune-runs" / "mlflow-ui.log").read_text()
    assert "Uvicorn running" in log or "uvicorn" in log.lower()
