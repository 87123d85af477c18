"""Batch inference on Ray Data: annotations in, E.T. Bench-style predictions, metrics and plots out.

The flow of :func:`evaluate` (the job ``jobs.evaluate`` and the quickstart both call it):

1. **Samples.** The annotation file is read on the driver: a D2VLM / E.T.-Instruct
   ``evi.json`` (the synthetic generator writes these) or an E.T. Bench json
   (``format: auto`` tells them apart by their fields). ``limit`` keeps the first N
   records in file order. Sample ids must be unique: they key resume and merge.
2. **Resume.** Predictions live in ``<output_dir>/shards/part-NNNNNN.jsonl``, one JSON
   prediction per line, each carrying its ``sample_id``. Samples whose id is already in a
   shard are not predicted again (failed ones included, unless ``retry_failed``). The
   settings that change predictions are stored in ``inference_settings.json``; a rerun
   with different ones stops with a ``ValueError`` instead of mixing two models'
   outputs (``overwrite: true`` clears the shards).
3. **Inference.** The remaining samples (sorted by video, so samples of one video share a
   batch and a cache entry) become a Ray Dataset; ``map_batches`` runs
   :class:`PredictBatch` on a ``ray.data.ActorPoolStrategy`` pool. Each actor loads the
   checkpoint once (``from_pretrained``), takes frame features from the shared
   :class:`~d2vlm_ray.cache.FeatureCache` (decoded and encoded on a miss) and generates
   in batches, on the GPU when the cluster has one. The driver streams the output blocks
   and writes each one as a shard (written to a temporary name, then renamed, so a killed
   run leaves only whole shards).
4. **Merge.** All shards are read in order (a later shard wins for a repeated id, which
   only happens with ``retry_failed``), restricted to the selected samples and sorted by
   sample id (numeric ids numerically, then the rest as strings): ``predictions.json``.
5. **Metrics and report** (:mod:`d2vlm_ray.eval.report`): ``metrics.json``,
   ``summary.md`` and PNG plots.

Prediction records are E.T. Bench records (``idx, task, source, video, duration, tgt,
q`` and ``o, p, g, src`` where the task has them) plus:

* ``a``: the detokenized response, each ``<evi>`` written as ``"s - e"`` seconds and
  ``</evi>`` kept between the grounding part and the answer (what every E.T. Bench
  scorer reads);
* ``pred_spans_s``: the spans of the ``<evi>`` tokens after ``</evi>`` (the answer's
  events); ``grounding_spans_s``: those before it (the evidence);
* ``n_input_tokens``, ``n_output_tokens``, ``n_frames``, ``truncated``, ``cache_hit``;
* ``warnings`` (the video decode's warnings: frames it could not decode, suspect
  metadata; empty for a clean decode, also on a cache hit) and ``missing_timestamps_s``
  (the sampled frames the model did not see). A decode that lost more than
  ``max_missing_frames_fraction`` of its sampled frames fails the sample with
  ``video:partial_decode``. The metric readers ignore both keys;
* ``status`` (``ok`` or ``failed``) and ``error`` (``{"reason", "message"}``). Reasons:
  ``video:<reason>`` for :class:`~d2vlm_ray.data.video.VideoDecodeError` reasons
  (``video:corrupt``, ``video:not_found`` ...), ``video:io_error`` for other read
  errors and ``video:too_long`` for ``max_duration_s``; ``too_long`` when the prompt plus frames exceed
  ``max_input_tokens``, ``bad_input`` for other invalid inputs and ``generation_error``.
  A failed sample keeps ``a = ""`` and counts as a failure in every metric.
* ``sample_id`` and, for sampled decoding, the per-sample ``seed``.

Decoding presets (:class:`DecodingConfig`): ``greedy`` (default; ``max_new_tokens``
defaults to 64) and ``official``, the paper's settings: sampling at temperature 0.2,
repetition penalty 1.2 on ``rar``/``eca``/``rvq`` (never on ``<evi>``), up to 2048 new
tokens. Sampled decoding runs each sample on its own with seed
``(seed + crc32(sample_id)) mod 2**31``, so a prediction does not depend on which
samples shared its batch (nor on resume). The seed is logged and written to
``run.json``; truncated generations (no stop token within ``max_new_tokens``) are counted.

Blank-frames baseline (``blank_frames: true``): the video is never opened. The model
sees an all-black clip of the same length: ``ceil(duration_s * fps)`` black frames at
the annotation's ``duration`` (thinned to ``max_frames``), with timestamps ``k / fps``,
each encoded by the checkpoint's own frame encoder. It measures what the model gets
from the question alone.

``video_root: ""`` resolves relative video paths against the annotation file's folder,
or its parent folder when that is where the first video exists (the synthetic layout
``<root>/annotations/test.json`` + ``<root>/videos/*.mp4``).

Everything except :func:`run_inference` (and :func:`evaluate`, which calls it) works
without Ray; :class:`PredictBatch` can be called directly on a hand-made batch.

Modules, one job each: :mod:`.config` (the job's config and its checks), :mod:`.samples`
(annotations to samples), :mod:`.shards` (resume, the settings fingerprint, merge),
:mod:`.predict` (the Ray-free prediction UDF), :mod:`.run` (the actor pool and
:func:`evaluate`). Metrics and the report are :mod:`d2vlm_ray.eval.report`.
"""

from __future__ import annotations

from d2vlm_ray.pipelines.inference.config import (
    ComputeConfig,
    DecodingConfig,
    EvaluateConfig,
    ReportConfig,
    as_config,
    check_inputs,
    sample_seed,
)
from d2vlm_ray.pipelines.inference.predict import PredictBatch, SampleFailure, blank_timestamps_s, failed_prediction
from d2vlm_ray.pipelines.inference.run import evaluate, run_inference
from d2vlm_ray.pipelines.inference.samples import Sample, SampleSet, detect_format, load_samples, sort_by_sample_id
from d2vlm_ray.pipelines.inference.shards import (
    ShardStore,
    check_resume,
    inference_fingerprint,
    merge_predictions,
    write_predictions,
)

__all__ = [
    "ComputeConfig",
    "DecodingConfig",
    "EvaluateConfig",
    "PredictBatch",
    "ReportConfig",
    "Sample",
    "SampleFailure",
    "SampleSet",
    "ShardStore",
    "as_config",
    "blank_timestamps_s",
    "check_resume",
    "check_inputs",
    "detect_format",
    "evaluate",
    "failed_prediction",
    "inference_fingerprint",
    "load_samples",
    "merge_predictions",
    "run_inference",
    "sample_seed",
    "sort_by_sample_id",
    "write_predictions",
]
