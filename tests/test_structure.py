"""The package's shape as the design states it: stage packages in the order data flows, each
importing only from stages to its left; no import cycles anywhere in autotune/ and trainables/;
no module over 500 lines; the trainables know autotune only by its metric schema.

Imports are read from the source (every `import`, at any depth, TYPE_CHECKING ones too), so a
function-level import that climbs back up the order fails here as a top-level one would."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("architecture", ROOT / "docs" / "architecture.py")
arch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arch)
STAGES, LEAVES, SHARED = arch.STAGES, set(arch.LEAVES), set(arch.SHARED)
MAX_LINES = 500
MODULES = {**arch.modules("autotune"), **arch.modules("trainables")}
GRAPH = arch.import_graph()


def _rank(module: str) -> float | None:
    """Where a module of autotune/ stands in the order (None: the package itself, trainables)."""
    parts = module.split(".")
    if parts[0] != "autotune" or len(parts) == 1:
        return None
    if module in LEAVES:
        return 0
    if module in SHARED:
        return 1.5
    if parts[1] in STAGES:
        return 1 + STAGES.index(parts[1])
    raise AssertionError(f"{module}: not in a stage package nor named as shared; place it in one of {STAGES}")


def test_every_module_stands_in_a_stage_or_is_named_shared():
    for module in MODULES:
        _rank(module)


def test_no_import_cycles():
    """Depth-first search for a back edge; the failure names the whole loop."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                loop = path[path.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(loop))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_stages_import_only_from_their_left():
    climbs = []
    for m, targets in GRAPH.items():
        rm = _rank(m)
        for t in targets:
            rt = _rank(t)
            if rm is not None and rt is not None and rt > rm:
                climbs.append(f"{m} -> {t}")
    assert not climbs, f"imports that climb back up the order {STAGES}: {climbs}"


def test_trainables_know_autotune_only_by_its_metric_schema():
    """A trial is a plain program, run and debugged alone with torchrun."""
    bad = [f"{m} -> {t}" for m, ts in GRAPH.items() if m.startswith("trainables")
           for t in ts if t.startswith("autotune") and t != "autotune.schema"]
    assert not bad


def test_no_module_over_500_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by responsibility: {long}"


def test_every_stage_package_says_what_it_holds():
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((ROOT / "autotune" / stage / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 1, f"autotune/{stage}/__init__.py: one line saying what it holds"


def test_the_check_sees_a_cycle_and_a_climb(tmp_path, monkeypatch):
    """The checks above can fail: a cycle and a climb planted in a copy of the graph are found."""
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph["autotune.space.layout"].add("autotune.cli.main")
    monkeypatch.setattr(__import__(__name__, fromlist=["GRAPH"]), "GRAPH", graph)
    with pytest.raises(AssertionError):
        test_stages_import_only_from_their_left()
    with pytest.raises(pytest.fail.Exception):
        test_no_import_cycles()


def test_the_architecture_picture_is_drawn_from_the_code_as_it_is():
    """docs/architecture.dot is what `python docs/architecture.py` writes from today's imports."""
    assert (ROOT / "docs" / "architecture.dot").read_text() == arch.dot(GRAPH), (
        "the stages' imports changed: run `python docs/architecture.py` and commit docs/architecture.*")
