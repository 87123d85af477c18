"""Build the shared feature cache: frozen frame-encoder patch features for a manifest of videos.

Reads an evi.json annotation file or a list of video paths, skips videos already cached,
decodes on CPU tasks, encodes with an actor pool (GPUs when ``num_gpus > 0``) and writes
the cache; failures and partial decodes (features computed from a decode that lost
frames, with its warnings) go to ``<run_dir>/failures.{parquet,json}``, counts to
``<run_dir>/summary.json`` (also printed as the last stdout line).

Local (starts an in-process Ray when none is running)::

    python -m jobs.build_cache --config jobs/configs/build_cache_tiny.yaml
    python -m jobs.build_cache --config jobs/configs/build_cache_tiny.yaml --dry-run   # projected bytes only
    python -m jobs.build_cache --config jobs/configs/build_cache_tiny.yaml manifest=my/videos.txt features.fps=2.0

On a running cluster (``ray start --head``; the cache root must be shared by every node,
e.g. ``features.cache_root=s3://bucket/d2vlm-cache``)::

    ray job submit --working-dir . -- python -m jobs.build_cache \\
        --config jobs/configs/build_cache_tiny.yaml features.cache_root=s3://bucket/d2vlm-cache

Under ``ray job submit`` the entrypoint runs in an uploaded copy of the working dir, so
give ``manifest``, ``run_dir`` and ``features.cache_root`` as absolute paths or URLs that every node
can read; the encoder actors load the checkpoint from ``checkpoint`` (or
``<run_dir>/checkpoint``), which must be on storage every node mounts.

Exit codes: 0 when the run finished (failed videos are listed, not fatal), 2 on a bad
config, manifest, checkpoint or cache root.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from d2vlm_ray.cache import SharedRootError
from d2vlm_ray.config import ConfigError, load_config
from d2vlm_ray.pipelines.build_cache import BuildCacheConfig, build_cache, project_cache_bytes
from d2vlm_ray.pipelines.runtime import ensure_ray


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.build_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (BuildCacheConfig)")
    parser.add_argument("--dry-run", action="store_true", help="print the projected cache bytes and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the job; see the module docstring."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(BuildCacheConfig, args.config, args.overrides)
        if args.dry_run:
            projection = project_cache_bytes(cfg)
            mib = projection["projected_bytes"] / 2**20
            print(f"projected cache bytes: {projection['projected_bytes']} ({mib:.1f} MiB) for "
                  f"{projection['videos']} videos, {projection['frames']} frames")
            print(json.dumps(projection))
            return 0
        ensure_ray(cfg.num_cpus)
        summary = build_cache(cfg)
    except (ConfigError, SharedRootError, FileNotFoundError, ValueError) as exc:
        print(f"build_cache: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
