"""Records and interfaces shared across d2vlm_ray's packages.

Every package codes against these types; extend them here rather than defining
look-alikes elsewhere. Nothing in this module imports Ray, DeepSpeed or FastAPI.

Units are carried by names: ``_s`` is seconds, ``_idx`` is a frame index into the
sampled frames of a video.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # torch costs ~3 s to import; Ray tasks that only read records skip it
    import torch

SpanS = tuple[float, float]
"""A closed time interval ``(start_s, end_s)`` in seconds."""

SpanIdx = tuple[int, int]
"""A closed interval ``(first_idx, last_idx)`` of sampled-frame indices."""


def _spans_tuple(spans: Any, name: str) -> tuple[SpanS, ...]:
    """Normalise a list of pairs (or a flat ``[s1, e1, s2, e2, ...]`` list) to a tuple of pairs."""
    if spans is None:
        return ()
    items = list(spans)
    if items and not isinstance(items[0], (list, tuple, np.ndarray)):
        if len(items) % 2:
            raise ValueError(f"{name}: a flat span list needs an even number of values, got {len(items)}")
        items = [items[i : i + 2] for i in range(0, len(items), 2)]
    out: list[SpanS] = []
    for pair in items:
        pair = list(pair)
        if len(pair) != 2:
            raise ValueError(f"{name}: each span needs exactly two values (start_s, end_s), got {pair!r}")
        out.append((float(pair[0]), float(pair[1])))
    return tuple(out)


@dataclass(frozen=True)
class VideoRecord:
    """One annotated question about one video, in the project's common form.

    Readers of every annotation format (E.T.-Instruct / D2VLM ``evi.json``, E.T. Bench,
    Charades-STA, QVHighlights, ActivityNet / YouCook2) produce this record.

    Attributes:
        video: Local path or fsspec URL of the video.
        duration_s: Duration of the video in seconds (from the annotation or the decoder).
        query: The question/prompt text shown to the model. Question-side evidence
            placeholders are written ``<evi>``; their spans are ``src_spans_s``.
        task: Task code (``tvg``, ``dvc``, ``tal``, ``gqa``, ``rvq`` ...).
        source: Dataset the sample comes from.
        src_spans_s: Question-side spans (one per ``<evi>`` in ``query``).
        spans_s: Answer spans (the grounding targets), in event order.
        captions: One caption per answer span, where the task has captions.
        options: Multiple-choice options, if any.
        answer: The target response. For D2VLM-style data it is the full response text
            with ``<evi>`` placeholders (``n x <evi></evi>`` then the interleaved answer).
        answer_idx: Index of the correct option for multiple choice, else ``None``.
        sample_id: Stable id of the sample, unique within its source file.
        split: ``train``, ``val`` or ``test`` where known.
    """

    video: str
    duration_s: float
    query: str
    task: str = ""
    source: str = ""
    src_spans_s: tuple[SpanS, ...] = ()
    spans_s: tuple[SpanS, ...] = ()
    captions: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    answer: str = ""
    answer_idx: int | None = None
    sample_id: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "src_spans_s", _spans_tuple(self.src_spans_s, "src_spans_s"))
        object.__setattr__(self, "spans_s", _spans_tuple(self.spans_s, "spans_s"))
        object.__setattr__(self, "captions", tuple(str(c) for c in self.captions))
        object.__setattr__(self, "options", tuple(str(o) for o in self.options))
        object.__setattr__(self, "duration_s", float(self.duration_s))

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (lists instead of tuples) for JSON, Arrow and Ray."""
        out = asdict(self)
        for key in ("src_spans_s", "spans_s"):
            out[key] = [list(s) for s in out[key]]
        out["captions"] = list(self.captions)
        out["options"] = list(self.options)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoRecord:
        """Inverse of :meth:`to_dict`; unknown keys are rejected."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"VideoRecord: unknown fields {sorted(unknown)}")
        return cls(**data)


@dataclass
class DecodedVideo:
    """Frames sampled from a video, with their presentation times.

    Attributes:
        frames: uint8 array ``[F, H, W, 3]`` (RGB).
        timestamps_s: Presentation time of each sampled frame, ``[F]`` seconds, increasing.
        duration_s: Duration of the video stream in seconds.
        source_fps: Average frame rate of the source stream.
        width: Width of the decoded frames (after rotation).
        height: Height of the decoded frames (after rotation).
        warnings: Non-fatal problems met while decoding, human-readable (which frames
            were lost and why, suspect metadata, ...). Every consumer that stores or
            returns the features carries these along.
        missing_timestamps_s: Presentation times (relative, like ``timestamps_s``) of the
            sampled frames that could not be decoded and are absent from ``frames``.
    """

    frames: np.ndarray
    timestamps_s: np.ndarray
    duration_s: float
    source_fps: float
    width: int
    height: int
    warnings: list[str] = field(default_factory=list)
    missing_timestamps_s: list[float] = field(default_factory=list)

    @property
    def n_sampled(self) -> int:
        """Frames the sampling rule asked for: the decoded ones plus the missing ones."""
        return int(len(self.timestamps_s)) + len(self.missing_timestamps_s)

    @property
    def missing_fraction(self) -> float:
        """Share of the sampled frames that could not be decoded, in ``[0, 1]``."""
        return len(self.missing_timestamps_s) / self.n_sampled if self.n_sampled else 0.0


@runtime_checkable
class FrameEncoder(Protocol):
    """The frozen, question-independent frame encoder (EVA ViT-g in the official model).

    Its output is what the shared feature cache stores.
    """

    @property
    def encoder_id(self) -> str:
        """Architecture name plus a hash of the weights; part of every cache key."""
        ...

    @property
    def image_size(self) -> int:
        """Side of the square input image in pixels."""
        ...

    @property
    def transform_id(self) -> str:
        """Identifier of the pixel transform, including the image size."""
        ...

    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Encode uint8 frames ``[F, H, W, 3]`` into patch features ``[F, P, C]`` (CLS dropped)."""
        ...


@dataclass(frozen=True)
class FeatureKey:
    """Key of one entry of the feature cache.

    Attributes:
        video_sha256: sha256 hex digest of the video file's bytes.
        fps: Sampling rate the frames were taken at.
        transform_id: Pixel transform id, including image size.
        encoder_id: Frame-encoder id, including a hash of its weights.
        max_frames: Frame cap applied when sampling (0 = none); it changes which frames exist.
    """

    video_sha256: str
    fps: float
    transform_id: str
    encoder_id: str
    max_frames: int = 0

    def digest(self) -> str:
        """A filesystem-safe hex id that is stable across processes and machines."""
        fps = repr(float(self.fps))
        text = "|".join([self.video_sha256, fps, self.transform_id, self.encoder_id, str(self.max_frames)])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class GroundingResult:
    """What grounding produces for one question, and what answering continues from.

    Attributes:
        question: The question the grounding answered.
        spans_s: Grounded spans in seconds, one per generated evidence token.
        spans_idx: The same spans as sampled-frame indices.
        scores: Per-evidence-token frame probabilities, ``[E, F]``.
        token_ids: Generated grounding token ids (``E x <evi>`` then ``</evi>``).
        frame_tokens: The compressed, question-conditioned frame tokens ``[F, D]``
            (the LLM inputs), so answering never re-runs the compressor.
        evidence_vectors: The vectors added to each ``<evi>`` embedding, ``[E, D]``.
        timestamps_s: Presentation time of every sampled frame, ``[F]``.
        duration_s: Video duration in seconds.
        src_spans_s: Question-side spans that were given with the question.
        warnings: What may make this grounding wrong that its fields alone do not show
            (e.g. a Grounded-VideoLLM temporal marker that formed no span).
    """

    question: str
    spans_s: list[SpanS]
    spans_idx: list[SpanIdx]
    scores: torch.Tensor
    token_ids: list[int]
    frame_tokens: torch.Tensor
    evidence_vectors: torch.Tensor
    timestamps_s: np.ndarray
    duration_s: float
    src_spans_s: list[SpanS] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PreferencePair:
    """One FPO preference pair: a chosen response and one perturbed (rejected) variant.

    Both responses share the prompt and the video; the spans are in seconds.

    Attributes:
        sample_id: Id of the chosen sample the pair was made from.
        family: Perturbation family (e.g. ``temporal_shift``, ``textual_swap``, ``combined``).
        variant_idx: Index of this variant among the sample's variants of this family.
        video: Video path or URL.
        duration_s: Duration of the video.
        task: Task code of the chosen sample.
        prompt: The question text (with ``<evi>`` for question-side spans).
        src_spans_s: Question-side spans.
        chosen_text: Chosen response (with ``<evi>`` placeholders).
        chosen_spans_s: Spans of the chosen response.
        rejected_text: Rejected response (with ``<evi>`` placeholders).
        rejected_spans_s: Spans of the rejected response.
    """

    sample_id: str
    family: str
    variant_idx: int
    video: str
    duration_s: float
    task: str
    prompt: str
    chosen_text: str
    chosen_spans_s: tuple[SpanS, ...]
    rejected_text: str
    rejected_spans_s: tuple[SpanS, ...]
    src_spans_s: tuple[SpanS, ...] = ()

    def __post_init__(self) -> None:
        for name in ("chosen_spans_s", "rejected_spans_s", "src_spans_s"):
            object.__setattr__(self, name, _spans_tuple(getattr(self, name), name))

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (lists instead of tuples) for Parquet and JSON."""
        out = asdict(self)
        for key in ("chosen_spans_s", "rejected_spans_s", "src_spans_s"):
            out[key] = [list(s) for s in out[key]]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreferencePair:
        """Inverse of :meth:`to_dict`."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_finite_spans(spans_s: tuple[SpanS, ...] | list[SpanS], name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if any span value is NaN or infinite."""
    for span in spans_s:
        if not all(math.isfinite(v) for v in span):
            raise ValueError(f"{name}: span {tuple(span)!r} is not finite")
