"""Starting or joining Ray for a job's driver."""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Join the cluster a job was submitted to, or start a local Ray in-process.

    Under ``ray job submit`` (``RAY_ADDRESS`` is set) the driver joins the cluster as it
    is: passing resources there is an error. Locally it starts Ray with ``num_cpus``
    (``None`` or 0 = all cores) and no dashboard.

    Returns:
        True if this call started or joined Ray, False if it was already initialised.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=num_cpus or None, include_dashboard=False)
    return True
