"""Bad input through the real command line: one `error:` line naming the field, exit 2, no traceback, nothing written.

Every case runs in-process (typer's CliRunner, fast) in an empty working directory; a handful also run as a real
`python -m autotune.cli` subprocess. Exit codes: 2 for a wrong file or command line, 1 when a well-formed space
screens to no fitting layout (see the `autotune.space.spec` docstring).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from autotune.cli.main import app

REPO = Path(__file__).resolve().parents[3]

BASE = """\
model:
  preset: tiny
cluster:
  ranks: 4
  device: cpu
  memory_gb: 1.0
search:
  ep: [1, 2]
  tp: [1]
  pp: [1]
  dp: auto
  world_sizes: [1, 2, 4]
  micro_batch_size: [2]
  global_batch_size: 16
  seq_len: 64
  precision: [fp32]
  recompute: [none]
objective:
  memory_cap: 0.9
budget:
  trials: 4
  warmup_steps: 1
tracking:
  experiment: errors
study:
  name: errors
"""


def edit(old: str, new: str) -> str:
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


@dataclass(frozen=True)
class Case:
    id: str
    write: Callable[[Path], list[str]]  # creates its files in the working directory, returns the argv
    expect: tuple[str, ...]  # each must appear in the error line (or, for usage errors, in the output)
    code: int = 2
    usage: bool = False  # a command-line usage error: typer's short usage block instead of one line
    root_skips: bool = False  # meaningless as root (root reads any file)


def space(text: str | bytes, name: str = "space.yaml") -> Callable[[Path], list[str]]:
    def write(cwd: Path) -> list[str]:
        p = cwd / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["validate", name]
    return write


def case(id: str, text: str | bytes, *expect: str, code: int = 2) -> Case:
    return Case(id, space(text), expect, code)


def _big(cwd: Path) -> list[str]:
    with (cwd / "big.yaml").open("wb") as f:
        f.write(BASE.encode())
        f.write(b"# padding\n" * 5_000_000)  # 50 MB
    return ["validate", "big.yaml"]


def _directory(cwd: Path) -> list[str]:
    (cwd / "spaces").mkdir()
    return ["validate", "spaces"]


def _fifo(cwd: Path) -> list[str]:
    os.mkfifo(cwd / "pipe.yaml")
    return ["validate", "pipe.yaml"]


def _unreadable(cwd: Path) -> list[str]:
    p = cwd / "space.yaml"
    p.write_text(BASE)
    p.chmod(0)
    return ["validate", "space.yaml"]


def _args(*argv: str, with_space: bool = True) -> Callable[[Path], list[str]]:
    def write(cwd: Path) -> list[str]:
        if with_space:
            (cwd / "space.yaml").write_text(BASE)
        return list(argv)
    return write


_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [" + ", ".join([f"*{p}"] * 10) + "]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True))

CASES: list[Case] = [
    # --- the file itself
    Case("file-missing", _args("validate", "nope.yaml", with_space=False), ("nope.yaml", "no such file")),
    Case("file-directory", _directory, ("spaces", "is a directory")),
    Case("file-fifo", _fifo, ("pipe.yaml", "not a regular file")),
    Case("file-unreadable", _unreadable, ("space.yaml", "permission denied"), root_skips=True),
    Case("file-50mb", _big, ("big.yaml", "bytes is larger than the", "byte limit")),
    case("file-empty", "", "space.yaml", "the file is empty"),
    case("file-comments-only", "# to do\n", "space.yaml", "the file is empty"),
    case("file-top-level-list", "- model\n- cluster\n", "space.yaml", "the top level is a list"),
    case("file-top-level-scalar", "hello\n", "space.yaml", "the top level is text"),
    case("file-not-utf8", edit("name: errors", "name: caf\xe9").encode("latin-1"), "space.yaml", "0xe9",
         "not UTF-8"),
    case("file-utf16", BASE.encode("utf-16"), "space.yaml", "byte 0 (0xff)", "not UTF-8"),
    case("file-nul-byte", BASE.encode() + b"\x00\n", "space.yaml", "#x0000", "not allowed"),
    # --- YAML
    case("yaml-unclosed-bracket", edit("ep: [1, 2]", "ep: [1, 2"), "space.yaml:", "YAML syntax error",
         "fix the YAML syntax"),
    case("yaml-tab-indent", edit("  ep: [1, 2]", "\tep: [1, 2]"), "space.yaml:8:1", "'\\t'",
         "indent with spaces, not tabs"),
    case("yaml-nested-mapping-on-one-line", edit("  name: errors", "  name: a: b"), "space.yaml:26:10",
         "mapping values are not allowed"),
    case("yaml-duplicate-key", edit("  seq_len: 64\n", "  seq_len: 64\n  seq_len: 128\n"), "space.yaml:16:3",
         "duplicated key seq_len", "first at line 15"),
    case("yaml-duplicate-section", BASE + "study:\n  name: again\n", "space.yaml:27:1", "duplicated key study",
         "first at line 25"),
    case("yaml-alias-bomb", _BOMB, "space.yaml", "values after expanding aliases"),
    case("yaml-undefined-alias", edit("tp: [1]", "tp: *degrees"), "space.yaml:9:7", "undefined alias 'degrees'"),
    case("yaml-python-tag", "!!python/object/apply:os.system [touch pwned]\n", "!!python/object/apply:os.system",
         "not allowed"),
    case("yaml-deep-nesting", "search: " + "[" * 3000 + "]" * 3000 + "\n", "space.yaml", "nested too deeply"),
    case("yaml-list-as-key", "? [1, 2]\n: x\n", "space.yaml:1:3", "a list cannot be a key"),
    # --- wrong types
    case("type-string-for-int", edit("global_batch_size: 16", "global_batch_size: sixteen"),
         "search.global_batch_size", "'sixteen'", "give a whole number"),
    case("type-float-for-int", edit("trials: 4", "trials: 2.5"), "budget.trials", "2.5", "give a whole number"),
    case("type-list-for-scalar", edit("seq_len: 64", "seq_len: [64, 128]"), "search.seq_len", "[64, 128]",
         "is a list", "give one whole number"),
    case("type-mapping-for-list", edit("ep: [1, 2]", "ep: {min: 1, max: 4}"), "search.ep", "{min: 1, max: 4}",
         "is a mapping", "give a list"),
    case("type-bool-for-number", edit("memory_gb: 1.0", "memory_gb: yes"), "cluster.memory_gb", "true",
         "where a number is expected"),
    case("type-bool-in-list", edit("micro_batch_size: [2]", "micro_batch_size: [on, 8]"), "search.micro_batch_size",
         "[true, 8]", "where a number is expected"),
    case("type-string-for-bool", edit("warmup_steps: 1", "warmup_steps: 1\n  early_stop: maybe"),
         "budget.early_stop", "'maybe'", "give true or false"),
    case("type-number-for-text", edit("name: errors", "name: 2024"), "study.name", "2024", "not text",
         "quote it"),
    case("type-section-is-scalar", edit("cluster:\n  ranks: 4\n  device: cpu\n  memory_gb: 1.0\n", "cluster: 4\n"),
         "cluster:", "4 is a number, not a mapping of fields"),
    case("type-section-is-null", edit("tracking:\n  experiment: errors\n", "tracking:\n"), "tracking:",
         "section is empty (null)"),
    # --- unknown keys, at every level
    case("unknown-section", edit("search:", "serach:"), "serach", "unknown section", "did you mean 'search'"),
    case("unknown-model-field", edit("preset: tiny", "preset: tiny\n  n_expert: 8"), "model.n_expert",
         "did you mean 'n_experts'"),
    case("unknown-cluster-field", edit("device: cpu", "devices: cpu"), "cluster.devices", "did you mean 'device'"),
    case("unknown-search-field", edit("micro_batch_size:", "micro_batch:"), "search.micro_batch",
         "did you mean 'micro_batch_size'"),
    case("unknown-objective-field", edit("memory_cap:", "memory_cape:"), "objective.memory_cape",
         "did you mean 'memory_cap'"),
    case("unknown-budget-field", edit("trials: 4", "trial: 4"), "budget.trial", "did you mean 'trials'"),
    case("unknown-tracking-field", edit("experiment: errors", "experiment_name: errors"), "tracking.experiment_name",
         "did you mean 'experiment'"),
    case("unknown-study-field", edit("name: errors", "name: errors\n  nmae: x"), "study.nmae",
         "did you mean 'name'"),
    case("unknown-field-at-top-level", BASE + "seq_len: 64\n", "seq_len: unknown section",
         "indent it under search"),
    case("unknown-field-in-wrong-section", edit("device: cpu", "device: cpu\n  seq_len: 64"), "cluster.seq_len",
         "move it to search.seq_len"),
    case("unknown-yes-key", BASE + "on: 1\n", "key true", "not a section name", "yes/no/on/off"),
    # --- sizes, budgets and enumerations
    case("value-negative-ranks", edit("ranks: 4", "ranks: -4"), "cluster.ranks", "-4", "give 1 or more"),
    case("value-zero-memory", edit("memory_gb: 1.0", "memory_gb: 0"), "cluster.memory_gb", "0",
         "give a value above 0"),
    case("value-infinite-memory", edit("memory_gb: 1.0", "memory_gb: .inf"), "cluster.memory_gb", "inf",
         "give a finite number"),
    case("value-nan-memory", edit("memory_gb: 1.0", "memory_gb: .nan"), "cluster.memory_gb", "nan",
         "give a finite number"),
    case("value-zero-trials", edit("trials: 4", "trials: 0"), "budget.trials", "0", "give 1 or more"),
    case("value-negative-warmup", edit("warmup_steps: 1", "warmup_steps: -1"), "budget.warmup_steps", "-1",
         "give 0 or more"),
    case("value-negative-timeout", edit("warmup_steps: 1", "warmup_steps: 1\n  trial_timeout_s: -10"),
         "budget.trial_timeout_s", "-10", "give a value above 0"),
    case("value-zero-in-degree-list", edit("ep: [1, 2]", "ep: [0, 2]"), "search.ep", "holds 0",
         "must be 1 or more"),
    case("value-zero-global-batch", edit("global_batch_size: 16", "global_batch_size: 0"),
         "search.global_batch_size", "0", "give 1 or more"),
    case("value-memory-cap-above-1", edit("memory_cap: 0.9", "memory_cap: 90"), "objective.memory_cap", "90",
         "give 1 or less", "fraction of cluster.memory_gb"),
    case("value-unknown-precision", edit("precision: [fp32]", "precision: [fp32, fp8]"), "search.precision[1]",
         "'fp8'", "fp32, bf16, fp16"),
    case("value-unknown-recompute", edit("recompute: [none]", "recompute: [partial]"), "search.recompute[0]",
         "'partial'", "none, selective, full"),
    case("value-unknown-schedule", edit("pp: [1]", "pp: [1]\n  schedule: [1f1f]"), "search.schedule[0]",
         "'1f1f'", "1f1b, gpipe"),
    case("value-unknown-device", edit("device: cpu", "device: gpu"), "cluster.device", "'gpu'", "cpu, cuda"),
    case("value-unknown-preset", edit("preset: tiny", "preset: huge"), "model.preset", "'huge'",
         "tiny, small, moe-64e"),
    case("value-empty-search-list", edit("ep: [1, 2]", "ep: []"), "search.ep", "[]", "give at least one value"),
    case("value-empty-precision-list", edit("precision: [fp32]", "precision: []"), "search.precision", "[]",
         "give at least one value"),
    case("value-dp-misspelt", edit("dp: auto", "dp: automatic"), "search.dp", "'automatic'",
         "give auto, or a list"),
    case("value-study-name-characters", edit("name: errors", "name: my study/v1"), "study.name", "'my study/v1'",
         "letters, digits", "'my-study-v1'"),
    case("value-study-name-too-long", edit("name: errors", "name: " + "x" * 101), "study.name",
         "longer than 100 characters"),
    case("value-negative-seed", edit("name: errors", "name: errors\n  seed: -1"), "study.seed", "-1",
         "give 0 or more"),
    # --- rules across fields
    case("rule-ranks-disagree", edit("ranks: 4", "ranks: 4\n  nodes: 2\n  ranks_per_node: 4"), "cluster.ranks",
         "2 x 4 = 8", "make them agree"),
    case("rule-no-ranks", edit("  ranks: 4\n", ""), "cluster", "give cluster.ranks"),
    case("rule-world-larger-than-cluster", edit("world_sizes: [1, 2, 4]", "world_sizes: [4, 16]"),
         "search.world_sizes", "16 exceeds the cluster's 4 ranks"),
    case("rule-smallest-layout-larger-than-cluster", edit("tp: [1]", "tp: [4]\n  pp: [2]").replace("  pp: [1]\n", ""),
         "search", "smallest layout needs 8 ranks", "largest of search.world_sizes is 4"),
    case("rule-no-ep-divides-experts", edit("ep: [1, 2]", "ep: [3, 5, 6]"), "search.ep", "[3, 5, 6]",
         "model.n_experts (8)", "1, 2, 4, 8"),
    case("rule-no-tp-divides-heads", edit("tp: [1]", "tp: [3]"), "search.tp", "[3]", "n_heads 4",
         "divisors of 4"),
    case("rule-no-pp-divides-layers", edit("pp: [1]", "pp: [3]"), "search.pp", "[3]", "model.n_layers (4)"),
    case("rule-seq-len-above-model", edit("seq_len: 64", "seq_len: 4096"), "search.seq_len", "4096",
         "max_seq_len 256"),
    case("rule-model-heads-do-not-divide-width", edit("preset: tiny", "preset: tiny\n  n_heads: 3"),
         "model.d_model (64)", "model.n_heads (3)"),
    case("rule-missing-section", edit("study:\n  name: errors\n", ""), "study", "required section is missing"),
    case("rule-missing-field", edit("  memory_gb: 1.0\n", ""), "cluster.memory_gb", "required field is missing"),
    # --- well-formed spaces that screen to nothing: exit 1, still one line
    case("screen-nothing-fits-in-memory", edit("memory_gb: 1.0", "memory_gb: 0.0001"), "no candidate layout fits",
         "cluster.memory_gb", code=1),
    case("screen-no-layout-divides-the-batch", edit("global_batch_size: 16", "global_batch_size: 7"),
         "no candidate layout fits", code=1),
    # --- the command line
    Case("cli-unknown-option", _args("validate", "--bogus", "space.yaml"), ("No such option: --bogus",), usage=True),
    Case("cli-missing-argument", _args("validate", with_space=False), ("Missing argument",), usage=True),
    Case("cli-extra-argument", _args("validate", "space.yaml", "other.yaml"), ("unexpected extra argument",),
         usage=True),
    Case("cli-bad-option-value", _args("validate", "space.yaml", "--limit", "many"), ("Invalid value for '--limit'",),
         usage=True),
    Case("cli-unknown-command", _args("frobnicate", with_space=False), ("No such command",), usage=True),
    Case("cli-no-arguments", _args(with_space=False), ("Usage:",), usage=True),
    Case("cli-run-misspelt-option", _args("run", "space.yaml", "--adress", "ray://x"), ("No such option: --adress",),
         usage=True),
]



def via_run(c: Case) -> Case:
    """The same bad space given to `autotune run`: it must fail before any tracking store or run folder exists."""
    assert c.code == 2 and not c.usage  # never start a study from a test of bad input

    def write(cwd: Path) -> list[str]:
        argv = c.write(cwd)
        return ["run", *argv[1:]]
    return Case(f"run-{c.id}", write, c.expect, c.code)


CASES += [via_run(c) for c in CASES if c.id in (
    "file-missing", "yaml-duplicate-key", "unknown-section", "type-bool-for-number", "value-memory-cap-above-1",
    "rule-world-larger-than-cluster", "rule-no-ep-divides-experts")]

SUBPROCESS = ["file-missing", "file-50mb", "yaml-tab-indent", "yaml-alias-bomb", "type-string-for-int",
              "unknown-section", "run-unknown-section", "screen-nothing-fits-in-memory", "cli-unknown-option",
              "cli-missing-argument"]
BY_ID = {c.id: c for c in CASES}


def test_corpus_is_distinct_and_large():
    assert len(BY_ID) == len(CASES) >= 30
    assert set(SUBPROCESS) <= set(BY_ID)


def files_in(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def check(c: Case, code: int, stdout: str, stderr: str) -> None:
    assert "Traceback" not in stdout + stderr
    assert code == c.code, (stdout[-2000:], stderr)
    if c.usage:  # typer's usage block on stderr (or, with no arguments at all, the help on stdout)
        text = stderr or stdout
        assert 0 < len(text.strip().splitlines()) <= (8 if stderr else 40), text
        for part in c.expect:
            assert part in text, text
        return
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), stderr
    line = lines[0]
    assert line.startswith("error: ")
    for part in c.expect:
        assert part in line, line


def prepare(c: Case, cwd: Path) -> tuple[list[str], set[str]]:
    if c.root_skips and os.geteuid() == 0:
        pytest.skip("running as root: root can read a chmod 000 file, so it cannot be made unreadable")
    argv = c.write(cwd)
    return argv, files_in(cwd)


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_bad_input_fails_well(c, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv, before = prepare(c, tmp_path)
    result = CliRunner().invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    check(c, result.exit_code, result.stdout, result.stderr)
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("case_id", SUBPROCESS)
def test_bad_input_fails_well_as_a_process(case_id, tmp_path):
    c = BY_ID[case_id]
    argv, before = prepare(c, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "autotune.cli", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    check(c, proc.returncode, proc.stdout, proc.stderr)
    assert files_in(tmp_path) == before


def test_a_valid_space_passes_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text(BASE)
    result = CliRunner().invoke(app, ["validate", "space.yaml"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert files_in(tmp_path) == {"space.yaml"}


def test_the_shipped_quickstart_validates(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "autotune.cli", "validate",
                           str(REPO / "search_spaces" / "quickstart-cpu.yaml")], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and files_in(tmp_path) == set()


@pytest.mark.parametrize("uri", ["ftp://x", "s3://bucket/mlruns"])
def test_a_tracking_uri_mlflow_has_no_store_for_is_one_line_and_exit_2(uri, tmp_path):
    """MLflow refuses the scheme when its client is made: said as a config error before the study
    takes its lease or writes a trial, not as 'the study stopped on an unexpected ...' with exit 1."""
    (tmp_path / "space.yaml").write_text(edit("  experiment: errors\n", f"  experiment: errors\n  uri: {uri}\n"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "autotune.cli", "run", "space.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"error: tracking.uri: MLflow cannot keep runs at {uri} (MLflow has no store for "
                           f"'{uri.split(':')[0]}' URIs); use "), line
    assert not [p for p in tmp_path.rglob("*") if p.name in ("optuna.journal", "mlflow.db", "state.json")]
