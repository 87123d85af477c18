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
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from d2vlm_ray import telemetry
from d2vlm_ray.cache.spec import FeatureSpec
from d2vlm_ray.config import ConfigError, DecodeSettings, dump_config, from_dict, to_dict

logger = logging.getLogger(__name__)

REFERRING_TASKS = ("rar", "eca", "rvq")
PRESET_MAX_NEW_TOKENS = {"greedy": 64, "official": 2048}
SHARD_DIR = "shards"
SETTINGS_FILE = "inference_settings.json"
PREDICTIONS_FILE = "predictions.json"


# --- configs ---------------------------------------------------------------------------


@dataclass
class DecodingConfig:
    """How to generate.

    Attributes:
        preset: ``greedy`` (argmax) or ``official`` (the paper: sampling at temperature
            0.2, repetition penalty 1.2 on rar/eca/rvq except ``<evi>``, 2048 tokens).
        max_new_tokens: Bound on generated tokens; 0 = the preset's (64 greedy, 2048 official).
        seed: Base seed of sampled decoding (logged; unused by greedy decoding).
        inject_evidence: Add event features to generated ``<evi>`` embeddings; ``false`` is
            the ablation.
    """

    preset: Literal["greedy", "official"] = "greedy"
    max_new_tokens: int = 0
    seed: int = 0
    inject_evidence: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field."""
        if self.max_new_tokens < 0:
            raise ValueError("decoding.max_new_tokens must be >= 0 (0 = the preset's value)")

    @property
    def resolved_max_new_tokens(self) -> int:
        """``max_new_tokens``, or the preset's default when it is 0."""
        return self.max_new_tokens or PRESET_MAX_NEW_TOKENS[self.preset]

    def settings_for(self, task: str, sample_id: str) -> DecodeSettings:
        """The :class:`DecodeSettings` of one sample (task-dependent for ``official``)."""
        if self.preset == "greedy":
            return DecodeSettings(
                max_new_tokens=self.resolved_max_new_tokens,
                do_sample=False,
                seed=self.seed,
                inject_evidence=self.inject_evidence,
            )
        return DecodeSettings(
            max_new_tokens=self.resolved_max_new_tokens,
            do_sample=True,
            temperature=0.2,
            top_p=1.0,
            repetition_penalty=1.2 if task in REFERRING_TASKS else 1.0,
            seed=sample_seed(self.seed, sample_id),
            inject_evidence=self.inject_evidence,
        )


@dataclass
class ComputeConfig:
    """The actor pool.

    Attributes:
        num_actors: Actors, each holding one model copy.
        batch_size: Samples per ``map_batches`` call (and per generation batch).
        cpus_per_actor: CPUs reserved per actor.
        gpus_per_actor: GPUs reserved per actor when running on GPU (> 0; fractions share a GPU).
        device: ``auto`` = GPU when the cluster has one, else CPU; ``cuda`` on a cluster
            without GPUs is refused (an actor nothing can host would wait forever).
        dtype: Model weights' dtype on the actor.
    """

    num_actors: int = 1
    batch_size: int = 4
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 1.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field."""
        if self.num_actors < 1:
            raise ValueError("compute.num_actors must be >= 1")
        if self.batch_size < 1:
            raise ValueError("compute.batch_size must be >= 1")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ValueError("compute.cpus_per_actor and compute.gpus_per_actor must be >= 0")


@dataclass
class ReportConfig:
    """What the report draws.

    Attributes:
        plots: Write PNG plots (needs matplotlib).
        timeline_samples: Samples shown in the ground-truth vs prediction timeline.
    """

    plots: bool = True
    timeline_samples: int = 8

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field."""
        if self.timeline_samples < 0:
            raise ValueError("report.timeline_samples must be >= 0")


@dataclass
class EvaluateConfig:
    """Config of the evaluate job (``jobs/configs/evaluate_*.yaml``).

    Attributes:
        checkpoint_dir: A d2vlm_ray checkpoint directory (``save_pretrained``/``init_checkpoint``).
        annotations: The annotation file to predict.
        format: ``evi`` (D2VLM / synthetic), ``etbench``, or ``auto`` (by the record fields).
        video_root: Folder relative video paths are joined to (see the module docstring for "").
        output_dir: Run folder: shards, predictions, metrics, summary, plots, resolved config.
        limit: Predict only the first N records in file order (0 = all).
        max_duration_s: Fail videos whose annotated duration exceeds this (0 = no limit).
        max_input_tokens: Prompt + frame tokens allowed (0 = the model's positions minus
            ``max_new_tokens``, at least half the positions).
        blank_frames: Feed an all-black clip of the video's length instead of the video.
        retry_failed: On resume, predict failed samples again.
        overwrite: Delete earlier shards and predict everything again.
        metrics: ``synthetic`` (tvg/dvc/tal/gqa of the synthetic benchmark), ``etbench``
            (``evaluate_etbench``), ``auto`` (etbench for E.T. Bench files, else synthetic)
            or ``none``.
        etbench_variant: Scorer variant for ``etbench`` (official, d2vlm, d2vlm-strict, fixed).
        with_coco: Also compute the optional captioning metrics (needs pycocoevalcap and java).
        num_cpus: CPUs of the local Ray instance the job starts when none is running (0 = all).
        decoding: Decoding settings.
        features: Sampling, partial-decode policy and feature cache (the spec every job and
            Serve share; ``cache_root`` "" = decode every time). A sample whose video lost
            more than ``max_missing_frames_fraction`` of its sampled frames fails with
            ``video:partial_decode``; smaller losses are predicted and the record carries
            the decode's ``warnings``.
        compute: Actor pool.
        report: Report settings.
    """

    checkpoint_dir: str = ""
    annotations: str = ""
    format: Literal["auto", "evi", "etbench"] = "auto"
    video_root: str = ""
    output_dir: str = ""
    limit: int = 0
    max_duration_s: float = 0.0
    max_input_tokens: int = 0
    blank_frames: bool = False
    retry_failed: bool = False
    overwrite: bool = False
    metrics: Literal["auto", "synthetic", "etbench", "none"] = "auto"
    etbench_variant: str = "official"
    with_coco: bool = False
    num_cpus: int = 0
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    features: FeatureSpec = field(default_factory=FeatureSpec)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self) -> None:
        """Cross-field checks; raises ``ValueError`` naming the field."""
        for name in ("checkpoint_dir", "annotations", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be set")
        if not math.isfinite(self.features.fps):
            raise ValueError("features.fps must be a finite number")
        self.features.validate()
        for name in ("limit", "max_input_tokens", "num_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_duration_s < 0:
            raise ValueError("max_duration_s must be >= 0")
        from d2vlm_ray.eval.etbench import VARIANTS

        if self.etbench_variant not in VARIANTS:
            raise ValueError(f"etbench_variant must be one of {sorted(VARIANTS)}, got {self.etbench_variant!r}")
        for section in (self.decoding, self.compute, self.report):
            section.validate()


def as_config(cfg: EvaluateConfig | Mapping[str, Any]) -> EvaluateConfig:
    """Accept a config object or a plain (nested) dict; validate either.

    Raises:
        ConfigError: On unknown keys, wrong types or invalid values.
    """
    if isinstance(cfg, EvaluateConfig):
        try:
            cfg.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cfg
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"evaluate: expected an EvaluateConfig or a mapping, got {type(cfg).__name__}")
    return from_dict(EvaluateConfig, cfg)


def check_inputs(cfg: EvaluateConfig) -> None:
    """Fail fast, before Ray starts, on a missing annotation file or checkpoint.

    Raises:
        ValueError: Naming the field whose path does not exist.
    """
    if not Path(cfg.annotations).is_file():
        raise ValueError(f"annotations: file {cfg.annotations!r} does not exist")
    if not (Path(cfg.checkpoint_dir) / "config.json").is_file():
        raise ValueError(f"checkpoint_dir: {cfg.checkpoint_dir!r} is not a checkpoint directory (no config.json)")


def sample_seed(base_seed: int, sample_id: str) -> int:
    """Per-sample sampling seed: ``(base_seed + crc32(sample_id)) mod 2**31``."""
    return (int(base_seed) + zlib.crc32(sample_id.encode("utf-8"))) % (2**31)


# --- samples ---------------------------------------------------------------------------


@dataclass
class Sample:
    """One sample to predict.

    Attributes:
        sample_id: Unique id (``id`` of evi.json, ``idx`` of E.T. Bench).
        record: The parsed record (video path resolved).
        base: The E.T. Bench record the prediction extends (original fields for E.T. Bench).
    """

    sample_id: str
    record: dict[str, Any]
    base: dict[str, Any]


@dataclass
class SampleSet:
    """What the annotation file yielded.

    Attributes:
        samples: Well-formed samples in file order (after ``limit``).
        format: ``evi`` or ``etbench``.
        video_root: The folder relative video paths were joined to.
        annotation_errors: Malformed annotation records, as strings (not predicted).
    """

    samples: list[Sample]
    format: str
    video_root: str
    annotation_errors: list[str] = field(default_factory=list)


def detect_format(items: Any, path: str) -> str:
    """``evi`` or ``etbench`` from the first record's fields.

    Raises:
        ValueError: If the file is not a non-empty list of records of either kind.
    """
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        raise ValueError(f"annotations {path!r}: expected a non-empty JSON list of records")
    first = items[0]
    if "conversations" in first:
        return "evi"
    if "q" in first and "idx" in first:
        return "etbench"
    raise ValueError(
        f"annotations {path!r}: cannot tell the format (no 'conversations' for evi, no 'q'/'idx' for "
        "etbench); set format"
    )


def _default_video_root(annotation_path: Path, first_video: str) -> str:
    here = annotation_path.parent
    if "://" in first_video or os.path.isabs(first_video) or (here / first_video).exists():
        return str(here)
    if (here.parent / first_video).exists():
        return str(here.parent)
    return str(here)


def _natural_key(sample_id: str) -> tuple[int, int, str]:
    return (0, int(sample_id), "") if sample_id.isdigit() else (1, 0, sample_id)


def sort_by_sample_id(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records sorted by ``sample_id``: numeric ids numerically first, then the rest as strings."""
    return sorted(items, key=lambda r: _natural_key(str(r["sample_id"])))


def load_samples(cfg: EvaluateConfig) -> SampleSet:
    """Read and select the samples of ``cfg.annotations``.

    Raises:
        ValueError: For an unreadable file, an unknown format or duplicate sample ids.
    """
    from d2vlm_ray.data.annotations import read_etbench_json, read_evi_json, record_to_etbench

    path = Path(cfg.annotations)
    if not path.is_file():
        raise ValueError(f"annotations: file {str(path)!r} does not exist")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"annotations {str(path)!r}: not valid JSON ({exc})") from None
    fmt = detect_format(items, str(path)) if cfg.format == "auto" else cfg.format
    video_root = cfg.video_root or _default_video_root(path, str(items[0].get("video", "")) if items else "")
    reader = read_evi_json if fmt == "evi" else read_etbench_json
    result = reader(path, video_root=video_root, on_error="collect")
    errors = [str(issue) for issue in result.errors]
    raw_by_id: dict[str, dict[str, Any]] = {}
    if fmt == "etbench":
        for item in items:
            if isinstance(item, dict) and "idx" in item:
                raw_by_id.setdefault(str(item["idx"]), item)
    samples: list[Sample] = []
    seen: set[str] = set()
    for position, record in enumerate(result.records):
        sid = record.sample_id
        if sid in seen:
            raise ValueError(f"annotations {str(path)!r}: duplicate sample id {sid!r}; ids key resume and merge")
        seen.add(sid)
        if fmt == "etbench":
            base = {k: v for k, v in raw_by_id[sid].items() if k != "a"}
        else:
            base = record_to_etbench(record, position, video_root=video_root)
        base["sample_id"] = sid
        samples.append(Sample(sample_id=sid, record=record.to_dict(), base=base))
    if cfg.limit:
        samples = samples[: cfg.limit]
    return SampleSet(samples=samples, format=fmt, video_root=video_root, annotation_errors=errors)


# --- shards: resume and merge ----------------------------------------------------------


class ShardStore:
    """Prediction shards under ``<output_dir>/shards``: whole files only, read in order.

    Args:
        output_dir: The run folder.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.dir = Path(output_dir) / SHARD_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    def shard_paths(self) -> list[Path]:
        """Finished shards in write order."""
        return sorted(self.dir.glob("part-*.jsonl"))

    def clear(self) -> None:
        """Delete every shard."""
        shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)

    def read_all(self) -> dict[str, dict[str, Any]]:
        """``{sample_id: prediction}`` over all shards; a later shard wins for a repeated id.

        Raises:
            ValueError: If a shard holds a line that is not a prediction record.
        """
        out: dict[str, dict[str, Any]] = {}
        for path in self.shard_paths():
            for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"shard {path}:{line_no}: not JSON ({exc})") from None
                if not isinstance(record, dict) or "sample_id" not in record:
                    raise ValueError(f"shard {path}:{line_no}: a prediction needs 'sample_id'")
                out[str(record["sample_id"])] = record
        return out

    def done_ids(self, include_failed: bool = True) -> set[str]:
        """Ids already predicted (failed ones too unless ``include_failed`` is False)."""
        return {sid for sid, r in self.read_all().items() if include_failed or r.get("status") == "ok"}

    def write(self, predictions: Sequence[dict[str, Any]]) -> Path | None:
        """Write one shard atomically (temporary name, then rename); ``None`` if empty."""
        if not predictions:
            return None
        existing = self.shard_paths()
        seq = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        path = self.dir / f"part-{seq:06d}.jsonl"
        tmp = self.dir / f".tmp-{path.name}"
        body = "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in predictions)
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, path)
        return path


def inference_fingerprint(cfg: EvaluateConfig) -> dict[str, Any]:
    """The settings that change predictions; resuming under different ones is refused."""
    return {
        "checkpoint_dir": str(Path(cfg.checkpoint_dir).resolve()),
        "annotations": str(Path(cfg.annotations).resolve()),
        "format": cfg.format,
        "video_root": cfg.video_root,
        "fps": cfg.features.fps,
        "max_frames": cfg.features.max_frames,
        "max_duration_s": cfg.max_duration_s,
        "max_missing_frames_fraction": cfg.features.max_missing_frames_fraction,
        "max_input_tokens": cfg.max_input_tokens,
        "blank_frames": cfg.blank_frames,
        "dtype": cfg.compute.dtype,
        "decoding": to_dict(cfg.decoding),
    }


FINGERPRINT_DEFAULTS: dict[str, Any] = {"max_missing_frames_fraction": 1.0}
"""Fingerprint entries added later, with the value that older runs effectively used.

Before the partial-decode policy existed every partial decode was predicted, silently
(a limit of 1): resuming such a run under another limit is refused like any other
changed setting, rather than mixing predictions made under two policies.
"""


def _check_resume(cfg: EvaluateConfig, out_dir: Path, store: ShardStore) -> None:
    path = out_dir / SETTINGS_FILE
    current = inference_fingerprint(cfg)
    if path.is_file() and store.shard_paths():
        previous = json.loads(path.read_text(encoding="utf-8"))
        # Runs from before a setting existed ran under its default: compare with that.
        previous = {k: FINGERPRINT_DEFAULTS[k] for k in FINGERPRINT_DEFAULTS if k not in previous} | previous
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            raise ValueError(
                f"output_dir {str(out_dir)!r} holds predictions made with other settings ({', '.join(changed)}); "
                "use a new output_dir or set overwrite=true"
            )
    path.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n", encoding="utf-8")


# --- the UDF ---------------------------------------------------------------------------


class SampleFailure(Exception):
    """A sample that cannot be predicted; ``reason`` is a short code (see the module docstring)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def failed_prediction(
    base: Mapping[str, Any],
    reason: str,
    message: str,
    *,
    warnings: Sequence[str] = (),
    missing_timestamps_s: Sequence[float] = (),
) -> dict[str, Any]:
    """The prediction record of a sample that failed (empty answer, counts as a failure).

    ``warnings`` / ``missing_timestamps_s`` are the video decode's, where it got that far.
    """
    return dict(base) | {
        "a": "",
        "pred_spans_s": [],
        "grounding_spans_s": [],
        "n_input_tokens": 0,
        "n_output_tokens": 0,
        "n_frames": 0,
        "truncated": False,
        "cache_hit": False,
        "status": "failed",
        "error": {"reason": reason, "message": message},
        "warnings": [str(w) for w in warnings],
        "missing_timestamps_s": [float(t) for t in missing_timestamps_s],
    }


def blank_timestamps_s(duration_s: float, fps: float, max_frames: int = 0) -> np.ndarray:
    """Frame times ``k / fps`` of an all-black clip of ``duration_s`` (thinned to ``max_frames``).

    Raises:
        ValueError: If the duration is not positive.
    """
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration {duration_s!r} s: a blank clip needs a positive duration")
    n_frames = max(1, math.ceil(duration_s * fps - 1e-6))
    times_s = np.arange(n_frames, dtype=np.float64) / fps
    if max_frames and n_frames > max_frames:
        keep = np.round(np.linspace(0, n_frames - 1, max_frames)).astype(np.int64)
        times_s = times_s[keep]
    return times_s


def _split_spans(token_ids: Sequence[int], spans_s: Sequence[Sequence[float]], evi_id: int, evi_end_id: int):
    """(grounding spans, answer spans): the ``<evi>`` spans before and after the first ``</evi>``."""
    n_before = 0
    for tid in token_ids:
        if tid == evi_end_id:
            break
        if tid == evi_id:
            n_before += 1
    else:
        # No </evi>: every span belongs to the (unfinished) grounding part.
        n_before = len(spans_s)
    as_lists = [[round(float(s), 3), round(float(e), 3)] for s, e in spans_s]
    return as_lists[:n_before], as_lists[n_before:]


class VideoFeatures(NamedTuple):
    """Frame features of one sample as the UDF uses them.

    Attributes:
        patches: Frame-encoder patch features ``[F, P, C]`` float32.
        timestamps_s: Frame times ``[F]``.
        duration_s: Video duration.
        cache_hit: Whether the feature cache served them.
        warnings: The video decode's warnings (empty for a clean decode or blank frames).
        missing_timestamps_s: Sampled frames the decode lost.
    """

    patches: Any
    timestamps_s: np.ndarray
    duration_s: float
    cache_hit: bool
    warnings: tuple[str, ...] = ()
    missing_timestamps_s: tuple[float, ...] = ()


# (position in the batch, record, features, input token count) of a sample ready to generate.
_Ready = tuple[int, dict[str, Any], VideoFeatures, int]


class PredictBatch:
    """Ray Data UDF: a batch of samples in, one prediction JSON per sample out.

    Built once per actor: loads the checkpoint and opens the feature cache. Callable
    without Ray on a dict batch with columns ``sample_id``, ``record_json``, ``base_json``.

    Args:
        config: ``to_dict(EvaluateConfig)`` (configs cross into Ray as plain dicts).
        device: ``cpu`` or ``cuda``, resolved by the driver.
    """

    def __init__(self, config: Mapping[str, Any], device: str = "cpu") -> None:
        import torch

        from d2vlm_ray.model.checkpoint import from_pretrained
        from d2vlm_ray.model.tokenizer import TokenIds
        from d2vlm_ray.model.vision import VisionFrameEncoder

        self.cfg = as_config(config)
        if device == "cuda" and not torch.cuda.is_available():
            device = "cpu"
        dtype = getattr(torch, self.cfg.compute.dtype)
        self.model, self.tokenizers, self.model_cfg = from_pretrained(
            self.cfg.checkpoint_dir, dtype=dtype, device=device
        )
        self.encoder = VisionFrameEncoder(self.model.vision, self.model_cfg.vision.image_size)
        self.ids = TokenIds.from_tokenizer(self.tokenizers.llm)
        from d2vlm_ray.cache import FeatureSource

        # The blank-frame baseline encodes no video, so it neither reads nor fills the cache.
        spec = replace(self.cfg.features, cache_root="") if self.cfg.blank_frames else self.cfg.features
        self.source = FeatureSource(self.encoder, spec)
        positions = self.model_cfg.llm.max_position_embeddings
        max_new = self.cfg.decoding.resolved_max_new_tokens
        self.max_input_tokens = self.cfg.max_input_tokens or max(positions - max_new, positions // 2)
        self._blank_frame: Any = None

    # features ---------------------------------------------------------------------------

    def _blank_features(self, record: Mapping[str, Any]) -> VideoFeatures:
        import torch

        times_s = blank_timestamps_s(float(record["duration_s"]), self.cfg.features.fps, self.cfg.features.max_frames)
        if self._blank_frame is None:
            side = self.encoder.image_size
            self._blank_frame = self.encoder.encode(np.zeros((1, side, side, 3), dtype=np.uint8))  # [1, P, C]
        patches = self._blank_frame.expand(len(times_s), -1, -1).contiguous()  # [F, P, C]
        return VideoFeatures(patches.to(torch.float32), times_s, float(record["duration_s"]), False)

    def _video_features(self, record: Mapping[str, Any]) -> VideoFeatures:
        from d2vlm_ray.data.video import VideoDecodeError

        if self.cfg.max_duration_s and float(record["duration_s"]) > self.cfg.max_duration_s:
            raise SampleFailure(
                "video:too_long", f"duration {record['duration_s']} s exceeds max_duration_s={self.cfg.max_duration_s}"
            )
        try:
            result = self.source.features(record["video"])
            feats, hit = result.features, result.cache_hit
        except VideoDecodeError as exc:
            raise SampleFailure(f"video:{exc.reason}", str(exc)) from None
        except FileNotFoundError as exc:
            raise SampleFailure("video:not_found", str(exc)) from None
        except OSError as exc:
            raise SampleFailure("video:io_error", f"{type(exc).__name__}: {exc}") from None
        if feats.warnings:
            logger.warning("video %s: %s", record["video"], "; ".join(feats.warnings))
        return VideoFeatures(
            feats.patches,
            np.asarray(feats.timestamps_s, dtype=np.float64),
            float(feats.duration_s),
            bool(hit),
            tuple(feats.warnings),
            tuple(feats.missing_timestamps_s),
        )

    def features(self, record: Mapping[str, Any]) -> VideoFeatures:
        """Patch features ``[F, P, C]``, frame times, duration and cache hit of one record.

        Raises:
            SampleFailure: If the video cannot be decoded or is too long.
        """
        if self.cfg.blank_frames:
            try:
                return self._blank_features(record)
            except ValueError as exc:
                raise SampleFailure("bad_input", str(exc)) from None
        return self._video_features(record)

    # generation -------------------------------------------------------------------------

    def _prepare(self, record: Mapping[str, Any], feats: VideoFeatures) -> int:
        """Check one sample's input length; return its input token count."""
        from d2vlm_ray.model.tokenizer import tokenize_prompt

        try:
            prompt = tokenize_prompt(self.tokenizers.llm, record["query"])
        except ValueError as exc:
            raise SampleFailure("bad_input", str(exc)) from None
        n_frames = int(feats.patches.shape[0])
        n_input = len(prompt.prefix_ids) + n_frames + len(prompt.suffix_ids)
        if n_input > self.max_input_tokens:
            raise SampleFailure(
                "too_long",
                f"{n_input} input tokens ({n_frames} frames + text) exceed "
                f"max_input_tokens={self.max_input_tokens}",
            )
        return n_input

    def _generate(self, group: list[_Ready], settings: DecodeSettings) -> list[Any]:
        from d2vlm_ray.model.generation import generate
        from d2vlm_ray.model.inputs import build_batch

        batch = build_batch(
            self.tokenizers.llm,
            self.tokenizers.qformer,
            [rec["query"] for _, rec, _, _ in group],
            [f.patches for _, _, f, _ in group],
            [f.timestamps_s for _, _, f, _ in group],
            [f.duration_s for _, _, f, _ in group],
            src_spans_s=[[tuple(s) for s in rec["src_spans_s"]] for _, rec, _, _ in group],
            max_text_tokens=self.model_cfg.qformer.max_text_tokens,
        )
        return generate(self.model, self.tokenizers.llm, batch, settings)

    def _prediction(
        self, base: Mapping[str, Any], result: Any, feats: VideoFeatures, n_input: int, settings: DecodeSettings
    ) -> dict[str, Any]:
        grounding, answer = _split_spans(result.token_ids, result.spans_s, self.ids.evi, self.ids.evi_end)
        out = dict(base) | {
            "a": result.text,
            "pred_spans_s": answer,
            "grounding_spans_s": grounding,
            "n_input_tokens": n_input,
            "n_output_tokens": len(result.token_ids),
            "n_frames": int(feats.patches.shape[0]),
            "truncated": bool(result.truncated),
            "cache_hit": feats.cache_hit,
            "status": "ok",
            "error": None,
            "warnings": list(feats.warnings),
            "missing_timestamps_s": list(feats.missing_timestamps_s),
        }
        if settings.do_sample:
            out["seed"] = settings.seed
        return out

    def predict(self, samples: Sequence[tuple[str, dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
        """Predict ``(sample_id, record, base)`` triples; one prediction record each, in order."""
        outputs: list[dict[str, Any] | None] = [None] * len(samples)
        video_memo: dict[str, VideoFeatures | SampleFailure] = {}
        ready: list[_Ready] = []
        for i, (_, record, base) in enumerate(samples):
            try:
                key = record["video"]
                if self.cfg.blank_frames or key not in video_memo:
                    try:
                        video_memo[key] = self.features(record)
                    except SampleFailure as exc:
                        video_memo[key] = exc
                feats = video_memo[key]
                if isinstance(feats, SampleFailure):
                    raise feats
                try:
                    ready.append((i, record, feats, self._prepare(record, feats)))
                except SampleFailure as exc:
                    outputs[i] = failed_prediction(
                        base, exc.reason, exc.message,
                        warnings=feats.warnings, missing_timestamps_s=feats.missing_timestamps_s,
                    )
            except SampleFailure as exc:
                outputs[i] = failed_prediction(base, exc.reason, exc.message)
        # Group by decode settings: sampled decoding runs one sample at a time (its own seed).
        groups: dict[tuple[Any, ...], tuple[DecodeSettings, list[_Ready]]] = {}
        for item in ready:
            settings = self.cfg.decoding.settings_for(item[1].get("task", ""), samples[item[0]][0])
            key = (*astuple(settings), item[0] if settings.do_sample else -1)
            groups.setdefault(key, (settings, []))[1].append(item)
        for settings, group in groups.values():
            try:
                results = self._generate(group, settings)
            except (ValueError, RuntimeError) as exc:
                if len(group) > 1:
                    # One bad sample must not fail its batch-mates: retry each on its own.
                    results = []
                    for item in group:
                        try:
                            results.append(self._generate([item], settings)[0])
                        except (ValueError, RuntimeError) as inner:
                            results.append(inner)
                else:
                    results = [exc]
            for (i, _, feats, n_input), result in zip(group, results):
                base = samples[i][2]
                if isinstance(result, Exception):
                    reason = "bad_input" if isinstance(result, ValueError) else "generation_error"
                    outputs[i] = failed_prediction(
                        base, reason, f"{type(result).__name__}: {result}",
                        warnings=feats.warnings, missing_timestamps_s=feats.missing_timestamps_s,
                    )
                else:
                    outputs[i] = self._prediction(base, result, feats, n_input, settings)
        return [o for o in outputs if o is not None]

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[str]]:
        """Ray Data entry: ``sample_id, record_json, base_json`` in, ``sample_id, prediction_json`` out."""
        samples = [
            (str(sid), json.loads(rec), json.loads(base))
            for sid, rec, base in zip(batch["sample_id"], batch["record_json"], batch["base_json"])
        ]
        start = time.perf_counter()
        preds = self.predict(samples)
        per_sample_ms = 1000.0 * (time.perf_counter() - start) / max(len(preds), 1)
        for pred in preds:
            telemetry.latency_ms("batch_inference", per_sample_ms)
            if pred.get("status") == "ok":
                telemetry.cache_lookup(bool(pred.get("cache_hit")), 0, "evaluate")
                telemetry.evidence_spans(len(pred.get("pred_spans_s") or []), "evaluate")
            elif pred.get("error"):
                reason = str(pred["error"].get("reason", ""))
                if reason.startswith("video:"):
                    telemetry.decode_failure(reason.split(":", 1)[1], "evaluate")
        return {
            "sample_id": [p["sample_id"] for p in preds],
            "prediction_json": [json.dumps(p, ensure_ascii=False, sort_keys=True) for p in preds],
        }


# --- Ray -------------------------------------------------------------------------------


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
    ordered = sorted(samples, key=lambda s: (s.record["video"], _natural_key(s.sample_id)))
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


def merge_predictions(store: ShardStore, sample_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The selected samples' predictions, sorted by sample id (deterministic)."""
    wanted = set(sample_ids)
    return sort_by_sample_id(p for sid, p in store.read_all().items() if sid in wanted)


def write_predictions(predictions: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write predictions as an E.T. Bench json list, one record per line."""
    path = Path(path)
    body = ",\n".join(json.dumps(p, ensure_ascii=False, sort_keys=True) for p in predictions)
    path.write_text(f"[\n{body}\n]\n" if predictions else "[]\n", encoding="utf-8")
    return path


def evaluate(cfg: EvaluateConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Predict (resuming), merge, score and report; Ray must already be initialised.

    Args:
        cfg: An :class:`EvaluateConfig` or the same as a nested dict, e.g.
            ``{"checkpoint_dir": ..., "annotations": ..., "output_dir": ..., "limit": 20,
            "blank_frames": True, "decoding": {"inject_evidence": False}}``.

    Returns:
        ``metrics`` (as in ``metrics.json``), counts (``n_samples``, ``n_predicted`` now,
        ``n_resumed``, ``n_failed``, ``n_truncated``, ``n_with_decode_warnings``), ``seed`` and the written paths
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
    _check_resume(cfg, out_dir, store)
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
    return {
        "metrics": metrics,
        "n_samples": len(selected),
        "n_predicted": n_predicted,
        "n_resumed": len(selected) - len(todo),
        "n_failed": counts.get("failed", 0),
        "n_truncated": counts.get("truncated", 0),
        "n_with_decode_warnings": run_info["n_with_decode_warnings"],
        "seed": cfg.decoding.seed,
        "output_dir": str(out_dir),
        "predictions": str(predictions_path),
        "metrics_path": str(paths["metrics"]),
        "summary": str(paths["summary"]),
        "plots": [str(p) for p in paths.get("plots", [])],
    }


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
