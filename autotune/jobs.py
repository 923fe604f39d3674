"""Tuning studies as Ray Jobs: ship the code and the space, run `autotune run --continue` on
the cluster, follow the job.

Token auth: Ray's job client attaches the cluster token itself when this process has
RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN (or ~/.ray/auth_token). Credentials for
MLflow or the study's database come from the cluster nodes' own environment, never from here:
nothing secret travels in the job's runtime environment, which anyone allowed to list jobs
can read.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from autotune.spec import Spec

PACKAGES = ("autotune", "trainables")
SPACE_NAME = "space.yaml"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


class JobError(RuntimeError):
    """A submission or a job query failed; the message says what to fix."""


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED
    message: str


def check_submittable(spec: Spec) -> None:
    """A job's working folder is discarded when it ends: state must live somewhere else."""
    storage = spec.study.storage
    if storage is None or ("://" not in storage and not Path(storage).is_absolute()):
        raise JobError("study.storage: a submitted study needs storage that outlives the job: an absolute path on "
                       "storage shared by the cluster, or a database URL such as postgresql+psycopg://host/optuna")
    uri = spec.tracking.uri
    if uri is None or (uri.startswith("sqlite:") and not uri.startswith("sqlite:////")):
        raise JobError("tracking.uri: a submitted study needs a tracking store that outlives the job: an mlflow "
                       "server URL (http://host:5000) or an absolute sqlite:////path on shared storage")


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise JobError(_explain(address, exc)) from None


def _explain(address: str, exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "401" in text or "Authentication" in text or "403" in text:
        return (f"{address} refused the request ({text[:200]}): set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                f"(or ~/.ray/auth_token) to the cluster's token")
    return f"cannot reach the Ray Jobs API at {address} ({text[:300]}); check --address (http://HEAD:8265)"


def stage(space: Path, root: Path) -> Path:
    """A working folder with the project's packages and the space, as the job will see it."""
    here = Path(__file__).resolve().parent.parent
    for package in PACKAGES:
        shutil.copytree(here / package, root / package, ignore=IGNORE)
    shutil.copy(space, root / SPACE_NAME)
    return root


def submit(space: Path, spec: Spec, address: str, *, python: str = "python", remeasure_top: int | None = None,
           submission_id: str | None = None) -> str:
    check_submittable(spec)
    client = _client(address)
    args = [python, "-m", "autotune.cli", "run", SPACE_NAME, "--continue", "--plain"]
    if remeasure_top is not None:
        args += ["--remeasure-top", str(remeasure_top)]
    with tempfile.TemporaryDirectory(prefix="autotune-job-") as tmp:
        working_dir = stage(space, Path(tmp))
        try:
            return client.submit_job(
                entrypoint=" ".join(args), submission_id=submission_id,
                runtime_env={"working_dir": str(working_dir)},
                metadata={"autotune_study": spec.study.name},
            )
        except Exception as exc:
            raise JobError(_explain(address, exc)) from None


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
