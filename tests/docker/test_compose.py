"""docker/: the compose file parsed (Docker is not run here), its key settings, the Dockerfiles, the scheduler loop."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from autotune.deploy.cron import parse_cron

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^{}]*))?\}")
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET")
REQUIRED = {"RAY_AUTH_TOKEN": "t0ken", "POSTGRES_PASSWORD": "pgpass", "MLFLOW_AUTH_ADMIN_PASSWORD": "adminpass",
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "flaskkey"}


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} (enough for this file)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        have = env.get(name)
        if op in (":-", "-"):
            return have if have not in (None, "") else arg
        if op in (":?", "?"):
            if not have:
                raise KeyError(f"{name}: {arg}")
            return have
        return have or ""

    return VAR.sub(one, value.replace("$$", "\x00")).replace("\x00", "$")


def env_of(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    assert isinstance(env, dict), f"{service}: environment as a mapping"
    return env


def argv(service: str) -> list[str]:
    command = SERVICES[service]["command"]
    return command.split() if isinstance(command, str) else command


def test_services_and_images():
    assert {"ray-head", "ray-worker", "postgres", "mlflow", "scheduler"} <= set(SERVICES)
    for name in ("ray-head", "ray-worker", "mlflow", "scheduler"):
        s = SERVICES[name]
        assert s["image"] == "${AUTOTUNE_IMAGE:-autotune:cpu}"
        assert s["build"] == {"context": "..", "dockerfile": "docker/${AUTOTUNE_DOCKERFILE:-Dockerfile.cpu}"}
        assert "container_name" not in s  # a fixed name would stop --scale
    assert SERVICES["postgres"]["image"].startswith("postgres:")


def test_every_interpolation_is_well_formed_and_resolves():
    text = (DOCKER / "docker-compose.yml").read_text()
    uncommented = "\n".join(line.split(" #")[0] for line in text.splitlines() if not line.lstrip().startswith("#"))
    for expr in re.findall(r"\$\{[^}]*\}", uncommented):
        assert VAR.fullmatch(expr), expr
    assert "$" not in VAR.sub("", uncommented.replace("$$", ""))
    resolved = interpolate(COMPOSE, REQUIRED)
    for name in REQUIRED:
        env = dict(REQUIRED)
        del env[name]
        with pytest.raises(KeyError, match=name):
            interpolate(COMPOSE, env)  # compose refuses to start without it
    assert resolved["services"]["ray-worker"]["deploy"]["replicas"] == "1"
    assert interpolate(COMPOSE, {**REQUIRED, "RAY_WORKERS": "4"})["services"]["ray-worker"]["deploy"]["replicas"] == "4"


def test_ray_head_jobs_api_and_token_auth():
    head = argv("ray-head")
    assert head[:2] == ["ray", "start"] and "--head" in head and "--block" in head
    assert "--dashboard-port=8265" in head and "--num-cpus=0" in head
    for name in ("ray-head", "ray-worker", "ray-worker-gpu", "scheduler"):
        env = env_of(name)
        assert env["RAY_AUTH_MODE"] == "token", name
        assert VAR.fullmatch(env["RAY_AUTH_TOKEN"]).group(1, 2) == ("RAY_AUTH_TOKEN", ":?"), name
    # published only on the host's loopback
    for name, s in SERVICES.items():
        for port in s.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert SERVICES["ray-head"]["ports"] == ["127.0.0.1:${RAY_DASHBOARD_PORT:-8265}:8265"]
    assert "ports" not in SERVICES["ray-worker"] and "ports" not in SERVICES["scheduler"]


def test_workers_scale():
    worker = argv("ray-worker")
    assert worker[:2] == ["ray", "start"] and "--address=ray-head:6379" in worker
    assert "replicas" in SERVICES["ray-worker"]["deploy"]
    gpu = SERVICES["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # every Ray node keeps its idle workers between trials (at Ray's default a node killed them)
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        env = interpolate(SERVICES[name]["environment"], {"RAY_AUTH_TOKEN": "t", "MLFLOW_AUTH_ADMIN_PASSWORD": "p"})
        assert int(env["RAY_num_workers_soft_limit"]) >= 64, name
        assert env["RAY_worker_niceness"] == "0", name  # ranks at normal priority, not Ray's nice 15


def test_mlflow_on_postgres_with_allowed_hosts_and_basic_auth():
    cmd = argv("mlflow")
    assert cmd[:2] == ["mlflow", "server"]
    flags = dict(item.split("=", 1) for item in cmd[2:] if "=" in item)
    assert flags["--host"] == "0.0.0.0" and flags["--port"] == "5000"
    hosts = flags["--allowed-hosts"].split(",")
    assert "mlflow:5000" in hosts and "127.0.0.1:*" in hosts and "*" not in hosts
    assert flags["--app-name"] == "basic-auth"
    env = env_of("mlflow")
    uri = interpolate(env["MLFLOW_BACKEND_STORE_URI"], REQUIRED)
    assert uri == "postgresql+psycopg://autotune:pgpass@postgres:5432/mlflow"
    pg = env_of("postgres")
    assert pg["POSTGRES_DB"] == "mlflow" and pg["POSTGRES_USER"] == "autotune"
    assert SERVICES["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in SERVICES["postgres"]
    for name in ("ray-head", "scheduler"):
        assert env_of(name)["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_no_secret_is_written_in_the_file():
    for name, s in SERVICES.items():
        for key, value in s.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert VAR.fullmatch(str(value)) and VAR.fullmatch(str(value)).group(2) == ":?", (name, key, value)
            for m in re.finditer(r"://[^:/@]+:([^@]+)@", str(value)):  # a password inside a URL
                assert VAR.fullmatch(m.group(1)), (name, key)
    volumes = set(COMPOSE["volumes"])
    for s in SERVICES.values():
        for v in s.get("volumes", []):
            source = v.split(":")[0]
            assert source in volumes or source.startswith(("${", ".", "/")), v


def test_scheduler_submits_on_a_cron_schedule():
    cmd = argv("scheduler")
    assert cmd[:2] == ["python", "/opt/autotune/scheduler.py"]
    schedule = interpolate(cmd[cmd.index("--schedule") + 1], {})
    assert schedule == "0 2 * * *" and parse_cron(schedule)
    assert cmd[cmd.index("--") + 1:] == ["autotune", "submit", "/config/space.yaml", "--address",
                                          "http://ray-head:8265", "--wait"]  # one run at a time
    # the driver (on the head) writes its state and reports into the runs volume
    assert env_of("ray-head")["AUTOTUNE_RUNS_DIR"] == "/home/autotune/runs"
    assert "runs:/home/autotune/runs" in SERVICES["ray-head"]["volumes"]
    assert SERVICES["scheduler"]["volumes"] == [
        "${AUTOTUNE_SPACE:-../search_spaces/quickstart-cpu.yaml}:/config/space.yaml:ro"]
    assert (DOCKER / "../search_spaces/quickstart-cpu.yaml").resolve().is_file()


def _run_scheduler(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, str(DOCKER / "scheduler.py"), *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_scheduler_runs_at_start_when_asked_and_refuses_a_bad_switch(tmp_path):
    assert env_of("scheduler")["AUTOTUNE_RUN_NOW"] == "${AUTOTUNE_RUN_NOW:-0}"  # off unless the user sets it
    out = tmp_path / "ran.txt"
    proc = subprocess.Popen([sys.executable, str(DOCKER / "scheduler.py"), "--schedule", "0 2 1 1 *", "--",
                             sys.executable, "-c", f"open({str(out)!r}, 'w').write('ran')"],
                            env={**os.environ, "PYTHONPATH": str(REPO), "AUTOTUNE_RUN_NOW": "1"},
                            stdout=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]  # the schedule, the run, its end
        assert "starting" in lines[1] and "finished with exit code 0" in lines[2], lines
        assert out.read_text() == "ran"
        assert "next run at" in proc.stdout.readline()  # then it waits for the schedule (1 January)
    finally:
        proc.terminate()
        proc.wait(30)
    bad = _run_scheduler("--schedule", "@daily", "--", "true", env={"AUTOTUNE_RUN_NOW": "maybe"})
    assert bad.returncode == 2 and bad.stderr.startswith("error: AUTOTUNE_RUN_NOW must be 1 or 0"), bad.stderr


def test_scheduler_script_plans_runs_and_refuses_bad_schedules():
    out = _run_scheduler("--schedule", "30 2 * * MON-FRI", "--time-zone", "UTC", "--dry-run", "3")
    assert out.returncode == 0, out.stderr
    times = [datetime.fromisoformat(line) for line in out.stdout.split()]
    assert len(times) == 3 and times == sorted(times)
    assert all(t.hour == 2 and t.minute == 30 and t.weekday() < 5 for t in times)
    bad = _run_scheduler("--schedule", "0 2 * *", "--", "true")
    assert bad.returncode == 2 and bad.stderr.startswith("error: schedule '0 2 * *' has 4 fields")
    zone = _run_scheduler("--schedule", "@daily", "--time-zone", "Mars/Olympus", "--", "true")
    assert zone.returncode == 2 and "time zone 'Mars/Olympus' is unknown" in zone.stderr


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def _instructions(path: Path) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_install_the_package_as_a_non_root_user(name):
    lines = _instructions(DOCKER / name)
    runs = [line for line in lines if line.startswith("RUN ")]
    assert any(re.search(r"pip install \.(\s|$)", r) for r in runs)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    for line in lines:
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for src in sources:
                assert (REPO / src).exists(), src
                assert f"!{src.rstrip('/')}" in {i.rstrip("/") for i in ignore}, f"{src} is not in the build context"
    assert "!.env" not in ignore and "**" in ignore  # nothing else (secrets, .venv) reaches the build


def test_cpu_image_pins_the_cpu_torch_wheel_before_the_package():
    lines = _instructions(DOCKER / "Dockerfile.cpu")
    assert lines[0] == "FROM python:3.11-slim"
    torch = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line)
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch]
    package = next(i for i, line in enumerate(lines) if re.search(r"pip install \.(\s|$)", line))
    assert torch < package
    assert "ray[default]" in lines[package]  # the head's dashboard / Jobs API


def test_cuda_image_names_its_base_to_adapt():
    text = (DOCKER / "Dockerfile.cuda").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M).group(1)
    assert base.startswith("pytorch/pytorch:2.13") and "cuda" in base
    assert "FROM ${BASE}" in text and "base is the one to adapt" in text


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_have_wget_for_kuberay_probes(name):
    runs = [line for line in _instructions(DOCKER / name) if line.startswith("RUN ")]
    assert any("apt-get install" in r and " wget" in r for r in runs)


def test_cuda_image_frees_uid_1000_before_creating_its_user(tmp_path):
    """Ubuntu 24.04 bases ship a uid-1000 user: the image's user step must not clash with it. The
    step's shell is run here against fake passwd/group tools that hold an `ubuntu` user."""
    run = next(line for line in _instructions(DOCKER / "Dockerfile.cuda") if "useradd" in line)
    script = run[len("RUN "):]
    assert script.index("userdel") < script.index("useradd --create-home --uid 1000")
    log = tmp_path / "log"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fakes = {
        "getent": 'case "$1 $2" in "passwd 1000") echo "ubuntu:x:1000:1000::/home/ubuntu:/bin/bash";; '
                  '"group 1000") echo "ubuntu:x:1000:";; *) exit 2;; esac',
        "userdel": f'echo "userdel $*" >> {log}', "groupdel": f'echo "groupdel $*" >> {log}',
        "useradd": f'echo "useradd $*" >> {log}', "mkdir": f'echo "mkdir $*" >> {log}',
        "chown": f'echo "chown $*" >> {log}',
    }
    for tool, body in fakes.items():
        (bindir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bindir / tool).chmod(0o755)
    out = subprocess.run(["sh", "-c", script], env={"PATH": f"{bindir}:/usr/bin:/bin"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    steps = log.read_text().splitlines()
    assert steps[0] == "userdel --remove ubuntu" and steps[1] == "groupdel ubuntu"
    assert steps[2].startswith("useradd --create-home --uid 1000")
