"""Evaluate a checkpoint: batch inference on Ray Data, then metrics, a Markdown summary and plots.

Predicts every sample of an annotation file (synthetic/D2VLM ``evi.json`` or E.T. Bench
json) on an actor pool, resuming from earlier shards in ``output_dir``, merges the
predictions into ``<output_dir>/predictions.json`` (E.T. Bench json, sorted by sample
id) and writes ``metrics.json``, ``summary.md``, ``plots/*.png``, ``run.json`` and the
resolved ``config.yaml`` there. The last stdout line is a JSON summary.

Local (starts an in-process Ray with ``num_cpus`` when none is running)::

    python -m jobs.evaluate --config jobs/configs/evaluate_tiny.yaml
    python -m jobs.evaluate --config jobs/configs/evaluate_tiny.yaml limit=10 decoding.inject_evidence=false \\
        output_dir=runs/eval_tiny_no_inject
    python -m jobs.evaluate --config jobs/configs/evaluate_tiny.yaml blank_frames=true output_dir=runs/eval_tiny_blank
    python -m jobs.evaluate --config jobs/configs/evaluate_tiny.yaml decoding.preset=official \\
        output_dir=runs/eval_tiny_official

On a running cluster (``ray start --head``; paths must be visible to every node, e.g. a
shared mount, and ``features.cache_root`` may be ``s3://...``)::

    ray job submit --working-dir . -- python -m jobs.evaluate --config jobs/configs/evaluate_tiny.yaml

Rerunning the same command predicts only what is missing (resume); ``overwrite=true``
starts over, ``retry_failed=true`` retries failed samples. From Python (Ray already
initialised): ``from jobs.evaluate import evaluate; evaluate({...})``.

Exit codes: 0 when the run finished (failed samples are recorded, not fatal), 2 on a bad
config, annotation file or output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from d2vlm_ray.config import ConfigError, load_config
from d2vlm_ray.pipelines.inference import EvaluateConfig, check_inputs, evaluate
from d2vlm_ray.pipelines.runtime import ensure_ray

__all__ = ["EvaluateConfig", "evaluate", "main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (EvaluateConfig)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the job; see the module docstring."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(EvaluateConfig, args.config, args.overrides)
        check_inputs(cfg)
        ensure_ray(cfg.num_cpus)
        result = evaluate(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in result.items() if k != "metrics"}
    metrics = result["metrics"]
    summary["merged"] = metrics.get("merged") or (metrics.get("etbench") or {}).get("Merged")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
