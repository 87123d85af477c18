"""Evidence grounding: span conversions, soft targets and span decoding.

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


def spans_s_to_idx(
    spans_s: Sequence[SpanS],
    timestamps_s: np.ndarray | Sequence[float],
    duration_s: float,
    field: str,
    stats: SpanStats | None = None,
) -> list[SpanIdx]:
    """Convert spans in seconds to closed sampled-frame index spans.

    Reversed spans are reordered and spans partly outside ``[0, duration_s]`` are clamped
    (both counted in ``stats``), as the official code does; 562 of Charades-STA's test
    queries end after their video. Each end maps to the sampled frame whose presentation
    time is nearest (at 1 fps from 0 s this is ``round(t)``, the official rule).

    Args:
        spans_s: ``(start_s, end_s)`` pairs.
        timestamps_s: Presentation time of each sampled frame, increasing, ``[F]``.
        duration_s: Video duration in seconds.
        field: Name of the field the spans come from, used in error messages.
        stats: Optional counters to update.

    Returns:
        One ``(first_idx, last_idx)`` per span, ``first_idx <= last_idx``.

    Raises:
        ValueError: If there are no frames, or a span is non-finite or entirely outside
            the video.
    """
    ts = np.asarray(timestamps_s, dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError(f"{field}: the video has no sampled frames")
    stats = stats if stats is not None else SpanStats()
    end_s = max(float(duration_s), float(ts[-1]))
    out: list[SpanIdx] = []
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
        first_idx = int(np.argmin(np.abs(ts - start)))
        last_idx = int(np.argmin(np.abs(ts - stop)))
        out.append((first_idx, max(first_idx, last_idx)))
    return out


def span_idx_to_s(span_idx: SpanIdx, timestamps_s: np.ndarray | Sequence[float]) -> SpanS:
    """The presentation times of a span's first and last frame (official: no ``+1`` on the end)."""
    ts = np.asarray(timestamps_s, dtype=np.float64)
    return (float(ts[span_idx[0]]), float(ts[span_idx[1]]))


def soft_targets(spans_idx: torch.Tensor, num_frames: int, alpha: float) -> torch.Tensor:
    """Soft grounding targets ``alpha ** -d`` (spec §2.2).

    ``d`` is 0 inside the closed span and the distance in frames to the nearer boundary
    outside it: with alpha 2, frames one step outside get 0.5, two steps 0.25.

    Args:
        spans_idx: Long tensor ``[E, 2]`` of ``(first_idx, last_idx)``.
        num_frames: F.
        alpha: Decay base (> 1).

    Returns:
        Float targets ``[E, F]`` in ``(0, 1]``.
    """
    frame_idx = torch.arange(num_frames, device=spans_idx.device)  # [F]
    first = spans_idx[:, :1]  # [E, 1]
    last = spans_idx[:, 1:]  # [E, 1]
    distance = (first - frame_idx).clamp(min=0) + (frame_idx - last).clamp(min=0)  # [E, F]
    return torch.pow(torch.tensor(float(alpha), dtype=torch.float32), -distance.float())


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
