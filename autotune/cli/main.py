"""`autotune`: validate a space, run a study, write its report, open the MLflow UI."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from autotune.cli.common import _fail, _load, err, out
from autotune.cli.validate import validate
from autotune.redaction import error_line
from autotune.space.spec import Spec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find the fastest MoE training layout that fits, with measured evidence.")


@app.callback()
def _group() -> None:
    """Find the fastest MoE training layout that fits, with measured evidence."""


def _default_runs_dir() -> Path:
    from autotune.settings import default_runs_dir

    return default_runs_dir()


def _study_of(study: str, directory: Optional[Path], storage: Optional[str]) -> tuple[str, Path, Optional[str]]:
    """A study named by its name or by its space file, as `autotune run` took it: its name, runs
    folder and storage (options given on the command line win; the environment's settings apply
    as they do to `run`)."""
    path = Path(study)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        spec = _load(path, resolved=True)
        return spec.study.name, directory or Path(spec.study.output_dir), storage or spec.study.storage
    return study, directory or _default_runs_dir(), storage


def _route_logs(directory: Path, verbose: bool, libraries: tuple[str, ...] = ("ray", "optuna", "mlflow")):
    """Other libraries' messages to `<directory>/autotune.log` (autotune/cli/logs.py); None when the
    folder is not writable (the command then says so in its own words)."""
    import importlib

    from autotune.cli.logs import LOG_NAME, route_to_file

    # Ray and MLflow attach their console handlers when imported: import them first, then adopt.
    for name in libraries:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional one: the command says what to install
            pass
    try:
        return route_to_file(directory / LOG_NAME, verbose)
    except OSError:
        return None


app.command()(validate)  # autotune/cli/validate.py


@app.command()
def run(
    space: Path = typer.Argument(..., help="the space file (YAML)"),
    resume: bool = typer.Option(False, "--resume", help="finish an interrupted study of the same name"),
    extend: bool = typer.Option(False, "--continue",
                                help="start the study, or if it exists run budget.trials more trials (scheduled runs)"),
    remeasure_top: Optional[int] = typer.Option(None, "--remeasure-top", min=0,
                                                help="when continuing, measure the best K layouts again first"),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS",
                                          help="Ray cluster to use (default: a local Ray)"),
    live: Optional[bool] = typer.Option(None, "--live/--plain", help="live view or plain log (default: by terminal)"),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="also show Ray's, MLflow's and Optuna's own messages (always in autotune.log)"),
) -> None:
    """Run a tuning study: Optuna proposes, Ray Tune runs real trials, MLflow records, a report is written."""
    spec = _load(space, resolved=True)
    if resume and extend:
        _fail("--resume and --continue: choose one (--resume finishes the budget, --continue adds to it)")
    from autotune.deploy.jobs import JOB_ENV, JobError, check_job_settings

    if os.environ.get(JOB_ENV):  # a submitted job: its state must outlive it
        try:
            check_job_settings(spec)
        except JobError as exc:
            _fail(str(exc))
    routing = _route_logs(spec.study.directory(), verbose)
    code = 0
    try:
        _run(space, spec, dict(resume=resume, extend=extend, address=address, live=live, remeasure_top=remeasure_top))
    except typer.Exit as exc:
        code = exc.exit_code
        raise
    finally:
        if routing is not None:
            routing.close()
            if code != 2:  # a study that ran (bad input stops before anything is worth reading)
                out.print(f"log: {_shown(routing.path)} (Ray, MLflow and Optuna messages"
                          f"{'' if verbose else '; --verbose shows them here'})", markup=False)


def _shown(path: Path) -> Path:
    """A path as the user can type it: relative to the working folder when it lies inside it
    (the runs folder is resolved to an absolute path once, in settings)."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return Path(path)


def _run(space: Path, spec: Spec, options: dict) -> None:
    from autotune.study.runner import RunOptions, run_study
    from autotune.study.store import StudyError

    try:
        result = run_study(spec, space.read_text(), RunOptions(**options))
    except StudyError as exc:
        _fail(str(exc), exc.code)
    except Exception as exc:  # a failure of autotune itself: one line here, the traceback in a file
        _fail(_crash_report(spec, exc), 1)
    report = spec.study.directory() / "report"
    if result.tracking_error:
        err.print(f"warning: {result.tracking_error}", markup=False)
    best = result.best()
    out.print(f"study {result.name}: {len(result.trials)} trials; by status: "
              + ", ".join(f"{k} {v}" for k, v in sorted(result.counts_by_status().items())))
    out.print(f"report: {_shown(report / 'report.md')} (also .html, .json); MLflow: autotune ui")
    if best is None:
        _fail("no feasible layout: every trial failed or was pruned; see the report's counts by reason", 1)
    out.print(f"best: {best.layout.key} at {best.tokens_per_s:,.0f} tokens/s")


@app.command()
def report(
    study: str = typer.Argument(..., help="the study: its name (study.name in the space) or its space file"),
    directory: Optional[Path] = typer.Option(None, "--dir", help="the runs folder (default: $AUTOTUNE_RUNS_DIR, "
                                                                 "else autotune-runs)"),
    storage: Optional[str] = typer.Option(None, "--storage", envvar="AUTOTUNE_STORAGE",
                                          help="Optuna storage (journal path or RDB URL)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="where to write (default: <dir>/<study>/report)"),
) -> None:
    """Write the deployment report of a study from its Optuna storage."""
    from autotune.report.write import write_report
    from autotune.study.store import StudyError, load_result

    study, directory, storage = _study_of(study, directory, storage)
    try:
        result = load_result(study, directory, storage)
    except StudyError as exc:
        _fail(str(exc), exc.code)
    files = write_report(result, out_dir or directory / study / "report")
    out.print(f"report: {files.markdown} (also {files.html.name}, {files.json.name})")
    if result.best() is None:
        raise typer.Exit(1)


@app.command()
def sync(
    study: str = typer.Argument(..., help="the study: its name (study.name in the space) or its space file"),
    directory: Optional[Path] = typer.Option(None, "--dir", help="the runs folder (default: $AUTOTUNE_RUNS_DIR, "
                                                                 "else autotune-runs)"),
    storage: Optional[str] = typer.Option(None, "--storage", envvar="AUTOTUNE_STORAGE",
                                          help="Optuna storage (journal path or RDB URL)"),
    uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: the study's own)"),
) -> None:
    """Copy trial records MLflow is missing (it was unreachable mid-study) from the study's storage."""
    from autotune.records.tracking import Tracker, TrackingError, machine_description
    from autotune.settings import resolve_settings
    from autotune.study.store import StudyError, load_result

    study, directory, storage = _study_of(study, directory, storage)
    try:
        result = load_result(study, directory, storage)
    except StudyError as exc:
        _fail(str(exc), exc.code)
    tracker = Tracker(uri or resolve_settings(result.spec).tracking_uri, result.spec.tracking.experiment)
    try:
        tracker.check()
    except TrackingError as exc:
        _fail(str(exc))
    import yaml

    parent, created, completed = tracker.sync(result.mlflow_parent_run_id, list(result.trials), result.spec,
                                              yaml.safe_dump(result.spec.model_dump(mode="json")),
                                              machine_description())
    out.print(f"study {study}: {created} trial runs created, {completed} completed, parent run {parent}")


def _crash_report(spec: Spec, exc: BaseException) -> str:
    import traceback

    path = spec.study.directory() / "error.log"
    text = "".join(traceback.format_exception(exc))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        where = f"the traceback is in {path}"
    except OSError:
        err.print(text, markup=False)
        where = "the traceback is above"
    return (f"the study stopped on an unexpected {type(exc).__name__}: {error_line(exc, empty='')}; trials recorded so far are kept "
            f"(run again with --resume); {where}")


def _job_address(address: Optional[str]) -> str:
    if address:
        return address
    import os

    env = os.environ.get("RAY_ADDRESS", "")
    if env.startswith("http"):
        return env
    _fail("--address: give the Ray Jobs API of the cluster, e.g. --address http://HEAD:8265")


@app.command()
def submit(
    space: Path = typer.Argument(..., help="the space file (YAML)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray Jobs API, e.g. http://HEAD:8265"),
    python: str = typer.Option("python", "--python", help="the cluster's Python with autotune's dependencies"),
    remeasure_top: Optional[int] = typer.Option(None, "--remeasure-top", min=0,
                                                help="measure the best K known layouts again first"),
    wait: bool = typer.Option(False, "--wait", help="follow the job's output to its end; exit with its exit code "
                                                    "(what a scheduler needs to run one study at a time)"),
) -> None:
    """Submit the study to a Ray cluster as a job (`autotune run --continue` there); prints the job id."""
    from autotune.deploy.jobs import JobError, follow
    from autotune.deploy.jobs import submit as submit_job

    spec = _load(space)
    job_address = _job_address(address)
    try:
        job_id = submit_job(space, spec, job_address, python=python, remeasure_top=remeasure_top)
    except JobError as exc:
        _fail(str(exc))
    print(job_id, flush=True)
    if wait:
        try:
            code, state = follow(job_address, job_id, lambda text: print(text, end="", flush=True))
        except JobError as exc:
            _fail(str(exc))
        if code:
            err.print(f"job {job_id} ended {state} (exit code {code})", markup=False)
        raise typer.Exit(code)


jobs_app = typer.Typer(help="Follow submitted studies.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("status")
def jobs_status(
    job_id: str = typer.Argument(..., help="the id `autotune submit` printed"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray Jobs API, e.g. http://HEAD:8265"),
) -> None:
    """The job's state: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    from autotune.deploy.jobs import JobError, status

    try:
        st = status(_job_address(address), job_id)
    except JobError as exc:
        _fail(str(exc))
    out.print(f"{st.job_id}: {st.status}" + (f" ({st.message})" if st.message else ""), markup=False)


@jobs_app.command("logs")
def jobs_logs(
    job_id: str = typer.Argument(..., help="the id `autotune submit` printed"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray Jobs API, e.g. http://HEAD:8265"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends"),
) -> None:
    """The job's output (the study's plain progress log)."""
    from autotune.deploy.jobs import JobError, logs

    try:
        logs(_job_address(address), job_id, follow, lambda text: print(text, end="", flush=True))
    except JobError as exc:
        _fail(str(exc))


@app.command()
def k8s(
    space: Path = typer.Argument(..., help="the space file (YAML)"),
    schedule: str = typer.Option(..., "--schedule", help="cron schedule of the submissions, e.g. '0 2 * * *'"),
    image: str = typer.Option(..., "--image", help="container image with autotune installed (docker/)"),
    out_dir: Path = typer.Option(..., "--out", help="folder to write the manifests to"),
    namespace: str = typer.Option("default", "--namespace", help="Kubernetes namespace"),
    workers: Optional[int] = typer.Option(None, "--workers", help="worker pods (default: cluster.nodes)"),
    gpus_per_worker: Optional[int] = typer.Option(None, "--gpus-per-worker",
                                                  help="GPUs per worker pod (default: cluster.ranks_per_node)"),
    token_secret: str = typer.Option("ray-auth-token", "--token-secret",
                                     help="Secret holding the Ray token under the key auth_token"),
    mlflow_uri: Optional[str] = typer.Option(None, "--mlflow-uri", help="MLflow server for the study driver"),
    mlflow_secret: Optional[str] = typer.Option(None, "--mlflow-secret",
                                                help="Secret with keys username and password for MLflow's basic auth"),
    memory_per_worker_gb: Optional[float] = typer.Option(None, "--memory-per-worker-gb",
                                                         help="host memory of a worker pod (default: from the space)"),
    storage_size: str = typer.Option("20Gi", "--storage-size", help="size of the runs volume"),
    time_zone: Optional[str] = typer.Option(None, "--time-zone", help="time zone of the schedule, e.g. Europe/Paris"),
) -> None:
    """Write Kubernetes manifests (KubeRay cluster, RayJob, nightly CronJob) that run the study on a schedule."""
    from autotune.deploy.k8s import TOKEN_KEY, K8sError, render_manifests, secret_command

    spec = _load(space)
    try:
        files = render_manifests(spec, space.read_text(encoding="utf-8"), schedule=schedule, image=image,
                                 namespace=namespace, workers=workers, gpus_per_worker=gpus_per_worker,
                                 token_secret=token_secret, mlflow_uri=mlflow_uri, mlflow_secret=mlflow_secret,
                                 memory_per_worker_gb=memory_per_worker_gb, storage_size=storage_size,
                                 time_zone=time_zone)
    except K8sError as exc:
        _fail(str(exc))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out_dir / name).write_text(text, encoding="utf-8")
    except OSError as exc:
        _fail(f"--out {out_dir}: cannot write the manifests ({exc.strerror or exc}); choose a writable folder")
    out.print(f"wrote {', '.join(files)} to {out_dir}")
    out.print(f"first, once: kubectl -n {namespace} create secret generic {token_secret} "
              f"--from-literal={TOKEN_KEY}=\"$(openssl rand -hex 32)\"", markup=False, soft_wrap=True)
    filled = secret_command(spec, namespace)
    if filled:
        out.print(f"and, with those variables set in your shell: {filled}", markup=False, soft_wrap=True)
    out.print(f"then: kubectl apply -f {out_dir}", markup=False)


@app.command()
def dashboard(
    study: str = typer.Argument(..., help="the study: its name (study.name in the space) or its space file"),
    directory: Optional[Path] = typer.Option(None, "--dir", help="the runs folder (default: $AUTOTUNE_RUNS_DIR, "
                                                                 "else autotune-runs)"),
    storage: Optional[str] = typer.Option(None, "--storage", envvar="AUTOTUNE_STORAGE",
                                          help="Optuna storage (journal path or RDB URL)"),
    port: int = typer.Option(8080, help="port to serve on"),
    host: str = typer.Option("127.0.0.1", help="address to bind; keep loopback unless you mean to share it"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also show the server's own messages"),
) -> None:
    """Open optuna-dashboard on the study's Optuna storage (bound to 127.0.0.1 by default)."""
    from autotune.records.dashboard import DashboardError, serve
    from autotune.records.tracking import redact
    from autotune.study.store import StudyError, find_storage

    study, directory, storage = _study_of(study, directory, storage)
    try:
        url = find_storage(study, directory, storage)
    except StudyError as exc:
        _fail(str(exc), exc.code)
    routing = _route_logs(directory / study, verbose, ("optuna", "optuna_dashboard"))

    def ready(page: str) -> None:
        out.print(f"Optuna dashboard on {page} for study {study} in {redact(url)} (Ctrl-C to stop)", markup=False)
        sys.stdout.flush()

    try:
        serve(study, url, host, port, ready)
    except DashboardError as exc:
        _fail(str(exc))
    finally:
        if routing is not None:
            routing.close()


@app.command()
def ui(
    port: int = typer.Option(5000, help="port to serve on"),
    host: str = typer.Option("127.0.0.1", help="address to bind; keep loopback unless you mean to share it"),
    uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                      help="MLflow store (default: sqlite:///mlflow.db here)"),
) -> None:
    """Open the MLflow UI on the studies' tracking store (bound to 127.0.0.1 by default)."""
    from autotune.records.mlflow_ui import UiError, serve
    from autotune.records.tracking import redact

    store = uri or f"sqlite:///{Path('mlflow.db').resolve()}"
    if store.lower().startswith(("http://", "https://")):  # a tracking server serves its own UI
        out.print(f"MLflow UI on {redact(store)} (the tracking server's own)", markup=False)
        return
    log_path = Path("autotune-runs") / "mlflow-ui.log"

    def ready(url: str) -> None:
        out.print(f"MLflow UI on {url} for {redact(store)} (Ctrl-C to stop; its log: {log_path})", markup=False)
        sys.stdout.flush()

    try:
        code = serve(store, host, port, log_path, ready)
    except UiError as exc:
        _fail(str(exc))
    raise typer.Exit(code)


def main() -> None:  # pragma: no cover - console entry
    app()


