"""Loading a space: valid files load, and every mistake is one line naming the field, the value and the fix."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from autotune.space.spec import (MAX_SPEC_BYTES, MAX_YAML_NODES, ClusterSpec, Spec, SpecError, load_spec, parse_yaml,
                           spec_from_data)

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "search_spaces" / "quickstart-cpu.yaml"

BASE: dict[str, Any] = {
    "model": {"preset": "tiny"},
    "cluster": {"ranks": 4, "device": "cpu", "memory_gb": 1.0},
    "search": {"ep": [1, 2], "tp": [1], "pp": [1], "dp": "auto", "world_sizes": [1, 2, 4],
               "micro_batch_size": [2], "global_batch_size": 16, "seq_len": 64,
               "precision": ["fp32"], "recompute": ["none"]},
    "objective": {"memory_cap": 0.9},
    "budget": {"trials": 4},
    "tracking": {"experiment": "t"},
    "study": {"name": "t"},
}


def data(**changes: Any) -> dict[str, Any]:
    """BASE with `section__field=value` set (or removed when value is ...)."""
    out = copy.deepcopy(BASE)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if not field:
            out.pop(section, None) if value is ... else out.__setitem__(section, value)
        elif value is ...:
            out[section].pop(field, None)
        else:
            out.setdefault(section, {})[field] = value
    return out


def error_of(d: Any) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_data(d, "s.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("s.yaml")
    return message


# --- valid files -------------------------------------------------------------------------------


def test_quickstart_loads():
    spec = load_spec(QUICKSTART)
    assert isinstance(spec, Spec)
    assert spec.study.name == "quickstart"
    assert spec.cluster.total_ranks == 4
    assert spec.world_sizes == [1, 2, 4]
    assert spec.search.dp == "auto"


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_loads(path):
    assert isinstance(load_spec(path), Spec)


def test_base_loads_and_defaults_fill_in():
    spec = spec_from_data(BASE)
    assert spec.budget.measure_steps == 5 and spec.objective.maximize == "tokens_per_s"
    assert spec.search.schedule == ["1f1b"]


def test_single_values_become_lists_and_numeric_text_is_accepted():
    spec = spec_from_data(data(search__ep=2, search__precision="bf16", search__dp=1, search__world_sizes=2,
                               search__global_batch_size="16"))
    assert spec.search.ep == [2] and spec.search.precision == ["bf16"] and spec.search.dp == [1]
    assert spec.search.global_batch_size == 16


def test_nodes_times_ranks_per_node():
    spec = spec_from_data(data(cluster={"nodes": 2, "ranks_per_node": 2, "memory_gb": 1}))
    assert spec.cluster.total_ranks == 4 and spec.world_sizes == [1, 2, 4]


def test_a_list_with_some_impossible_values_is_fine():
    """Only a list where no value can work is an error; the rest is screening's business."""
    spec = spec_from_data(data(search__ep=[1, 3], search__tp=[1, 3], search__pp=[1, 3]))
    assert spec.search.ep == [1, 3]


def test_bom_and_comments(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_bytes(b"\xef\xbb\xbf# a comment\n" + yaml.safe_dump(BASE).encode())
    assert load_spec(p).study.name == "t"


# --- exact messages ------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,message", [
    ({"search__global_batch_size": "sixteen"},
     "s.yaml: search.global_batch_size: 'sixteen' is not a whole number; give a whole number such as 8"),
    ({"budget__trials": 2.5}, "s.yaml: budget.trials: 2.5 has a fractional part; give a whole number"),
    ({"search__seq_len": [64]}, "s.yaml: search.seq_len: [64] is a list, not a whole number; give one whole number"),
    ({"search__ep": {"a": 1}}, "s.yaml: search.ep: {a: 1} is a mapping, not a list; give a list such as [1, 2]"),
    ({"cluster__memory_gb": True},
     "s.yaml: cluster.memory_gb: true has true/false where a number is expected; write the value itself "
     "(YAML reads yes/no/on/off as true/false)"),
    ({"search__micro_batch_size": [True, 8]},
     "s.yaml: search.micro_batch_size: [true, 8] has true/false where a number is expected; write the value "
     "itself (YAML reads yes/no/on/off as true/false)"),
    ({"budget__early_stop": "maybe"}, "s.yaml: budget.early_stop: 'maybe' is not true or false; give true or false"),
    ({"study__name": 123},
     "s.yaml: study.name: 123 is a number, not text; give text (quote it if it looks like a number)"),
])
def test_wrong_types(changes, message):
    assert error_of(data(**changes)) == message


def test_item_in_a_list_is_named_by_index():
    assert error_of(data(search__ep=[1, "two"])) == \
        "s.yaml: search.ep[1]: 'two' is not a whole number; give a whole number such as 8"


@pytest.mark.parametrize("changes,message", [
    ({"serach": {}}, "s.yaml: serach: unknown section; did you mean 'search'?"),
    ({"model__n_expert": 8}, "s.yaml: model.n_expert: unknown field; did you mean 'n_experts'?"),
    ({"cluster__rank_per_node": 2}, "s.yaml: cluster.rank_per_node: unknown field; did you mean 'ranks_per_node'?"),
    ({"search__micro_batch": [2]}, "s.yaml: search.micro_batch: unknown field; did you mean 'micro_batch_size'?"),
    ({"objective__memory_cape": 0.5}, "s.yaml: objective.memory_cape: unknown field; did you mean 'memory_cap'?"),
    ({"budget__trial": 3}, "s.yaml: budget.trial: unknown field; did you mean 'trials'?"),
    ({"tracking__experiments": "x"}, "s.yaml: tracking.experiments: unknown field; did you mean 'experiment'?"),
    ({"study__nmae": "x"}, "s.yaml: study.nmae: unknown field; did you mean 'name'?"),
    ({"ep": [1]}, "s.yaml: ep: unknown section; ep is a field of search: indent it under search:"),
    ({"cluster__seq_len": 64}, "s.yaml: cluster.seq_len: unknown field; seq_len belongs in search: "
                               "move it to search.seq_len"),
    ({"budget__zzz": 1}, "s.yaml: budget.zzz: unknown field; remove it, or use one of trials, warmup_steps, "
                         "measure_steps, max_concurrent, trial_timeout_s, wall_clock_s, early_stop, remeasure_top, remeasure_share, "
                         "measure_alone"),
])
def test_unknown_keys_with_did_you_mean(changes, message):
    assert error_of(data(**changes)) == message


def test_a_typo_in_a_section_name_is_reported_before_the_section_it_hides():
    d = data(search=...)
    d["serach"] = BASE["search"]
    assert error_of(d) == "s.yaml: serach: unknown section; did you mean 'search'? (and 1 more)"


def test_keys_that_are_not_names():
    assert error_of({**BASE, True: 1}) == (
        "s.yaml: key true is true/false, not a section name (YAML reads yes/no/on/off as true/false); use one "
        "of model, cluster, search, objective, budget, tracking, study, trainable")
    assert error_of(data(model={1: 2})).startswith(
        "s.yaml: model: key 1 is a number, not a field name; use one of preset")


@pytest.mark.parametrize("changes,message", [
    ({"cluster__ranks": -1}, "s.yaml: cluster.ranks: -1 is too small; give 1 or more"),
    ({"cluster__memory_gb": 0}, "s.yaml: cluster.memory_gb: 0 is too small; give a value above 0"),
    ({"cluster__memory_gb": float("inf")},
     "s.yaml: cluster.memory_gb: inf is not a finite number; give a finite number"),
    ({"cluster__memory_gb": 1e7}, "s.yaml: cluster.memory_gb: 10000000.0 is too large; give 1000000 or less"),
    ({"budget__trials": 0}, "s.yaml: budget.trials: 0 is too small; give 1 or more"),
    ({"budget__trial_timeout_s": -5}, "s.yaml: budget.trial_timeout_s: -5 is too small; give a value above 0"),
    ({"objective__memory_cap": 1.5},
     "s.yaml: objective.memory_cap: 1.5 is too large; give 1 or less (a fraction of cluster.memory_gb, e.g. 0.9)"),
    ({"search__ep": [-1, 2]},
     "s.yaml: search.ep: [-1, 2] holds -1, but every value must be 1 or more; remove it or raise it"),
    ({"search__ep": []}, "s.yaml: search.ep: [] is empty; give at least one value"),
    ({"search__precision": []}, "s.yaml: search.precision: [] is empty; give at least one value"),
    ({"search__dp": []}, "s.yaml: search.dp: [] is empty; give at least one value, or auto"),
    ({"search__dp": "aut"}, "s.yaml: search.dp: 'aut' is neither auto nor a list of whole numbers (did you mean "
                            "'auto'?); give auto, or a list such as [1, 2]"),
    ({"search__precision": ["fp8"]}, "s.yaml: search.precision[0]: 'fp8' is not one of fp32, bf16, fp16, bf16-params; "
                                     "use one of them"),
    ({"search__precision": ["bf16", "fp61"]}, "s.yaml: search.precision[1]: 'fp61' is not one of fp32, bf16, "
                                              "fp16, bf16-params; did you mean 'fp16'? use one of them"),
    ({"search__recompute": "some"}, "s.yaml: search.recompute[0]: 'some' is not one of none, selective, full; "
                                    "use one of them"),
    ({"objective__maximize": "speed"}, "s.yaml: objective.maximize: 'speed' is not supported; use tokens_per_s"),
    ({"model__preset": "tiney"}, "s.yaml: model.preset: 'tiney' is not a model preset; did you mean 'tiny'? "
                                 "choose one of tiny, small, moe-64e"),
    ({"model__top_k": 3}, "s.yaml: model.top_k: 3 is too large; give 2 or less"),
    ({"study__seed": -1}, "s.yaml: study.seed: -1 is too small; give 0 or more"),
    ({"study__name": "my study/1"},
     "s.yaml: study.name: 'my study/1' is not a safe study name (it names a folder); use letters, digits, '.', '_' "
     "and '-' only, starting with a letter or digit, e.g. 'my-study-1'"),
    ({"study__name": ""}, "s.yaml: study.name: '' is empty; give a non-empty value, e.g. name: my-study"),
])
def test_values_out_of_range(changes, message):
    assert error_of(data(**changes)) == message


@pytest.mark.parametrize("changes,message", [
    ({"study": ...}, "s.yaml: study: required section is missing; add it, e.g. study: {name: my-study}"),
    ({"cluster__memory_gb": ...}, "s.yaml: cluster.memory_gb: required field is missing; add it, e.g. memory_gb: 16"),
    ({"search": None}, "s.yaml: search: section is empty (null); indent its fields under it, as in "
                       "search_spaces/quickstart-cpu.yaml"),
    ({"cluster": 4}, "s.yaml: cluster: 4 is a number, not a mapping of fields; indent its fields under it, as in "
                     "search_spaces/quickstart-cpu.yaml"),
    ({"budget": True}, "s.yaml: budget: true is true/false, not a mapping of fields; indent its fields under it, as "
                       "in search_spaces/quickstart-cpu.yaml"),
])
def test_missing_and_misshapen_sections(changes, message):
    assert error_of(data(**changes)) == message


@pytest.mark.parametrize("changes,message", [
    ({"cluster": {"ranks": 4, "nodes": 2, "ranks_per_node": 4, "memory_gb": 1}},
     "s.yaml: cluster.ranks: 4 disagrees with cluster.nodes x cluster.ranks_per_node (2 x 4 = 8); give only one "
     "of them, or make them agree"),
    ({"cluster": {"memory_gb": 1}},
     "s.yaml: cluster: neither ranks nor ranks_per_node is set; give cluster.ranks (e.g. ranks: 4), or "
     "cluster.nodes and cluster.ranks_per_node"),
    ({"search__world_sizes": [2, 8]},
     "s.yaml: search.world_sizes: 8 exceeds the cluster's 4 ranks; lower it or add ranks to cluster"),
    ({"search__ep": [8], "search__world_sizes": ...},
     "s.yaml: search: the smallest layout needs 8 ranks (ep*tp*pp*dp = 8*1*1*auto) but the cluster has 4; "
     "lower the degrees or add ranks"),
    ({"search__dp": [2], "search__ep": [4], "search__world_sizes": [2, 4]},
     "s.yaml: search: the smallest layout needs 8 ranks (ep*tp*pp*dp = 4*1*1*2) but the largest of "
     "search.world_sizes is 4; lower the degrees or add ranks"),
    ({"search__seq_len": 1000},
     "s.yaml: search.seq_len: 1000 exceeds the model's max_seq_len 256; lower it or raise model.max_seq_len"),
    ({"search__ep": [3, 5]},
     "s.yaml: search.ep: no value in [3, 5] divides model.n_experts (8), so every layout is invalid; use divisors "
     "of 8: 1, 2, 4, 8"),
    ({"search__tp": [3]},
     "s.yaml: search.tp: no value in [3] divides all of model n_heads 4, ffn_hidden 128, vocab_size 256, so every "
     "layout is invalid; use divisors of 4: 1, 2, 4"),
    ({"search__pp": [3]},
     "s.yaml: search.pp: no value in [3] divides model.n_layers (4), so every layout is invalid; use divisors of 4: "
     "1, 2, 4"),
    ({"model": {"preset": "tiny", "n_heads": 3}},
     "s.yaml: model.d_model (64) must be divisible by model.n_heads (3) (preset 'tiny' plus your overrides); "
     "make the first a multiple of the second"),
    ({"search__precision": ["bf16", "bf16-params"],
      "trainable": {"command": ["python", "train.py", "--precision", "{precision}", "--out", "{metrics_file}"]}},
     "s.yaml: search.precision: bf16-params (bf16 parameters with fp32 main gradients) is a mode of the built-in "
     "trainable; a trainable.command program is told fp32, bf16 or fp16, so remove bf16-params or drop the "
     "trainable section"),
])
def test_rules_across_fields(changes, message):
    assert error_of(data(**changes)) == message


def test_only_the_first_error_is_spelled_out_and_the_rest_are_counted():
    assert error_of(data(budget__trials=-1, budget__measure_steps=0)) == \
        "s.yaml: budget.trials: -1 is too small; give 1 or more (and 1 more)"


def test_the_top_level_must_be_a_mapping():
    assert error_of([1, 2]) == ("s.yaml: the top level is a list; it must be a mapping of sections (model, "
                                "cluster, search, ...), as in search_spaces/quickstart-cpu.yaml")
    assert error_of("hello").startswith("s.yaml: the top level is text; it must be a mapping")
    assert error_of(None) == "s.yaml: the file is empty; start from search_spaces/quickstart-cpu.yaml"


def test_control_characters_never_break_the_line():
    message = error_of(data(study__name="a\nb"))
    assert message.startswith("s.yaml: study.name: 'a\\nb' is not a safe study name")
    assert str(SpecError("one\ntwo")) == "one\\ntwo"
    assert error_of({**BASE, "x\ny": 1}).startswith("s.yaml: 'x\\ny': unknown section")


# --- YAML --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,message", [
    ("search: {ep: [1, 2\n", "s.yaml:2:1: YAML syntax error: expected ',' or ']', but got '<stream end>' (a flow "
                             "sequence opened at 1:14); fix the YAML syntax at that position"),
    ("a:\n  b: 1\n c: 2\n", "s.yaml:3:2: YAML syntax error: expected <block end>, but found '<block mapping "
                           "start>' (a block mapping opened at 1:1); indent this line like the lines of the same "
                           "level above it"),
    ("search:\n\tep: [1]\n", "s.yaml:2:1: YAML syntax error: found character '\\t' that cannot start any token; "
                             "indent with spaces, not tabs"),
    ("search: ep: 1\n", "s.yaml:1:11: YAML syntax error: mapping values are not allowed here; "
                        "fix the YAML syntax at that position"),
    ("search:\n  ep: [1]\n  tp: [1]\n  ep: [2]\n", "s.yaml:4:3: duplicated key ep (first at line 2); keep one of them"),
    ("a: &x 1\nb: *y\n", "s.yaml:2:4: YAML syntax error: found undefined alias 'y'; define the anchor (&name) "
                         "before using it, or write the value out"),
    ("!!python/object/apply:os.system [ls]\n",
     "s.yaml:1:1: YAML syntax error: the tag !!python/object/apply:os.system is not allowed; remove it (a space "
     "file holds plain values only)"),
    ("? [1, 2]\n: x\n", "s.yaml:1:3: a list cannot be a key; use a plain name such as search"),
    ("a: 1\nb: 2\x00\n", "s.yaml:2: character #x0000 is not allowed in YAML; remove it (is this a text file?)"),
    ("a: " + "9" * 5000 + "\n", "s.yaml:1:4: '" + "9" * 60 + "'... looks like a whole number but cannot be read "
                               "as one (Exceeds the limit (4300 digits) for integer string conversion); write a "
                               "smaller or valid value, or quote it if it is text"),
    ("a: 2024-13-45\n", "s.yaml:1:4: '2024-13-45' looks like a date but cannot be read as one (month must be in "
                        "1..12); write a smaller or valid value, or quote it if it is text"),
    ("a: [" * 3000 + "\n", "s.yaml: values are nested too deeply (hundreds of levels); a space file needs three or "
                           "four"),
])
def test_yaml_problems_name_the_position(text, message):
    with pytest.raises(SpecError) as info:
        parse_yaml(text, "s.yaml")
    assert str(info.value) == message


def test_alias_bomb_stops_early():
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    with pytest.raises(SpecError) as info:
        parse_yaml("\n".join(lines) + "\n", "s.yaml")
    assert str(info.value) == (f"s.yaml: more than {MAX_YAML_NODES} values after expanding aliases; write the "
                               f"space out without nested anchors")


def test_aliases_within_the_limit_are_fine():
    d = data(search=...)
    text = yaml.safe_dump(d) + "search:\n  ep: &deg [1, 2]\n  tp: *deg\n  global_batch_size: 16\n  seq_len: 64\n"
    spec = spec_from_data(parse_yaml(text, "s.yaml"))
    assert spec.search.ep == spec.search.tp == [1, 2]


def test_empty_and_comment_only_files(tmp_path):
    for text in ("", "# nothing yet\n", "---\n"):
        p = tmp_path / "s.yaml"
        p.write_text(text)
        with pytest.raises(SpecError) as info:
            load_spec(p)
        assert str(info.value) == f"{p}: the file is empty; start from search_spaces/quickstart-cpu.yaml"


# --- files ---------------------------------------------------------------------------------------------


def load_error(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def test_missing_file_and_directory(tmp_path):
    assert load_error(tmp_path / "nope.yaml") == \
        f"{tmp_path}/nope.yaml: no such file; check the path (ready spaces are in search_spaces/)"
    assert load_error(tmp_path) == f"{tmp_path}: is a directory; give the path of a .yaml file"


def test_too_large_file_is_refused_before_reading(tmp_path):
    p = tmp_path / "big.yaml"
    with p.open("wb") as f:
        f.truncate(50_000_000)
    assert load_error(p) == (f"{p}: 50000000 bytes is larger than the {MAX_SPEC_BYTES} byte limit for a space "
                             f"file; a space file is a few dozen lines")


def test_not_utf8(tmp_path):
    p = tmp_path / "latin.yaml"
    p.write_bytes(b"study:\n  name: caf\xe9\n")
    assert load_error(p) == f"{p}: byte 18 (0xe9) is not UTF-8 text; save the file as UTF-8"


def test_unreadable_file(tmp_path, monkeypatch):
    """Simulated: as root, chmod 000 does not stop a read."""
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(BASE))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)
    assert load_error(p) == (f"{p}: cannot be read (permission denied); fix its permissions (e.g. chmod u+r) or "
                             f"copy it somewhere readable")


def test_huge_numbers_are_shown_short():
    assert error_of(data(search__seq_len=10**3000)) == (
        "s.yaml: search.seq_len: a number of about 3000 digits exceeds the model's max_seq_len 256; lower it or "
        "raise model.max_seq_len")


def test_errors_from_a_file_carry_its_path(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data(budget__trials=0)))
    assert load_error(p) == f"{p}: budget.trials: 0 is too small; give 1 or more"


def test_public_models_keep_their_fields():
    assert set(ClusterSpec.model_fields) == {"ranks", "nodes", "ranks_per_node", "device", "memory_gb",
                                             "cpus_per_rank", "profile", "probe"}
    assert set(Spec.model_fields) == {"model", "cluster", "search", "objective", "budget", "tracking", "study",
                                      "trainable"}
