"""`space.yaml` -> a validated Spec, or one clear line that names the field, the value and the fix.

Only `yaml.safe_load`-level constructs are accepted, with a size limit, no runaway nesting, no
duplicate keys and a bound on alias expansion, so a hostile or broken file can never do more
than fail. Every failure is a `SpecError` whose text is a single line shaped like

    <file>: <field path>: <value> <what is wrong>; <what to do>

What is a spec error, and what the command line makes of it:

* exit 2 -- the file (or the command line) is wrong: it cannot be read or parsed, a key is
  unknown, a value has the wrong type or range, sections disagree (cluster.ranks against
  nodes x ranks_per_node, a world size larger than the cluster), or a search list holds no
  value that could ever give a valid layout on its own (no `ep` divides model.n_experts, no
  `tp` divides the heads and widths, no `pp` divides model.n_layers, or even the smallest
  degrees need more ranks than the largest world size). Those are properties of one field and
  are reported against it here, when the file is loaded.
* exit 1 -- the file is well formed but screening (`autotune.candidates.screen`) leaves no
  layout that fits: every combination of otherwise valid values breaks a layout rule (global
  batch divisibility, pipeline micro-batches, world sizes) or exceeds the memory cap. That is
  an answer about the space, not a mistake in the file, and `autotune validate` prints the
  screened table before its one-line error.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from trainables.moe.config import PRESETS, ModelConfig, preset

if TYPE_CHECKING:
    from autotune.devices import DeviceProfile

MAX_SPEC_BYTES = 100_000  # a space file is a few dozen lines; parsing stays well under a second
MAX_YAML_NODES = 100_000
MAX_MEMORY_GB = 1_000_000  # per rank: a petabyte is far beyond any device, and keeps byte counts finite

Precision = Literal["fp32", "bf16", "fp16"]
Recompute = Literal["none", "selective", "full"]
ScheduleName = Literal["1f1b", "gpipe"]

QUICKSTART = "search_spaces/quickstart-cpu.yaml"


def _one_line(text: str) -> str:
    """Control characters (a newline in a key, a tab in a path) shown escaped, never as line breaks."""
    return re.sub(r"[\x00-\x1f\x7f\u2028\u2029]", lambda m: repr(m.group())[1:-1], text)


class SpecError(ValueError):
    """A problem with the space file, as one line that says what to change."""

    def __init__(self, message: object = "") -> None:
        super().__init__(_one_line(str(message)))


# ---------------------------------------------------------------------------------------------
# Showing values and names in messages


def _show(value: Any, limit: int = 60) -> str:
    """A value as the user wrote it in YAML (null, true, 'text', [1, 2]), cut short if long."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value.bit_length() > 3 * limit:  # str() of a huge integer is slow, and refused past 4300 digits
            return f"a number of about {int(value.bit_length() * math.log10(2))} digits"
        text = str(value)
        return text if len(text) <= limit else f"a {len(text.lstrip('-'))}-digit number"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else repr(value[:limit]) + "..."
    if isinstance(value, (list, dict)):
        items = value.items() if isinstance(value, dict) else value
        parts, size = [], 2
        for item in items:
            part = f"{_key(item[0])}: {_show(item[1], limit)}" if isinstance(value, dict) else _show(item, limit)
            size += len(part) + 2
            if size > limit:
                return f"a mapping of {len(value)} keys" if isinstance(value, dict) else \
                    f"a list of {len(value)} values"
            parts.append(part)
        return ("{%s}" if isinstance(value, dict) else "[%s]") % ", ".join(parts)
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _key(part: Any) -> str:
    """A key in a field path: bare if it looks like a name, quoted otherwise."""
    if isinstance(part, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", part):
        return part
    return _show(part, 40)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _a(value: Any) -> str:
    """'a list', 'a number', but 'text' and 'null'."""
    kind = _kind(value)
    return kind if kind in ("text", "null", "true/false") else f"a {kind}"


def _num(x: Any) -> str:
    """A bound from a constraint: 0 rather than 0.0, 1000000 rather than 1e+06."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return str(x)


def _suggest(word: Any, choices: list[str]) -> str | None:
    if not isinstance(word, str) or not choices:
        return None
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


def _divisors(n: int, limit: int = 8) -> str:
    found = [d for d in range(1, min(n, 10_000) + 1) if n % d == 0]
    if n > 10_000:
        found.append(n)
    shown = ", ".join(map(str, found[:limit]))
    return shown + (", ..." if len(found) > limit else "")


# ---------------------------------------------------------------------------------------------
# Sections


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """YAML reads true/yes/on as booleans; pydantic would quietly take them as 1 or 1.0."""
        field = cls.model_fields.get(info.field_name or "")
        ann = field.annotation if field else None
        if ann is None or ann is bool or (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return v  # booleans, and whole sections (a mapping is expected there, and says so)
        items = v if isinstance(v, list) else [v]
        if any(isinstance(x, bool) for x in items):
            raise PydanticCustomError("bool_for_value", "true/false is not allowed here")
        return v


class ModelSpec(_Strict):
    """A preset, optionally with some of its dimensions changed."""

    preset: str = "tiny"
    vocab_size: int | None = Field(default=None, ge=1)
    d_model: int | None = Field(default=None, ge=1)
    n_layers: int | None = Field(default=None, ge=1)
    n_heads: int | None = Field(default=None, ge=1)
    ffn_hidden: int | None = Field(default=None, ge=1)
    n_experts: int | None = Field(default=None, ge=1)
    top_k: int | None = Field(default=None, ge=1, le=2)
    dense_ffn_hidden: int | None = Field(default=None, ge=0)
    moe_every: int | None = Field(default=None, ge=1)
    first_dense_layers: int | None = Field(default=None, ge=0)
    capacity_factor: float | None = Field(default=None, gt=0)
    aux_loss_coef: float | None = Field(default=None, ge=0)
    max_seq_len: int | None = Field(default=None, ge=1)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            close = _suggest(v, list(PRESETS))
            raise ValueError("is not a model preset; "
                             + (f"did you mean {close!r}? " if close else "")
                             + f"choose one of {', '.join(PRESETS)}")
        return v

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}

    def config(self) -> ModelConfig:
        return ModelConfig(**{**preset(self.preset).to_dict(), **self.overrides()})

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        problems = self.config().problems()
        if problems:
            raise ValueError(_model_fix(problems[0], self.preset))
        return self


def _model_fix(problem: str, preset_name: str) -> str:
    """The model's own shape rule, with the change that satisfies it."""
    if "must be divisible by" in problem:
        fix = "make the first a multiple of the second"
    elif "must be <=" in problem:
        fix = "lower the first or raise the second"
    else:
        fix = "change the fields it names"
    return f"{problem} (preset {preset_name!r} plus your overrides); {fix}"


class ClusterSpec(_Strict):
    """Where trials run. `ranks` or `nodes` x `ranks_per_node`; memory is per rank."""

    ranks: int | None = Field(default=None, ge=1)
    nodes: int = Field(default=1, ge=1)
    ranks_per_node: int | None = Field(default=None, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    memory_gb: float = Field(gt=0, le=MAX_MEMORY_GB)
    cpus_per_rank: float = Field(default=1.0, gt=0)
    # Device profile for the step-time model: a name from autotune/profiles/devices.yaml, or a
    # mapping that overrides one (`base: NAME`) or defines a new device. Default: by device.
    profile: str | dict[str, Any] | None = None

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, v: Any) -> Any:
        from autotune.devices import ProfileError, resolve

        if v is not None:
            try:
                resolve(v, "cpu")
            except ProfileError as exc:
                raise ValueError(str(exc)) from None
        return v

    def device_profile(self) -> "DeviceProfile":
        from autotune.devices import resolve

        return resolve(self.profile, self.device)

    @model_validator(mode="after")
    def _ranks(self) -> "ClusterSpec":
        if self.ranks is None and self.ranks_per_node is None:
            raise ValueError("cluster: neither ranks nor ranks_per_node is set; give cluster.ranks "
                             "(e.g. ranks: 4), or cluster.nodes and cluster.ranks_per_node")
        if self.ranks is not None and self.ranks_per_node is not None and \
                self.ranks != self.nodes * self.ranks_per_node:
            raise ValueError(f"cluster.ranks: {_show(self.ranks)} disagrees with cluster.nodes x "
                             f"cluster.ranks_per_node ({_show(self.nodes)} x {_show(self.ranks_per_node)} = "
                             f"{_show(self.nodes * self.ranks_per_node)}); "
                             f"give only one of them, or make them agree")
        return self

    @property
    def total_ranks(self) -> int:
        return self.ranks if self.ranks is not None else self.nodes * self.ranks_per_node

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)


class SearchSpec(_Strict):
    """Value lists to search; a single value is a list of one."""

    ep: list[int] = Field(default=[1], min_length=1)
    tp: list[int] = Field(default=[1], min_length=1)
    pp: list[int] = Field(default=[1], min_length=1)
    dp: list[int] | Literal["auto"] = "auto"
    world_sizes: list[int] | None = Field(default=None, min_length=1)
    micro_batch_size: list[int] = Field(default=[1], min_length=1)
    global_batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=1)
    precision: list[Precision] = Field(default=["bf16"], min_length=1)
    recompute: list[Recompute] = Field(default=["none"], min_length=1)
    schedule: list[ScheduleName] = Field(default=["1f1b"], min_length=1)

    @field_validator("ep", "tp", "pp", "world_sizes", "micro_batch_size", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float, str)) and not isinstance(v, bool) and v != "auto" else v

    @field_validator("precision", "recompute", "schedule", mode="before")
    @classmethod
    def _listify_str(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("dp", mode="before")
    @classmethod
    def _listify_dp(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "auto":
            close = " (did you mean 'auto'?)" if _suggest(v, ["auto"]) else ""
            raise PydanticCustomError("dp_value", "is neither auto nor a list of whole numbers{close}; "
                                      "give auto, or a list such as [1, 2]", {"close": close})
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("ep", "tp", "pp", "world_sizes", "micro_batch_size")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        for x in v or []:
            if x < 1:
                raise ValueError(f"holds {_show(x)}, but every value must be 1 or more; remove it or raise it")
        return v

    @field_validator("dp")
    @classmethod
    def _positive_dp(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("is empty; give at least one value, or auto")
            for x in v:
                if x < 1:
                    raise ValueError(f"holds {_show(x)}, but every value must be 1 or more; remove it or raise it")
        return v


class ObjectiveSpec(_Strict):
    maximize: Literal["tokens_per_s"] = "tokens_per_s"
    minimize: Literal["peak_mem_bytes"] | None = None  # a second objective: the Pareto front
    memory_cap: float = Field(default=0.9, gt=0, le=1)  # of the rank memory
    # Pareto studies: deploy the fastest layout on the front that leaves this fraction of the
    # rank memory free (room for a longer sequence, a fragmenting allocator, a neighbour).
    deploy_headroom: float = Field(default=0.2, ge=0, lt=1)
    # Skip layouts the memory model predicts over the cap (false: launch them and let the real
    # per-rank memory limit decide).
    prune_over_cap: bool = True


class BudgetSpec(_Strict):
    trials: int = Field(default=20, ge=1)
    warmup_steps: int = Field(default=2, ge=0)
    measure_steps: int = Field(default=5, ge=1)
    max_concurrent: int = Field(default=1, ge=1)
    trial_timeout_s: float = Field(default=600, gt=0)
    wall_clock_s: float | None = Field(default=None, gt=0)
    early_stop: bool = False  # stop a layout once a peer is faster beyond noise (autotune.early_stop)
    # When a study continues (a scheduled run), first measure again the best K layouts known,
    # so that drift (a new driver, a busy cluster) shows up in the report.
    remeasure_top: int = Field(default=0, ge=0)
    # At the end of every run of a study, the leaders whose step-time intervals overlap the
    # best's are measured again, interleaved, until the best is separated or this share of
    # `trials` in extra launches is spent (0 turns it off; the rule is in autotune.stats).
    remeasure_share: float = Field(default=0.3, ge=0, le=1)

    def remeasure_launches(self) -> int:
        """Launches the end-of-study re-measuring may spend."""
        return math.ceil(self.remeasure_share * self.trials - 1e-9)


class TrackingSpec(_Strict):
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    experiment: str = Field(default="autotune", min_length=1)

    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


class StudySpec(_Strict):
    name: str = Field(min_length=1, max_length=100)
    storage: str | None = None  # journal file path or RDB URL; default <output_dir>/<name>/optuna.journal
    sampler: Literal["auto", "tpe", "gp", "random", "grid"] = "auto"
    seed: int = Field(default=0, ge=0, le=2**32 - 1)  # what Optuna's samplers accept
    output_dir: str = "autotune-runs"  # the runs folder; AUTOTUNE_RUNS_DIR wins (autotune/settings.py)
    # One writer per study (autotune/lease.py): a second run waits this long for the lease, then
    # exits 3; a holder silent for lease_timeout_s is taken to be dead and its lease is taken over.
    lease_wait_s: float = Field(default=0, ge=0)
    lease_timeout_s: float = Field(default=60, ge=3)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            fixed = re.sub(r"[^A-Za-z0-9._-]+", "-", v).strip("-._")
            example = f", e.g. {fixed!r}" if fixed and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", fixed) else ""
            raise ValueError("is not a safe study name (it names a folder); use letters, digits, '.', '_' and "
                             f"'-' only, starting with a letter or digit{example}")
        return v

    def directory(self) -> Path:
        return Path(self.output_dir) / self.name

    def storage_url(self) -> str:
        return self.storage or str(self.directory() / "optuna.journal")


class TrainableSpec(_Strict):
    """The user's own training program instead of the built-in MoE run (trainables/command.py
    documents the placeholders and the metrics contract). `model` still describes the model, for
    the memory model's estimates."""

    command: list[str] = Field(min_length=1)
    metrics_regex: dict[str, str] | None = None  # default: JSON lines in the file {metrics_file} names
    # a framework's standard printed lines (trainables/presets.py); metrics_regex beside it adds to it
    metrics_preset: Literal["hf-trainer", "torchtitan", "megatron", "deepspeed"] | None = None
    env: dict[str, str] = {}  # added to the program's environment (values never written anywhere)
    # names of variables passed from the driver's environment (a cluster's Secret): how a
    # submitted or scheduled study gives the program a secret without writing it in a file
    env_from: list[str] = []
    cwd: str | None = None  # default: the folder autotune runs in

    @field_validator("command")
    @classmethod
    def _template(cls, v: list[str]) -> list[str]:
        from trainables.command import TemplateError, check_template

        try:
            check_template(v)
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("env_from")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{name!r} is not an environment variable name; use letters, digits and '_'")
        return v

    @model_validator(mode="after")
    def _a_metrics_channel(self) -> "TrainableSpec":
        if self.metrics_regex is not None or self.metrics_preset is not None:
            from trainables.command import compile_metrics_regex
            from trainables.presets import preset_patterns

            patterns = (preset_patterns(self.metrics_preset, self.metrics_regex) if self.metrics_preset
                        else self.metrics_regex)
            compile_metrics_regex(patterns)  # raises ValueError naming the pattern and the fix
        elif not any("{metrics_file}" in item for item in self.command):
            raise ValueError("command: pass '{metrics_file}' to the program (it writes JSON lines there), or set "
                             "trainable.metrics_preset (hf-trainer, torchtitan, megatron, deepspeed) or "
                             "trainable.metrics_regex to read its printed lines")
        return self

    def directory(self) -> Path:
        return Path(self.cwd).resolve() if self.cwd else Path.cwd()


class Spec(_Strict):
    model: ModelSpec = ModelSpec()
    cluster: ClusterSpec
    search: SearchSpec
    objective: ObjectiveSpec = ObjectiveSpec()
    budget: BudgetSpec = BudgetSpec()
    tracking: TrackingSpec = TrackingSpec()
    study: StudySpec
    trainable: TrainableSpec | None = None  # absent: the built-in MoE run

    @model_validator(mode="after")
    def _fits_cluster(self) -> "Spec":
        ranks = self.cluster.total_ranks
        for w in self.search.world_sizes or []:
            if w > ranks:
                raise ValueError(f"search.world_sizes: {_show(w)} exceeds the cluster's {_show(ranks)} ranks; "
                                 f"lower it or add ranks to cluster")
        s = self.search
        largest = max(self.world_sizes)
        dp_min = min(s.dp) if isinstance(s.dp, list) else 1
        smallest = min(s.ep) * min(s.tp) * min(s.pp) * dp_min
        if smallest > largest:
            where = "the cluster has" if s.world_sizes is None else "the largest of search.world_sizes is"
            degrees = "*".join(_show(d) for d in (min(s.ep), min(s.tp), min(s.pp)))
            degrees += f"*{_show(dp_min)}" if isinstance(s.dp, list) else "*auto"
            raise ValueError(f"search: the smallest layout needs {_show(smallest)} ranks (ep*tp*pp*dp = {degrees}) "
                             f"but {where} {_show(largest)}; lower the degrees or add ranks")
        if s.seq_len > self.model.config().max_seq_len:
            raise ValueError(f"search.seq_len: {_show(s.seq_len)} exceeds the model's max_seq_len "
                             f"{self.model.config().max_seq_len}; lower it or raise model.max_seq_len")
        return self

    @model_validator(mode="after")
    def _some_value_works(self) -> "Spec":
        """A degree list none of whose values the model admits makes every layout invalid: say which."""
        cfg, s = self.model.config(), self.search
        if not any(cfg.n_experts % e == 0 for e in s.ep):
            raise ValueError(f"search.ep: no value in {_show(s.ep)} divides model.n_experts ({cfg.n_experts}), "
                             f"so every layout is invalid; use divisors of {cfg.n_experts}: "
                             f"{_divisors(cfg.n_experts)}")
        widths = {"n_heads": cfg.n_heads, "ffn_hidden": cfg.ffn_hidden, "vocab_size": cfg.vocab_size}
        if cfg.n_moe_layers < cfg.n_layers:
            widths["dense_ffn_hidden"] = cfg.dense_ffn
        common = math.gcd(*widths.values())
        if not any(common % t == 0 for t in s.tp):
            named = ", ".join(f"{k} {v}" for k, v in widths.items())
            raise ValueError(f"search.tp: no value in {_show(s.tp)} divides all of model {named}, so every "
                             f"layout is invalid; use divisors of {common}: {_divisors(common)}")
        if not any(cfg.n_layers % p == 0 for p in s.pp):
            raise ValueError(f"search.pp: no value in {_show(s.pp)} divides model.n_layers ({cfg.n_layers}), "
                             f"so every layout is invalid; use divisors of {cfg.n_layers}: "
                             f"{_divisors(cfg.n_layers)}")
        return self

    @property
    def world_sizes(self) -> list[int]:
        return sorted(set(self.search.world_sizes or [self.cluster.total_ranks]))


def _section_model(annotation: Any) -> Any:
    """`TrainableSpec | None` -> TrainableSpec: optional sections are models too."""
    models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if models else annotation


_SECTIONS: dict[str, type[_Strict]] = {name: _section_model(field.annotation)
                                       for name, field in Spec.model_fields.items()}
_EXAMPLES = {
    "cluster": "cluster: {ranks: 4, memory_gb: 16}",
    "search": "search: {global_batch_size: 16, seq_len: 64}",
    "study": "study: {name: my-study}",
    "cluster.memory_gb": "memory_gb: 16",
    "search.global_batch_size": "global_batch_size: 16",
    "search.seq_len": "seq_len: 64",
    "study.name": "name: my-study",
}


# ---------------------------------------------------------------------------------------------
# Loading


class _Problem(Exception):
    """Something YAML accepts (or chokes on) that a space file must not have, at its position."""

    def __init__(self, mark: yaml.Mark, text: str) -> None:
        super().__init__(text)
        self.mark, self.text = mark, text


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses duplicated keys instead of silently keeping the last one, and reports
    keys and scalars Python cannot use at their line and column."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        mark = key_node.start_mark
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise _Problem(mark, f"{_a(key)} cannot be a key; use a plain name such as search") from None
        if key in seen:
            first = seen[key].start_mark
            raise _Problem(mark, f"duplicated key {_key(key)} (first at line {first.line + 1}); keep one of them")
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _readable(tag: str, what: str) -> None:
    """Scalars Python cannot build (a 5000-digit integer, the 45th of a month) as positioned errors."""
    build = yaml.SafeLoader.yaml_constructors[tag]

    def construct(loader: _UniqueKeyLoader, node: yaml.Node) -> Any:
        try:
            return build(loader, node)
        except (ValueError, OverflowError) as exc:
            reason = str(exc).split(";")[0].split(":")[0]
            raise _Problem(node.start_mark, f"{_show(node.value)} looks like {what} but cannot be read as one "
                                            f"({reason}); write a smaller or valid value, or quote it "
                                            f"if it is text") from None

    _UniqueKeyLoader.add_constructor(tag, construct)


_readable("tag:yaml.org,2002:int", "a whole number")
_readable("tag:yaml.org,2002:float", "a number")
_readable("tag:yaml.org,2002:timestamp", "a date")


def _expanded_size(node: yaml.Node, budget: int) -> int:
    """Nodes after alias expansion, counting up to `budget` (a billion-laughs file stops early)."""
    count, stack = 0, [node]
    while stack:
        n = stack.pop()
        count += 1
        if count > budget:
            return count
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.extend((k, v))
    return count


def parse_yaml(text: str, where: str) -> Any:
    try:
        loader = _UniqueKeyLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
                raise SpecError(f"{where}: more than {MAX_YAML_NODES} values after expanding aliases; "
                                f"write the space out without nested anchors")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except SpecError as exc:
        raise SpecError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
    except _Problem as exc:
        raise SpecError(f"{where}:{exc.mark.line + 1}:{exc.mark.column + 1}: {exc.text}") from None
    except RecursionError:
        raise SpecError(f"{where}: values are nested too deeply (hundreds of levels); a space file needs "
                        f"three or four") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        opened = exc.context_mark
        if exc.problem and exc.context and opened and mark and opened.line != mark.line and \
                exc.context.startswith("while "):
            what = exc.context.removeprefix("while ").removeprefix("parsing ").removeprefix("scanning ")
            problem += f" ({what} opened at {opened.line + 1}:{opened.column + 1})"
        if "\\t" in problem or "'\\t'" in problem or "tab" in problem:
            fix = "indent with spaces, not tabs"
        elif "could not determine a constructor" in problem:
            tag = re.search(r"tag '([^']*)'", problem)
            name = tag.group(1).replace("tag:yaml.org,2002:", "!!") if tag else "used here"
            problem = f"the tag {name} is not allowed"
            fix = "remove it (a space file holds plain values only)"
        elif "<block end>" in problem:
            fix = "indent this line like the lines of the same level above it"
        elif "undefined alias" in problem:
            fix = "define the anchor (&name) before using it, or write the value out"
        else:
            fix = "fix the YAML syntax at that position"
        raise SpecError(f"{where}{pos}: YAML syntax error: {problem}; {fix}") from None
    except yaml.reader.ReaderError as exc:
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        line = text.count("\n", 0, exc.position) + 1
        raise SpecError(f"{where}:{line}: character #x{code:04x} is not allowed in YAML; remove it "
                        f"(is this a text file?)") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{where}: YAML error: {str(exc).splitlines()[0]}; fix the file's syntax") from None


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and re.search(r"[\[(]", part):
            continue  # a union member or validator tag, not a key the user wrote
        else:
            out += ("." if out else "") + _key(part)
    return out or "(top level)"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Spec
    for part in loc:
        if model is None or not isinstance(part, str):
            return None
        field = model.model_fields.get(part)
        ann = _section_model(field.annotation) if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    model = _model_at(loc[:-1])
    return list(model.model_fields) if model else []


def _unknown_field(loc: tuple[Any, ...]) -> str:
    path, name, known = _path(loc), loc[-1], _known_fields(loc)
    noun = "section" if len(loc) == 1 else "field"
    close = _suggest(name, known)
    if close:
        return f"{path}: unknown {noun}; did you mean {close!r}?"
    homes = [s for s, m in _SECTIONS.items() if isinstance(name, str) and name in m.model_fields]
    if len(loc) == 1 and homes:
        return f"{path}: unknown section; {name} is a field of {homes[0]}: indent it under {homes[0]}:"
    homes = [h for h in homes if h != loc[0]]
    if homes:
        return f"{path}: unknown field; {name} belongs in {homes[0]}: move it to {homes[0]}.{name}"
    return f"{path}: unknown {noun}; remove it, or use one of {', '.join(known)}"


def _bounds(ctx: dict[str, Any]) -> tuple[str, str]:
    if "ge" in ctx:
        return "too small", f"give {_num(ctx['ge'])} or more"
    if "gt" in ctx:
        return "too small", f"give a value above {_num(ctx['gt'])}"
    if "le" in ctx:
        return "too large", f"give {_num(ctx['le'])} or less"
    return "too large", f"give a value below {_num(ctx.get('lt'))}"


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    path = _path(loc)
    kind = err.get("type", "")
    value = err.get("input")
    ctx = err.get("ctx") or {}
    shown = _show(value)
    if kind == "extra_forbidden":
        return _unknown_field(loc)
    if kind == "missing":
        noun = "section" if len(loc) == 1 else "field"
        example = _EXAMPLES.get(path)
        return f"{path}: required {noun} is missing; add it" + (f", e.g. {example}" if example else "")
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "value_error" and (not loc or isinstance(value, dict)):
        # a rule across fields: its message names the fields itself
        return msg if not loc or msg.startswith(path) else f"{path}: {msg}"
    if kind in ("value_error", "dp_value"):
        return f"{path}: {shown} {msg}"
    if kind == "bool_for_value":
        return f"{path}: {shown} has true/false where {'a number' if _numeric(loc) else 'text'} is expected; " \
               f"write the value itself (YAML reads yes/no/on/off as true/false)"
    if kind in ("int_type", "int_parsing", "int_parsing_size"):
        if isinstance(value, (list, dict)):
            return f"{path}: {shown} is {_a(value)}, not a whole number; give one whole number"
        return f"{path}: {shown} is not a whole number; give a whole number such as 8"
    if kind == "int_from_float":
        return f"{path}: {shown} has a fractional part; give a whole number"
    if kind in ("float_type", "float_parsing"):
        if isinstance(value, (list, dict)):
            return f"{path}: {shown} is {_a(value)}, not a number; give one number"
        return f"{path}: {shown} is not a number; give a number such as 0.5"
    if kind == "finite_number":
        return f"{path}: {shown} is not a finite number; give a finite number"
    if kind in ("bool_type", "bool_parsing"):
        return f"{path}: {shown} is not true or false; give true or false"
    if kind == "string_type":
        return f"{path}: {shown} is {_a(value)}, not text; give text (quote it if it looks like a number)"
    if kind == "list_type":
        return f"{path}: {shown} is {_a(value)}, not a list; give a list such as [1, 2]"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        if value is None:
            return f"{path}: section is empty (null); indent its fields under it, as in {QUICKSTART}"
        return f"{path}: {shown} is {_a(value)}, not a mapping of fields; indent its fields under it, " \
               f"as in {QUICKSTART}"
    if kind == "too_short":
        return f"{path}: {shown} is empty; give at least one value"
    if kind == "string_too_short":
        return f"{path}: {shown} is empty; give a non-empty value" + \
            (f", e.g. {_EXAMPLES[path]}" if path in _EXAMPLES else "")
    if kind == "string_too_long":
        return f"{path}: {shown} is longer than {ctx.get('max_length')} characters; shorten it"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        problem, fix = _bounds(ctx)
        if path == "objective.memory_cap":
            fix += " (a fraction of cluster.memory_gb, e.g. 0.9)"
        elif path == "objective.deploy_headroom":
            fix += " (the fraction of cluster.memory_gb the deployed layout leaves free, e.g. 0.2)"
        return f"{path}: {shown} is {problem}; {fix}"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        close = _suggest(value, allowed)
        if len(allowed) == 1:
            return f"{path}: {shown} is not supported; use {allowed[0]}"
        hint = f"did you mean {close!r}? " if close else ""
        return f"{path}: {shown} is not one of {', '.join(allowed)}; {hint}use one of them"
    return f"{path}: {shown} is not valid: {msg}"


def _numeric(loc: tuple[Any, ...]) -> bool:
    """Whether the field at `loc` holds numbers (int, float, or a list or optional of them)."""
    model = _model_at(loc[:1])
    names = [p for p in loc[1:] if isinstance(p, str)]
    field = model.model_fields.get(names[0]) if model and names else None
    stack = [field.annotation] if field else []
    while stack:
        t = stack.pop()
        if t in (int, float):
            return True
        stack.extend(get_args(t))
    return False


def _rank(err: dict[str, Any]) -> int:
    """Unknown keys first: a typo'd section also shows up as a missing one, and the typo is the cause."""
    return 0 if err.get("type") == "extra_forbidden" else 1


def _check_keys(data: dict[Any, Any], where: str) -> None:
    """Keys must be names; YAML turns `on:`/`yes:` into true and `1:` into a number, which pydantic can't place."""
    def bad(mapping: dict[Any, Any], section: str | None) -> None:
        for key in mapping:
            if isinstance(key, str):
                continue
            at = f"{section}: " if section else ""
            known = list(_SECTIONS[section].model_fields) if section else list(_SECTIONS)
            extra = " (YAML reads yes/no/on/off as true/false)" if isinstance(key, bool) else ""
            raise SpecError(f"{where}: {at}key {_show(key)} is {_a(key)}, not a "
                            f"{'field' if section else 'section'} name{extra}; use one of {', '.join(known)}")
    bad(data, None)
    for name, section in data.items():
        if name in _SECTIONS and isinstance(section, dict):
            bad(section, name)


def spec_from_data(data: Any, where: str = "space") -> Spec:
    if data is None:
        raise SpecError(f"{where}: the file is empty; start from {QUICKSTART}")
    if not isinstance(data, dict):
        raise SpecError(f"{where}: the top level is {_a(data)}; it must be a mapping of sections "
                        f"(model, cluster, search, ...), as in {QUICKSTART}")
    _check_keys(data, where)
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        errors = sorted(exc.errors(include_url=False), key=_rank)
        raise SpecError(f"{where}: {_describe(errors[0])}"
                        + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")) from None


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read and validate a space file; every failure is a SpecError with one line."""
    p = Path(path)
    where = _one_line(str(path))
    try:
        st = p.stat()
        if stat.S_ISDIR(st.st_mode):
            raise SpecError(f"{where}: is a directory; give the path of a .yaml file")
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(f"{where}: is not a regular file; give the path of a .yaml file")
        if st.st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{where}: {st.st_size} bytes is larger than the {MAX_SPEC_BYTES} byte limit for a "
                            f"space file; a space file is a few dozen lines")
        with p.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError(f"{where}: larger than the {MAX_SPEC_BYTES} byte limit for a space file; "
                            f"a space file is a few dozen lines")
    except FileNotFoundError:
        raise SpecError(f"{where}: no such file; check the path (ready spaces are in search_spaces/)") from None
    except NotADirectoryError:
        raise SpecError(f"{where}: no such file (a parent of it is not a directory); check the path") from None
    except PermissionError:
        raise SpecError(f"{where}: cannot be read (permission denied); fix its permissions "
                        f"(e.g. chmod u+r) or copy it somewhere readable") from None
    except OSError as exc:
        raise SpecError(f"{where}: cannot be read ({exc.strerror or exc}); check the file") from None
    except ValueError as exc:  # e.g. a NUL byte in the path
        if isinstance(exc, SpecError):
            raise
        raise SpecError(f"{where}: is not a usable path ({exc}); check the path") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{where}: byte {exc.start} (0x{raw[exc.start]:02x}) is not UTF-8 text; "
                        f"save the file as UTF-8") from None
    return spec_from_data(parse_yaml(text, where), where)
