"""Layouts for Ray Tune: the step-time model as a prior, Optuna's samplers, the memory model and
the study's own history.

With `study.sampler: auto` every launch is the fitting layout of highest expected improvement
under the calibrated step-time model and its measured error (`autotune.search.prior`), re-ranked
after every measured trial; it is enqueued into Optuna, so the study holds every trial. With a
named sampler, Optuna proposes. Optuna's samplers see the space as independent knobs (ep, tp, pp, world or dp, micro-batch,
precision, recompute, schedule), so they can learn which values help. A proposal that breaks a
structural rule or is predicted over the memory cap is answered at once as an infeasible
trial (Optuna constraint > 0) and recorded, never launched; one that repeats a layout already
measured gets its measured result back. Only new, fitting layouts reach Tune. Failed runs
(oom, timeout, crash) are told as COMPLETE and infeasible: TPE learns nothing from FAIL.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from ray.tune.search import Searcher

from autotune.predict.candidates import OVER_MEMORY, Candidate, Screening, judge
from autotune.predict.speedmodel import SpeedModel
from autotune.search.prior import choose, error_scale, feasible
from autotune.schema import INTERVAL_METRICS, Status
from autotune.space.layout import Layout
from autotune.space.spec import Spec
from autotune.trial_record import TrialRecord

log = logging.getLogger(__name__)

RECORD_ATTR = "record"
KEY_ATTR = "layout_key"
MAX_FREE_PROPOSALS = 2000
# How the step-time model steers a study: "prior" (`study.sampler: auto`), every pick the
# highest expected improvement under the calibrated model and its measured error; "none", the
# sampler alone. The rest are ablations for benchmarks/search_efficiency.py: "greedy", the
# calibrated model's fastest unmeasured layout every turn; "opening", a fixed opening of the
# uncalibrated model's fastest layouts (one per (ep, tp, pp) family) then the sampler;
# "frontier", the memory frontier in rules-of-thumb order then the sampler; "alternate", the
# opening then the model's pick every other turn, the sampler between.
GUIDES = ("prior", "none", "greedy", "opening", "frontier", "alternate")
FAILED_STATUSES = {Status.OOM, Status.TIMEOUT, Status.CRASHED, Status.NODE_LOST, Status.INVALID, Status.NO_METRICS}


def open_storage(url: str) -> optuna.storages.BaseStorage | str:
    """A journal file (path) or an RDB URL (anything with '://')."""
    if "://" in url:
        return url
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(url))


def make_sampler(spec: Spec) -> optuna.samplers.BaseSampler:
    seed = spec.study.seed
    name = spec.study.sampler
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler({k: list(d.choices) for k, d in distributions(spec).items()}, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                      n_startup_trials=max(4, min(10, spec.budget.trials // 3)))


_RECOMPUTE_ORDER = {"none": 0, "selective": 1, "full": 2}
# What a device runs fastest, first: CPUs rarely have bf16/fp16 matmul units; GPUs have.
_PRECISION_ORDER = {"cpu": ("fp32", "bf16", "fp16", "bf16-params"), "cuda": ("bf16", "bf16-params", "fp16", "fp32")}


def _dominates(a: Layout, b: Layout) -> bool:
    """`a` is at least as fast as `b` by construction: the same layout with less recomputation
    (recompute only adds work) and, without pipelining, a micro-batch at least as large (fewer,
    larger matmuls; with pp > 1 a larger micro-batch means fewer micro-batches and a larger
    bubble, so nothing is claimed there)."""
    if a == b or (a.ep, a.tp, a.pp, a.dp, a.precision, a.schedule) != (b.ep, b.tp, b.pp, b.dp, b.precision,
                                                                          b.schedule):
        return False
    if _RECOMPUTE_ORDER[a.recompute] > _RECOMPUTE_ORDER[b.recompute]:
        return False
    return a.micro_batch_size == b.micro_batch_size or (a.pp == 1 and a.micro_batch_size > b.micro_batch_size)


def frontier(spec: Spec, screening: Screening) -> list[Layout]:
    """The fitting layouts no other fitting layout dominates, most promising first.

    The memory model knows which layouts fit; among them, one that recomputes less or takes a
    larger micro-batch than a fitting twin cannot be slower. These are where the search starts
    (enqueued into Optuna, so the sampler learns from them like from its own proposals), in
    the order of the usual rules of thumb: the device's fast precision; as little model
    parallelism (ep * tp * pp: collectives every layer) as memory allows, data parallelism being
    the cheapest; the largest micro-batch; the most ranks; the least recomputation.
    """
    fitting = [c.layout for c in screening.candidates if c.fits]
    front = [b for b in fitting if not any(_dominates(a, b) for a in fitting)]
    order = _PRECISION_ORDER[spec.cluster.device]

    def rank(layout: Layout) -> tuple:
        precision = order.index(layout.precision) if layout.precision in order else len(order)
        return (precision, layout.ep * layout.tp * layout.pp, -layout.micro_batch_size, -layout.world_size,
                _RECOMPUTE_ORDER[layout.recompute], layout.key)

    return sorted(front, key=rank)


MAX_OPENING_BUBBLE = 0.3  # a pipeline idle this much opens nothing while a less idle layout is predicted faster


def opening(spec: Spec, screening: Screening, speed: SpeedModel, size: int) -> list[Layout]:
    """The fastest predicted frontier layouts, one per (ep, tp, pp) family, fastest first.

    One per family: the first measurements then also tell the calibration about every kind of
    communication the leaders use, not five micro-batch variants of one layout. Equal
    predictions go to the layout predicted to need less memory (1F1B before GPipe), never to
    its name. A layout whose pipeline bubble is predicted over MAX_OPENING_BUBBLE is left out
    while some fitting layout with less bubble is predicted faster.
    """
    front = frontier(spec, screening)
    if not front or size <= 0:
        return []
    times = speed.predict(front)
    peak = {c.layout: c.prediction.total for c in screening.candidates if c.fits and c.prediction}
    order = sorted(range(len(front)), key=lambda i: (times.step_time_s[i], peak.get(front[i], 0)))
    bubble = times.bubble_frac
    out: list[Layout] = []
    families: set[tuple[int, int, int]] = set()
    least_bubble = float("inf")  # among the layouts predicted faster than the current one
    for i in order:
        lay = front[i]
        family = (lay.ep, lay.tp, lay.pp)
        idle = bool(bubble[i] > MAX_OPENING_BUBBLE and least_bubble < bubble[i])
        least_bubble = min(least_bubble, float(bubble[i]))
        if idle or family in families:
            continue
        families.add(family)
        out.append(lay)
        if len(out) == size:
            break
    return out


def warm_start_size(spec: Spec) -> int:
    """How many frontier layouts a fixed opening holds (the "opening" and "alternate" guides)."""
    if spec.study.sampler != "auto":
        return 0
    return max(2, spec.budget.trials // 3)


def distributions(spec: Spec) -> dict[str, CategoricalDistribution]:
    s = spec.search
    space = {"ep": CategoricalDistribution(sorted(set(s.ep))), "tp": CategoricalDistribution(sorted(set(s.tp))),
             "pp": CategoricalDistribution(sorted(set(s.pp)))}
    if s.dp == "auto":
        space["world_size"] = CategoricalDistribution(spec.world_sizes)
    else:
        space["dp"] = CategoricalDistribution(sorted(set(s.dp)))
    space["micro_batch_size"] = CategoricalDistribution(sorted(set(s.micro_batch_size)))
    space["precision"] = CategoricalDistribution(list(dict.fromkeys(s.precision)))
    space["recompute"] = CategoricalDistribution(list(dict.fromkeys(s.recompute)))
    if len(set(s.schedule)) > 1 and max(s.pp) > 1:
        space["schedule"] = CategoricalDistribution(list(dict.fromkeys(s.schedule)))
    return space


def params_for(spec: Spec, layout: Layout) -> dict[str, Any]:
    """The sampler's parameters that mean this layout (the inverse of layout_from_params)."""
    space = distributions(spec)
    p: dict[str, Any] = {"ep": layout.ep, "tp": layout.tp, "pp": layout.pp,
                         "micro_batch_size": layout.micro_batch_size, "precision": layout.precision,
                         "recompute": layout.recompute}
    p["world_size" if "world_size" in space else "dp"] = layout.world_size if "world_size" in space else layout.dp
    if "schedule" in space:
        p["schedule"] = layout.schedule
    return p


def layout_from_params(spec: Spec, p: dict[str, Any]) -> Layout | str:
    """The layout a proposal means, or why it means none (a world the degrees do not divide)."""
    ep, tp, pp = int(p["ep"]), int(p["tp"]), int(p["pp"])
    if "world_size" in p:
        world = int(p["world_size"])
        if world % (ep * tp * pp):
            return f"world size {world} is not divisible by ep*tp*pp ({ep}*{tp}*{pp} = {ep * tp * pp})"
        dp = world // (ep * tp * pp)
    else:
        dp = int(p["dp"])
    schedule = str(p.get("schedule", spec.search.schedule[0]))
    return Layout(ep, tp, pp, dp, int(p["micro_batch_size"]), str(p["precision"]), str(p["recompute"]),
                  schedule if pp > 1 else spec.search.schedule[0])


def create_study(spec: Spec, storage: Any, load_if_exists: bool) -> optuna.Study:
    kwargs: dict[str, Any] = {"directions": ["maximize", "minimize"]} if spec.objective.minimize else \
        {"direction": "maximize"}
    return optuna.create_study(storage=storage, sampler=make_sampler(spec), study_name=spec.study.name,
                               load_if_exists=load_if_exists, **kwargs)


def stored_records(study: optuna.Study) -> list[TrialRecord]:
    """Every trial the study decided, from its own storage (the report's source of truth)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        raw = t.user_attrs.get(RECORD_ATTR)
        if raw:
            out.append(TrialRecord.from_dict(json.loads(raw)))
    return sorted(out, key=lambda r: r.number)


def reconcile(study: optuna.Study) -> list[int]:
    """Trials a killed driver left RUNNING are closed as FAIL (Optuna's heartbeat does not cover
    ask/tell); their layouts have no record, so the search will propose them again."""
    stale = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for number in stale:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    return stale


def dashboard_attrs(record: TrialRecord) -> dict[str, Any]:
    """What a trial's row says in optuna-dashboard (`autotune dashboard`): its status and why,
    and its measured and predicted peak memory per rank in MB (the full record is in RECORD_ATTR)."""
    attrs: dict[str, Any] = {"status": record.status.value, "reason": record.reason}
    for name, value in (("peak_mem_mb", record.metrics.get("peak_mem_bytes")),
                        ("pred_peak_mem_mb", record.prediction.get("pred_peak_mem_bytes"))):
        if value is not None:
            attrs[name] = round(float(value) / 1e6, 3)
    return attrs


class LayoutSearcher(Searcher):
    """A Ray Tune Searcher over Optuna ask/tell with memory-model pruning and a result cache."""

    def __init__(self, spec: Spec, screening: Screening, study: optuna.Study,
                 make_config: Callable[[int, Layout, Candidate], dict[str, Any]],
                 on_decided: Callable[[TrialRecord], TrialRecord], on_complete: Callable[[str, dict | None, bool], TrialRecord],
                 launches: int, session: int = 0, remeasure: list[TrialRecord] | None = None,
                 speed: SpeedModel | None = None,
                 admit: Callable[[dict[str, Any], list[dict[str, Any]]], bool] | None = None,
                 on_answered: Callable[[int, str], None] | None = None,
                 fenced: Callable[[], bool] = lambda: False, guide: str | None = None) -> None:
        super().__init__(metric="tokens_per_s", mode="max")
        # fenced(): this run no longer holds the study's lease; another run writes it now, so
        # this one proposes nothing more and tells Optuna nothing (autotune.study.lease).
        self.fenced = fenced
        self.spec, self.screening, self.study = spec, screening, study
        self.space = distributions(spec)
        self.make_config, self.on_decided, self.on_complete = make_config, on_decided, on_complete
        self.launches_left = launches
        self.session = session
        self.remeasure = list(remeasure or [])  # measured layouts to launch again first
        self.cap = screening.cap_bytes
        self.pending: dict[str, tuple[optuna.trial.Trial, Layout, dict[str, Any]]] = {}
        # admit(config, running configs): whether the cluster can place the trial now. A proposal
        # that cannot is held back (Tune asks again) rather than started to wait for placement.
        self.admit = admit
        # on_answered(trial number, kind): a proposal answered at once, without a run and without a
        # record of its own ("repeat", "twin", "decided", "no layout"), so the console can account
        # for every trial number.
        self.on_answered = on_answered or (lambda number, kind: None)
        self.held: tuple[optuna.trial.Trial, Layout, dict[str, Any]] | None = None
        self.in_flight: set[str] = set()
        self.known: dict[str, TrialRecord] = {}
        self.decided_without_run: set[str] = set()
        for record in stored_records(study):
            if record.status in (Status.PRUNED_BY_MEMORY_MODEL, Status.INVALID) and not record.metrics:
                self.decided_without_run.add(record.layout.key)
            else:
                self.known[record.layout.key] = record
        self.fitting = {c.layout.key for c in screening.candidates if c.fits}
        self.fitting_layouts = [c.layout for c in screening.candidates if c.fits]
        self.fitting_peaks = np.array([c.prediction.total if c.prediction else 0 for c in screening.candidates if c.fits],
                                      dtype=float)
        # How the step-time model steers (`study.sampler: auto`: "prior", every pick by expected
        # improvement under the model and its measured error; the others are the benchmark's
        # ablations, see GUIDES). The model is refit on every measured trial.
        self.guide = guide or ("prior" if spec.study.sampler == "auto" else "none")
        if self.guide not in GUIDES:
            raise ValueError(f"guide {self.guide!r}: expected one of {', '.join(GUIDES)}")
        # The prior search weighs the model's leave-one-out error, so its fits compute it.
        self.with_loo = self.guide == "prior"
        self.speed = (speed or SpeedModel.of(spec)).fit_records(self.known.values(), with_loo=self.with_loo)
        self.fitting_index = {lay.key: i for i, lay in enumerate(self.fitting_layouts)}
        self.fitting_fits = feasible(self.fitting_peaks, self.cap)
        self.rng = np.random.default_rng(spec.study.seed)
        self.turn = 0
        # A study that continues has already started: only a new one opens on a fixed list.
        fresh = not self.known and not self.decided_without_run
        self.opening: list[Layout] = []
        if fresh and self.guide in ("opening", "alternate"):
            self.opening = opening(spec, screening, self.speed, warm_start_size(spec))
        elif fresh and self.guide == "frontier":
            self.opening = frontier(spec, screening)

    # -- telling Optuna -----------------------------------------------------------------------------
    def _values(self, record: TrialRecord) -> tuple[list[float] | float, float]:
        """Objective value(s) and constraint (> 0 = infeasible) of a decided trial."""
        tps = record.tokens_per_s if record.status in (Status.OK, Status.EARLY_STOPPED) else 0.0
        peak = float(record.metrics.get("peak_mem_bytes") or record.prediction.get("pred_peak_mem_bytes") or 0)
        if record.status in (Status.OK, Status.EARLY_STOPPED):
            constraint = (peak - self.cap) / self.cap if peak else -1.0
        elif record.status == Status.PRUNED_BY_MEMORY_MODEL:
            constraint = max((peak - self.cap) / self.cap, 1e-3)
        else:
            constraint = 1.0
        if self.spec.objective.minimize:
            return [tps, peak if peak else float(self.cap) * 10], constraint
        return tps, constraint

    def _tell(self, trial: optuna.trial.Trial, record: TrialRecord, store: bool) -> None:
        values, constraint = self._values(record)
        trial.set_constraint("memory_and_failures", constraint)
        trial.set_user_attr(KEY_ATTR, record.layout.key)
        for k in INTERVAL_METRICS:  # beside the record: visible to Optuna's own tools
            if k in record.metrics:
                trial.set_user_attr(k, float(record.metrics[k]))
        for key, value in dashboard_attrs(record).items():
            trial.set_user_attr(key, value)
        if store:
            trial.set_user_attr(RECORD_ATTR, json.dumps(record.to_dict()))
        self.study.tell(trial, values, state=TrialState.COMPLETE)

    # -- Tune's Searcher interface ------------------------------------------------------------------
    def _launch(self, trial_id: str, trial: optuna.trial.Trial, layout: Layout, cand: Candidate,
                **extra: Any) -> dict[str, Any]:
        config = {**self.make_config(trial.number, layout, cand), **extra}
        # The step-time prediction as the model stood when the trial was chosen, beside memory's.
        config["prediction"] = {**config.get("prediction", {}), **self.speed.prediction_metrics(layout)}
        self.in_flight.add(layout.key)
        self.launches_left -= 1
        self.held = (trial, layout, config)
        return self._start_held(trial_id)

    def _launch_chosen(self, trial_id: str, layout: Layout, **extra: Any) -> dict[str, Any] | None:
        """Launch a layout the searcher chose itself: enqueued into Optuna first, so the study holds
        it as a trial the sampler learns from like its own proposals."""
        self.study.enqueue_trial(params_for(self.spec, layout), skip_if_exists=False)
        trial = self.study.ask(self.space)
        return self._launch(trial_id, trial, layout, judge(self.spec, layout), **extra)

    def _start_held(self, trial_id: str) -> dict[str, Any] | None:
        assert self.held is not None
        config = self.held[2]
        if self.admit is not None and not self.admit(config, [c for _, _, c in self.pending.values()]):
            return None
        self.pending[trial_id], self.held = self.held, None
        return config

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.fenced():
            return Searcher.FINISHED
        if self.held is not None:
            return self._start_held(trial_id)
        if self.launches_left <= 0:
            return Searcher.FINISHED
        while self.remeasure:
            previous = self.remeasure.pop(0)
            if previous.layout.key in self.in_flight:
                continue
            return self._launch_chosen(trial_id, previous.layout, remeasure_of=previous.number)
        while self.opening:
            layout = self.opening.pop(0)
            if layout.key in self.known or layout.key in self.in_flight:
                continue
            return self._launch_chosen(trial_id, layout)
        if self.guide in ("prior", "greedy"):
            layout = self._prior_pick() if self.guide == "prior" else self._model_pick()
            if layout is None:
                return Searcher.FINISHED  # every fitting layout is measured, running or failed
            return self._launch_chosen(trial_id, layout)
        if self.guide == "alternate":
            self.turn += 1
            layout = self._model_pick() if self.turn % 2 == 1 else None
            if layout is not None:
                return self._launch_chosen(trial_id, layout)
        for _ in range(MAX_FREE_PROPOSALS):
            if not (self.fitting - set(self.known) - self.in_flight):
                return Searcher.FINISHED  # every fitting layout is measured or running
            trial = self.study.ask(self.space)
            layout = layout_from_params(self.spec, trial.params)
            if isinstance(layout, str):  # not a layout at all: tell it infeasible, keep no record
                trial.set_constraint("memory_and_failures", 1.0)
                trial.set_user_attr("status", Status.INVALID.value)
                trial.set_user_attr("reason", layout)
                self.study.tell(trial, [0.0, float(self.cap) * 10] if self.spec.objective.minimize else 0.0)
                self.on_answered(trial.number, "no layout")
                continue
            key = layout.key
            if key in self.known:
                self._tell(trial, self.known[key], store=False)
                self.on_answered(trial.number, "repeat")
                continue
            if key in self.in_flight:
                self.study.tell(trial, state=TrialState.FAIL)  # a twin is running; constant liar covers it
                self.on_answered(trial.number, "twin")
                continue
            cand = judge(self.spec, layout)
            if not cand.fits:
                status = Status.PRUNED_BY_MEMORY_MODEL if cand.verdict == OVER_MEMORY else Status.INVALID
                record = TrialRecord(number=trial.number, layout=layout, status=status, reason=cand.reason,
                                     prediction=cand.prediction.as_metrics() if cand.prediction else {},
                                     session=self.session)
                first = key not in self.decided_without_run
                if first:
                    self.decided_without_run.add(key)
                    record = self.on_decided(record)
                else:
                    self.on_answered(trial.number, "decided")
                self._tell(trial, record, store=first)
                continue
            return self._launch(trial_id, trial, layout, cand)
        return Searcher.FINISHED

    def _prior_pick(self) -> Layout | None:
        """The fitting layout of highest expected improvement under the calibrated model and its
        error on this study's trials (`autotune.search.prior`)."""
        if not self.fitting_layouts:
            return None
        predicted = np.log(self.speed.predict(self.fitting_layouts).tokens_per_s)
        index = self.fitting_index

        def pred(layout: Layout) -> float:
            i = index.get(layout.key)
            return float(predicted[i]) if i is not None else float(np.log(self.speed.predict([layout]).tokens_per_s[0]))

        ok = [r for r in self.known.values() if r.status == Status.OK and r.tokens_per_s > 0]
        measured = [(r.layout, pred(r.layout), float(np.log(r.tokens_per_s))) for r in ok]
        failed = [(r.layout, pred(r.layout)) for r in self.known.values()
                  if r.status in FAILED_STATUSES and r.status != Status.NODE_LOST]
        within = [float(np.log(r.tokens_per_s)) for r in ok
                  if float(r.metrics.get("peak_mem_bytes") or 0) <= self.cap]
        pending = [(lay, float(predicted[index[lay.key]])) for _, lay, _ in self.pending.values() if lay.key in index]
        exclude = set(self.known) | self.in_flight | self.decided_without_run
        amplitude = error_scale(self.speed.calibration.loo_log_residuals)
        i = choose(predicted, self.fitting_layouts, measured, pending, amplitude, exclude, self.rng, failed,
                   max(within) if within else None, self.fitting_fits, self.fitting_peaks)
        return None if i is None else self.fitting_layouts[i]

    def _model_pick(self) -> Layout | None:
        """The calibrated model's fastest fitting layout not measured, running or decided."""
        if not self.fitting_layouts:
            return None
        times = self.speed.predict(self.fitting_layouts)
        for i in times.order(self.fitting_peaks):
            lay = self.fitting_layouts[int(i)]
            if lay.key not in self.known and lay.key not in self.in_flight:
                return lay
        return None

    # Tune checkpoints its searcher for `Tuner.restore`, which autotune never uses: a study resumes
    # from its Optuna storage, which already holds every decided trial and its record (see
    # `stored_records`, `reconcile`). So there is nothing to save, on purpose, and nothing to restore.
    def save(self, checkpoint_path: str) -> None:
        """Nothing to write: the Optuna storage is the searcher's state."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to read: a resumed study rebuilds this searcher from its Optuna storage."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.pending:
            return
        trial, layout, config = self.pending.pop(trial_id)
        self.in_flight.discard(layout.key)
        # Tune flattens results; the trial's own config rides along intact under its own key.
        record = self.on_complete(trial_id, {**(result or {}), "autotune_config": config}, error)
        if self.fenced():  # the new holder closes this trial as interrupted: written once, by it
            return
        self.known[layout.key] = record
        self._tell(trial, record, store=True)
        if record.status == Status.OK:
            try:
                self.speed = self.speed.fit_records(self.known.values(), with_loo=self.with_loo)
            except (ValueError, RuntimeError) as exc:  # a fit that fails keeps the previous one
                log.warning("step-time calibration skipped: %s", exc)
