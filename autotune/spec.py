"""`space.yaml` -> a validated Spec, or one clear line that names the field and the fix.

Only `yaml.safe_load`-level constructs are accepted, with a size limit, no duplicate keys and
a bound on alias expansion, so a hostile or broken file can never do more than fail.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainables.moe.config import PRESETS, ModelConfig, preset

MAX_SPEC_BYTES = 1_000_000
MAX_YAML_NODES = 100_000

Precision = Literal["fp32", "bf16", "fp16"]
Recompute = Literal["none", "selective", "full"]
ScheduleName = Literal["1f1b", "gpipe"]


class SpecError(ValueError):
    """A problem with the space file, as one line that says what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


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
            raise ValueError(f"unknown preset; choose one of {', '.join(PRESETS)}")
        return v

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}

    def config(self) -> ModelConfig:
        return ModelConfig(**{**preset(self.preset).to_dict(), **self.overrides()})

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        problems = self.config().problems()
        if problems:
            raise ValueError(problems[0])
        return self


class ClusterSpec(_Strict):
    """Where trials run. `ranks` or `nodes` x `ranks_per_node`; memory is per rank."""

    ranks: int | None = Field(default=None, ge=1)
    nodes: int = Field(default=1, ge=1)
    ranks_per_node: int | None = Field(default=None, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    memory_gb: float = Field(gt=0)
    cpus_per_rank: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _ranks(self) -> "ClusterSpec":
        if self.ranks is None and self.ranks_per_node is None:
            raise ValueError("give cluster.ranks, or cluster.nodes and cluster.ranks_per_node")
        if self.ranks is not None and self.ranks_per_node is not None and \
                self.ranks != self.nodes * self.ranks_per_node:
            raise ValueError(f"ranks ({self.ranks}) != nodes x ranks_per_node "
                             f"({self.nodes} x {self.ranks_per_node}); give one or make them agree")
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
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("ep", "tp", "pp", "world_sizes", "micro_batch_size")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        for x in v or []:
            if x < 1:
                raise ValueError(f"every value must be >= 1 (got {x})")
        return v

    @field_validator("dp")
    @classmethod
    def _positive_dp(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("empty list: give at least one value, or auto")
            for x in v:
                if x < 1:
                    raise ValueError(f"every value must be >= 1 (got {x})")
        return v


class ObjectiveSpec(_Strict):
    maximize: Literal["tokens_per_s"] = "tokens_per_s"
    minimize: Literal["peak_mem_bytes"] | None = None  # a second objective: the Pareto front
    memory_cap: float = Field(default=0.9, gt=0, le=1)  # of the rank memory


class BudgetSpec(_Strict):
    trials: int = Field(default=20, ge=1)
    warmup_steps: int = Field(default=2, ge=0)
    measure_steps: int = Field(default=5, ge=1)
    max_concurrent: int = Field(default=1, ge=1)
    trial_timeout_s: float = Field(default=600, gt=0)
    wall_clock_s: float | None = Field(default=None, gt=0)
    early_stop: bool = False  # ASHA on per-step throughput


class TrackingSpec(_Strict):
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    experiment: str = Field(default="autotune", min_length=1)

    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


class StudySpec(_Strict):
    name: str = Field(min_length=1, max_length=100)
    storage: str | None = None  # journal file path or RDB URL; default <output_dir>/<name>/optuna.journal
    sampler: Literal["auto", "tpe", "gp", "random", "grid"] = "auto"
    seed: int = 0
    output_dir: str = "autotune-runs"

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only, starting with a letter or digit")
        return v

    def directory(self) -> Path:
        return Path(self.output_dir) / self.name

    def storage_url(self) -> str:
        return self.storage or str(self.directory() / "optuna.journal")


class Spec(_Strict):
    model: ModelSpec = ModelSpec()
    cluster: ClusterSpec
    search: SearchSpec
    objective: ObjectiveSpec = ObjectiveSpec()
    budget: BudgetSpec = BudgetSpec()
    tracking: TrackingSpec = TrackingSpec()
    study: StudySpec

    @model_validator(mode="after")
    def _fits_cluster(self) -> "Spec":
        ranks = self.cluster.total_ranks
        for w in self.search.world_sizes or []:
            if w > ranks:
                raise ValueError(f"search.world_sizes: {w} exceeds the cluster's {ranks} ranks; "
                                 f"lower it or add ranks to cluster")
        if isinstance(self.search.dp, list):
            smallest = min(self.search.ep) * min(self.search.tp) * min(self.search.pp) * min(self.search.dp)
            if smallest > ranks:
                raise ValueError(f"search: the smallest layout needs {smallest} ranks (ep*tp*pp*dp) but the "
                                 f"cluster has {ranks}; lower the degrees or add ranks")
        if self.search.seq_len > self.model.config().max_seq_len:
            raise ValueError(f"search.seq_len: {self.search.seq_len} exceeds the model's max_seq_len "
                             f"{self.model.config().max_seq_len}; lower it or raise model.max_seq_len")
        return self

    @property
    def world_sizes(self) -> list[int]:
        return sorted(set(self.search.world_sizes or [self.cluster.total_ranks]))


# ---------------------------------------------------------------------------------------------
# Loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses duplicated keys instead of silently keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise SpecError(f"line {mark.line + 1}: duplicated key {key!r}: keep one of them")
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


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
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        if "\\t" in problem or "'\\t'" in problem or "tab" in problem:
            fix = "indent with spaces, not tabs"
        else:
            fix = "fix the YAML syntax at that position"
        raise SpecError(f"{where}{pos}: YAML syntax error: {problem}; {fix}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{where}: YAML error: {str(exc).splitlines()[0]}; fix the file's syntax") from None


_FIX = {
    "missing": "add it",
    "extra_forbidden": "remove it",
    "int_parsing": "give a whole number",
    "int_from_float": "give a whole number",
    "int_type": "give a whole number",
    "float_parsing": "give a number",
    "float_type": "give a number",
    "bool_parsing": "give true or false",
    "bool_type": "give true or false",
    "string_type": "give a string",
    "list_type": "give a list like [1, 2]",
    "too_short": "give at least one value",
    "too_long": "shorten it",
    "greater_than_equal": "raise it",
    "greater_than": "raise it",
    "less_than_equal": "lower it",
    "less_than": "lower it",
    "literal_error": "use one of the allowed values",
    "model_type": "give a mapping of fields",
    "dict_type": "give a mapping of fields",
    "string_pattern_mismatch": "change it",
}


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("list[int]", "literal['auto']", "function-after[_positive_dp(), list[int]]"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] | None = Spec
    for part in loc[:-1]:
        if model is None or not isinstance(part, str):
            return []
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model else []


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    path = _path(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        name = str(loc[-1])
        close = difflib.get_close_matches(name, _known_fields(loc), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(_known_fields(loc))}"
        return f"{path}: unknown field; {hint} (or remove it)"
    if kind == "missing":
        return f"{path}: required field is missing; add it"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    if not loc:  # a rule across sections: its message names the fields itself
        return msg
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 60 else type(value).__name__
    fix = _FIX.get(kind)
    if kind == "literal_error":
        msg = msg.replace("Input should be", "must be")
    return f"{path}: {shown} is not valid: {msg}" + (f"; {fix}" if fix and fix not in msg else "")


def spec_from_data(data: Any, where: str = "space") -> Spec:
    if data is None:
        raise SpecError(f"{where}: the file is empty; start from search_spaces/quickstart-cpu.yaml")
    if not isinstance(data, dict):
        raise SpecError(f"{where}: the top level must be a mapping of sections (model, cluster, search, ...), "
                        f"not a {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise SpecError(f"{where}: {_describe(errors[0])}"
                        + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")) from None


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read and validate a space file; every failure is a SpecError with one line."""
    p = Path(path)
    where = str(path)
    if not p.exists():
        raise SpecError(f"{where}: no such file; check the path (ready spaces are in search_spaces/)")
    if p.is_dir():
        raise SpecError(f"{where}: is a directory; give the path of a .yaml file")
    try:
        size = p.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{where}: {size} bytes is larger than the {MAX_SPEC_BYTES} byte limit for a space "
                            f"file; a space file is a few dozen lines")
        raw = p.read_bytes()
    except PermissionError:
        raise SpecError(f"{where}: cannot be read (permission denied); fix its permissions") from None
    except OSError as exc:
        raise SpecError(f"{where}: cannot be read ({exc.strerror}); check the file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{where}: is not UTF-8 text; save it as UTF-8 YAML") from None
    return spec_from_data(parse_yaml(text, where), where)
