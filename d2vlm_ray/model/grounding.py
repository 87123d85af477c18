"""Evidence grounding: span conversions and span decoding (the soft targets are in ``losses.targets``).

Spans cross this module's boundary in two units: seconds (``_s``, what users and
annotations speak) and sampled-frame indices (``_idx``, what the model scores). The
conversion uses the presentation time of each sampled frame, never an fps assumption,
so variable-frame-rate video and start offsets come out right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from d2vlm_ray.types import SpanIdx, SpanS


@dataclass
class SpanStats:
    """Counts of spans that were repaired while converting, for reporting."""

    clamped: int = 0
    reordered: int = 0


def _nearest_frame(ts: np.ndarray, t_s: float) -> int:
    """Index of the frame nearest ``t_s``; a tie goes to the even index.

    The official code rounds spans with Python's ``round`` and ``Tensor.round``, both
    half-to-even (5.5 -> 6, 4.5 -> 4); at 1 fps from 0 s this rule gives the same frames.
    """
    distance = np.abs(ts - t_s)
    nearest = np.flatnonzero(distance == distance.min())
    even = nearest[nearest % 2 == 0]
    return int(even[0] if even.size else nearest[0])


def clean_spans_s(
    spans_s: Sequence[SpanS],
    timestamps_s: np.ndarray | Sequence[float],
    duration_s: float,
    field: str,
    stats: SpanStats | None = None,
) -> list[SpanS]:
    """Validate spans in seconds: reversed spans are reordered and spans partly outside
    ``[0, duration_s]`` are clamped (both counted in ``stats``), as the official code does;
    562 of Charades-STA's test queries end after their video.

    Args:
        spans_s: ``(start_s, end_s)`` pairs.
        timestamps_s: Presentation time of each sampled frame, increasing, ``[F]``.
        duration_s: Video duration in seconds.
        field: Name of the field the spans come from, used in error messages.
        stats: Optional counters to update.

    Returns:
        One ``(start_s, end_s)`` per span, ``0 <= start_s <= end_s <= max(duration_s, last frame time)``.

    Raises:
        ValueError: If there are no frames, or a span is non-finite or entirely outside
            the video.
    """
    ts = np.asarray(timestamps_s, dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError(f"{field}: the video has no sampled frames")
    stats = stats if stats is not None else SpanStats()
    end_s = max(float(duration_s), float(ts[-1]))
    out: list[SpanS] = []
    for span in spans_s:
        start, stop = float(span[0]), float(span[1])
        if not (math.isfinite(start) and math.isfinite(stop)):
            raise ValueError(f"{field}: span {tuple(span)!r} is not finite")
        if start > stop:
            start, stop = stop, start
            stats.reordered += 1
        if stop < 0.0 or start > end_s:
            raise ValueError(
                f"{field}: span ({start:g}, {stop:g}) s lies entirely outside the video (0 - {end_s:g} s)"
            )
        if start < 0.0 or stop > end_s:
            start, stop = max(start, 0.0), min(stop, end_s)
            stats.clamped += 1
        out.append((start, stop))
    return out


def spans_s_to_idx(
    spans_s: Sequence[SpanS],
    timestamps_s: np.ndarray | Sequence[float],
    duration_s: float,
    field: str,
    stats: SpanStats | None = None,
) -> list[SpanIdx]:
    """Convert spans in seconds to closed sampled-frame index spans.

    The spans are first cleaned by :func:`clean_spans_s` (reordered, clamped, counted).
    Each end maps to the sampled frame whose presentation time is nearest, ties to the even
    index (at 1 fps from 0 s this is Python's half-to-even ``round(t)``, the official rule).

    Returns:
        One ``(first_idx, last_idx)`` per span, ``first_idx <= last_idx``.

    Raises:
        ValueError: If there are no frames, or a span is non-finite or entirely outside
            the video.
    """
    ts = np.asarray(timestamps_s, dtype=np.float64)
    out: list[SpanIdx] = []
    for start, stop in clean_spans_s(spans_s, ts, duration_s, field, stats):
        first_idx, last_idx = _nearest_frame(ts, start), _nearest_frame(ts, stop)
        out.append((first_idx, max(first_idx, last_idx)))
    return out


def spans_s_to_frame_pos(spans_s: Sequence[SpanS], timestamps_s: np.ndarray | Sequence[float]) -> list[tuple[float, float]]:
    """Spans in seconds as *unrounded* positions on the sampled-frame axis.

    Frame ``i`` sits at position ``i``; a time between two frames' presentation times is
    placed linearly between them, and times before the first or after the last frame
    continue the first or last frame interval. At 1 fps from 0 s a time of ``t`` seconds
    is position ``t``, which is what the official FPO log-likelihood (``calculate_logps``)
    measures distances from: it uses the annotation spans as they are, while the SFT
    loss rounds them to frames (:func:`spans_s_to_idx`). Reversed spans are reordered.

    Args:
        spans_s: ``(start_s, end_s)`` pairs (already validated by :func:`spans_s_to_idx`).
        timestamps_s: Presentation time of each sampled frame, increasing, ``[F]``.

    Returns:
        One ``(first_pos, last_pos)`` per span, ``first_pos <= last_pos``.
    """
    ts = np.asarray(timestamps_s, dtype=np.float64)
    positions = np.arange(ts.size, dtype=np.float64)

    def to_pos(t_s: float) -> float:
        if ts.size == 1:
            return 0.0
        if t_s < ts[0]:
            return (t_s - ts[0]) / (ts[1] - ts[0])
        if t_s > ts[-1]:
            return ts.size - 1 + (t_s - ts[-1]) / (ts[-1] - ts[-2])
        return float(np.interp(t_s, ts, positions))

    out = []
    for span in spans_s:
        start, stop = sorted((float(span[0]), float(span[1])))
        out.append((to_pos(start), to_pos(stop)))
    return out


def span_idx_to_s(span_idx: SpanIdx, timestamps_s: np.ndarray | Sequence[float]) -> SpanS:
    """The presentation times of a span's first and last frame (official: no ``+1`` on the end)."""
    ts = np.asarray(timestamps_s, dtype=np.float64)
    return (float(ts[span_idx[0]]), float(ts[span_idx[1]]))


def decode_span(probs: torch.Tensor | np.ndarray, threshold: float = 0.6) -> SpanIdx:
    """The official span rule over one evidence token's frame probabilities.

    Keep frames with ``p >= threshold * max(p)``, split them into maximal runs of
    consecutive frames, score each run by its mean probability, and return
    ``[first, last]`` over the best run(s); exact ties between runs give a span that
    covers all tied runs (spec §2.3).

    Args:
        probs: Frame probabilities ``[F]``, F >= 1.
        threshold: Fraction of the maximum kept (official 0.6).

    Returns:
        ``(first_idx, last_idx)``.
    """
    p = np.asarray(probs.detach().cpu().double() if isinstance(probs, torch.Tensor) else probs, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError("probs: need a non-empty 1-D array of frame probabilities")
    keep = p >= threshold * p.max()
    # Run boundaries: a run starts where keep turns on and ends where it turns off.
    edges = np.diff(np.concatenate([[0], keep.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    means = np.array([p[s : e + 1].mean() for s, e in zip(starts, ends)])
    tied = np.flatnonzero(means == means.max())
    return (int(starts[tied[0]]), int(ends[tied[-1]]))
