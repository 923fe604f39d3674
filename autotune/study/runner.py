"""One tuning study: screen the space, let Optuna propose, let Ray Tune run, record, report.

The Optuna storage is the study's memory: every decided trial keeps its full record there, so
`--resume` (after a crash, or the next scheduled run) re-runs nothing already measured, and
`autotune report` can rebuild the report from it alone.

What a study keeps, and reading it back, is autotune/study/store.py's; its step-time model is
autotune/study/speed.py's.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from autotune.predict.candidates import Candidate, screen
from autotune.records.results import StudyResult
from autotune.records.tracking import Tracker, TrackingError, machine_description, public_spec, redact
from autotune.redaction import error_line, mask_values
from autotune.settings import resolve
from autotune.space.layout import Layout
from autotune.space.spec import Spec
from autotune.study.progress import Progress
from autotune.study.cluster_profile import console_line
from autotune.study.connect import ray_init
from autotune.study.speed import speed_model_for
from autotune.study.store import (EXPERIMENT_ATTR, PARENT_ATTR, SESSIONS_ATTR, SPEC_ATTR, TRACKING_ATTR,
                                  CALIBRATION_ATTR, PROBE_ATTR, PROFILE_ATTR, StudyError, write_state)
from autotune.trial_record import TrialRecord
from autotune.trials.configs import run_config_for
from autotune.trials.placement import plan

_WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
# Trial coordinators run on the head node (where the driver is) and hold no CPU: a sliver of the
# resource Ray gives every head node. A head started with --num-cpus=0 still runs them.
COORDINATOR_RESOURCES = {"node:__internal_head__": 0.01}


@dataclass(frozen=True)
class RunOptions:
    resume: bool = False  # finish an interrupted study's budget
    extend: bool = False  # start the study, or continue it with budget.trials more launches
    remeasure_top: int | None = None  # overrides budget.remeasure_top
    address: str | None = None  # Ray cluster; None = $RAY_ADDRESS or a local Ray
    live: bool | None = None  # rich view; None = when stdout is a terminal
    report: bool = True


def _storage_error(spec: Spec, exc: Exception) -> StudyError:
    """The study's storage cannot be opened: a path (OSError) or a database URL that does not connect."""
    where = redact(spec.study.storage_url())
    if isinstance(exc, OSError):
        return StudyError(f"study.storage: cannot use {where} ({exc.strerror or exc}); choose a writable path or a "
                          f"reachable database URL")
    return StudyError(f"study.storage: cannot use {where} ({error_line(exc)}); check the URL, the server and its "
                      f"credentials")


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise StudyError(f"study.output_dir: cannot write to {directory} ({exc.strerror}); "
                         f"choose a writable folder or free some space") from None


# ------------------------------------------------------------------------------------------------
# Trial configs and records


def make_trial_config(spec: Spec, number: int, layout: Layout, cand: Candidate,
                      env_holder: str | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "number": number,
        "layout": layout.params(),
        "layout_key": layout.key,
        "timeout_s": spec.budget.trial_timeout_s,
        "placement_wait_s": spec.budget.trial_timeout_s * max(1, spec.budget.max_concurrent),
        "prediction": cand.prediction.as_metrics() if cand.prediction else {},
    }
    if spec.trainable is not None:  # the user's own program (autotune.trials.command_trial)
        from autotune.trials.command_trial import command_placement, command_trial

        config["command"] = command_trial(spec, number, layout, env_holder)
        config["placement"] = command_placement(layout, spec)
        return config
    # The rank's memory is limited for real to cluster.memory_gb: a layout that needs more fails
    # as out of memory, as it would on the target hardware.
    config["run"] = run_config_for(spec, layout, timeout_s=spec.budget.trial_timeout_s,
                                   memory_limit_bytes=spec.cluster.memory_bytes,
                                   measure_alone=spec.budget.measures_alone(spec.cluster.device))
    config["placement"] = plan(layout, spec.cluster)
    return config


# ------------------------------------------------------------------------------------------------
# The study


# The tuner's own credentials, masked by value in whatever it writes (they may reach an error
# message, a library's exception text, a printed URL).
SERVICE_SECRETS = ("RAY_AUTH_TOKEN", "PGPASSWORD", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def run_study(spec: Spec, spec_text: str, options: RunOptions = RunOptions()) -> StudyResult:
    from autotune.study.lease import Lease, LeaseBusy

    spec = resolve(spec)
    screening = screen(spec)
    if not screening.fitting():
        raise StudyError("no candidate layout fits: " + ", ".join(f"{k} {v}" for k, v in screening.reasons.items())
                         + "; widen the search lists or raise cluster.memory_gb", code=1)
    directory = spec.study.directory()
    _check_writable(directory)
    tracker = Tracker(spec.tracking.resolved_uri(), spec.tracking.experiment)
    try:
        tracker.check()
    except TrackingError as exc:
        raise StudyError(str(exc)) from None
    mask_values(os.environ.get(name, "") for name in SERVICE_SECRETS)
    env = program_env(spec)
    # One writer per study: nothing below runs unless this run holds the study's lease.
    try:
        lease = Lease(spec.study.storage_url(), spec.study.name, spec.study.lease_wait_s,
                      spec.study.lease_timeout_s).acquire()
    except LeaseBusy as exc:
        raise StudyError(str(exc), code=3) from None
    except Exception as exc:
        raise _storage_error(spec, exc) from None
    if lease.took_over is not None:  # its RUNNING trials are closed below, as --resume does
        print(f"note: took over the lease of study {spec.study.name!r} from {lease.took_over.describe()}, silent "
              f"for over {spec.study.lease_timeout_s:.0f} s; its unfinished trials are closed as interrupted",
              file=sys.stderr, flush=True)
    try:
        return _run_leased(spec, spec_text, options, screening, tracker, env, lease)
    finally:
        lease.release()


def program_env(spec: Spec) -> dict[str, str]:
    """A user command's environment: `trainable.env` and the driver's values of `trainable.env_from`."""
    if spec.trainable is None:
        return {}
    missing = [name for name in spec.trainable.env_from if name not in os.environ]
    if missing:
        raise StudyError(f"trainable.env_from: {', '.join(missing)} not set in the environment of the driver; set "
                         f"{'them' if len(missing) > 1 else 'it'} there (a Kubernetes Secret, docker/.env) or drop "
                         f"{'them' if len(missing) > 1 else 'it'} from the list")
    secrets = {name: os.environ[name] for name in spec.trainable.env_from}
    mask_values(secrets.values())
    return {**spec.trainable.env, **secrets}


def _run_leased(spec: Spec, spec_text: str, options: RunOptions, screening, tracker: Tracker,
                env: dict[str, str], lease) -> StudyResult:
    import optuna

    from autotune.search.searcher import create_study, open_storage, reconcile, stored_records

    directory = spec.study.directory()
    try:
        storage = open_storage(spec.study.storage_url())
        exists = spec.study.name in optuna.study.get_all_study_names(storage)
    except Exception as exc:
        raise _storage_error(spec, exc) from None
    if exists and not (options.resume or options.extend):
        raise StudyError(f"study {spec.study.name!r} already exists in {redact(spec.study.storage_url())}: add --resume "
                         f"to finish it, --continue to run budget.trials more, or change study.name")
    if not exists and options.resume:
        raise StudyError(f"--resume: there is no study {spec.study.name!r} in {redact(spec.study.storage_url())} to "
                         f"continue; run without --resume to start it")
    try:
        study = create_study(spec, storage, load_if_exists=exists)
        reconcile(study)
    except OSError as exc:
        raise StudyError(f"study.storage: cannot write {redact(spec.study.storage_url())} ({exc.strerror or exc}); "
                         f"free space or choose another path") from None
    try:
        parent = tracker.start_study(spec, spec_text, machine_description(),
                                     study.user_attrs.get(PARENT_ATTR) if exists else None)
        if exists:
            tracker.close_stale(parent)
    except Exception as exc:  # the store answered the preflight but refuses writes (full disk, permissions)
        raise StudyError(f"tracking store {redact(tracker.uri)} refused to record the study "
                         f"({error_line(exc)}); free space or fix the store, then run again"
                         + (" with --resume" if options.resume else "")) from None
    sessions = list(study.user_attrs.get(SESSIONS_ATTR, []))
    session = len(sessions)
    sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "mode": "resume" if options.resume else "continue" if exists else "start"})
    try:
        study.set_user_attr(SESSIONS_ATTR, sessions)
        study.set_user_attr(PARENT_ATTR, parent)
        study.set_user_attr(TRACKING_ATTR, redact(tracker.uri))
        study.set_user_attr(EXPERIMENT_ATTR, spec.tracking.experiment)
        study.set_user_attr(SPEC_ATTR, json.loads(redact(public_spec(spec).model_dump_json())))
        write_state(spec, parent, tracker.uri)
    except OSError as exc:
        raise StudyError(f"cannot write the study's state ({exc.strerror or exc}: {exc.filename or ''}); "
                         f"free space or fix the folder, then run again") from None

    records = stored_records(study)
    # What the search launched: the end-of-study re-measures have a budget of their own.
    launched = sum(1 for r in records if r.searched)
    launches = spec.budget.trials if options.extend else max(0, spec.budget.trials - launched)
    top = spec.budget.remeasure_top if options.remeasure_top is None else options.remeasure_top
    remeasure = []
    if session > 0 and top > 0:
        # The leaders a user could deploy: within the memory cap, one trial per layout (its fastest).
        known = StudyResult(spec.study.name, spec, tuple(records)).fitting()
        leaders: dict[str, TrialRecord] = {}
        for t in sorted(known, key=lambda t: -t.tokens_per_s):
            leaders.setdefault(t.layout.key, t)
        remeasure = list(leaders.values())[:min(top, launches)]
    started = time.monotonic()
    tracking_error = None
    if launches:
        started_ray = ray_init(spec, options.address)  # one Ray for the search and the re-measuring
        try:
            tracking_error = _tune(spec, screening, study, tracker, parent, launches, options, session, remeasure,
                                   env=env, fenced=lease.fence)
            settle_error = _settle(spec, screening, study, tracker, parent, options, session, started, env,
                                   fenced=lease.fence)
            tracking_error = tracking_error or settle_error
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    if lease.lost:  # another run writes this study now: this one stops here and writes nothing more
        raise StudyError(f"this run lost the lease of study {spec.study.name!r} to {lease.taker()} (its heartbeat "
                         f"was older than study.lease_timeout_s, {spec.study.lease_timeout_s:.0f} s); it stopped "
                         f"launching and writing, and that run closes its unfinished trials as interrupted; raise "
                         f"study.lease_timeout_s if this machine stalls that long", code=3)
    result = StudyResult(name=spec.study.name, spec=spec, trials=tuple(stored_records(study)),
                         machine=machine_description(), wall_s=time.monotonic() - started, mlflow_parent_run_id=parent,
                         tracking_error=tracking_error, cluster_probe=study.user_attrs.get(PROBE_ATTR))
    if launches:
        try:
            fitted = speed_model_for(spec, study).fit_records(result.trials)
            study.set_user_attr(CALIBRATION_ATTR, fitted.calibration.to_dict())
        except (OSError, ValueError, RuntimeError):
            pass  # the records are kept; `autotune validate --from` refits from them
    report_dir = directory / "report"
    if options.report:
        from autotune.report.write import write_report

        write_report(result, report_dir)
    if tracking_error is None:
        try:
            if spec.objective.minimize:
                pick = result.deploy_pick()
                tracker.tag_front(parent, result.pareto(), pick.trial, pick.rule)
            tracker.finish_study(parent, report_dir if options.report else None)
        except Exception as exc:
            result = replace(result, tracking_error=f"closing the study's MLflow run failed: {exc}")
    return result


def _settle(spec: Spec, screening, study, tracker: Tracker, parent: str, options: RunOptions, session: int,
            started: float, env: dict[str, str] | None = None,
            fenced: Callable[[], bool] = lambda: False) -> str | None:
    """End of a study: measure the best again if one run is all it has, and the leaders tied
    with it, round after round (each round runs the best and its closest rivals once more,
    interleaved, so that the machine's drift hits them alike; the repeats also estimate the
    run-to-run spread the tie rule uses), until the best is separated or
    `budget.remeasure_launches()` is spent. Returns why MLflow stopped taking records, if it did."""
    from autotune.search.searcher import stored_records
    from autotune.search.stats import leaders_to_remeasure

    budget = spec.budget.remeasure_launches()
    error = None
    while budget > 0 and not fenced():
        if spec.budget.wall_clock_s is not None and time.monotonic() - started >= spec.budget.wall_clock_s:
            break
        result = StudyResult(spec.study.name, spec, tuple(stored_records(study)))
        latest = {t.layout.key: t for t in result.fitting()}
        ev = result.evidence()
        leaders = [latest[k] for k in leaders_to_remeasure(ev.intervals, spread=ev.spread, runs=ev.runs)][:budget]
        if len(leaders) < 2:
            break
        error = _tune(spec, screening, study, tracker, parent, len(leaders), options, session, leaders,
                      settling=True, env=env, fenced=fenced) or error
        budget -= len(leaders)
    return error



def _fence_stopper(fenced: Callable[[], bool]):
    """Tune's stop condition while the run holds the study's lease: once another run has taken
    it, every trial in flight is stopped and nothing new starts (Tune asks after each event)."""
    from ray.tune.stopper import Stopper

    class FenceStop(Stopper):
        def __init__(self, fenced: Callable[[], bool]) -> None:  # an argument, not a closure: Tune
            self.fenced = fenced                                   # pickles its run config (Fence pickles)

        def __call__(self, trial_id: str, result: dict) -> bool:
            return self.fenced()

        def stop_all(self) -> bool:
            return self.fenced()

    return FenceStop(fenced)


def _tune(spec: Spec, screening, study, tracker: Tracker, parent: str, launches: int, options: RunOptions,
          session: int = 0, remeasure: list | None = None, settling: bool = False,
          env: dict[str, str] | None = None, fenced: Callable[[], bool] = lambda: False) -> str | None:
    """Run the trials; returns why MLflow stopped taking records mid-study, if it did.

    `settling`: only the `remeasure` leaders run, as re-measures that separate tied leaders.
    `env`: a user command's environment values, held by an actor for the run's lifetime."""
    import ray
    from ray import tune

    from ray.tune.logger import JsonLoggerCallback

    from autotune.search.searcher import LayoutSearcher, stored_records
    from autotune.study.recorder import Recorder
    from autotune.trials.owner import ADMITTED, FREE_WAIT_S, TrialOwner, admits, demand, free_now
    from autotune.trials.tune_trial import tune_trial

    # Only the JSON logger (Tune's result grid reads it); CSV and TensorBoard files are not needed.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    progress = Progress(spec.study.name + (" (re-measuring the leaders)" if settling else ""), launches,
                        spec.budget.wall_clock_s, live=options.live, spec=spec, known=stored_records(study))
    owners: list[TrialOwner] = []  # the study's owner of every placement group and rank process

    def release(number: int, close: bool) -> list[dict[str, Any]]:
        return owners[0].release(number, close) if owners else []

    stop_reasons: dict[str, str] = {}  # trial id -> why the early stopper stopped it
    recorder = Recorder(spec, tracker, parent, progress, session, settling=settling, release=release,
                        stop_reasons=stop_reasons, fenced=fenced)
    holder: list[Any] = []  # the program's environment values, when a user command has any

    def trial_config(number: int, layout: Layout, cand: Candidate) -> dict[str, Any]:
        config = make_trial_config(spec, number, layout, cand, holder[0].name if holder else None)
        config["owner"] = owners[0].name
        placement = config["placement"]
        config["demand"] = demand(placement.bundles(layout.world_size) if spec.trainable is None
                                  else placement.bundles())
        return config

    capacity: dict[str, float] = {}

    held_since: dict[int, float] = {}

    def admit(config: dict[str, Any], running: list[dict[str, Any]]) -> bool:
        if not admits(config["demand"], [c["demand"] for c in running], capacity):
            return False
        # A freed group's resources reach Ray's view a moment after its removal: wait for them
        # here, before the trial starts, rather than inside it (at most FREE_WAIT_S: on a cluster
        # shared with other jobs they may never all be free, and placement then waits its turn).
        first = held_since.setdefault(config["number"], time.monotonic())
        if time.monotonic() - first < FREE_WAIT_S and not free_now(config["demand"], ray.available_resources()):
            return False
        held_since.pop(config["number"], None)
        return True

    started_ray = ray_init(spec, options.address)
    try:
        owners.append(TrialOwner())
        capacity.update({k: v for k, v in ray.cluster_resources().items() if k in ADMITTED})
        # The first round of a study measures the cluster (autotune/study/cluster_profile.py) before
        # its first pick; later rounds and runs read the figures kept with the study.
        probed = PROFILE_ATTR not in study.user_attrs
        speed = speed_model_for(spec, study, probe=True)
        if probed and study.user_attrs.get(PROBE_ATTR):
            progress.note(console_line(study.user_attrs[PROBE_ATTR]))
        searcher = LayoutSearcher(spec, screening, study, trial_config, recorder.decided, recorder.complete,
                                  launches, session=session, remeasure=remeasure, speed=speed, admit=admit,
                                  on_answered=recorder.answered, fenced=fenced)
        scheduler = None
        if spec.budget.early_stop and not settling:  # re-measures run to the end: their steps all count
            from autotune.search.early_stop import NoiseAwareStopper

            scheduler = NoiseAwareStopper(spec, stored_records(study), stop_reasons)
        if env:
            from autotune.trials.command_trial import EnvHolder

            holder.append(EnvHolder(dict(env)))
        tuner = tune.Tuner(
            tune.with_resources(tune_trial, COORDINATOR_RESOURCES),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=launches, scheduler=scheduler,
                                        max_concurrent_trials=spec.budget.max_concurrent, reuse_actors=True,
                                        time_budget_s=spec.budget.wall_clock_s),
            run_config=tune.RunConfig(name=time.strftime("tune-%Y%m%d-%H%M%S") + ("-tied" if settling else ""),
                                      storage_path=str((spec.study.directory() / "ray").resolve()),
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      callbacks=[recorder, JsonLoggerCallback()], verbose=0,
                                      stop=_fence_stopper(fenced)),
        )
        with progress:
            tuner.fit()
    except OSError as exc:
        if exc.errno not in _WRITE_FAILURES:
            raise
        # The study's own files (storage, output folder) became unwritable.
        raise StudyError(f"the study could not write its state ({exc.strerror or exc}: {exc.filename or ''}); "
                         f"trials recorded so far are kept; free space or fix the folder, then run with --resume")
    finally:
        for o in owners:  # whatever ended the study (Ctrl-C included), nothing a trial held survives it
            try:
                o.close()
            except Exception:  # Ray already gone: the placement groups went with it
                pass
        for h in holder:
            try:
                h.close()
            except Exception:  # Ray already gone: the actor went with it
                pass
        if started_ray:
            ray.shutdown()
    return recorder.tracking_error
