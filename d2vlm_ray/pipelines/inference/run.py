"""The Ray side of evaluation: the actor pool over the remaining samples, and :func:`evaluate`."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from d2vlm_ray.config import dump_config, to_dict
from d2vlm_ray.pipelines.inference.config import PREDICTIONS_FILE, EvaluateConfig, as_config, check_inputs
from d2vlm_ray.pipelines.inference.predict import PredictBatch
from d2vlm_ray.pipelines.inference.samples import Sample, load_samples, natural_key
from d2vlm_ray.pipelines.inference.shards import ShardStore, check_resume, merge_predictions, write_predictions

logger = logging.getLogger(__name__)


def _use_gpu(cfg: EvaluateConfig) -> bool:
    """Whether actors run on GPUs; refuses requests the current cluster can never schedule.

    An actor whose resources no node has would wait forever, so this raises instead. The
    check reads the resources of the nodes up now (start GPU nodes of an autoscaling
    cluster first, or use ``device: auto``).

    Raises:
        ValueError: If ``device`` is ``cuda`` without GPUs, or one actor's CPUs exceed the cluster's.
    """
    import ray

    resources = ray.cluster_resources()
    n_gpus = resources.get("GPU", 0)
    if cfg.compute.device == "cuda" and n_gpus < cfg.compute.gpus_per_actor:
        raise ValueError(f"compute.device=cuda but the Ray cluster has {n_gpus} GPUs")
    if resources.get("CPU", 0) < cfg.compute.cpus_per_actor:
        raise ValueError(
            f"compute.cpus_per_actor={cfg.compute.cpus_per_actor} exceeds the cluster's {resources.get('CPU', 0)} CPUs"
        )
    if cfg.compute.device == "cpu":
        return False
    return n_gpus >= cfg.compute.gpus_per_actor > 0


def run_inference(cfg: EvaluateConfig, samples: Sequence[Sample], store: ShardStore) -> int:
    """Predict ``samples`` on a Ray Data actor pool and write each output block as a shard.

    Ray must already be initialised.

    Returns:
        The number of predictions written.
    """
    import ray

    if not samples:
        return 0
    use_gpu = _use_gpu(cfg)
    # Samples of one video next to each other: they share a batch, a decode and a cache entry.
    ordered = sorted(samples, key=lambda s: (s.record["video"], natural_key(s.sample_id)))
    rows = [
        {"sample_id": s.sample_id, "record_json": json.dumps(s.record), "base_json": json.dumps(s.base)}
        for s in ordered
    ]
    n_blocks = max(1, min(len(rows), math.ceil(len(rows) / cfg.compute.batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    ds = ds.map_batches(
        PredictBatch,
        fn_constructor_kwargs={"config": to_dict(cfg), "device": "cuda" if use_gpu else "cpu"},
        batch_size=cfg.compute.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.compute.num_actors),
        num_cpus=cfg.compute.cpus_per_actor,
        num_gpus=cfg.compute.gpus_per_actor if use_gpu else 0,
    )
    written = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        preds = [json.loads(p) for p in batch["prediction_json"]]
        store.write(preds)
        written += len(preds)
        logger.info("predicted %d/%d samples", written, len(rows))
    return written


def evaluate(cfg: EvaluateConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Predict (resuming), merge, score and report; Ray must already be initialised.

    Args:
        cfg: An :class:`EvaluateConfig` or the same as a nested dict, e.g.
            ``{"checkpoint_dir": ..., "annotations": ..., "output_dir": ..., "limit": 20,
            "blank_frames": True, "decoding": {"inject_evidence": False}}``.

    Returns:
        ``metrics`` (as in ``metrics.json``), counts (``n_samples``, ``n_predicted`` now,
        ``n_resumed``, ``n_failed``, ``n_truncated``, ``n_with_decode_warnings``, ``n_with_output_warnings``), ``seed`` and the written paths
        (``output_dir``, ``predictions``, ``metrics_path``, ``summary``, ``plots``).

    Raises:
        ConfigError: On an invalid config.
        ValueError: On unreadable annotations or an output folder made with other settings.
    """
    from d2vlm_ray.eval.report import compute_metrics, write_report

    cfg = as_config(cfg)
    check_inputs(cfg)
    start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir)
    store = ShardStore(out_dir)
    if cfg.overwrite:
        store.clear()
    check_resume(cfg, out_dir, store)
    sample_set = load_samples(cfg)
    selected = sample_set.samples
    done = store.done_ids(include_failed=not cfg.retry_failed)
    todo = [s for s in selected if s.sample_id not in done]
    logger.info(
        "evaluate: %d samples, %d already predicted, %d to predict; decoding %s seed=%d",
        len(selected), len(selected) - len(todo), len(todo), cfg.decoding.preset, cfg.decoding.seed,
    )
    infer_start = time.perf_counter()
    n_predicted = run_inference(cfg, todo, store)
    infer_s = time.perf_counter() - infer_start
    predictions = merge_predictions(store, [s.sample_id for s in selected])
    predictions_path = write_predictions(predictions, out_dir / PREDICTIONS_FILE)
    benchmark = cfg.metrics
    if benchmark == "auto":
        benchmark = "etbench" if sample_set.format == "etbench" else "synthetic"
    metrics = compute_metrics(predictions, benchmark, variant=cfg.etbench_variant, with_coco=cfg.with_coco)
    run_info = {
        "checkpoint_dir": cfg.checkpoint_dir,
        "annotations": cfg.annotations,
        "format": sample_set.format,
        "decoding": to_dict(cfg.decoding) | {"max_new_tokens": cfg.decoding.resolved_max_new_tokens},
        "seed": cfg.decoding.seed,
        "blank_frames": cfg.blank_frames,
        "inject_evidence": cfg.decoding.inject_evidence,
        "n_samples": len(selected),
        "n_predicted": n_predicted,
        "n_resumed": len(selected) - len(todo),
        "n_with_decode_warnings": sum(bool(p.get("warnings")) for p in predictions),
        "n_with_output_warnings": sum(bool(p.get("output_warnings")) for p in predictions),
        "annotation_errors": sample_set.annotation_errors,
        "inference_s": round(infer_s, 3),
        "samples_per_s": round(n_predicted / infer_s, 3) if n_predicted and infer_s > 0 else None,
    }
    metrics["run"] = run_info
    paths = write_report(
        out_dir,
        predictions,
        metrics,
        plots=cfg.report.plots,
        timeline_samples=cfg.report.timeline_samples,
    )
    counts = metrics.get("counts", {})
    total_s = time.perf_counter() - start
    run_record = run_info | {"total_s": round(total_s, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out_dir / "run.json").write_text(json.dumps(run_record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    # run.json describes the latest run; the history keeps every resume's counts and timings.
    with (out_dir / "run_history.jsonl").open("a", encoding="utf-8") as history:
        history.write(json.dumps(run_record, sort_keys=True) + "\n")
    logger.info(
        "evaluate: %d predictions (%d new, %d failed, %d truncated) in %.1f s -> %s",
        len(predictions), n_predicted, counts.get("failed", 0), counts.get("truncated", 0), total_s, out_dir,
    )
    if run_info["n_with_decode_warnings"]:
        logger.warning(
            "evaluate: %d predictions were made on videos whose decode reported warnings (lost frames); "
            "see their 'warnings' in %s", run_info["n_with_decode_warnings"], predictions_path,
        )
    if run_info["n_with_output_warnings"]:
        logger.warning(
            "evaluate: %d predictions hold malformed output the metrics could not read as spans "
            "(e.g. a lone temporal token); see their 'output_warnings' in %s",
            run_info["n_with_output_warnings"], predictions_path,
        )
    return {
        "metrics": metrics,
        "n_samples": len(selected),
        "n_predicted": n_predicted,
        "n_resumed": len(selected) - len(todo),
        "n_failed": counts.get("failed", 0),
        "n_truncated": counts.get("truncated", 0),
        "n_with_decode_warnings": run_info["n_with_decode_warnings"],
        "n_with_output_warnings": run_info["n_with_output_warnings"],
        "seed": cfg.decoding.seed,
        "output_dir": str(out_dir),
        "predictions": str(predictions_path),
        "metrics_path": str(paths["metrics"]),
        "summary": str(paths["summary"]),
        "plots": [str(p) for p in paths.get("plots", [])],
    }
