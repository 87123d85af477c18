"""Synthesize FPO preference pairs (factorized temporal / textual perturbations) with Ray Data.

Local (starts an in-process Ray with ``num_cpus`` CPUs when ``RAY_ADDRESS`` is unset)::

    python -m d2vlm_ray.data.synthetic --out data/synth --n-videos 40 --seed 0 --no-render
    python -m jobs.synth_pairs --config jobs/configs/synth_pairs_tiny.yaml \\
        annotations='[data/synth/annotations/train.json]' out_dir=runs/synth_pairs

On a cluster (the driver connects to it)::

    ray job submit --working-dir . -- python -m jobs.synth_pairs \\
        --config jobs/configs/synth_pairs_tiny.yaml annotations='[s3://bucket/evi.json]' \\
        out_dir=s3://bucket/runs/synth_pairs num_workers=16

Writes ``out_dir/train/*.parquet``, ``out_dir/val/*.parquet`` (PreferencePair rows),
``out_dir/report.json`` (per-family applied / skipped counts) and ``out_dir/config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys

from d2vlm_ray.config import ConfigError, dump_config, load_config
from d2vlm_ray.pipelines.runtime import ensure_ray
from d2vlm_ray.pipelines.synth_pairs import SynthPairsConfig, synthesize_pairs


def main(argv: list[str] | None = None) -> int:
    """Parse ``--config`` and ``key=value`` overrides, run the synthesis, print the report."""
    parser = argparse.ArgumentParser(prog="python -m jobs.synth_pairs", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/synth_pairs_tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(SynthPairsConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    # Under `ray job submit` this joins the cluster as it is (passing num_cpus there fails).
    ensure_ray(cfg.num_cpus)
    if "://" not in cfg.out_dir:
        # Remote run folders carry the resolved config inside report.json instead.
        dump_config(cfg, cfg.out_dir)
    try:
        report = synthesize_pairs(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
