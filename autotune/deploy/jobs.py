"""Tuning studies as Ray Jobs: ship the code and the space, run `autotune run --continue` on
the cluster, follow the job.

Where the job writes is the cluster's business: the driver resolves its settings from the
environment of the node it runs on (AUTOTUNE_RUNS_DIR, AUTOTUNE_STORAGE, MLFLOW_TRACKING_URI;
autotune/settings.py), which the compose file and the manifests set. A job refuses (exit 2)
to keep its state in its own working folder, which Ray deletes when the job ends.

What is shipped (Ray's `working_dir`) is the `autotune` and `trainables` packages, the space as
it may be shown (no URL credentials, no `trainable.env` values: `submit` refuses a space that
has them, since the job could not run on masked values), and a `trainable:` command's own
folder (`trainable.cwd`, default the space file's folder) as `program/`.

Token auth: Ray's job client attaches the cluster token itself when this process has
RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN (or ~/.ray/auth_token). Credentials for
MLflow or the study's database come from the cluster nodes' own environment, never from here:
nothing secret travels in the job's runtime environment, which anyone allowed to list jobs
can read.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from autotune.deploy.secrets import written_secrets
from autotune.redaction import error_line, redact
from autotune.settings import RUNS_ENV, TRACKING_ENV, resolve_settings
from autotune.space.spec import Spec

PACKAGES = ("autotune", "trainables")
SPACE_NAME = "space.yaml"
PROGRAM_DIR = "program"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")
PROGRAM_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".git", ".venv", "venv", "node_modules",
                                        "autotune-runs", "mlruns", "mlflow.db", ".env")
JOB_ENV = "AUTOTUNE_JOB"  # set in a submitted job's environment: the driver checks its state outlives it
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 180  # how long a submission waits for a just-started head's job agent


class JobError(RuntimeError):
    """A submission or a job query failed; the message says what to fix."""


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED
    message: str


def check_submittable(spec: Spec) -> None:
    """What can be known before submitting: nothing secret would be written into the job."""
    problem = written_secrets(spec)
    if problem:
        raise JobError(problem)
    uri = spec.tracking.uri
    if uri is not None and uri.startswith("sqlite:") and not uri.startswith("sqlite:////"):
        raise JobError("tracking.uri: a relative sqlite path would be written in the job's own folder, which is "
                       "deleted when it ends; drop tracking.uri (the cluster's MLFLOW_TRACKING_URI is used) or give "
                       "an mlflow server URL (http://host:5000) or an absolute sqlite:////path on shared storage")


def check_job_settings(spec: Spec) -> None:
    """In a submitted job, on the cluster: the runs folder and the tracking store must outlive the job."""
    s = resolve_settings(spec)
    if s.origin["runs_dir"] == "default" or (s.origin["runs_dir"] == "study.output_dir"
                                             and not Path(spec.study.output_dir).is_absolute()):
        raise JobError(f"{RUNS_ENV}: a submitted study writes its report, trial logs and state into the runs folder, "
                       f"and this job's own folder is deleted when it ends; set {RUNS_ENV} on the cluster's nodes "
                       f"(docker-compose.yml and the manifests do) or give study.output_dir as an absolute path")
    if s.origin["tracking_uri"] == "default":
        raise JobError(f"{TRACKING_ENV}: a submitted study needs a tracking store that outlives the job; set "
                       f"{TRACKING_ENV} on the cluster's nodes (an mlflow server URL) or tracking.uri in the space")


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise JobError(_explain(address, exc)) from None


def _explain(address: str, exc: BaseException) -> str:
    text = error_line(exc)
    if "401" in text or "Authentication" in text or "403" in text:
        return (f"{address} refused the request ({text[:200]}): set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                f"(or ~/.ray/auth_token) to the cluster's token")
    return f"cannot reach the Ray Jobs API at {address} ({text[:300]}); check --address (http://HEAD:8265)"


def shipped_space(spec: Spec, text: str) -> str:
    """The space as the job gets it: a user command's folder points at the shipped copy."""
    if spec.trainable is None:
        return text
    import yaml

    data = yaml.safe_load(text)
    data["trainable"]["cwd"] = PROGRAM_DIR
    return "# trainable.cwd points at the program's files shipped with the job\n" + yaml.safe_dump(data, sort_keys=False)


def stage(space: Path, root: Path, spec: Spec | None = None) -> Path:
    """A working folder with the project's packages, the space and a user command's own files."""
    here = Path(__file__).resolve().parents[2]  # the folder that holds autotune/ and trainables/
    for package in PACKAGES:
        shutil.copytree(here / package, root / package, ignore=IGNORE)
    text = space.read_text(encoding="utf-8")
    if spec is not None and spec.trainable is not None:
        program = Path(spec.trainable.cwd).expanduser() if spec.trainable.cwd else space.resolve().parent
        shutil.copytree(program, root / PROGRAM_DIR, ignore=PROGRAM_IGNORE, symlinks=True)
        text = shipped_space(spec, text)
    (root / SPACE_NAME).write_text(redact(text), encoding="utf-8")
    return root


def submit(space: Path, spec: Spec, address: str, *, python: str = "python", remeasure_top: int | None = None,
           submission_id: str | None = None) -> str:
    check_submittable(spec)
    client = _client(address)
    args = [python, "-m", "autotune.cli", "run", SPACE_NAME, "--continue", "--plain"]
    if remeasure_top is not None:
        args += ["--remeasure-top", str(remeasure_top)]
    with tempfile.TemporaryDirectory(prefix="autotune-job-") as tmp:
        working_dir = stage(space, Path(tmp), spec)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(
                    entrypoint=shlex.join(args), submission_id=submission_id,
                    runtime_env={"working_dir": str(working_dir), "env_vars": {JOB_ENV: "1"}},
                    metadata={"autotune_study": spec.study.name},
                )
            except Exception as exc:
                # A head that has just started answers before its job agent is up (HTTP 500, "No
                # available agent"): a scheduler firing then waits for it rather than missing a night.
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise JobError(_explain(address, exc)) from None
                time.sleep(3)


def status(address: str, job_id: str) -> JobStatus:
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except Exception as exc:
        raise JobError(_explain(address, exc)) from None
    return JobStatus(job_id, str(info.status.value if hasattr(info.status, "value") else info.status),
                     info.message or "")


def logs(address: str, job_id: str, follow: bool, write: Callable[[str], None]) -> None:
    client = _client(address)
    try:
        if not follow:
            write(client.get_job_logs(job_id))
            return
        import asyncio

        async def tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                write(chunk)

        asyncio.run(tail())
    except Exception as exc:
        raise JobError(_explain(address, exc)) from None


def follow(address: str, job_id: str, write: Callable[[str], None], poll_s: float = 2.0) -> tuple[int, str]:
    """Print the job's output until it ends; (exit code, final state). The code is the driver's own
    when Ray knows it (3: another run held the study), else 0 for SUCCEEDED and 1 otherwise."""
    try:
        logs(address, job_id, True, write)
    except JobError:
        pass  # the log stream broke (a restarted dashboard): the state below still decides
    client = _client(address)
    while True:
        try:
            info = client.get_job_info(job_id)
        except Exception as exc:
            raise JobError(_explain(address, exc)) from None
        state = str(info.status.value if hasattr(info.status, "value") else info.status)
        if state in TERMINAL:
            break
        time.sleep(poll_s)
    if state == "SUCCEEDED":
        return 0, state
    code = getattr(info, "driver_exit_code", None)
    return (code if isinstance(code, int) and code > 0 else 1), state
