"""The shipped scheduled path, run for real: every service of docker/docker-compose.yml started
from its own command and environment as a local process (no Docker daemon here), then the
nights the scheduler runs, a concurrent run refused, a killed run taken over, the RayJob's and
the CronJob's commands from the rendered manifests, and a scan for secrets in everything written.

What is mapped, as Docker would: the compose names (`ray-head`, `mlflow`, `postgres`) and ports to
127.0.0.1 and free ports; the volumes (`runs`, `/config/space.yaml`, `/mlflow`) to folders of the
test; `postgres:16`'s entrypoint (POSTGRES_USER / PASSWORD / DB) to Debian's binaries. The cron
schedule is AUTOTUNE_SCHEDULE="* * * * *" so that nights come a minute apart, and night 1 runs
as the scheduler starts (AUTOTUNE_RUN_NOW=1).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from unittest import mock

import pytest
import yaml

from tests.docker.test_compose import COMPOSE, interpolate
from tests.faults import Cluster, free_port, own_ports, wait_gone
from tests.services import postgres_bindir, start_postgres

pytestmark = [
    pytest.mark.slow,
    # Nights start on minute boundaries and each runs a real job: about 5 minutes on a quiet 2-core
    # machine for the whole module, over 10 under heavy load.
    pytest.mark.timeout(1800),
    pytest.mark.skipif(postgres_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl) are not "
                                                         "installed: install Debian's postgresql package"),
]

REPO = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)
STUDY = "nightly"
SECRETS = {  # docker/.env of this deployment; the last one is the program's own secret (trainable.env_from)
    "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"],  # tests/conftest.py: the session's token
    "POSTGRES_PASSWORD": "pgpw" + os.urandom(8).hex(),
    "MLFLOW_AUTH_ADMIN_PASSWORD": "adminpw" + os.urandom(8).hex(),
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask" + os.urandom(8).hex(),
    "TOY_API_TOKEN": "toytok" + os.urandom(8).hex(),
}
COMMAND = ["{python}", "toy_train.py", "--ep", "{ep}", "--tp", "{tp}", "--pp", "{pp}", "--dp", "{dp}",
           "--micro-batch-size", "{micro_batch_size}", "--global-batch-size", "{global_batch_size}",
           "--seq-len", "{seq_len}", "--precision", "{precision}", "--recompute", "{recompute}", "--steps", "3",
           "--warmup-steps", "1", "--metrics-file", "{metrics_file}", "--require-env", "TOY_API_TOKEN"]


def space_text(name: str, cwd: str | None = None, trials: int = 2) -> str:
    """A tiny study of the toy program, written as a user would: no storage, runs folder or tracking
    store in it (the deployment's environment says where), the program's secret by name only."""
    trainable: dict = {"command": [c.replace("{python}", sys.executable) for c in COMMAND],
                       "env_from": ["TOY_API_TOKEN"]}
    if cwd:
        trainable["cwd"] = cwd
    return yaml.safe_dump({
        "model": {"preset": "tiny"},
        "cluster": {"ranks": 2, "device": "cpu", "memory_gb": 1.0, "cpus_per_rank": 1},
        "search": {"ep": [1, 2], "tp": [1, 2], "world_sizes": [1, 2], "micro_batch_size": [2, 4],
                   "global_batch_size": 8, "seq_len": 32, "precision": ["fp32"], "recompute": ["none", "full"]},
        "budget": {"trials": trials, "warmup_steps": 1, "measure_steps": 3, "max_concurrent": 1, "trial_timeout_s": 120,
                   "remeasure_share": 0},  # night 2 re-runs nothing: no tied leaders re-measured
        "tracking": {"experiment": "scheduled"},
        "study": {"name": name, "seed": 4, "lease_timeout_s": 15},
        "trainable": trainable,
    }, sort_keys=False)


class Stack:
    """The compose services as processes; `env(service)` is a service's environment, mapped."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ray_root = Path(tempfile.mkdtemp(prefix="atc", dir="/tmp"))  # short: socket paths
        self.gcs_port, self.dash_port, self.mlflow_port = free_port(), free_port(), free_port()
        self.runs = tmp / "runs"
        self.space = tmp / "config" / "space.yaml"
        self.program = tmp / "config"  # the program beside the space: `submit` ships that folder
        self.logs = tmp / "console"
        for d in (self.runs, self.space.parent, self.logs, tmp / "mlflow"):
            d.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "trainables" / "examples" / "toy_train.py", self.program / "toy_train.py")
        self.space.write_text(space_text(STUDY))
        # docker/secrets.env of this deployment: the program's secret, which ray-head's env_file reads
        self.compose_dir = tmp / "docker"
        self.compose_dir.mkdir()
        (self.compose_dir / "secrets.env").write_text(f"TOY_API_TOKEN={SECRETS['TOY_API_TOKEN']}\n")
        self.procs: list[subprocess.Popen] = []
        self.pg = None
        self.head_ip = ""
        self.other_rays: list[Cluster] = []  # the rendered RayCluster's pods, as processes

    # -- mapping compose onto this machine ---------------------------------------------------------
    def mapping(self) -> dict[str, str]:
        m = {"http://ray-head:8265": self.dashboard, "ray-head:6379": f"{self.head_ip}:{self.gcs_port}",
             "--port=6379": f"--port={self.gcs_port}", "--dashboard-port=8265": f"--dashboard-port={self.dash_port}",
             "--dashboard-host=0.0.0.0": "--dashboard-host=127.0.0.1", "--host=0.0.0.0": "--host=127.0.0.1",
             "--port=5000": f"--port={self.mlflow_port}", "http://mlflow:5000": f"http://127.0.0.1:{self.mlflow_port}",
             "/mlflow/artifacts": str(self.tmp / "mlflow" / "artifacts"), "/home/autotune/runs": str(self.runs),
             "/config/space.yaml": str(self.space), "/opt/autotune/scheduler.py": str(REPO / "docker" / "scheduler.py")}
        if self.pg is not None:
            m["postgres:5432"] = f"127.0.0.1:{self.pg.port}"
        return m

    def _map(self, value: str) -> str:
        for old, new in sorted(self.mapping().items(), key=lambda kv: -len(kv[0])):
            value = value.replace(old, new)
        return value

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    def compose_env(self) -> dict[str, str]:
        return {**SECRETS, "AUTOTUNE_SCHEDULE": "* * * * *", "AUTOTUNE_RUN_NOW": "1"}

    def image_env(self) -> dict[str, str]:
        """What the image gives every container: this process's environment without its Ray,
        MLflow and autotune settings, with the project's tools on the path."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AUTOTUNE_"))}
        env.update(PATH=f"{BIN}:{os.environ['PATH']}", PYTHONPATH=str(REPO), HOME=str(self.tmp))
        return env

    def env(self, service: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        svc = interpolate(COMPOSE["services"][service], self.compose_env())
        env = self.image_env()  # the service's own follow
        for entry in svc.get("env_file", []):  # as compose reads it: NAME=value lines, beside the compose file
            path = self.compose_dir / (entry["path"] if isinstance(entry, dict) else entry)
            if path.exists():
                env.update(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
            else:
                assert isinstance(entry, dict) and entry.get("required") is False, f"{service}: {path} is required"
        env.update({k: self._map(str(v)) for k, v in svc.get("environment", {}).items()})
        env.update(extra or {})
        return env

    def argv(self, service: str) -> list[str]:
        command = interpolate(COMPOSE["services"][service]["command"], self.compose_env())
        items = command.split() if isinstance(command, str) else command
        return [self._map(item) for item in items]

    def start(self, service: str, extra_args: list[str] | None = None, extra_env: dict[str, str] | None = None,
              cwd: Path | None = None, log: str | None = None) -> subprocess.Popen:
        return self.spawn(self.argv(service) + (extra_args or []), self.env(service, extra_env), cwd or self.tmp,
                          log or service)

    def spawn(self, argv: list[str], env: dict[str, str], cwd: Path, log: str) -> subprocess.Popen:
        out = open(self.logs / f"{log}.log", "a")
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    # -- services ----------------------------------------------------------------------------------
    def start_postgres(self) -> None:
        """postgres:16's entrypoint: POSTGRES_USER with POSTGRES_PASSWORD owns POSTGRES_DB."""
        import psycopg

        self.pg = start_postgres()
        env = self.env("postgres")
        user, db = env["POSTGRES_USER"], env["POSTGRES_DB"]
        with psycopg.connect(f"host=127.0.0.1 port={self.pg.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{user}" LOGIN PASSWORD %s'.replace("%s", "'" + env["POSTGRES_PASSWORD"] + "'"))
            conn.execute(f'CREATE DATABASE "{db}" OWNER "{user}"')

    def start_ray(self, attempts: int = 5) -> None:
        """The head, then a worker; a loaded machine sometimes fails a node's start (a slow GCS): then
        both are stopped and started again on fresh ports, as tests/faults.py does."""
        from ray._private.services import get_node_ip_address

        self.head_ip = get_node_ip_address()
        for attempt in range(attempts):
            try:
                self._start_ray_once(attempt)
                return
            except RuntimeError:
                for proc in self.procs[-2:]:
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                Cluster(root=self.ray_root, port=self.gcs_port, env={}).stop()
                self.ray_root = Path(tempfile.mkdtemp(prefix="atc", dir="/tmp"))
                self.gcs_port, self.dash_port = free_port(), free_port()
                if attempt == attempts - 1:
                    raise

    def _start_ray_once(self, attempt: int) -> None:
        # Each service has a machine of its own under Docker: here its fixed default ports are freed.
        head = self.start("ray-head", [f"--temp-dir={self.ray_root}", *own_ports(head=True)], cwd=self.runs,
                          log=f"ray-head-{attempt}")
        self._wait_log(f"ray-head-{attempt}", head, "Ray runtime started", 300)
        worker = self.start("ray-worker", [f"--temp-dir={self.ray_root / 'w'}", *own_ports()],
                            log=f"ray-worker-{attempt}")
        self._wait_log(f"ray-worker-{attempt}", worker, "Ray runtime started", 300)
        self._wait_http(f"{self.dashboard}/api/version", head, f"ray-head-{attempt}")

    def _wait_log(self, name: str, proc: subprocess.Popen, text: str, timeout: float) -> None:
        log = self.logs / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and text in log.read_text():
                return
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {log.read_text()[-2000:]}")
            time.sleep(1)
        raise RuntimeError(f"{name} did not start in {timeout:.0f} s")

    def start_mlflow(self) -> None:
        proc = self.start("mlflow", cwd=self.tmp / "mlflow")
        self._wait_http(f"http://127.0.0.1:{self.mlflow_port}/health", proc, "mlflow")

    def _wait_http(self, url: str, proc: subprocess.Popen, name: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {(self.logs / f'{name}.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=3)
                return
            except urllib.error.HTTPError:
                return  # it answers (401 without the token)
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"{name} did not answer at {url}")

    def stop(self) -> None:
        """As `docker compose down`: SIGTERM to each service's first process only, 10 s of grace, then
        everything left of the service is killed. (SIGTERM to the whole group would stop Ray's GCS
        under `ray start --block`, whose drain then waits out its 30 s timeout.)"""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        for ray_cluster in [Cluster(root=self.ray_root, port=self.gcs_port, env={}), *self.other_rays]:
            ray_cluster.stop()
        if self.pg is not None:
            self.pg.stop()

    # -- reading what the study did ----------------------------------------------------------------
    def cli(self, service: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "autotune.cli", *args], env=self.env(service), cwd=self.tmp,
                             capture_output=True, text=True, timeout=timeout)
        with open(self.logs / "cli.log", "a") as log:  # the console, for the secret scan
            log.write(f"$ autotune {shlex.join(args)}\n{out.stdout}{out.stderr}")
        return out

    def trials(self, study: str = STUDY) -> list:
        from autotune.study.store import load_result

        return list(load_result(study, self.runs).trials)

    def holder(self, study: str = STUDY) -> dict | None:
        path = self.runs / study / f"optuna.journal.{study}.lease"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None


def launched(trials) -> list:
    from autotune.schema import Status

    return [t for t in trials if t.status not in (Status.PRUNED_BY_MEMORY_MODEL, Status.INVALID)]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("compose"))
    try:
        s.start_postgres()
        s.start_mlflow()
        s.start_ray()
        yield s
    finally:
        s.stop()


def mlflow_runs(stack: Stack) -> list:
    from mlflow import MlflowClient

    env = stack.env("scheduler")
    credentials = {k: env[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    with mock.patch.dict(os.environ, credentials):
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name("scheduled")
        return client.search_runs([exp.experiment_id], "", max_results=1000) if exp else []


def test_nights_one_writer_and_takeover(stack):
    log = stack.logs / "scheduler.log"
    scheduler = stack.start("scheduler")
    finished = lambda n: log.exists() and log.read_text().count("finished with exit code") >= n  # noqa: E731

    # Night 1 starts the study as the scheduler starts (AUTOTUNE_RUN_NOW=1), not at a fire time.
    wait_for(lambda: log.exists() and "starting" in log.read_text(), 60, "night 1 did not start at once")
    assert "next run at" not in log.read_text().split("starting")[0]
    wait_for(lambda: finished(1), 900, f"night 1 did not finish: {log.read_text()[-3000:] if log.exists() else ''}")
    assert "finished with exit code 0" in log.read_text(), log.read_text()[-3000:]
    night1 = launched(stack.trials())
    assert len(night1) == 2 and all(t.ok for t in night1), [(t.status, t.reason) for t in night1]
    report = json.loads((stack.runs / STUDY / "report" / "report.json").read_text())
    assert report and (stack.runs / STUDY / "report" / "report.md").exists()
    for t in night1:
        assert (stack.runs / STUDY / "trials" / f"{t.number:04d}" / "node0" / "command.log").exists()

    # Night 2 holds the lease: a third run (a person's `submit --wait`) waits 0 s and exits 3.
    wait_for(lambda: log.read_text().count("starting") >= 2 and stack.holder(), 300, "night 2 did not start")
    holder = stack.holder()
    third = stack.cli("scheduler", "submit", str(stack.space), "--address", stack.dashboard, "--wait")
    assert third.returncode == 3, third.stdout[-3000:] + third.stderr[-2000:]
    assert f"is being run by host {holder['host']} pid {holder['pid']}, started " in third.stdout
    wait_for(lambda: finished(2), 900, f"night 2 did not finish: {log.read_text()[-3000:]}")
    os.killpg(scheduler.pid, signal.SIGTERM)
    scheduler.wait(30)
    assert log.read_text().count("finished with exit code 0") == 2, log.read_text()[-3000:]
    night2 = launched(stack.trials())
    assert len(night2) == 4 and all(t.ok for t in night2), [(t.status, t.reason) for t in night2]
    assert len({t.layout.key for t in night2}) == 4  # night 2 re-ran none of night 1's layouts
    assert json.loads((stack.runs / STUDY / "report" / "report.json").read_text()) != report
    runs = mlflow_runs(stack)
    children = [r for r in runs if "autotune.trial" in r.data.tags]
    assert len(children) == len(stack.trials())  # the third run added no MLflow run
    assert not [r for r in runs if r.info.status == "RUNNING"], [(r.info.run_name, r.info.status) for r in runs]
    parent = next(r for r in runs if "autotune.study" in r.data.tags)
    assert (stack.tmp / "mlflow" / "artifacts").exists()
    reported = [p.name for p in (stack.tmp / "mlflow" / "artifacts").rglob("report.md")]
    assert reported, "the report is logged to the MLflow parent run " + parent.info.run_id

    # A run killed by SIGKILL holds a lease no one renews: the next one takes it over and completes.
    victim = subprocess.Popen([sys.executable, "-m", "autotune.cli", "submit", str(stack.space), "--address",
                               stack.dashboard, "--wait"], env=stack.env("scheduler"), cwd=stack.tmp,
                              stdout=open(stack.logs / "killed.log", "w"), stderr=subprocess.STDOUT)
    before = len(stack.trials())
    wait_for(lambda: (h := stack.holder()) and h["pid"] != holder["pid"] and len(stack.trials()) >= before, 300,
             "the run to kill did not take the lease")
    wait_for(lambda: any(int(p.name) >= before for p in (stack.runs / STUDY / "trials").iterdir()), 300,
             "the run to kill started no trial")
    dead = stack.holder()
    os.kill(dead["pid"], signal.SIGKILL)
    wait_gone([dead["pid"]], 10)
    assert victim.wait(300) != 0
    time.sleep(16)  # past study.lease_timeout_s (15 s) without a heartbeat: the holder is dead
    after = stack.cli("scheduler", "submit", str(stack.space), "--address", stack.dashboard, "--wait")
    assert after.returncode == 0, after.stdout[-4000:] + after.stderr[-2000:]
    assert f"took over the lease of study 'nightly' from host {dead['host']} pid {dead['pid']}," in after.stdout
    final = launched(stack.trials())
    assert sum(1 for t in final if t.ok) >= 6, [(t.status, t.reason) for t in final]
    runs = mlflow_runs(stack)
    assert not [r for r in runs if r.info.status == "RUNNING"], [(r.info.run_name, r.info.status) for r in runs]
    assert stack.holder() is None  # released at the end


def _kubectl_secrets(console: str, shell: dict[str, str]) -> dict[tuple[str, str], str]:
    """The Secrets the printed `kubectl create secret generic NAME --from-literal=KEY="$VAR"` lines
    make, with the user's shell variables (`shell`) for $VAR and a fresh value for a command."""
    out = {}
    for line in console.splitlines():
        if "kubectl" not in line or "create secret generic" not in line:
            continue
        words = shlex.split(line.split("kubectl", 1)[1].replace('"$(openssl rand -hex 32)"', "RANDOM"))
        name = words[words.index("generic") + 1]
        for w in words:
            if w.startswith("--from-literal="):
                key, value = w.removeprefix("--from-literal=").split("=", 1)
                out[(name, key)] = value
    for ref, value in out.items():
        for var, secret in shell.items():
            value = value.replace("$" + var, secret)
        assert "$" not in value, f"{ref}: the user's shell has no {value}"
        out[ref] = value
    return out


def test_the_manifests_run_on_pods_with_the_rendered_environment(stack):
    """The RayJob's entrypoint (as KubeRay's submitter runs it) and the CronJob's command, on a
    Ray cluster whose head and worker run with the environment the rendered RayCluster gives their
    pods: each env entry, secretKeyRef values from the Secrets that the printed `kubectl create
    secret` lines make, and the token KubeRay's authOptions adds. Nothing else: the program's
    secret reaches the driver only if the manifests wire it."""
    space = stack.tmp / "k8s-space.yaml"
    space.write_text(space_text("k8s-check", cwd=str(stack.program), trials=1))  # a run starts it, the next continues
    out_dir = stack.tmp / "manifests"
    rendered = stack.cli("scheduler", "k8s", str(space), "--schedule", "0 2 * * *", "--image", "autotune:cpu",
                         "--out", str(out_dir), "--namespace", "tuning", "--mlflow-uri",
                         "http://mlflow.tuning.svc:5000", "--mlflow-secret", "mlflow-auth")
    assert rendered.returncode == 0, rendered.stderr
    docs = {p.name: yaml.safe_load(p.read_text()) for p in out_dir.glob("*.yaml")}
    # the ConfigMap is what the pods mount at /config/space.yaml; the PVC is the head's /data
    mounted = stack.tmp / "k8s-config" / "space.yaml"
    mounted.parent.mkdir()
    mounted.write_text(docs["configmap.yaml"]["data"]["space.yaml"])
    data = stack.tmp / "k8s-data"
    data.mkdir()
    # Secrets as the user makes them: the printed lines, from a shell holding the program's secret
    # (ray-auth-token: this session's token, so the test can talk to the cluster; mlflow-auth: the
    # MLflow login the README asks for).
    secrets = _kubectl_secrets(rendered.stdout, {"TOY_API_TOKEN": SECRETS["TOY_API_TOKEN"]})
    assert secrets.pop(("ray-auth-token", "auth_token")) == "RANDOM"
    assert secrets == {("autotune-k8s-check-secrets", "TOY_API_TOKEN"): SECRETS["TOY_API_TOKEN"]}, rendered.stdout
    secrets[("ray-auth-token", "auth_token")] = SECRETS["RAY_AUTH_TOKEN"]
    secrets[("mlflow-auth", "username")] = "admin"
    secrets[("mlflow-auth", "password")] = SECRETS["MLFLOW_AUTH_ADMIN_PASSWORD"]
    gcs, dash = free_port(), free_port()
    head_svc = "autotune-k8s-check-head-svc.tuning.svc"
    local = {"/config/space.yaml": str(mounted), "/data": str(data),
             f"http://{head_svc}:8265": f"http://127.0.0.1:{dash}",
             "http://mlflow.tuning.svc:5000": f"http://127.0.0.1:{stack.mlflow_port}"}

    def mapped(text: str) -> str:
        for old, new in local.items():
            text = text.replace(old, new)
        return text

    def pod_env(container: dict, auth: bool) -> dict[str, str]:
        """The image's environment (this machine's, without Ray/MLflow/autotune settings) and the
        container's env entries, as the kubelet resolves them."""
        env = stack.image_env()
        for e in container.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            env[e["name"]] = secrets[(ref["name"], ref["key"])] if ref else mapped(str(e["value"]))
        if auth:  # KubeRay's authOptions: {mode: token, secretName: S} gives Ray's pods the token
            opts = docs["raycluster.yaml"]["spec"]["authOptions"]
            env.update(RAY_AUTH_MODE=opts["mode"], RAY_AUTH_TOKEN=secrets[(opts["secretName"], "auth_token")])
        return env

    # The RayCluster's pods: `ray start` with each group's rayStartParams, as KubeRay runs it.
    spec = docs["raycluster.yaml"]["spec"]
    head_c = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_env = pod_env(head_c, auth=True)
    assert head_env["TOY_API_TOKEN"] == SECRETS["TOY_API_TOKEN"]  # wired by the manifests, not by the test
    params = {**spec["headGroupSpec"]["rayStartParams"], "dashboard-host": "127.0.0.1"}
    root = Path(tempfile.mkdtemp(prefix="atk", dir="/tmp"))
    stack.other_rays.append(Cluster(root=root, port=gcs, env={}))
    head = stack.spawn([f"{BIN}/ray", "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
                        f"--temp-dir={root}", "--disable-usage-stats", *own_ports(head=True),
                        *(f"--{k}={v}" for k, v in params.items())], head_env, data, "k8s-head")
    stack._wait_log("k8s-head", head, "Ray runtime started", 300)
    group = spec["workerGroupSpecs"][0]
    worker_c = group["template"]["spec"]["containers"][0]
    cpus = worker_c["resources"]["limits"]["cpu"]  # KubeRay's num-cpus: the container's CPU limit
    worker = stack.spawn([f"{BIN}/ray", "start", f"--address={stack.head_ip}:{gcs}", "--block", f"--num-cpus={cpus}",
                          f"--temp-dir={root / 'w'}", "--disable-usage-stats", *own_ports(),
                          *(f"--{k}={v}" for k, v in group["rayStartParams"].items())],
                         pod_env(worker_c, auth=True), stack.tmp, "k8s-worker")
    stack._wait_log("k8s-worker", worker, "Ray runtime started", 300)
    stack._wait_http(f"http://127.0.0.1:{dash}/api/version", head, "k8s-head")

    def trials():
        from autotune.study.store import load_result

        return launched(load_result("k8s-check", data).trials)

    # RayJob: KubeRay's submitter pod runs `ray job submit --address HEAD -- ENTRYPOINT` with its env.
    job_spec = docs["rayjob.yaml"]["spec"]
    entrypoint = job_spec["entrypoint"]
    assert entrypoint == "autotune run /config/space.yaml --continue --plain"
    submitter = job_spec["submitterPodTemplate"]["spec"]["containers"][0]
    job = subprocess.run([f"{BIN}/ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--submission-id",
                          "rayjob-check", "--", *[mapped(a) for a in shlex.split(entrypoint)]],
                         env=pod_env(submitter, auth=False), capture_output=True, text=True, timeout=600)
    status = subprocess.run([f"{BIN}/ray", "job", "status", "rayjob-check", "--address", f"http://127.0.0.1:{dash}"],
                            env=pod_env(submitter, auth=False), capture_output=True, text=True, timeout=120)
    with open(stack.logs / "rayjob.log", "w") as f:
        f.write(job.stdout + job.stderr + status.stdout + status.stderr)
    assert job.returncode == 0 and "Job 'rayjob-check' succeeded" in status.stdout + status.stderr, (
        job.stdout[-4000:] + job.stderr[-2000:])
    first = trials()
    assert len(first) == 1 and all(t.ok for t in first), [(t.status, t.reason) for t in first]

    # CronJob: its container's command with its environment.
    container = docs["cronjob.yaml"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    command = [mapped(a) for a in container["command"]]
    assert command[0] == "autotune" and "--wait" in command
    cron = subprocess.run(command, env=pod_env(container, auth=False), cwd=stack.tmp, capture_output=True, text=True,
                          timeout=600)
    with open(stack.logs / "cronjob.log", "w") as f:
        f.write(cron.stdout + cron.stderr)
    assert cron.returncode == 0, cron.stdout[-4000:] + cron.stderr[-2000:]
    both = trials()
    assert len(both) == 2 and all(t.ok for t in both), [(t.status, t.reason) for t in both]
    assert (data / "k8s-check" / "report" / "report.md").exists()


def test_no_secret_is_written_anywhere(stack):
    """Runs folder, Ray's session folders, manifests, MLflow's artifacts and database, the Optuna
    journal, every console: none holds a secret value of the deployment or of the program."""
    pg_dump = subprocess.run(stack.pg.as_user + [str(stack.pg.bindir / "pg_dump"), "-h", "127.0.0.1", "-p",
                                                 str(stack.pg.port), "-U", "postgres", "mlflow"],
                             capture_output=True, text=True, timeout=120)
    assert pg_dump.returncode == 0 and "CREATE TABLE public.runs" in pg_dump.stdout, pg_dump.stderr
    (stack.logs / "mlflow-database.sql").write_text(pg_dump.stdout)
    checked = 0
    found = []
    for root in (stack.runs, stack.ray_root, stack.tmp / "manifests", stack.tmp / "mlflow", stack.logs,
                 stack.tmp / "k8s-config", stack.tmp / "k8s-data", *(c.root for c in stack.other_rays)):
        for path in root.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            checked += 1
            for name, value in SECRETS.items():
                if value.encode() in data:
                    found.append((name, str(path)))
    assert checked > 100
    assert not found, found
