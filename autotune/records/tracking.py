"""MLflow: one parent run per study, one child run per trial (pruned and failed ones too).

Only the driver writes, through MlflowClient: trials stream their results to it, so many
concurrent trials never contend for the SQLite file.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from autotune.redaction import error_line, redact  # one masking rule for everything written
from autotune.schema import INTERVAL_METRICS, LAYOUT_PARAMS, MEMORY_CATEGORIES, SUMMARY_METRICS
from autotune.space.spec import Spec
from autotune.trial_record import TrialRecord

STUDY_TAG = "autotune.study"
TRIAL_TAG = "autotune.trial"
PARENT_TAG = "mlflow.parentRunId"
FRONT_TAG = "autotune.pareto_front"


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any trial launches."""


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """MLflow retries an unreachable server for minutes by default; a preflight should not."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "30"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def public_spec(spec: Spec) -> Spec:
    """The spec as it may be shown: the values of `trainable.env` (tokens, passwords) masked."""
    if spec.trainable is None or not spec.trainable.env:
        return spec
    masked = spec.trainable.model_copy(update={"env": {k: "***" for k in spec.trainable.env}})
    return spec.model_copy(update={"trainable": masked})


def public_space_text(spec: Spec, text: str) -> str:
    """The space file as it may be logged: passwords in URIs masked and, where the program gets
    environment values, the file re-written with those values masked (its comments are lost)."""
    if spec.trainable is None or not spec.trainable.env:
        return redact(text)
    import yaml

    data = yaml.safe_load(text)
    data["trainable"]["env"] = {k: "***" for k in data["trainable"]["env"]}
    return redact("# environment values of trainable.env are masked\n" + yaml.safe_dump(data, sort_keys=False))


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.experiment = experiment
        self.experiment_id: str | None = None
        self._refused: str | None = None
        try:
            self.client = MlflowClient(tracking_uri=uri)
        except Exception as exc:  # a scheme MLflow has no store for: said by check(), as a config error
            text = str(exc).strip()
            why = (f"MLflow has no store for {uri.split('://', 1)[0]!r} URIs" if "unsupported URI" in text
                   else error_line(exc, 200))
            self._refused = (f"tracking.uri: MLflow cannot keep runs at {redact(uri)} ({why}); use a folder, "
                             "sqlite:///FILE.db, http(s)://SERVER or postgresql://USER@HOST/DB")

    def check(self) -> None:
        """Reach the store and make sure the experiment exists, or say clearly why not."""
        if self._refused is not None:
            raise TrackingError(self._refused)
        try:
            with _fail_fast():
                exp = self.client.get_experiment_by_name(self.experiment)
                self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        except Exception as exc:  # any failure here means no trial could be recorded
            raise TrackingError(f"tracking store {redact(self.uri)} is not usable ({error_line(exc)}); start the server, fix "
                                f"tracking.uri / MLFLOW_TRACKING_URI, or drop it to use sqlite:///mlflow.db") from None

    # -- study ------------------------------------------------------------------------------------
    def start_study(self, spec: Spec, spec_text: str, machine: dict[str, Any], parent_run_id: str | None) -> str:
        """Create the parent run, or reopen the one a resumed study already has."""
        if parent_run_id:
            self.client.update_run(parent_run_id, status="RUNNING")
            return parent_run_id
        tags = {STUDY_TAG: spec.study.name, "autotune.device": spec.cluster.device,
                "autotune.model": spec.model.preset, "autotune.ranks": str(spec.cluster.total_ranks),
                "autotune.machine": json.dumps(machine, sort_keys=True)[:5000],
                "mlflow.note.content": f"Tuning study {spec.study.name}: {spec.model.preset} on "
                                       f"{spec.cluster.total_ranks} x {spec.cluster.device}"}
        run = self.client.create_run(self.experiment_id, run_name=f"study-{spec.study.name}", tags=tags)
        rid = run.info.run_id
        self.client.log_text(rid, public_space_text(spec, spec_text), "space.yaml")
        self.client.log_dict(rid, json.loads(redact(public_spec(spec).model_dump_json())), "spec.json")
        for key, value in (("global_batch_size", spec.search.global_batch_size),
                           ("seq_len", spec.search.seq_len), ("memory_gb", spec.cluster.memory_gb),
                           ("memory_cap", spec.objective.memory_cap), ("trials", spec.budget.trials)):
            self.client.log_param(rid, key, value)
        return rid

    def finish_study(self, parent_run_id: str, report_dir: Path | None, status: str = "FINISHED") -> None:
        if report_dir is not None and report_dir.exists():
            self.client.log_artifacts(parent_run_id, str(report_dir), "report")
        self.client.set_terminated(parent_run_id, status=status)

    def tag_front(self, parent_run_id: str, front: list[TrialRecord], pick: TrialRecord | None, rule: str) -> None:
        """A Pareto study's front on its parent run (trial numbers, layouts, the pick and its rule),
        and `autotune.pareto_front=true` on each member's own run (false on former members)."""
        self.client.set_tag(parent_run_id, FRONT_TAG, ",".join(str(t.number) for t in front))
        self.client.set_tag(parent_run_id, FRONT_TAG + "_layouts", "; ".join(t.layout.key for t in front)[:5000])
        self.client.set_tag(parent_run_id, "autotune.deploy_pick", "" if pick is None else str(pick.number))
        self.client.set_tag(parent_run_id, "autotune.deploy_rule", rule[:5000])
        members = {t.mlflow_run_id for t in front if t.mlflow_run_id}
        former = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                                                               f"tags.`{FRONT_TAG}` = 'true'")
        for run in former:
            if run.info.run_id not in members:
                self.client.set_tag(run.info.run_id, FRONT_TAG, "false")
        for run_id in members:
            self.client.set_tag(run_id, FRONT_TAG, "true")

    def close_stale(self, parent_run_id: str) -> list[str]:
        """Child runs a killed driver left RUNNING are marked KILLED; returns their ids."""
        stale = self.client.search_runs([self.experiment_id],
                                        f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'")
        for run in stale:
            self.client.set_tag(run.info.run_id, "status", "interrupted")
            self.client.set_tag(run.info.run_id, "reason", "the driver stopped while this trial ran")
            self.client.set_terminated(run.info.run_id, status="KILLED")
        return [r.info.run_id for r in stale]

    # -- trials -----------------------------------------------------------------------------------
    def start_trial(self, parent_run_id: str, number: int, params: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number:04d} {params.get('layout', '')}",
                                     tags={PARENT_TAG: parent_run_id, TRIAL_TAG: str(number), "status": "running"})
        from mlflow.entities import Param

        self.client.log_batch(run.info.run_id, params=[Param(k, str(params[k])) for k in LAYOUT_PARAMS if k in params])
        return run.info.run_id

    def log_step(self, run_id: str, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = _now_ms()
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in values.items()])

    def finish_trial(self, run_id: str, record: TrialRecord, spec: Spec) -> None:
        from mlflow.entities import Metric, RunTag

        ts = _now_ms()
        metrics = [Metric(k, float(record.metrics[k]), ts, 0) for k in (*SUMMARY_METRICS, *INTERVAL_METRICS)
                   if k in record.metrics]
        metrics += [Metric(k, float(v), ts, 0) for k, v in record.prediction.items()]
        if record.duration_s is not None:
            metrics.append(Metric("trial_duration_s", float(record.duration_s), ts, 0))
        for r in record.ranks:  # every rank's memory, as rank-indexed series
            for k in ("peak_mem_bytes", *MEMORY_CATEGORIES):
                if k in r:
                    metrics.append(Metric(f"rank_{k}", float(r[k]), ts, int(r["rank"])))
        tags = [RunTag("status", record.status.value), RunTag("reason", record.reason[:4000]),
                RunTag("layout", record.layout.key), RunTag("attempts", str(record.attempts))]
        nodes = sorted({str(r.get("node", "")) for r in record.ranks if r.get("node")})
        if nodes:
            tags.append(RunTag("nodes", ",".join(nodes)))
        for i in range(0, len(metrics), 900):
            self.client.log_batch(run_id, metrics=metrics[i:i + 900])
        self.client.log_batch(run_id, tags=tags)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "metrics.jsonl"
            path.write_text(_metrics_file(record, spec))
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, status="FINISHED" if record.ok else "FAILED")

    def log_unlaunched(self, parent_run_id: str, record: TrialRecord, spec: Spec) -> str:
        """A trial decided without running (pruned by the memory model, invalid): still a child run."""
        params = {**record.layout.params(), "global_batch_size": spec.search.global_batch_size,
                  "seq_len": spec.search.seq_len, "layout": record.layout.key}
        run_id = self.start_trial(parent_run_id, record.number, params)
        self.finish_trial(run_id, record, spec)
        return run_id

    def log_record(self, parent_run_id: str, record: TrialRecord, spec: Spec, run_id: str | None = None) -> str:
        """A whole trial after the fact (sync): params, step series, summary, status."""
        if run_id is None:
            params = {**record.layout.params(), "global_batch_size": spec.search.global_batch_size,
                      "seq_len": spec.search.seq_len, "layout": record.layout.key}
            run_id = self.start_trial(parent_run_id, record.number, params)
        tokens = spec.search.global_batch_size * spec.search.seq_len
        warm = spec.budget.warmup_steps
        for i, loss in enumerate(record.losses):
            values = {"loss": loss}
            j = i - warm
            if 0 <= j < len(record.step_times) and record.step_times[j] > 0:
                values.update(step_time_s=record.step_times[j], tokens_per_s=tokens / record.step_times[j])
            self.log_step(run_id, i, values)
        self.finish_trial(run_id, record, spec)
        return run_id

    def sync(self, parent_run_id: str | None, records: list[TrialRecord], spec: Spec, spec_text: str,
             machine: dict[str, Any]) -> tuple[str, int, int]:
        """Copy records MLflow lacks (after an outage); returns (parent, created, completed)."""
        parent = None
        if parent_run_id:
            try:
                parent = self.client.get_run(parent_run_id).info.run_id
            except Exception:
                parent = None
        if parent is None:
            parent = self.start_study(spec, spec_text, machine, None)
        children: dict[int, Any] = {}
        for run in self.trial_runs(parent):
            number = run.data.tags.get(TRIAL_TAG)
            if number is not None:
                children[int(number)] = run
        created = completed = 0
        for record in records:
            run = children.get(record.number)
            if run is None:
                self.log_record(parent, record, spec)
                created += 1
            elif run.info.status == "RUNNING":  # started before the outage, never closed
                self.finish_trial(run.info.run_id, record, spec)
                completed += 1
        return parent, created, completed

    # -- reading back -----------------------------------------------------------------------------
    def trial_runs(self, parent_run_id: str) -> list[Any]:
        return self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                       max_results=10000)


def _metrics_file(record: TrialRecord, spec: Spec) -> str:
    """The trial's metrics as the trainable writes them: step lines, then the summary."""
    lines = []
    for i, loss in enumerate(record.losses):
        line = {"type": "step", "step": i, "loss": loss,
                "phase": "warmup" if i < spec.budget.warmup_steps else "measure"}
        j = i - spec.budget.warmup_steps
        if 0 <= j < len(record.step_times):
            line["step_time_s"] = record.step_times[j]
        lines.append(line)
    lines.append({"type": "summary", "status": record.status.value, "reason": record.reason,
                  "layout": record.layout.key, **record.metrics, **record.prediction, "ranks": list(record.ranks)})
    return "".join(json.dumps(line) + "\n" for line in lines)


def machine_description() -> dict[str, Any]:
    return {"host": platform.node(), "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count()}
