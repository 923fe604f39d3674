"""The study's Ray: a local one sized for the space, or a cluster it connects to, with the
settings a measured trial needs on either (warm workers, ranks at normal priority)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from autotune.space.spec import Spec
from autotune.trial_record import NORMAL_PRIORITY


# Ray starts its workers at nice 15 (RayConfig `worker_niceness`), so that anything else on the node
# comes first; a trial's ranks are forked from those workers and would inherit it. A training run is
# measured at normal priority: beside two busy processes on 2 cores, one tiny rank took 84-92 s at
# nice 15 and 3.7 s at nice 0 (the study's own driver is such a process). The compose file, the
# manifests and most of the tests' clusters also set RAY_worker_niceness=0 on their nodes.
WORKER_NICENESS = NORMAL_PRIORITY
# On a cluster the study connects to, the same setting travels in the study's job-level runtime
# environment: a worker takes RayConfig's worker_niceness from its own environment, whatever its
# node was started with (Ray's job supervisor runs its own actor this way; measured here: tasks at
# nice 0 on a node at 15). Job-level, so every worker of the study shares one pool, as without it.
PRIORITY_ENV = "RAY_worker_niceness"
# Where Ray's job supervisor hands a job's driver the job's config (ray._private.runtime_env.constants).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_init(spec: Spec, address: str | None) -> bool:
    """Connect to a cluster, or start a local Ray sized for the space. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers' output stays in Ray's own log files (log_to_driver): a trial's outcome reaches the
    # driver as its result. Ray's driver-side logger is left as it is (configure_logging=False), so
    # the CLI's routing (autotune/cli/logs.py) decides where its lines go.
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False,
                              "configure_logging": False}
    if address:
        ray.init(address=address, runtime_env=connected_runtime_env(os.environ), **kwargs)
        return True
    # The ranks' CPUs; trial coordinators only hold a sliver of the head node's own resource.
    num_cpus = max(1, math.ceil(spec.cluster.total_ranks * spec.cluster.cpus_per_rank))
    kwargs["_system_config"] = {"num_workers_soft_limit": warm_workers(spec, num_cpus),
                                "worker_niceness": WORKER_NICENESS}
    try:
        ray.init(num_cpus=num_cpus, **kwargs)
    except Exception as exc:
        # Ray gives a new local node a fixed 30 s to register with its GCS (ray/_private/node.py);
        # a heavily loaded machine can miss that window. Nothing of the study has run yet, so
        # start a fresh node once more rather than fail the study.
        if "timed out during startup" not in str(exc):
            raise
        ray.shutdown()
        ray.init(num_cpus=num_cpus, **kwargs)
    return True


def connected_runtime_env(environ: Mapping[str, str]) -> dict[str, Any] | None:
    """The study's runtime environment on a cluster it connects to: its ranks at WORKER_NICENESS.

    Inside a Ray job (`autotune deploy`, `ray job submit`) Ray merges this with the job's own
    environment and refuses a variable set by both: where the job already sets the priority, the
    job's choice stands."""
    job = environ.get(JOB_CONFIG_ENV)
    if job:
        try:
            env_vars = (json.loads(job).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            env_vars = {}
        if PRIORITY_ENV in env_vars:
            return None
    return {"env_vars": {PRIORITY_ENV: str(WORKER_NICENESS)}}


def warm_workers(spec: Spec, num_cpus: int) -> int:
    """How many worker processes the local Ray keeps alive between trials (its idle-worker soft
    limit), so that every rank of the next trial finds a worker that already imported torch.

    Ray 2.60 left at its default killed idle workers between trials here: in a study of world-2
    trials on 2 CPUs, 3 of 5 trials forked their second rank from a new worker, which imports
    torch first (4-6 s of a 6 s trial; benchmarks/warm_workers.py measures the whole study).
    Room for every rank of the cluster, the concurrent trials' coordinators and the study's own
    actors keeps them all."""
    return max(num_cpus, spec.cluster.total_ranks + spec.budget.max_concurrent + 2)
