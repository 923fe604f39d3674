"""Kubernetes manifests for a scheduled study: a KubeRay cluster, a first run, a nightly submission.

`render_manifests(spec, space_text, schedule=..., image=...)` returns file name -> YAML text:

* `configmap.yaml`  -- the space file, mounted at /config/space.yaml in the head pod and the job;
* `pvc.yaml`        -- a volume for the head pod's working folder /data (the study's default
  journal storage, its reports, and sqlite MLflow when no tracking server is given);
* `raycluster.yaml` -- a KubeRay `RayCluster` (ray.io/v1): a head that runs no trial ranks, one
  worker group sized from the space's `cluster` section, Ray token auth
  (`spec.authOptions: {mode: token, secretName}`: KubeRay puts the token from that Secret's
  `auth_token` key into every Ray container);
* `rayjob.yaml`     -- a `RayJob` that runs the study once on that cluster (`clusterSelector`);
* `cronjob.yaml`    -- a `batch/v1` `CronJob` that submits the study to the cluster's Jobs API on
  the given schedule (`concurrencyPolicy: Forbid`). KubeRay's RayJob has no schedule of its own,
  and its RayCronJob is alpha behind an operator feature gate that is off by default.

No token is ever written into a manifest: the Secret is created by hand, once, e.g.
`kubectl create secret generic ray-auth-token --from-literal=auth_token="$(openssl rand -hex 32)"`.
Likewise the driver's own secrets (`driver_secrets`: the program's `trainable.env_from` values,
PGPASSWORD for a PostgreSQL storage URL) reach the head from the Secret `<base>-secrets`, filled
by the line `secret_command` gives.

Schedules are checked by autotune/deploy/cron.py, which the docker-compose deployment's scheduler
loop (`docker/scheduler.py`) also reads.
"""

from __future__ import annotations

import hashlib
import math
import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

from autotune.deploy.cron import ScheduleError, parse_cron

if TYPE_CHECKING:  # the cron parser is used by a scheduler loop that needs nothing else
    from autotune.space.sections import BudgetSpec
    from autotune.space.spec import Spec

RAY_API = "ray.io/v1"
RAY_VERSION = "2.60.0"
DASHBOARD_PORT = 8265
GCS_PORT = 6379
CLIENT_PORT = 10001
CONFIG_DIR = "/config"
SPACE_PATH = f"{CONFIG_DIR}/space.yaml"
DATA_DIR = "/data"
START_AND_REPORT_S = 600  # a run's driver start, screening and report, beside its trials
TOKEN_KEY = "auth_token"  # the data key KubeRay reads from the Secret named in authOptions
MAX_BASE = 40  # RayCluster names: at most 53 characters (KubeRay); RayJob: 47; CronJob: 52
# Continue-or-start: the first run starts the study, every later one adds budget.trials to it.
RUN_ENTRYPOINT = shlex.join(["autotune", "run", SPACE_PATH, "--continue", "--plain"])
UID = 1000  # the images' user (docker/Dockerfile.*)
# Every pod: not root, and the volumes writable by the image's user (fsGroup).
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
SUBMITTER_RESOURCES = {"requests": {"cpu": "100m", "memory": "512M"}, "limits": {"memory": "1G"}}
GPU_WORKER_HOST_GB = 16  # per GPU, host memory for a rank's process, pinned buffers and data


class K8sError(ValueError):
    """A value that cannot make valid manifests, as one line saying what to change."""


# ---------------------------------------------------------------------------------------------
# Names and sizes


@dataclass(frozen=True)
class Names:
    base: str
    configmap: str
    pvc: str
    cluster: str
    job: str
    cronjob: str
    head_service: str
    secrets: str  # the driver's secrets: trainable.env_from values and the database password


def names_for(study: str) -> Names:
    """DNS-1035 names derived from the study name, short enough for KubeRay's limits (RayCluster 53)."""
    slug = re.sub(r"[^a-z0-9]+", "-", study.lower()).strip("-") or "study"
    base = f"autotune-{slug}"
    if len(base) > MAX_BASE or slug != study:  # shortened or changed: a digest keeps 'A_b' and 'a-b' apart
        digest = hashlib.sha256(study.encode()).hexdigest()[:6]
        base = f"{base[:MAX_BASE - 7].rstrip('-')}-{digest}"
    return Names(base, f"{base}-space", f"{base}-data", base, f"{base}-run", f"{base}-nightly",
                 f"{base}-head-svc", f"{base}-secrets")


def driver_secrets(spec: Spec) -> list[str]:
    """Variables the study's driver (on the head) reads as secrets: each `trainable.env_from`
    name, whose value it hands to the program, and PGPASSWORD for a PostgreSQL storage URL,
    which carries no password in a space a job may run."""
    names = list(spec.trainable.env_from) if spec.trainable is not None else []
    if (spec.study.storage or "").startswith(("postgresql", "postgres:")) and "PGPASSWORD" not in names:
        names.append("PGPASSWORD")
    return names


def secret_command(spec: Spec, namespace: str) -> str | None:
    """The one `kubectl create secret` line that fills the driver's Secret from the shell's own
    variables of the same names (no value on the command line); None when there is nothing to fill."""
    names = driver_secrets(spec)
    if not names:
        return None
    values = " ".join(f'--from-literal={n}="${n}"' for n in names)
    return f"kubectl -n {namespace} create secret generic {names_for(spec.study.name).secrets} {values}"


@dataclass(frozen=True)
class WorkerShape:
    replicas: int
    ranks: int  # ranks per worker pod
    gpus: int
    cpus: int
    memory_gb: int | None


def worker_shape(spec: Spec, workers: int | None = None, gpus_per_worker: int | None = None,
                 memory_per_worker_gb: float | None = None) -> WorkerShape:
    c = spec.cluster
    total = c.total_ranks
    cuda = c.device == "cuda"
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise K8sError(f"workers: {workers!r} must be a whole number of 1 or more")
    if gpus_per_worker is not None:
        if not cuda:
            raise K8sError(f"gpus_per_worker: {gpus_per_worker!r} is for spaces with cluster.device: cuda; this "
                           f"space runs on cpu; leave it out")
        if isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, int) or gpus_per_worker < 1:
            raise K8sError(f"gpus_per_worker: {gpus_per_worker!r} must be a whole number of 1 or more")
    replicas = workers if workers is not None else c.nodes
    if gpus_per_worker is not None:
        ranks = gpus_per_worker
    elif workers is None and c.ranks_per_node is not None:
        ranks = c.ranks_per_node
    else:
        ranks = math.ceil(total / replicas)
    if ranks * replicas < total:
        raise K8sError(f"{replicas} workers x {ranks} {'GPUs' if cuda else 'ranks'} = {ranks * replicas} is less "
                       f"than the space's {total} ranks; raise workers or gpus_per_worker")
    # One CPU beyond the ranks' own: each trial's coordinator (a Ray Tune actor of 0.01 CPU) runs on a
    # worker, since the head takes no Ray tasks; without it a trial using every rank could never be placed.
    cpus = math.ceil(c.cpus_per_rank * ranks) + 1
    if memory_per_worker_gb is not None:
        if isinstance(memory_per_worker_gb, bool) or not memory_per_worker_gb > 0:
            raise K8sError(f"memory_per_worker_gb: {memory_per_worker_gb!r} must be a positive number")
        memory = math.ceil(memory_per_worker_gb)
    elif cuda:  # cluster.memory_gb is device memory: host memory by a rule of thumb, stated in the manifest
        memory = ranks * GPU_WORKER_HOST_GB + 8
    else:  # each CPU rank: its share of cluster.memory_gb plus ~1 GB for the Python process and torch
        memory = math.ceil(ranks * (c.memory_gb + 1) + 1)
    return WorkerShape(replicas, ranks, ranks if cuda else 0, cpus, memory)


# ---------------------------------------------------------------------------------------------
# Rendering


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line text (the space file reads as itself in the ConfigMap), no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def _dump(header: str, doc: dict[str, Any]) -> str:
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.strip().splitlines())
    return comment + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100,
                               allow_unicode=True)


def _check_name(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", value) or len(value) > limit:
        raise K8sError(f"{what}: {value!r} is not a valid Kubernetes name; use at most {limit} lower-case letters, "
                       f"digits and '-', starting and ending with a letter or digit")
    return value


def _check_image(image: Any) -> str:
    if not isinstance(image, str) or not image or re.search(r"[\s\x00-\x1f]", image) or len(image) > 1024:
        raise K8sError(f"image: {image!r} is not a container image reference; give one such as "
                       f"registry.example.com/autotune:0.1.0")
    return image


def _check_uri(uri: Any) -> str:
    if not isinstance(uri, str) or not uri or re.search(r"[\s\x00-\x1f]", uri):
        raise K8sError(f"mlflow_uri: {uri!r} is not a URI; give one such as http://mlflow.mlflow.svc:5000")
    parts = urlsplit(uri)
    if parts.password is not None:
        raise K8sError("mlflow_uri: it holds a password; give the URI without credentials and put them in a "
                       "Secret (mlflow_secret, keys username and password)")
    return uri


def run_deadline_s(budget: BudgetSpec) -> int:
    """How long one scheduled run may take before Kubernetes ends it (the Job's
    activeDeadlineSeconds): with Forbid, one hung night would otherwise block every later one.
    The most the budget lets a run take, every trial to its time limit, in as many waves as
    `max_concurrent` allows (a wall-clock budget caps the search part), the best ones measured
    again first and last, and 10 minutes to start the driver and write the report."""
    waves = lambda n: math.ceil(n / budget.max_concurrent)  # noqa: E731
    search = waves(budget.trials + budget.remeasure_top) * budget.trial_timeout_s
    if budget.wall_clock_s is not None:
        search = min(search, budget.wall_clock_s + budget.trial_timeout_s)
    return int(math.ceil(search + waves(budget.remeasure_launches()) * budget.trial_timeout_s + START_AND_REPORT_S))


def _labels(names: Names, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "autotune", "app.kubernetes.io/instance": names.base,
            "app.kubernetes.io/component": component}


def _meta(name: str, namespace: str, names: Names, component: str, study: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": _labels(names, component),
            "annotations": {"autotune/study": study}}


def _env(mlflow_uri: str | None, mlflow_secret: str | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if mlflow_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri})
    else:  # no server: an sqlite store on the runs volume, unless the space names one
        env.append({"name": "MLFLOW_TRACKING_URI", "value": f"sqlite:///{DATA_DIR}/mlflow.db"})
    if mlflow_secret:
        for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": mlflow_secret, "key": key}}})
    return env


def render_manifests(spec: Spec, space_text: str, *, schedule: str, image: str, namespace: str = "default",
                     workers: int | None = None, gpus_per_worker: int | None = None,
                     token_secret: str = "ray-auth-token", mlflow_uri: str | None = None,
                     mlflow_secret: str | None = None, memory_per_worker_gb: float | None = None,
                     storage_size: str = "20Gi", time_zone: str | None = None) -> dict[str, str]:
    """The manifests of one scheduled study, file name -> YAML text (one document each).

    `workers` defaults to `cluster.nodes`, ranks (GPUs) per worker to `cluster.ranks_per_node` (or
    the ranks spread evenly); CPUs per worker are `cluster.cpus_per_rank` x ranks. `mlflow_uri`
    sets MLFLOW_TRACKING_URI for the study driver (on the head) when the space has no
    `tracking.uri`; `mlflow_secret` names a Secret with `username` and `password` for an MLflow
    server with basic auth. Raises K8sError (a ValueError) with one line naming what to change.
    """
    try:
        cron = parse_cron(schedule)
    except ScheduleError as exc:
        raise K8sError(str(exc)) from None
    _check_image(image)
    _check_name(namespace, "namespace", 63)
    _check_name(token_secret, "token_secret", 253)
    if mlflow_secret is not None:
        _check_name(mlflow_secret, "mlflow_secret", 253)
    if mlflow_uri is not None:
        _check_uri(mlflow_uri)
        if spec.tracking.uri and spec.tracking.uri != mlflow_uri:
            raise K8sError(f"mlflow_uri: the space already sets tracking.uri {spec.tracking.uri!r}, which wins; "
                           f"leave mlflow_uri out or change the space")
    if not isinstance(storage_size, str) or not re.fullmatch(r"\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?", storage_size):
        raise K8sError(f"storage_size: {storage_size!r} is not a Kubernetes quantity; give one such as 20Gi")
    if time_zone is not None and (not isinstance(time_zone, str) or not re.fullmatch(r"[A-Za-z0-9_+/-]+", time_zone)):
        raise K8sError(f"time_zone: {time_zone!r} is not a time zone name; give one such as Europe/Paris")
    if not isinstance(space_text, str) or not space_text.strip():
        raise K8sError("space_text is empty; pass the space file's text")
    from autotune.deploy.secrets import written_secrets
    from autotune.redaction import redact

    problem = written_secrets(spec)
    if problem:
        raise K8sError(problem.replace("into the job", "into the ConfigMap"))
    space_text = redact(space_text)
    shape = worker_shape(spec, workers, gpus_per_worker, memory_per_worker_gb)
    study = spec.study.name
    names = names_for(study)
    address = f"http://{names.head_service}.{namespace}.svc:{DASHBOARD_PORT}"
    env = _env(mlflow_uri or spec.tracking.uri, mlflow_secret)
    config_volume = {"name": "space", "configMap": {"name": names.configmap}}
    config_mount = {"name": "space", "mountPath": CONFIG_DIR, "readOnly": True}
    shm_volume = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
    shm_mount = {"name": "dshm", "mountPath": "/dev/shm"}
    cuda = spec.cluster.device == "cuda"
    storage_note = (f"the study's Optuna storage is the journal file\n{spec.study.storage or spec.study.name + '/optuna.journal'} "
                    f"(relative to {DATA_DIR}, the runs folder, unless absolute)"
                    if spec.study.storage is None or "://" not in spec.study.storage
                    else "the study's Optuna storage is the URL in study.storage")
    files: dict[str, str] = {}
    token_env = [{"name": "RAY_AUTH_MODE", "value": "token"},
                 {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": token_secret, "key": TOKEN_KEY}}}]

    files["configmap.yaml"] = _dump(
        f"The space file of study {study!r}, mounted at {SPACE_PATH}.",
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": _meta(names.configmap, namespace, names, "space", study),
         "data": {"space.yaml": space_text if space_text.endswith("\n") else space_text + "\n"}})

    files["pvc.yaml"] = _dump(
        f"The head pod's working folder {DATA_DIR}; {storage_note}.\nThe study's reports are written there too.",
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": _meta(names.pvc, namespace, names, "data", study),
         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage_size}}}})

    head_resources = {"requests": {"cpu": "2", "memory": "8G"}, "limits": {"cpu": "2", "memory": "8G"}}
    worker_resources: dict[str, dict[str, Any]] = {"requests": {"cpu": str(shape.cpus)},
                                                   "limits": {"cpu": str(shape.cpus)}}
    if shape.memory_gb is not None:
        worker_resources["requests"]["memory"] = f"{shape.memory_gb}G"
        worker_resources["limits"]["memory"] = f"{shape.memory_gb}G"
    if shape.gpus:
        worker_resources["requests"]["nvidia.com/gpu"] = shape.gpus
        worker_resources["limits"]["nvidia.com/gpu"] = shape.gpus
    head_container = {
        "name": "ray-head", "image": image, "imagePullPolicy": "IfNotPresent", "workingDir": DATA_DIR,
        "securityContext": CONTAINER_SECURITY,
        "ports": [{"name": "gcs", "containerPort": GCS_PORT}, {"name": "dashboard", "containerPort": DASHBOARD_PORT},
                  {"name": "client", "containerPort": CLIENT_PORT}],
        "resources": head_resources,
        "volumeMounts": [config_mount, {"name": "data", "mountPath": DATA_DIR}, shm_mount],
    }
    # The driver's settings (autotune/settings.py): reports, trial logs and the journal on the volume.
    head_container["env"] = [{"name": "AUTOTUNE_RUNS_DIR", "value": DATA_DIR}, *env]
    # The driver runs on the head (RayJob and `autotune submit` alike) and reads env_from there;
    # the CronJob's pod only calls the Jobs API, so it holds none of them.
    head_container["env"] += [{"name": n, "valueFrom": {"secretKeyRef": {"name": names.secrets, "key": n}}}
                              for n in driver_secrets(spec)]
    # Ray kills idle workers beyond a soft limit; at its default a node killed them between trials,
    # so each trial's ranks started on new workers that import torch first (autotune.study.connect.warm_workers).
    worker_container = {"name": "ray-worker", "image": image, "imagePullPolicy": "IfNotPresent",
                        "securityContext": CONTAINER_SECURITY,
                        "env": [{"name": "RAY_num_workers_soft_limit", "value": str(shape.ranks + 2)},
                                # ranks at normal priority, not Ray's nice 15 (autotune.study.connect)
                                {"name": "RAY_worker_niceness", "value": "0"}],
                        "resources": worker_resources, "volumeMounts": [shm_mount]}
    cluster = {
        "apiVersion": RAY_API, "kind": "RayCluster",
        "metadata": _meta(names.cluster, namespace, names, "ray", study),
        "spec": {
            "rayVersion": RAY_VERSION,
            "authOptions": {"mode": "token", "secretName": token_secret},
            "headGroupSpec": {
                # The Jobs API listens on the pod network for the RayJob and the CronJob; the head
                # Service is ClusterIP (never exposed outside the cluster) and every request needs the token.
                "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                "template": {"metadata": {"labels": _labels(names, "ray-head")},
                             "spec": {"securityContext": POD_SECURITY, "containers": [head_container],
                                      "volumes": [config_volume,
                                                  {"name": "data", "persistentVolumeClaim": {"claimName": names.pvc}},
                                                  shm_volume]}},
            },
            "workerGroupSpecs": [{
                "groupName": "gpu-workers" if cuda else "cpu-workers",
                "replicas": shape.replicas, "minReplicas": shape.replicas, "maxReplicas": shape.replicas,
                "rayStartParams": {},
                "template": {"metadata": {"labels": _labels(names, "ray-worker")},
                             "spec": {"securityContext": POD_SECURITY, "containers": [worker_container],
                                      "volumes": [shm_volume]}},
            }],
        },
    }
    per = f"{shape.gpus} GPUs" if shape.gpus else f"{shape.ranks} ranks"
    workers_text = f"{shape.replicas} worker{'s' if shape.replicas != 1 else ''}"
    files["raycluster.yaml"] = _dump(
        f"""KubeRay cluster for study {study!r}: {workers_text} x {per}, {shape.cpus} CPUs each
({spec.cluster.total_ranks} ranks in the space; one CPU per worker is for the trials' coordinators);
the head runs the study driver and no trial ranks.
Token auth: create the Secret once, before applying, in namespace {namespace}:
  kubectl -n {namespace} create secret generic {token_secret} --from-literal={TOKEN_KEY}="$(openssl rand -hex 32)"
"""
        + ("" if not cuda or memory_per_worker_gb is not None else
           f"Worker host memory: {GPU_WORKER_HOST_GB} GB per GPU + 8 GB (cluster.memory_gb is GPU memory); "
           f"set memory_per_worker_gb for your nodes.\n"),
        cluster)

    files["rayjob.yaml"] = _dump(
        f"""Runs study {study!r} once on the cluster above (clusterSelector); the driver runs on the head,
runs folder {DATA_DIR} (AUTOTUNE_RUNS_DIR). {RUN_ENTRYPOINT!r} starts the study, or continues it.""",
        {"apiVersion": RAY_API, "kind": "RayJob",
         "metadata": _meta(names.job, namespace, names, "run", study),
         "spec": {"entrypoint": RUN_ENTRYPOINT,
                  "clusterSelector": {"ray.io/cluster": names.cluster},
                  "submissionMode": "K8sJobMode",
                  # KubeRay fills in the submitter's command (`ray job submit ... -- entrypoint`) when it
                  # has none; the template sets what every pod here has: non-root, limits, the token.
                  "submitterPodTemplate": {"spec": {
                      "restartPolicy": "Never", "securityContext": POD_SECURITY,
                      "containers": [{"name": "ray-job-submitter", "image": image, "imagePullPolicy": "IfNotPresent",
                                      "env": token_env, "resources": SUBMITTER_RESOURCES,
                                      "securityContext": CONTAINER_SECURITY}]}}}})

    submit = {
        "name": "submit", "image": image, "imagePullPolicy": "IfNotPresent",
        # --wait: the pod lives as long as the study, so concurrencyPolicy Forbid keeps one run at a time.
        "command": ["autotune", "submit", SPACE_PATH, "--address", address, "--wait"],
        "env": [*token_env, *env],
        "volumeMounts": [config_mount],
        "resources": SUBMITTER_RESOURCES,
        "securityContext": CONTAINER_SECURITY,
    }
    cron_spec: dict[str, Any] = {"schedule": cron.text}
    if time_zone:
        cron_spec["timeZone"] = time_zone
    cron_spec.update({
        "concurrencyPolicy": "Forbid", "startingDeadlineSeconds": 3600,
        "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 3,
        "jobTemplate": {"spec": {
            "backoffLimit": 0, "activeDeadlineSeconds": run_deadline_s(spec.budget),
            "template": {"metadata": {"labels": _labels(names, "submit")},
                         "spec": {"restartPolicy": "Never", "securityContext": POD_SECURITY,
                                  "containers": [submit], "volumes": [config_volume]}},
        }},
    })
    files["cronjob.yaml"] = _dump(
        f"""Submits study {study!r} to {address} on schedule {cron.text!r}
({'time zone ' + time_zone if time_zone else "the controller manager's time zone"}); one at a time (Forbid).""",
        {"apiVersion": "batch/v1", "kind": "CronJob",
         "metadata": _meta(names.cronjob, namespace, names, "schedule", study), "spec": cron_spec})
    return files
