"""A study as it is kept: where to find it again and what it holds, read back without running it.

The state file (state.json) says where a study's Optuna storage is; the storage keeps every
decided trial and, as study attributes named here, the spec, the MLflow parent run, the runs of
the study and the step-time model's device profile. `autotune report`, `sync`, `dashboard` and
`validate --from` read a study through these functions; running one (Ray Tune, the searcher,
the re-measuring) is autotune/study/runner.py's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from autotune.records.results import StudyResult
from autotune.records.tracking import machine_description
from autotune.redaction import redact_url
from autotune.settings import storage_path
from autotune.space.spec import Spec

STATE_FILE = "state.json"
PARENT_ATTR = "mlflow_parent_run_id"
TRACKING_ATTR = "mlflow_tracking_uri"
EXPERIMENT_ATTR = "mlflow_experiment"
SPEC_ATTR = "spec"
SESSIONS_ATTR = "sessions"  # one entry per run of the study (start, resume or continue)
PROFILE_ATTR = "device_profile"  # the step-time model's profile (on CPU: measured at the study's start)
PROBE_ATTR = "cluster_probe"  # what the cluster profile's ranks measured at the study's start (or its error)
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


def find_storage(name: str, output_dir: Path, storage_url: str | None = None) -> str:
    """Where a study's Optuna storage is: as given, as its state file says, or its journal file."""
    output_dir = Path(output_dir).absolute()
    state = read_state(output_dir / name) or {}
    url = storage_path(storage_url, output_dir) if storage_url else (
        state.get("storage") or str(output_dir / name / "optuna.journal"))
    if "://" not in url and not Path(url).exists():
        raise StudyError(f"no study {name!r} under {output_dir}: {url} does not exist; name the study's space "
                         "file, or pass --dir or --storage")
    return url


def load_result(name: str, output_dir: Path, storage_url: str | None = None) -> StudyResult:
    """Rebuild a study's result from its Optuna storage (the state file only says where it is)."""
    import optuna

    from autotune.search.searcher import open_storage, stored_records
    from autotune.space.spec import Spec

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
                       cluster_probe=study.user_attrs.get(PROBE_ATTR),
                       mlflow_parent_run_id=study.user_attrs.get(PARENT_ATTR))
