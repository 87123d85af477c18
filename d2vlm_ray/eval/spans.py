"""Span metrics on already-structured predictions (no text parsing).

These are the reusable building blocks other packages call (the quickstart reports
R@1 at IoU 0.3/0.5/0.7, mIoU and dense-captioning F1 from structured spans), plus
the exact IoU flavours the official scorers use:

* ``temporal_iou``: the plain IoU in float64; a zero-width union gives 0.0.
* ``nncore_iou``: nncore's IoU as E.T. Bench computes it (float32 tensors, no
  epsilon), so two zero-length spans give NaN unless ``nan_as_zero``.
* ``dense_iou``: the densevid-style IoU of the DVC scorers,
  ``inter / (min(hull, len_a + len_b) + 1e-8)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SpanLike = Sequence[float]
CHARADES_THRESHOLDS = (0.3, 0.5, 0.7)
ETBENCH_THRESHOLDS = (0.1, 0.3, 0.5, 0.7)
MAX_PROPOSALS = 1000


def _ordered(span: SpanLike) -> tuple[float, float]:
    start_s, end_s = float(span[0]), float(span[1])
    return (start_s, end_s) if start_s <= end_s else (end_s, start_s)


def temporal_iou(a: SpanLike, b: SpanLike) -> float:
    """Intersection over union of two time spans ``[start_s, end_s]``.

    Reversed spans are read as ``[min, max]``. When the union has zero width (two
    identical points) the IoU is defined as 0.0 rather than NaN.

    Args:
        a: First span in seconds.
        b: Second span in seconds.

    Returns:
        IoU in ``[0, 1]``.
    """
    a_start, a_end = _ordered(a)
    b_start, b_end = _ordered(b)
    inter = max(0.0, min(a_end, b_end) - max(a_start, b_start))
    union = (a_end - a_start) + (b_end - b_start) - inter
    if union <= 0.0:
        return 0.0
    return inter / union


def nncore_iou(gt: SpanLike, pred: SpanLike, nan_as_zero: bool = False) -> float:
    """IoU as ``nncore.ops.temporal_iou`` on float32 tensors (E.T. Bench).

    Inputs are rounded to float32 and the arithmetic is float32, so threshold ties
    (``IoU >= 0.3``) fall the same way as in the official scorer.

    Args:
        gt: Ground-truth span.
        pred: Predicted span (already ``[min, max]``).
        nan_as_zero: Return 0.0 instead of NaN for two zero-length spans.

    Returns:
        The IoU as a Python float (NaN possible unless ``nan_as_zero``).
    """
    g = np.asarray(gt, dtype=np.float32)
    p = np.asarray(pred, dtype=np.float32)
    inter = np.maximum(np.minimum(g[1], p[1]) - np.maximum(g[0], p[0]), np.float32(0))
    union = (g[1] - g[0]) + (p[1] - p[0]) - inter
    if union == 0:
        return 0.0 if nan_as_zero or inter != 0 else math.nan
    return float(np.float32(inter / union))


def dense_iou(a: SpanLike, b: SpanLike) -> float:
    """Densevid-style IoU used by the DVC scorers (1e-8 epsilon, min(hull, sum) union)."""
    a_start, a_end = float(a[0]), float(a[1])
    b_start, b_end = float(b[0]), float(b[1])
    inter = max(0.0, min(a_end, b_end) - max(a_start, b_start))
    union = min(max(a_end, b_end) - min(a_start, b_start), (a_end - a_start) + (b_end - b_start))
    return inter / (union + 1e-8)


def recall_at_iou(
    preds: Sequence[SpanLike | None],
    gts: Sequence[SpanLike],
    thresholds: Sequence[float] = CHARADES_THRESHOLDS,
) -> dict[str, float]:
    """R@1 at each IoU threshold (``>=``) and mIoU over ALL queries.

    A missing prediction (``None``) counts as a miss with IoU 0 and stays in the
    denominator.

    Args:
        preds: One top-1 span (or ``None``) per query, seconds.
        gts: One ground-truth span per query, seconds.
        thresholds: IoU thresholds.

    Returns:
        ``{"R@0.3": ..., "R@0.5": ..., "R@0.7": ..., "mIoU": ...}`` as fractions in
        ``[0, 1]`` (unrounded); all 0.0 for an empty input.

    Raises:
        ValueError: If the two lists differ in length.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground truths")
    ious = np.array([0.0 if p is None else temporal_iou(p, g) for p, g in zip(preds, gts)], dtype=np.float64)
    total = max(len(gts), 1)
    out = {f"R@{thr}": float(np.sum(ious >= thr) / total) for thr in thresholds}
    out["mIoU"] = float(np.sum(ious) / total)
    return out


def detection_precision_recall(
    pred_spans: Sequence[SpanLike],
    gt_spans: Sequence[SpanLike],
    threshold: float,
    max_proposals: int | None = MAX_PROPOSALS,
) -> tuple[float, float]:
    """Per-video densevid precision and recall at one threshold (strict ``>``).

    Args:
        pred_spans: Predicted spans of one video.
        gt_spans: Ground-truth spans of the video.
        threshold: IoU threshold.
        max_proposals: Use only the first this many predictions (``None``: all).

    Returns:
        ``(precision, recall)``; precision is 0 with no prediction.
    """
    preds = list(pred_spans)[:max_proposals]
    covered_preds: set[int] = set()
    covered_gts: set[int] = set()
    for p_idx, pred in enumerate(preds):
        for g_idx, gt in enumerate(gt_spans):
            if dense_iou(pred, gt) > threshold:
                covered_preds.add(p_idx)
                covered_gts.add(g_idx)
    precision = len(covered_preds) / len(preds) if preds else 0.0
    recall = len(covered_gts) / len(gt_spans) if gt_spans else 0.0
    return precision, recall


def dense_caption_f1(
    pred_spans: Sequence[Sequence[SpanLike] | None],
    gt_spans: Sequence[Sequence[SpanLike]],
    thresholds: Sequence[float] = ETBENCH_THRESHOLDS,
) -> dict[str, float]:
    """E.T. Bench dense-captioning detection F1 from structured spans.

    Precision and recall are averaged over the videos that have a prediction
    (V of N); both are scaled by the parse rate ``s = V / N`` before the F1 at
    each threshold: ``F1@θ = 2(sP)(sR) / (sP + sR)``; ``F1`` is the mean over
    thresholds. A ``None`` or empty prediction is a failed video.

    Args:
        pred_spans: Per video, the predicted spans (or ``None``).
        gt_spans: Per video, the ground-truth spans.
        thresholds: IoU thresholds (strict ``>``).

    Returns:
        ``F1@θ``, ``Precision@θ``, ``Recall@θ`` (unscaled means over parsed
        videos) and ``F1``, as unrounded fractions.

    Raises:
        ValueError: If the two lists differ in length.
    """
    if len(pred_spans) != len(gt_spans):
        raise ValueError(f"{len(pred_spans)} predictions for {len(gt_spans)} videos")
    parsed = [(p, g) for p, g in zip(pred_spans, gt_spans) if p]
    scale = len(parsed) / len(gt_spans) if gt_spans else 0.0
    out: dict[str, float] = {}
    f1_values = []
    for thr in thresholds:
        pairs = [detection_precision_recall(p, g, thr) for p, g in parsed]
        precision = float(np.mean([pr[0] for pr in pairs])) if pairs else 0.0
        recall = float(np.mean([pr[1] for pr in pairs])) if pairs else 0.0
        sp, sr = precision * scale, recall * scale
        f1 = 0.0 if sp + sr == 0 else 2 * sp * sr / (sp + sr)
        out[f"Precision@{thr}"] = precision
        out[f"Recall@{thr}"] = recall
        out[f"F1@{thr}"] = f1
        f1_values.append(f1)
    out["F1"] = float(np.mean(f1_values)) if f1_values else 0.0
    return out
