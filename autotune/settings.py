"""Where a study's state lives, resolved once: the environment over the space file over defaults.

A scheduled study runs where its space file cannot know the paths: in a container, a Ray job's
temporary folder, a Kubernetes pod. The deployment says where things are through the
environment, and those settings win over what the space file says:

| setting | environment | space file | default |
|---|---|---|---|
| runs folder (reports, trial logs, journal) | `AUTOTUNE_RUNS_DIR` | `study.output_dir` | `autotune-runs` |
| Optuna storage | `AUTOTUNE_STORAGE` | `study.storage` | `<runs folder>/<study>/optuna.journal` |
| MLflow tracking store | `MLFLOW_TRACKING_URI` | `tracking.uri` | `sqlite:///mlflow.db` in the working folder |
| Ray cluster | `--address`, then `RAY_ADDRESS` | - | a local Ray |

The runs folder becomes absolute (against the working folder); a relative storage path
resolves against the runs folder, so that `storage: nightly.journal` means the same file
whichever folder the driver runs in. `resolve` returns a spec with these filled in, so every
command (run, submit, report, ui, sync) and every module sees the same values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from autotune.space.spec import Spec

RUNS_ENV = "AUTOTUNE_RUNS_DIR"
STORAGE_ENV = "AUTOTUNE_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
RAY_ENV = "RAY_ADDRESS"
DEFAULT_RUNS_DIR = "autotune-runs"
JOURNAL_NAME = "optuna.journal"


@dataclass(frozen=True)
class Settings:
    """The resolved values and where each one came from (for messages and the README's table)."""

    runs_dir: Path  # absolute
    storage: str  # a database URL or an absolute journal path
    tracking_uri: str
    ray_address: str | None
    origin: Mapping[str, str]  # setting -> "AUTOTUNE_STORAGE" | "study.storage" | "default"

    def study_dir(self, name: str) -> Path:
        return self.runs_dir / name


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _pick(origin: dict[str, str], key: str, env_value: str | None, env_name: str, space_value: str | None,
          space_field: str, default: str) -> str:
    """The first of environment, space file, default that is set; notes where it came from."""
    for value, where in ((env_value, env_name), (space_value, space_field), (default, "default")):
        if value:
            origin[key] = where
            return value
    raise AssertionError("the default is always set")


def is_url(storage: str) -> bool:
    return "://" in storage


def default_runs_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The runs folder when no space file is at hand (`autotune report`, `sync` and `dashboard` given a study name)."""
    environ = os.environ if environ is None else environ
    return Path(_env(environ, RUNS_ENV) or DEFAULT_RUNS_DIR).absolute()


def storage_path(storage: str, runs_dir: Path) -> str:
    """A journal path resolved against the runs folder; URLs unchanged."""
    if is_url(storage):
        return storage
    path = Path(storage).expanduser()
    return str(path if path.is_absolute() else runs_dir / path)


def resolve_settings(spec: Spec, environ: Mapping[str, str] | None = None,
                     address: str | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    origin: dict[str, str] = {}
    runs_env = _env(environ, RUNS_ENV)
    if runs_env:
        runs, origin["runs_dir"] = runs_env, RUNS_ENV
    else:
        runs = spec.study.output_dir
        origin["runs_dir"] = "study.output_dir" if "output_dir" in spec.study.model_fields_set else "default"
    runs_dir = Path(runs).expanduser().absolute()
    storage = _pick(origin, "storage", _env(environ, STORAGE_ENV), STORAGE_ENV, spec.study.storage, "study.storage",
                    str(Path(spec.study.name) / JOURNAL_NAME))
    tracking = _pick(origin, "tracking_uri", _env(environ, TRACKING_ENV), TRACKING_ENV, spec.tracking.uri,
                     "tracking.uri", f"sqlite:///{Path('mlflow.db').absolute()}")
    ray = address or _env(environ, RAY_ENV)
    origin["ray_address"] = "--address" if address else RAY_ENV if ray else "default"
    return Settings(runs_dir, storage_path(storage, runs_dir), tracking, ray, origin)


def resolve(spec: Spec, environ: Mapping[str, str] | None = None) -> Spec:
    """The spec with the runs folder, storage and tracking store filled in (idempotent)."""
    s = resolve_settings(spec, environ)
    study = spec.study.model_copy(update={"output_dir": str(s.runs_dir), "storage": s.storage})
    tracking = spec.tracking.model_copy(update={"uri": s.tracking_uri})
    return spec.model_copy(update={"study": study, "tracking": tracking})
