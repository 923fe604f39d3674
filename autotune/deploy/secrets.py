"""What a job or a manifest may not carry: secret values in a space, which must reach the cluster by
its environment instead."""

from __future__ import annotations

from autotune.redaction import has_secret
from autotune.space.spec import Spec


def written_secrets(spec: Spec) -> str | None:
    """Why this space cannot be written into a job or a manifest as it is (None: it can).

    A job's working folder and a ConfigMap are readable by whoever can list jobs or read the
    namespace, and the job needs the real values: a masked copy would not run. So values travel
    only by the environment of the cluster's nodes.
    """
    if has_secret(spec.study.storage):
        return ("study.storage: the URL holds a password, which would be written into the job; drop it from the "
                "URL and give it to the cluster's nodes by the environment (PGPASSWORD, or AUTOTUNE_STORAGE)")
    if has_secret(spec.tracking.uri):
        return ("tracking.uri: the URL holds a credential, which would be written into the job; drop it and set "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD on the cluster's nodes")
    if spec.trainable is not None and spec.trainable.env:
        names = ", ".join(sorted(spec.trainable.env))
        return (f"trainable.env: values in the space file ({names}) would be written into the job; list the names in "
                f"trainable.env_from instead and set them in the cluster's environment (a Kubernetes Secret, docker/.env)")
    return None
