"""One trial of a user's own training command (`trainable:` in the space) on Ray.

The command starts its own ranks (torchrun, a launcher script), so Ray's part is to reserve
them and to say where rank 0 is: one placement-group bundle per node the trial uses, holding
that node's share of the ranks; one Ray task per bundle runs the rendered command there with
its `{node_rank}`, `{nproc}` and the rank-0 node's `{master_addr}`/`{master_port}`
(`trainables.command.run_command`: no shell, own process group, killed on timeout). Node 0's
metrics are the trial's.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from autotune.redaction import error_line
from autotune.schema import Status
from autotune.space.layout import Layout
from autotune.space.spec import Spec
from autotune.trials.placement import rank_resources
from trainables.command_template import layout_spellings

GRACE_S = 15.0  # beyond the command's own budget: its SIGTERM/SIGKILL grace and the task's return


@dataclass(frozen=True)
class CommandPlacement:
    nproc: int  # ranks per node the trial uses
    nnodes: int
    rank: dict[str, float]  # what one rank holds
    strategy: str

    def bundles(self) -> list[dict[str, float]]:
        return [{k: v * self.nproc for k, v in self.rank.items()} for _ in range(self.nnodes)]


@dataclass(frozen=True)
class CommandTrial:
    """Everything a node task needs: plain values, so the trial's config stays picklable."""

    command: tuple[str, ...]
    values: dict[str, Any]  # layout placeholders; the node ones are added per node
    metrics_regex: dict[str, str] | None
    metrics_preset: str | None = None
    env_holder: str | None = None  # the named actor holding trainable.env (`EnvHolder`), not the values
    cwd: str = "."
    trial_dir: str = "."
    warmup_steps: int = 0
    tokens_per_step: float | None = None
    shape: tuple[int, int, int] | None = None  # seq_len, world size, global batch: to derive printed figures
    secret_names: tuple[str, ...] = ()  # trainable.env_from: their values are masked in the program's output


@ray.remote(num_cpus=0)
class _EnvHolder:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def get(self) -> dict[str, str]:
        return self.env


class EnvHolder:
    """The program's environment values (tokens, passwords) live in one actor of the study's
    driver, for its lifetime. Trial configs carry only the actor's name, so the values never reach
    Ray Tune's saved experiment state, MLflow or the report."""

    def __init__(self, env: dict[str, str]) -> None:
        import uuid

        self.name = f"autotune-env-{uuid.uuid4().hex}"
        self.actor = _EnvHolder.options(name=self.name).remote(env)

    def close(self) -> None:
        ray.kill(self.actor)


def command_placement(layout: Layout, spec: Spec) -> CommandPlacement:
    """All ranks on one node where they fit (STRICT_PACK), else whole nodes (STRICT_SPREAD)."""
    rank, per_node = rank_resources(spec.cluster), spec.cluster.ranks_per_node
    world = layout.world_size
    if per_node is None or world <= per_node:
        return CommandPlacement(world, 1, rank, "STRICT_PACK")
    nproc = math.gcd(world, per_node)
    return CommandPlacement(nproc, world // nproc, rank, "STRICT_SPREAD" if nproc == per_node else "SPREAD")


def command_trial(spec: Spec, number: int, layout: Layout, env_holder: str | None = None) -> CommandTrial:
    t = spec.trainable
    assert t is not None
    values = {"ep": layout.ep, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
              "micro_batch_size": layout.micro_batch_size, "global_batch_size": spec.search.global_batch_size,
              "seq_len": spec.search.seq_len, "world_size": layout.world_size, "seed": spec.study.seed,
              "precision": layout.precision, "recompute": layout.recompute, "schedule": layout.schedule}
    values.update(layout_spellings(layout.precision, layout.recompute, spec.search.global_batch_size,
                                   layout.micro_batch_size, layout.dp, layout.ep))
    trial_dir = (spec.study.directory() / "trials" / f"{number:04d}").resolve()
    # In a submitted job each node unpacks the job's files at its own path and runs the job's tasks
    # there: the shipped program's relative folder stays relative, to be found on every node.
    shipped = os.environ.get("AUTOTUNE_JOB") and t.cwd and not os.path.isabs(t.cwd)
    cwd = t.cwd if shipped else str(t.directory())
    return CommandTrial(tuple(t.command), values, t.metrics_regex, t.metrics_preset, env_holder, cwd,
                        str(trial_dir), spec.budget.warmup_steps,
                        float(spec.search.global_batch_size * spec.search.seq_len),
                        (spec.search.seq_len, layout.world_size, spec.search.global_batch_size),
                        tuple(t.env_from))


def _free_port() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def _node_main(trial: CommandTrial, node_rank: int, nnodes: int, nproc: int, master_addr: str, master_port: int,
               timeout_s: float, owner: str | None = None, number: int = -1) -> dict[str, Any]:
    from autotune.trials.owner import owner_handle, start_time
    from trainables.command import RunShape, render_argv, run_command

    handle = owner_handle(owner)
    node = ray.get_runtime_context().get_node_id()

    def started(pid: int) -> None:
        """The study's owner holds the command's process group: a stopped trial loses all of it."""
        if handle is not None:
            ray.get(handle.rank_started.remote(number, node_rank, node, pid, start_time(pid), True))

    node_dir = Path(trial.trial_dir) / f"node{node_rank}"
    node_dir.mkdir(parents=True, exist_ok=True)
    values = {**trial.values, "nproc": nproc, "nnodes": nnodes, "node_rank": node_rank,
              "master_addr": master_addr, "master_port": master_port, "trial_dir": str(node_dir),
              "metrics_file": str(node_dir / "metrics.jsonl")}
    argv = render_argv(trial.command, values)
    env = ray.get(ray.get_actor(trial.env_holder).get.remote()) if trial.env_holder else {}
    printed = trial.metrics_regex is not None or trial.metrics_preset is not None
    out = run_command(argv, env=env, cwd=trial.cwd, metrics_file=None if printed else values["metrics_file"],
                      metrics_regex=trial.metrics_regex, metrics_preset=trial.metrics_preset, timeout_s=timeout_s,
                      log_path=node_dir / "command.log", warmup_steps=trial.warmup_steps,
                      tokens_per_step=trial.tokens_per_step, shape=RunShape(*trial.shape) if trial.shape else None,
                      on_start=started, secrets=[env[n] for n in trial.secret_names if env.get(n)])
    reason = out.reason
    if out.status == Status.OK and out.derived:  # the report says which figures autotune computed, from what
        how = f" (metrics_preset {trial.metrics_preset})" if trial.metrics_preset else ""
        reason = f"derived{how}: " + "; ".join(f"{k} = {v}" for k, v in sorted(out.derived.items()))
    return {"status": out.status.value, "reason": reason, "summary": out.summary, "steps": out.steps,
            "node": node, "ip": ray.util.get_node_ip_address(), "nice": os.nice(0),  # the command's priority
            "log": str(out.log_path)}


_where_task = ray.remote(max_retries=0)(_free_port)
_node_task = ray.remote(max_retries=0)(_node_main)


def run_command_trial(trial: CommandTrial, placement: CommandPlacement, timeout_s: float,
                      placement_wait_s: float | None = None, owner: str | None = None, number: int = -1):
    """Reserve the trial's nodes, run the command on each, and always give them back (with
    `owner`, the study's `autotune.trials.owner` removes the placement group however the trial ends)."""
    from autotune.trials.outcome import TrialOutcome, wait_for_placement
    from autotune.trials.owner import give_back, owner_handle, reserve

    start = time.monotonic()
    outcome = TrialOutcome(Status.OK)
    handle = owner_handle(owner)
    pg = reserve(handle, number, placement.bundles(), placement.strategy)
    refs: list[Any] = []
    try:
        unplaced = wait_for_placement(pg, timeout_s, placement_wait_s, outcome)
        if unplaced is not None:
            outcome.status = Status.CRASHED
            outcome.reason = (f"the cluster could not place {placement.nnodes} node(s) of {placement.nproc} ranks "
                              f"({placement.strategy}) within {unplaced:.0f} s")
            return outcome

        def where(i: int):
            return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)

        addr, port = ray.get(_where_task.options(num_cpus=0, scheduling_strategy=where(0)).remote())
        cpus = placement.rank.get("CPU", 0) * placement.nproc
        gpus = placement.rank.get("GPU", 0) * placement.nproc
        refs = [_node_task.options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=where(i))
                .remote(trial, i, placement.nnodes, placement.nproc, addr, port, timeout_s, owner, number)
                for i in range(placement.nnodes)]
        try:
            results = ray.get(refs, timeout=timeout_s + GRACE_S)
        except GetTimeoutError:
            outcome.status = Status.TIMEOUT
            outcome.reason = f"trial exceeded its {timeout_s:.0f} s budget"
            return outcome
        except RayError as exc:
            outcome.status, outcome.reason = Status.CRASHED, f"a node task failed: {error_line(exc)}"
            return outcome
        for i, r in enumerate(results):
            outcome.ranks += [{"rank": i * placement.nproc + j, "node": r["node"], "ip": r["ip"], "nice": r.get("nice")}
                              for j in range(placement.nproc)]
        failed = [(i, r) for i, r in enumerate(results) if r["status"] != Status.OK.value]
        if failed:
            i, r = failed[0]
            outcome.status = Status(r["status"])
            outcome.reason = f"node {i}: {r['reason']} (log: {r['log']})" if placement.nnodes > 1 else \
                f"{r['reason']} (log: {r['log']})"
            return outcome
        outcome.summary, outcome.steps = results[0]["summary"], results[0]["steps"]
        outcome.reason = results[0]["reason"]
        return outcome
    finally:
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except Exception:
                pass
        give_back(handle, number, pg)
        outcome.duration_s = time.monotonic() - start
