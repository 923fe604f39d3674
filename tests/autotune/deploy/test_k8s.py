"""Kubernetes manifests from a space: what KubeRay and Kubernetes require, token auth, no secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from autotune.deploy.k8s import (K8sError, MAX_BASE, RUN_ENTRYPOINT, names_for, render_manifests,
                                 worker_shape)
from autotune.space.spec import load_spec, parse_yaml, spec_from_data

REPO = Path(__file__).resolve().parents[3]
SEED = REPO / "search_spaces" / "seed-16x80gb.yaml"
QUICK = REPO / "search_spaces" / "quickstart-cpu.yaml"
FILES = ["configmap.yaml", "pvc.yaml", "raycluster.yaml", "rayjob.yaml", "cronjob.yaml"]
FAKE_TOKEN = "f00dfeed" * 8
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def render(path: Path, **kwargs):
    kwargs.setdefault("schedule", "0 2 * * *")
    kwargs.setdefault("image", "registry.example.com/autotune:0.1.0")
    return render_manifests(load_spec(path), path.read_text(), **kwargs)


def docs(files: dict[str, str]) -> dict[str, dict]:
    out = {}
    for name, text in files.items():
        parsed = list(yaml.safe_load_all(text))
        assert len(parsed) == 1, name
        out[name] = parsed[0]
    return out


def pod_specs(d: dict[str, dict]) -> list[dict]:
    cluster = d["raycluster.yaml"]["spec"]
    return ([cluster["headGroupSpec"]["template"]["spec"]]
            + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
            + [d["cronjob.yaml"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
            + [d["rayjob.yaml"]["spec"]["submitterPodTemplate"]["spec"]])


@pytest.fixture(params=[SEED, QUICK], ids=["seed-16x80gb", "quickstart"])
def rendered(request, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", FAKE_TOKEN)  # must never leak into a manifest
    files = render(request.param, namespace="tuning", mlflow_uri="http://mlflow.tuning.svc:5000",
                   mlflow_secret="mlflow-auth")
    return request.param, files, docs(files)


def test_every_document_has_what_kubernetes_requires(rendered):
    path, files, d = rendered
    assert list(files) == FILES
    kinds = {name: (doc["apiVersion"], doc["kind"]) for name, doc in d.items()}
    assert kinds == {"configmap.yaml": ("v1", "ConfigMap"), "pvc.yaml": ("v1", "PersistentVolumeClaim"),
                     "raycluster.yaml": ("ray.io/v1", "RayCluster"), "rayjob.yaml": ("ray.io/v1", "RayJob"),
                     "cronjob.yaml": ("batch/v1", "CronJob")}
    limits = {"RayCluster": 53, "RayJob": 47, "CronJob": 52, "ConfigMap": 253, "PersistentVolumeClaim": 253}
    for doc in d.values():
        name = doc["metadata"]["name"]
        assert DNS1035.fullmatch(name) and len(name) <= limits[doc["kind"]], name
        assert doc["metadata"]["namespace"] == "tuning"
        for value in doc["metadata"]["labels"].values():
            assert re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", value)
    for text in files.values():
        assert text.startswith("# ") and "&id" not in text and "*id" not in text  # no YAML anchors


def test_configmap_holds_the_space_as_written(rendered):
    path, files, d = rendered
    text = d["configmap.yaml"]["data"]["space.yaml"]
    assert text == path.read_text()
    assert spec_from_data(parse_yaml(text, "cm")) == load_spec(path)
    assert "space.yaml: |" in files["configmap.yaml"]  # readable block text, not one escaped line


def test_raycluster_head_and_worker_group(rendered):
    path, _, d = rendered
    spec = load_spec(path)
    rc = d["raycluster.yaml"]["spec"]
    assert rc["authOptions"] == {"mode": "token", "secretName": "ray-auth-token"}
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    container = head["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/autotune:0.1.0"
    assert {"name": "space", "mountPath": "/config", "readOnly": True} in container["volumeMounts"]
    assert {"containerPort": 8265, "name": "dashboard"}.items() <= {**container["ports"][1]}.items()
    groups = rc["workerGroupSpecs"]
    assert len(groups) == 1
    group = groups[0]
    assert group["groupName"] and group["template"]["spec"]["containers"][0]["image"]
    res = group["template"]["spec"]["containers"][0]["resources"]
    if spec.cluster.device == "cuda":  # 2 nodes x 8 GPUs, 4 CPUs per rank
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 8
        assert res["limits"]["cpu"] == "33" and res["limits"]["memory"] == "136G"  # 16 GB per GPU + 8
    else:  # 4 ranks of 0.5 CPU and 0.05 GB on one worker
        assert group["replicas"] == 1
        assert res["limits"] == {"cpu": "3", "memory": "6G"} and "nvidia.com/gpu" not in res["limits"]
    assert group["replicas"] * (res["limits"].get("nvidia.com/gpu") or 4) >= spec.cluster.total_ranks
    # idle workers kept for every rank of the pod and more: at Ray's default a node killed them between trials
    env = {e["name"]: e["value"] for e in group["template"]["spec"]["containers"][0]["env"]}
    ranks_per_pod = -(-spec.cluster.total_ranks // group["replicas"])
    assert int(env["RAY_num_workers_soft_limit"]) > ranks_per_pod
    assert env["RAY_worker_niceness"] == "0"  # ranks at normal priority, not Ray's nice 15


def test_every_volume_mount_has_its_volume(rendered):
    _, _, d = rendered
    for pod in pod_specs(d):
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes
    head = pod_specs(d)[0]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in head["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [d["pvc.yaml"]["metadata"]["name"]]
    maps = {v["configMap"]["name"] for p in pod_specs(d) for v in p.get("volumes", []) if "configMap" in v}
    assert maps == {d["configmap.yaml"]["metadata"]["name"]}


def test_rayjob_runs_the_study_on_that_cluster(rendered):
    _, _, d = rendered
    job = d["rayjob.yaml"]["spec"]
    assert job["entrypoint"] == RUN_ENTRYPOINT == "autotune run /config/space.yaml --continue --plain"
    assert job["clusterSelector"] == {"ray.io/cluster": d["raycluster.yaml"]["metadata"]["name"]}
    assert "rayClusterSpec" not in job and not job.get("shutdownAfterJobFinishes")  # KubeRay: not with a selector


def test_cronjob_submits_nightly_with_the_token_from_the_secret(rendered):
    _, _, d = rendered
    cj = d["cronjob.yaml"]["spec"]
    assert cj["schedule"] == "0 2 * * *" and cj["concurrencyPolicy"] == "Forbid"
    pod = cj["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    cluster = d["raycluster.yaml"]["metadata"]["name"]
    assert container["command"] == ["autotune", "submit", "/config/space.yaml", "--address",
                                    f"http://{cluster}-head-svc.tuning.svc:8265", "--wait"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "ray-auth-token", "key": "auth_token"}}}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.tuning.svc:5000"
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": "password"}


def test_no_secret_value_anywhere(rendered):
    _, files, d = rendered
    text = "\n".join(files.values())
    assert FAKE_TOKEN not in text
    assert not any(doc["kind"] == "Secret" for doc in d.values())
    for pod in pod_specs(d):
        for c in pod["containers"]:
            for e in c.get("env", []):
                if re.search(r"TOKEN|PASSWORD|SECRET", e["name"]) and e["name"] != "RAY_AUTH_MODE":
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], e


def test_core_resources_pass_the_kubernetes_schemas(rendered):
    """ConfigMap, PVC and CronJob against the Kubernetes OpenAPI schemas (strict: unknown fields fail)."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    _, _, d = rendered
    for name in ("configmap.yaml", "pvc.yaml", "cronjob.yaml"):
        kv.validate(d[name], kv.latest_version(), strict=True)


# ---------------------------------------------------------------------------------------------
# Options and their errors


def test_workers_and_gpus_per_worker_reshape_the_group():
    d = docs(render(SEED, workers=4, gpus_per_worker=4))
    group = d["raycluster.yaml"]["spec"]["workerGroupSpecs"][0]
    res = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert group["replicas"] == 4 and res["nvidia.com/gpu"] == 4 and res["cpu"] == "17"
    d = docs(render(SEED, workers=16, memory_per_worker_gb=120))
    res = d["raycluster.yaml"]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["limits"]["memory"] == "120G"
    assert worker_shape(load_spec(QUICK), workers=2).ranks == 2


def test_time_zone_and_descriptor_schedules():
    d = docs(render(QUICK, schedule="@daily", time_zone="Europe/Paris"))
    assert d["cronjob.yaml"]["spec"]["schedule"] == "@daily"
    assert d["cronjob.yaml"]["spec"]["timeZone"] == "Europe/Paris"


@pytest.mark.parametrize("kwargs,words", [
    ({"workers": 1, "gpus_per_worker": 8}, "1 workers x 8 GPUs = 8 is less than the space's 16 ranks"),
    ({"workers": 0}, "workers: 0 must be a whole number of 1 or more"),
    ({"gpus_per_worker": True}, "gpus_per_worker: True must be a whole number"),
    ({"namespace": "Tuning"}, "namespace: 'Tuning' is not a valid Kubernetes name"),
    ({"token_secret": "ray_token"}, "token_secret: 'ray_token' is not a valid Kubernetes name"),
    ({"image": "autotune latest"}, "image: 'autotune latest' is not a container image reference"),
    ({"image": ""}, "image: '' is not a container image reference"),
    ({"mlflow_uri": "http://admin:hunter2@mlflow:5000"}, "mlflow_uri: it holds a password"),
    ({"storage_size": "lots"}, "storage_size: 'lots' is not a Kubernetes quantity"),
    ({"time_zone": "Paris; rm"}, "time_zone: 'Paris; rm' is not a time zone name"),
    ({"schedule": "0 2 * *"}, "has 4 fields; a cron schedule has 5"),
])
def test_bad_options_say_what_to_change(kwargs, words):
    with pytest.raises(K8sError) as err:
        render(SEED, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_gpus_per_worker_on_a_cpu_space_and_conflicting_tracking_uri():
    with pytest.raises(K8sError, match="gpus_per_worker: 2 is for spaces with cluster.device: cuda"):
        render(QUICK, gpus_per_worker=2)
    text = QUICK.read_text().replace("experiment: autotune-quickstart",
                                     "experiment: autotune-quickstart\n  uri: http://mlflow-a:5000")
    spec = spec_from_data(parse_yaml(text, "space"))
    with pytest.raises(K8sError, match="the space already sets tracking.uri 'http://mlflow-a:5000'"):
        render_manifests(spec, text, schedule="0 2 * * *", image="img:1", mlflow_uri="http://mlflow-b:5000")
    files = render_manifests(spec, text, schedule="0 2 * * *", image="img:1")
    head = docs(files)["raycluster.yaml"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in head["env"]}
    assert env == {"AUTOTUNE_RUNS_DIR": "/data", "MLFLOW_TRACKING_URI": "http://mlflow-a:5000"}
    head = docs(render(QUICK))["raycluster.yaml"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e["value"] for e in head["env"]} == {"AUTOTUNE_RUNS_DIR": "/data",
                                                           "MLFLOW_TRACKING_URI": "sqlite:////data/mlflow.db"}


def test_every_pod_runs_as_the_image_user_with_writable_volumes_and_every_container_has_a_memory_limit(rendered):
    _, _, d = rendered
    pods = pod_specs(d)
    assert len(pods) == 4  # head, workers, the CronJob's submitter, the RayJob's submitter
    for pod in pods:
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == sc["fsGroup"] == 1000
        for c in pod["containers"]:
            assert c["resources"]["limits"]["memory"], c["name"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("extra,field", [
    ("study:\n  name: s\n  storage: postgresql+psycopg://optuna:hunter2@db/optuna\n", "study.storage"),
    ("study:\n  name: s\n  storage: postgresql://:hunter2@db/optuna\n", "study.storage"),
    ("study:\n  name: s\n  storage: postgresql://db/optuna?password=hunter2\n", "study.storage"),
    ("study:\n  name: s\ntracking:\n  uri: http://hunter2@mlflow:5000\n", "tracking.uri"),
])
def test_a_space_with_a_secret_is_refused_not_written(extra, field):
    base = QUICK.read_text().split("tracking:")[0]
    text = base + extra
    spec = spec_from_data(parse_yaml(text, "space"))
    with pytest.raises(K8sError) as err:
        render_manifests(spec, text, schedule="0 2 * * *", image="img:1")
    assert str(err.value).startswith(field) and "hunter2" not in str(err.value)


@pytest.mark.parametrize("study", ["My_Study.v2", "x" * 100, "9lives", "a--b"])
def test_names_fit_kuberay_limits_for_any_study_name(study):
    names = names_for(study)
    assert len(names.base) <= MAX_BASE
    for name in (names.cluster, names.job, names.cronjob, names.configmap, names.pvc):
        assert DNS1035.fullmatch(name), name
    assert len(names.cluster) <= 53 and len(names.job) <= 47 and len(names.cronjob) <= 52
    assert names.head_service == f"{names.cluster}-head-svc"
    assert names_for("x" * 100) != names_for("x" * 99)


def test_names_keep_a_plain_study_name_and_tell_similar_ones_apart():
    assert names_for("seed-16x80gb").cluster == "autotune-seed-16x80gb"
    assert names_for("My_Study").base != names_for("my-study").base == "autotune-my-study"
    assert names_for("My_Study").base.startswith("autotune-my-study-")


def test_a_hung_night_is_ended_by_its_budget_so_later_nights_run():
    """With Forbid, a run that never ends would block every later night: the Job's
    activeDeadlineSeconds is the most the space's budget lets one run take."""
    text = QUICK.read_text()
    data = parse_yaml(text, "space")

    def deadline(**budget) -> int:
        d = {**data, "budget": {**data["budget"], **budget}}
        job = docs(render_manifests(spec_from_data(d), text, schedule="0 2 * * *", image="img:1"))["cronjob.yaml"]
        return job["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]

    # 10 trials of at most 60 s two at a time, 3 re-measures (one wave more than 2 at a time), 600 s to start and report
    assert deadline(trials=10, trial_timeout_s=60, max_concurrent=2, remeasure_share=0.3, remeasure_top=0) == \
        5 * 60 + 2 * 60 + 600
    assert deadline(trials=10, trial_timeout_s=60, max_concurrent=1, remeasure_share=0, remeasure_top=2) == \
        12 * 60 + 600
    # A wall-clock budget caps the search: it stops launching then, and the trial in flight ends within its limit.
    assert deadline(trials=100, trial_timeout_s=60, max_concurrent=1, remeasure_share=0, wall_clock_s=900) == \
        900 + 60 + 600


def test_the_driver_gets_each_env_from_secret_and_the_database_password_from_a_secret(tmp_path, monkeypatch):
    """The recommended form (env_from names, a password-less PostgreSQL URL) must run: the head,
    where the driver reads them, gets each from the study's Secret, and `autotune k8s` prints the
    one line that fills it; no value is in any manifest, and the CronJob's pod holds none."""
    from typer.testing import CliRunner

    from autotune.cli.main import app

    data = parse_yaml((REPO / "search_spaces" / "hf-trainer.yaml").read_text(), "space")
    data["trainable"]["env_from"] = ["HF_TOKEN", "WANDB_API_KEY"]
    data["trainable"].pop("env", None)  # values in the space are refused (above): names only
    data["study"] = {**data.get("study", {}), "name": "hf", "storage": "postgresql+psycopg://optuna@db/optuna"}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("HF_TOKEN", "hf_" + FAKE_TOKEN)
    d = docs(render_manifests(spec_from_data(data), space.read_text(), schedule="0 2 * * *", image="img:1",
                              namespace="tuning"))
    secret = names_for("hf").secrets
    head = d["raycluster.yaml"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in head["env"] if "valueFrom" in e}
    assert refs == {n: {"name": secret, "key": n} for n in ("HF_TOKEN", "WANDB_API_KEY", "PGPASSWORD")}
    (submit,) = d["cronjob.yaml"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert not {e["name"] for e in submit["env"]} & {"HF_TOKEN", "WANDB_API_KEY", "PGPASSWORD"}
    assert FAKE_TOKEN not in yaml.safe_dump(d)

    result = CliRunner().invoke(app, ["k8s", str(space), "--schedule", "0 2 * * *", "--image", "img:1",
                                      "--out", str(tmp_path / "k8s"), "--namespace", "tuning"])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert (f'kubectl -n tuning create secret generic {secret} --from-literal=HF_TOKEN="$HF_TOKEN" '
            '--from-literal=WANDB_API_KEY="$WANDB_API_KEY" --from-literal=PGPASSWORD="$PGPASSWORD"') in result.stdout
    assert FAKE_TOKEN not in result.stdout + "".join(p.read_text() for p in (tmp_path / "k8s").iterdir())
