"""Training inputs: annotation rows, preference pairs, the feature-cache join, collators.

Nothing here imports Ray. The Ray side (``trainer.py``) ships the rows produced here
through Ray Data and calls the collators on each worker.

**The feature join.** Rows carry video paths, never frames. A worker's collator asks
:class:`TrainingFeatures` for each video's frame-encoder features, which asks the shared
:class:`d2vlm_ray.cache.FeatureSource` (the one used by the cache build, evaluation and
Serve): a cache hit (in-process LRU, then the shared store) is used as it is, so no video
is decoded in the training loop once the cache is built; a miss falls back to decoding
and encoding on the fly, which also writes the entry for next time. Videos are hashed
through the manifest under the cache root, so a remote video is not streamed per step.
The frame encoder for that fallback is loaded lazily from the initial checkpoint, in
float32, so on-the-fly features equal the cached ones and land under the same key.

**Partial decodes.** Features of a video whose decode lost frames carry the decoder's
warnings (from the cache entry on a hit). :class:`TrainingFeatures` logs them once per
video and counts such videos (``feature_partial_videos`` in its stats); a decode that
lost more than ``max_missing_frames_fraction`` of its frames raises ``partial_decode``.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2vlm_ray.cache import CachedFeatures, FeatureMissingError, FeatureSource
from d2vlm_ray.data.annotations import caption_records, read_evi_json
from d2vlm_ray.model.builders import Tokenizers
from d2vlm_ray.model.inputs import D2VLMBatch, build_batch
from d2vlm_ray.model.preference import PairBatch, build_pair_batch
from d2vlm_ray.types import PreferencePair, VideoRecord

FeatureFn = Callable[[str], CachedFeatures]

logger = logging.getLogger(__name__)


def resolve_video(video: str, video_root: str) -> str:
    """Join a relative video path to ``video_root`` (URLs and absolute paths are kept)."""
    if not video_root or "://" in video or Path(video).is_absolute():
        return video
    return posixpath.join(video_root, video)


class LazyFrameEncoder:
    """A :class:`d2vlm_ray.types.FrameEncoder` whose weights load on the first ``encode``.

    Its ids (which enter every cache key) are fixed at construction, so looking features
    up never loads the encoder; only a cache miss does.

    Args:
        ckpt_dir: Checkpoint directory to load the frozen encoder from.
        encoder_id: The encoder's id (architecture + weights hash).
        transform_id: The pixel transform's id.
        image_size: Square input side.
        device: Where to run the encoder on a miss.
    """

    def __init__(
        self, ckpt_dir: str | Path, encoder_id: str, transform_id: str, image_size: int, device: str = "cpu"
    ) -> None:
        self.ckpt_dir = str(ckpt_dir)
        self._encoder_id = encoder_id
        self._transform_id = transform_id
        self._image_size = image_size
        self.device = device
        self._encoder: Any = None

    @classmethod
    def from_model(cls, model: Any, ckpt_dir: str | Path, image_size: int, device: str = "cpu") -> LazyFrameEncoder:
        """Take the ids from a freshly loaded model's (float32) vision tower."""
        from d2vlm_ray.model.builders import build_frame_encoder

        live = build_frame_encoder(model, image_size)
        return cls(ckpt_dir, live.encoder_id, live.transform_id, image_size, device)

    @property
    def encoder_id(self) -> str:
        """Architecture name plus weights hash."""
        return self._encoder_id

    @property
    def transform_id(self) -> str:
        """Pixel transform id."""
        return self._transform_id

    @property
    def image_size(self) -> int:
        """Square input side in pixels."""
        return self._image_size

    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Encode uint8 frames ``[F, H, W, 3]`` to patch features ``[F, P, C]``."""
        if self._encoder is None:
            from d2vlm_ray.model.checkpoint import load_frame_encoder

            self._encoder = load_frame_encoder(self.ckpt_dir, device=self.device)
            if self._encoder.encoder_id != self._encoder_id:
                raise ValueError(
                    f"frame encoder of {self.ckpt_dir!r} has id {self._encoder.encoder_id}, "
                    f"expected {self._encoder_id}: the checkpoint changed under the run"
                )
        return self._encoder.encode(frames)


class TrainingFeatures:
    """Features of a video by path for the collators, through the shared :class:`FeatureSource`.

    Args:
        source: The feature source (encoder, :class:`~d2vlm_ray.cache.FeatureSpec`, cache, manifest).
        decode_on_miss: Decode on a miss; when false, a miss raises :class:`FeatureMissingError`.
    """

    def __init__(self, source: FeatureSource, *, decode_on_miss: bool = True) -> None:
        self.source = source
        self.decode_on_miss = decode_on_miss
        self.hits = 0
        self.misses = 0
        self.partial_videos: dict[str, list[str]] = {}

    def __call__(self, video: str) -> CachedFeatures:
        result = self.source.features(video, decode_on_miss=self.decode_on_miss)
        if result.cache_hit:
            self.hits += 1
        else:
            self.misses += 1
        feats = result.features
        if feats.warnings and video not in self.partial_videos:
            # Once per video: a training run reads each video every epoch.
            self.partial_videos[video] = list(feats.warnings)
            logger.warning("features of %s come from a partial decode: %s", video, "; ".join(feats.warnings))
        return feats

    def stats(self) -> dict[str, float]:
        """Cumulative ``feature_hits`` / ``feature_misses`` / ``feature_partial_videos`` of this process."""
        return {
            "feature_hits": float(self.hits),
            "feature_misses": float(self.misses),
            "feature_partial_videos": float(len(self.partial_videos)),
        }


def mapping_features(features: Mapping[str, CachedFeatures]) -> FeatureFn:
    """A feature function over a ``{video: CachedFeatures}`` mapping (tests, notebooks)."""

    def lookup(video: str) -> CachedFeatures:
        if video not in features:
            raise FeatureMissingError(f"no features given for video {video!r}")
        return features[video]

    return lookup


# --- SFT rows ------------------------------------------------------------------------


def load_sft_records(
    path: str,
    *,
    video_root: str = "",
    tasks: Sequence[str] = (),
    max_samples: int = 0,
    task_repeats: Mapping[str, int] | None = None,
    captions_only: bool = False,
) -> list[VideoRecord]:
    """Read an ``evi.json`` file into training records (those with a response).

    ``max_samples`` applies before ``task_repeats``, which lists each record of a named
    task that many times in a row (the trainer shuffles). With ``captions_only`` the
    records are the video-caption pairs made from the dense-captioning records
    (:func:`~d2vlm_ray.data.annotations.caption_records`) and ``tasks`` is not applied.

    Raises:
        ValueError: If no usable record remains (the message names ``data.train``), or
            ``task_repeats`` names a task no record of the file has (a typo would otherwise
            do nothing).
    """
    result = read_evi_json(path, video_root=video_root or None, on_error="skip")
    if captions_only:
        result = replace(result, records=caption_records(result.records))
        tasks = ()
    records = [r for r in result.records if r.answer and (not tasks or r.task in tasks)]
    if max_samples:
        records = records[:max_samples]
    if not records:
        raise ValueError(f"data.train: no training records with a response in {path!r} (tasks={list(tasks)})")
    repeats = task_repeats or {}
    # Checked against the whole file, so that a small max_samples cut is not an error.
    unknown = sorted(set(repeats) - {r.task for r in result.records})
    if unknown:
        raise ValueError(f"data.task_repeats: no training record has task {unknown} in {path!r}")
    return [r for r in records for _ in range(repeats.get(r.task, 1))]


def record_rows(records: Sequence[VideoRecord]) -> list[dict[str, Any]]:
    """Flat rows for Ray Data: ``row_idx``, ``sample_id`` and the record as JSON."""
    return [
        {"row_idx": i, "sample_id": r.sample_id or str(i), "record": json.dumps(r.to_dict())}
        for i, r in enumerate(records)
    ]


def records_from_rows(rows: Sequence[Mapping[str, Any]]) -> list[VideoRecord]:
    """Inverse of :func:`record_rows`, in ``row_idx`` order whatever order the rows came in."""
    ordered = sorted(rows, key=lambda row: int(row["row_idx"]))
    return [VideoRecord.from_dict(json.loads(row["record"])) for row in ordered]


def record_id(record: VideoRecord) -> str:
    """Id of an SFT sample in logs."""
    return record.sample_id


# --- preference pairs ------------------------------------------------------------------


def pair_id(pair: PreferencePair) -> str:
    """Id of a preference pair: chosen sample, family and variant."""
    return f"{pair.sample_id}/{pair.family}/{pair.variant_idx}"


def pairs_from_rows(
    rows: Sequence[Mapping[str, Any]], *, video_root: str = "", max_samples: int = 0
) -> list[PreferencePair]:
    """Preference pairs from Parquet rows, sorted by :func:`pair_id` (so any read order gives one list).

    Raises:
        ValueError: On a malformed row (naming its index) or no rows at all.
    """
    pairs = []
    for i, row in enumerate(rows):
        try:
            pair = PreferencePair.from_dict(dict(row))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"data.train: preference pair row {i} is malformed: {exc}") from None
        pairs.append(pair)
    pairs.sort(key=pair_id)
    if video_root:
        pairs = [replace(p, video=resolve_video(p.video, video_root)) for p in pairs]
    if max_samples:
        pairs = pairs[:max_samples]
    if not pairs:
        raise ValueError("data.train: no preference pairs")
    return pairs


def load_pairs(path: str, *, video_root: str = "", max_samples: int = 0) -> list[PreferencePair]:
    """Read preference pairs from a Parquet file or folder (no Ray)."""
    import pyarrow.dataset as pads

    try:
        table = pads.dataset(path, format="parquet").to_table()
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"preference pairs {path!r}: {exc}") from None
    return pairs_from_rows(table.to_pylist(), video_root=video_root, max_samples=max_samples)


# --- collators -----------------------------------------------------------------------


class _FeatureCollate:
    """Shared state of the collators: tokenizers and a feature source.

    Args:
        tokenizers: The model's tokenizers.
        features: Video path → features.
        max_text_tokens: Q-Former question tokens kept.
    """

    def __init__(self, tokenizers: Tokenizers, features: FeatureFn, max_text_tokens: int = 256) -> None:
        self.tokenizers = tokenizers
        self.features = features
        self.max_text_tokens = max_text_tokens


class SFTCollate(_FeatureCollate):
    """Records → :class:`D2VLMBatch` (prompt, response, spans) with features from the cache."""

    def __call__(self, records: list[VideoRecord]) -> D2VLMBatch:
        feats = [self.features(r.video) for r in records]
        return build_batch(
            self.tokenizers.llm,
            self.tokenizers.qformer,
            [r.query for r in records],
            [f.patches for f in feats],
            [f.timestamps_s for f in feats],
            [f.duration_s for f in feats],
            responses=[r.answer for r in records],
            spans_s=[list(r.spans_s) for r in records],
            src_spans_s=[list(r.src_spans_s) for r in records],
            max_text_tokens=self.max_text_tokens,
        )


class PairCollate(_FeatureCollate):
    """Preference pairs → :class:`PairBatch` with features from the cache (each video once)."""

    def __call__(self, pairs: list[PreferencePair]) -> PairBatch:
        feats = [self.features(p.video) for p in pairs]
        return build_pair_batch(
            self.tokenizers,
            pairs,
            [f.patches for f in feats],
            [f.timestamps_s for f in feats],
            [f.duration_s for f in feats],
            max_text_tokens=self.max_text_tokens,
        )
