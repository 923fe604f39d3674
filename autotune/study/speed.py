"""The study's step-time model: the device profile kept with the study (on CPU measured at its
start), calibrated on the study's own measured trials. What the searcher, the end of a study and
`autotune validate --from` ask; reading the study back is autotune/study/store.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autotune.predict.speedmodel import SpeedModel
from autotune.space.devices import DeviceProfile
from autotune.space.spec import Spec
from autotune.study.store import PROBE_ATTR, PROFILE_ATTR, load_result, read_state
from autotune.trials.machine import cpu_matmul_shapes, measure_cpu


def speed_model_for(spec: Spec, study: Any, probe: bool = False) -> SpeedModel:
    """The study's step-time model (uncalibrated): the space's device profile with the figures
    measured once when the study starts (kept in the study, so a continued study and `validate
    --from` use the same figures). With `probe` (Ray connected, no figures kept yet) the cluster
    profile's ranks measure them (autotune/study/cluster_profile.py); where it cannot, a CPU study
    measures this machine's matmul rate and bandwidth from here."""
    stored = study.user_attrs.get(PROFILE_ATTR)
    if stored:
        return SpeedModel.of(spec, DeviceProfile(**stored))
    profile = spec.cluster.device_profile()
    record = None
    if probe and spec.cluster.probe:
        from autotune.study.cluster_profile import apply, cluster_profile

        record = cluster_profile(spec)
        study.set_user_attr(PROBE_ATTR, record)
        profile = apply(profile, record)
    if (record is None or record.get("error")) and spec.cluster.device == "cpu" and spec.cluster.profile is None:
        try:
            profile = measure_cpu(profile, shapes=cpu_matmul_shapes(spec))
        except (RuntimeError, ValueError, ZeroDivisionError):
            pass  # the data file's figures; calibration fits the rest
    study.set_user_attr(PROFILE_ATTR, profile.to_dict())
    return SpeedModel.of(spec, profile)


def load_speed_model(name: str, output_dir: Path, storage_url: str | None, spec: Spec) -> tuple[SpeedModel, str]:
    """`spec`'s step-time model calibrated on a study's measured trials, and what it is.

    Efficiencies fitted on one device say nothing about another: a space whose profile is not
    the study's gets the study's device figures only where it names none, and is calibrated
    only when the device is the same."""
    import optuna

    from autotune.search.searcher import open_storage

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


