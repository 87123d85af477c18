"""The shared command line of ``jobs.sft`` and ``jobs.fpo``: parse, load the config, start Ray, train."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from d2vlm_ray.config import ConfigError, load_config
from d2vlm_ray.train.config import CONFIG_CLASSES


def _parse(argv: list[str] | None, prog: str, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="YAML job config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser.parse_args(argv)


def run_job(stage: str, argv: list[str] | None, *, prog: str, description: str) -> int:
    """Run the ``stage`` (``sft`` or ``fpo``) job; prints the JSON summary as the last stdout line.

    Returns:
        0 on success, 2 on a bad config or missing inputs, 1 when training failed.
    """
    args = _parse(argv, prog, description)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(CONFIG_CLASSES[stage], args.config, args.overrides)
    except ConfigError as exc:
        print(f"{stage}: {exc}", file=sys.stderr)
        return 2
    import ray
    import ray.train

    from d2vlm_ray.pipelines.runtime import ensure_ray
    from d2vlm_ray.train.trainer import train_fpo, train_sft

    ensure_ray(cfg.ray_num_cpus)
    try:
        summary = (train_sft if stage == "sft" else train_fpo)(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"{stage}: {exc}", file=sys.stderr)
        return 2
    except (ray.train.TrainingFailedError, RuntimeError) as exc:  # Ray already logged the workers' tracebacks
        print(f"{stage}: training failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, default=str))
    return 0
