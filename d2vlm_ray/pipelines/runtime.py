"""Starting or joining Ray for a job's driver."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def ensure_ray(
    num_cpus: int | None = None,
    *,
    log_to_driver: bool = True,
    env: dict[str, str] | None = None,
    dashboard: bool = True,
) -> bool:
    """Join the cluster a job was submitted to, or start a local Ray in-process.

    Every driver in the project starts Ray through here. Under ``ray job submit``
    (``RAY_ADDRESS`` is set) the driver joins the cluster as it is: passing resources
    there is an error. Locally it starts Ray with ``num_cpus`` (``None`` or 0 = all
    cores) and, by default, the dashboard on 127.0.0.1.

    The dashboard is more than a view: it serves Ray's state API, and Ray Train's
    placement-group cleaner polls that API every second to see whether the training
    controller is alive. Without it the cleaner cannot tell, and every poll printed a
    "State API may be temporarily unavailable" warning (hundreds per training run).

    Args:
        num_cpus: CPUs of a local Ray; ignored when joining a cluster.
        log_to_driver: Forward worker logs to this process (benchmarks turn it off).
        env: Environment defaults for a *local* Ray (e.g. ``RAY_AUTH_MODE``); variables
            already set win. A joined cluster keeps its own settings.
        dashboard: Start the dashboard with a local Ray. Benchmarks turn it off so that
            its processes do not share the cores they measure.

    Returns:
        True if this call started or joined Ray, False if it was already initialised.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
    else:
        for key, value in (env or {}).items():
            os.environ.setdefault(key, value)
        context = ray.init(
            num_cpus=num_cpus or None,
            # None is Ray's "start it if it can": a dashboard that fails to start (a missing
            # dependency, no free port) is logged, not raised, so the job still runs.
            include_dashboard=None if dashboard else False,
            dashboard_host="127.0.0.1",
            log_to_driver=log_to_driver,
        )
        # Ray itself logs the dashboard's URL when it starts.
        if dashboard and not context.dashboard_url:
            logger.warning("the Ray dashboard did not start; Ray's state API (and Ray Train's cleanup check) is off")
    return True
