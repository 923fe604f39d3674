"""The space file's sections as pydantic models, and the rules across them that make a `Spec`.

Each section validates its own fields (ranges, presets, safe names, a trainable's template);
`Spec` adds the rules that need several sections (world sizes against the cluster, degree lists
against the model). How a violation is worded for the user is in autotune/space/load.py.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from autotune.space.messages import _divisors, _show, _suggest
from trainables.moe.config import GEMM_ALIGN, PRESETS, ModelConfig, preset

if TYPE_CHECKING:
    from autotune.space.devices import DeviceProfile

MAX_MEMORY_GB = 1_000_000  # per rank: a petabyte is far beyond any device, and keeps byte counts finite

# bf16 and fp16 run under autocast over fp32 parameters; bf16-params holds the parameters in bf16
# with fp32 main gradients and master weights (the built-in trainable only).
Precision = Literal["fp32", "bf16", "fp16", "bf16-params"]
Recompute = Literal["none", "selective", "full"]
ScheduleName = Literal["1f1b", "gpipe"]


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
    # Device profile for the step-time model: a name from autotune/space/profiles/devices.yaml, or a
    # mapping that overrides one (`base: NAME`) or defines a new device. Default: by device.
    profile: str | dict[str, Any] | None = None
    # Measure the cluster before the first trial (GEMM rates, collectives against message size;
    # autotune/study/cluster_profile.py) and use that in place of the profile's figures. false: the
    # profile's own figures (on CPU, a short matmul measurement on the driver).
    probe: bool = True

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, v: Any) -> Any:
        from autotune.space.devices import ProfileError, resolve

        if v is not None:
            try:
                resolve(v, "cpu")
            except ProfileError as exc:
                raise ValueError(str(exc)) from None
        return v

    def device_profile(self) -> "DeviceProfile":
        from autotune.space.devices import resolve

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
    early_stop: bool = False  # stop a layout once a peer is faster beyond noise (autotune.search.early_stop)
    # When a study continues (a scheduled run), first measure again the best K layouts known,
    # so that drift (a new driver, a busy cluster) shows up in the report.
    remeasure_top: int = Field(default=0, ge=0)
    # At the end of every run of a study, the leaders whose step-time intervals overlap the
    # best's are measured again, interleaved, until the best is separated or this share of
    # `trials` in extra launches is spent (0 turns it off; the rule is in autotune.search.stats).
    remeasure_share: float = Field(default=0.3, ge=0, le=1)
    # Time each trial's steps while no other trial on its machine times its own (a lock per
    # machine; start-up still overlaps). None: on CPU, where concurrent trials' ranks share cores.
    measure_alone: bool | None = None

    def measures_alone(self, device: str) -> bool:
        return device == "cpu" if self.measure_alone is None else self.measure_alone

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
    # One writer per study (autotune/study/lease.py): a second run waits this long for the lease, then
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
    def _precision_for_the_trainable(self) -> "Spec":
        if self.trainable is not None and "bf16-params" in self.search.precision:
            raise ValueError("search.precision: bf16-params (bf16 parameters with fp32 main gradients) is a mode of "
                             "the built-in trainable; a trainable.command program is told fp32, bf16 or fp16, so "
                             "remove bf16-params or drop the trainable section")
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
        def aligned(t: int) -> bool:
            return common % t == 0 and (cfg.ffn_hidden // t) % GEMM_ALIGN == 0

        if not any(aligned(t) for t in s.tp):
            fits = [t for t in range(1, min(common, 4096) + 1) if aligned(t)][:8]
            fix = f"use one of {fits}" if fits else f"make model.ffn_hidden a multiple of {GEMM_ALIGN}"
            raise ValueError(f"search.tp: every value in {_show(s.tp)} leaves an expert width ffn_hidden/tp that is "
                             f"not a multiple of {GEMM_ALIGN} (model.ffn_hidden {cfg.ffn_hidden}), so every layout is "
                             f"invalid; {fix}")
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
