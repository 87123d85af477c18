"""Structured-span metrics: IoU flavours, R@1/mIoU and E.T. Bench dense-caption F1."""

from __future__ import annotations

import math

import pytest

from d2vlm_ray.eval import dense_caption_f1, recall_at_iou, temporal_iou
from d2vlm_ray.eval.spans import dense_iou, nncore_iou


def test_temporal_iou_values() -> None:
    """[0,10] vs [5,15]: overlap 5, union 15 -> 1/3; reversed input is sorted; points give 0."""
    assert temporal_iou([0, 10], [5, 15]) == pytest.approx(1 / 3)
    assert temporal_iou([10, 0], [5, 15]) == pytest.approx(1 / 3)
    assert temporal_iou([0, 10], [20, 30]) == 0.0
    assert temporal_iou([3, 3], [3, 3]) == 0.0
    assert temporal_iou([0, 10], [0, 10]) == 1.0


def test_nncore_iou_nan_and_float32() -> None:
    assert math.isnan(nncore_iou([12, 12], [12, 12]))
    assert nncore_iou([12, 12], [12, 12], nan_as_zero=True) == 0.0
    # float32 arithmetic: 24.3/30.4 style values differ from float64 in the last digits.
    assert nncore_iou([24.3, 30.4], [24, 30]) == pytest.approx(5.7 / 6.4, abs=1e-6)
    assert nncore_iou([24.3, 30.4], [24, 30]) != 5.7 / 6.4


def test_dense_iou_epsilon() -> None:
    assert dense_iou([0, 10], [0, 5]) == pytest.approx(0.5, abs=1e-8)
    assert dense_iou([0, 10], [0, 5]) < 0.5  # the 1e-8 epsilon makes exact ties fail '>'


def test_recall_at_iou_counts_failures() -> None:
    """GT [0,10]; preds IoU 0.5, 2/3, None, 0.7 -> R@.3=.75, R@.5=.75, R@.7=.25, mIoU=(.5+.6667+.7)/4."""
    gts = [[0, 10]] * 4
    preds = [[0, 5], [2, 12], None, [3, 10]]
    out = recall_at_iou(preds, gts)
    assert out["R@0.3"] == 0.75
    assert out["R@0.5"] == 0.75
    assert out["R@0.7"] == 0.25
    assert out["mIoU"] == pytest.approx((0.5 + 2 / 3 + 0.7) / 4)
    with pytest.raises(ValueError):
        recall_at_iou(preds, gts[:2])


def test_dense_caption_f1_scaled_by_parse_rate() -> None:
    """Video 1: preds [0,10] (IoU 1) and [40,50] (IoU 0) vs GT [0,10],[20,30] -> P = R = 1/2.
    Video 2 fails to parse -> s = 1/2; F1@θ = 2(sP)(sR)/(sP+sR) = 2*.25*.25/.5 = .25."""
    out = dense_caption_f1([[[0, 10], [40, 50]], None], [[[0, 10], [20, 30]], [[0, 5]]])
    for thr in (0.1, 0.3, 0.5, 0.7):
        assert out[f"F1@{thr}"] == pytest.approx(0.25)
        assert out[f"Precision@{thr}"] == pytest.approx(0.5)
    assert out["F1"] == pytest.approx(0.25)


def test_dense_caption_f1_strict_threshold() -> None:
    """IoU exactly 0.5 does not count at θ = 0.5 (strict '>'), counts at 0.3."""
    out = dense_caption_f1([[[0, 5]]], [[[0, 10]]], thresholds=(0.3, 0.5))
    assert out["F1@0.3"] == pytest.approx(1.0)
    assert out["F1@0.5"] == 0.0
