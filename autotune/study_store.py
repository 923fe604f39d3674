"""A study as it is kept: where to find it again and what it holds, read back without running it.

The state file (state.json) says where a study's Optuna storage is; the storage keeps every
decided trial and, as study attributes named here, the spec, the MLflow parent run, the runs of
the study and the step-time model's device profile. `autotune report`, `sync`, `dashboard` and
`validate --from` read a study through these functions; running one (Ray Tune, the searcher,
the re-measuring) is autotune/study.py's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from autotune.redaction import redact_url
from autotune.results import StudyResult
from autotune.settings import storage_path
from autotune.spec import Spec
from autotune.tracking import machine_description

STATE_FILE = "state.json"
PARENT_ATTR = "mlflow_parent_run_id"
TRACKING_ATTR = "mlflow_tracking_uri"
EXPERIMENT_ATTR = "mlflow_experiment"
SPEC_ATTR = "spec"
SESSIONS_ATTR = "sessions"  # one entry per run of the study (start, resume or continue)
PROFILE_ATTR = "device_profile"  # the step-time model's profile (on CPU: measured at the study's start)
CALIBRATION_ATTR = "steptime_calibration"  # its efficiencies fitted on every measured trial, leave-one-out error


class StudyError(RuntimeError):
    """A study cannot start or continue; `code` is the exit code the CLI uses."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def state_path(spec: Spec) -> Path:
    return spec.study.directory() / STATE_FILE


def write_state(spec: Spec, parent_run_id: str, tracking_uri: str) -> None:
    """Where to find the study again; written atomically so a kill never leaves half a file."""
    path = state_path(spec)
    # Masked: a password in a URL comes from the environment again (PGPASSWORD, AUTOTUNE_STORAGE).
    data = {"study": spec.study.name, "storage": redact_url(spec.study.storage_url()),
            "tracking_uri": redact_url(tracking_uri),
            "experiment": spec.tracking.experiment, "mlflow_parent_run_id": parent_run_id}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.chmod(tmp, 0o600)  # it may name a database URL
    os.replace(tmp, path)


def read_state(directory: Path) -> dict[str, Any] | None:
    """The state file, or None when it is missing, empty or truncated (the storage still knows)."""
    try:
        data = json.loads((directory / STATE_FILE).read_text())
        return data if isinstance(data, dict) and "storage" in data else None
    except (OSError, ValueError):
        return None


def cpu_matmul_shapes(spec: Spec) -> list[tuple[int, int, int]]:
    """The matmuls a step of this space runs, for measuring a CPU's rate: a micro-batch's tokens
    x width x FFN hidden at the smallest and largest micro-batch, and an expert's share of those
    tokens (top_k / n_experts of them) where the model has experts."""
    cfg = spec.model.config()
    sizes = sorted({min(spec.search.micro_batch_size), max(spec.search.micro_batch_size)})
    shapes = []
    for mb in sizes:
        tokens = mb * spec.search.seq_len
        shapes.append((tokens, cfg.d_model, cfg.ffn_hidden))
        if cfg.n_experts:
            shapes.append((max(1, tokens * cfg.top_k // cfg.n_experts), cfg.d_model, cfg.ffn_hidden))
    return shapes


def speed_model_for(spec: Spec, study: Any) -> Any:
    """The study's step-time model (uncalibrated): the space's device profile, on CPU with this
    machine's matmul rate and bandwidth measured once when the study starts (kept in the study,
    so a continued study and `validate --from` use the same figures)."""
    from autotune.devices import DeviceProfile, measure_cpu
    from autotune.speedmodel import SpeedModel

    stored = study.user_attrs.get(PROFILE_ATTR)
    if stored:
        profile = DeviceProfile(**stored)
    else:
        profile = spec.cluster.device_profile()
        if spec.cluster.device == "cpu" and spec.cluster.profile is None:
            try:
                profile = measure_cpu(profile, shapes=cpu_matmul_shapes(spec))
            except (RuntimeError, ValueError, ZeroDivisionError):
                pass  # the data file's figures; calibration fits the rest
        study.set_user_attr(PROFILE_ATTR, profile.to_dict())
    return SpeedModel.of(spec, profile)


def load_speed_model(name: str, output_dir: Path, storage_url: str | None, spec: Spec) -> tuple[Any, str]:
    """`spec`'s step-time model calibrated on a study's measured trials, and what it is.

    Efficiencies fitted on one device say nothing about another: a space whose profile is not
    the study's gets the study's device figures only where it names none, and is calibrated
    only when the device is the same."""
    import optuna

    from autotune.devices import DeviceProfile
    from autotune.searcher import open_storage
    from autotune.speedmodel import SpeedModel

    result = load_result(name, output_dir, storage_url)
    state = read_state(output_dir / name) or {}
    url = storage_url or state.get("storage") or str(output_dir / name / "optuna.journal")
    stored = optuna.load_study(study_name=name, storage=open_storage(url)).user_attrs.get(PROFILE_ATTR)
    own = DeviceProfile(**stored) if stored else result.spec.cluster.device_profile()
    mine = spec.cluster.device_profile() if spec.cluster.profile is not None else None
    if mine is not None and mine.name != own.name:
        return SpeedModel.of(spec, mine), (f"not calibrated: study {name!r} measured on {own.name}, this space "
                                           f"asks for {mine.name}")
    speed = SpeedModel.of(spec, own).fit_records(result.trials)
    cal = speed.calibration
    loo = (f", leave-one-out error median {cal.loo_median_rel_err:.0%}, worst {cal.loo_max_rel_err:.0%}"
           if cal.loo_median_rel_err is not None else "")
    return speed, f"calibrated on {cal.points} measured trials of study {name!r}{loo}"


def find_storage(name: str, output_dir: Path, storage_url: str | None = None) -> str:
    """Where a study's Optuna storage is: as given, as its state file says, or its journal file."""
    output_dir = Path(output_dir).absolute()
    state = read_state(output_dir / name) or {}
    url = storage_path(storage_url, output_dir) if storage_url else (
        state.get("storage") or str(output_dir / name / "optuna.journal"))
    if "://" not in url and not Path(url).exists():
        raise StudyError(f"no study {name!r} under {output_dir}: {url} does not exist; pass --dir or --storage")
    return url


def load_result(name: str, output_dir: Path, storage_url: str | None = None) -> StudyResult:
    """Rebuild a study's result from its Optuna storage (the state file only says where it is)."""
    import optuna

    from autotune.searcher import open_storage, stored_records
    from autotune.spec import Spec

    url = find_storage(name, output_dir, storage_url)
    storage = open_storage(url)
    if name not in optuna.study.get_all_study_names(storage):
        raise StudyError(f"storage {url} holds no study named {name!r}")
    study = optuna.load_study(study_name=name, storage=storage)
    raw = study.user_attrs.get(SPEC_ATTR)
    if not raw:
        raise StudyError(f"study {name!r} in {url} has no spec recorded; it was not created by autotune run")
    spec = Spec.model_validate(raw)
    return StudyResult(name=name, spec=spec, trials=tuple(stored_records(study)), machine=machine_description(),
                       mlflow_parent_run_id=study.user_attrs.get(PARENT_ATTR))
