"""Soft targets, span decoding and second/frame conversions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from d2vlm_ray.losses.targets import soft_targets
from d2vlm_ray.model.grounding import SpanStats, decode_span, span_idx_to_s, spans_s_to_idx


def test_soft_targets_decay_by_alpha_per_frame() -> None:
    targets = soft_targets(torch.tensor([[2, 3]]), 7, alpha=2.0)
    expected = torch.tensor([[0.25, 0.5, 1.0, 1.0, 0.5, 0.25, 0.125]])
    assert torch.equal(targets, expected)


def test_soft_targets_other_alpha_and_several_rows() -> None:
    targets = soft_targets(torch.tensor([[0, 0], [4, 4]]), 5, alpha=3.0)
    assert torch.allclose(targets[0], torch.tensor([1, 1 / 3, 1 / 9, 1 / 27, 1 / 81]))
    assert torch.allclose(targets[1], torch.tensor([1 / 81, 1 / 27, 1 / 9, 1 / 3, 1]))


@pytest.mark.parametrize(
    ("probs", "expected"),
    [
        # One clear run above 0.6 x max.
        ([0.1, 0.2, 0.9, 0.8, 0.7, 0.1], (2, 4)),
        # Two runs; the second has the higher mean (0.85 vs 0.7).
        ([0.7, 0.7, 0.1, 0.9, 0.8, 0.1], (3, 4)),
        # Two runs with exactly equal means: the span covers both.
        ([0.8, 0.1, 0.1, 0.8, 0.1], (0, 3)),
        # Flat: everything survives, one run over the whole video.
        ([0.3, 0.3, 0.3, 0.3], (0, 3)),
        # A single frame.
        ([0.42], (0, 0)),
        # Threshold is inclusive: 0.6 x 1.0 = 0.6 survives.
        ([0.6, 1.0, 0.59], (0, 1)),
    ],
)
def test_decode_span_official_rule(probs: list[float], expected: tuple[int, int]) -> None:
    assert decode_span(torch.tensor(probs)) == expected
    assert decode_span(np.array(probs)) == expected


def test_decode_span_rejects_empty() -> None:
    with pytest.raises(ValueError, match="probs"):
        decode_span(torch.tensor([]))


def test_spans_use_presentation_times_not_fps() -> None:
    # Variable frame rate: frames at irregular times.
    ts = np.array([0.0, 0.4, 1.9, 3.0, 4.2, 6.0])
    assert spans_s_to_idx([(1.8, 4.0)], ts, 6.5, "spans_s") == [(2, 4)]
    assert span_idx_to_s((2, 4), ts) == (1.9, 4.2)


def test_spans_clamped_reordered_and_counted() -> None:
    stats = SpanStats()
    ts = np.arange(10.0)
    out = spans_s_to_idx([(8.0, 14.0), (5.0, 2.0)], ts, 10.0, "spans_s", stats)
    assert out == [(8, 9), (2, 5)]
    assert (stats.clamped, stats.reordered) == (1, 1)


@pytest.mark.parametrize("span", [(11.0, 12.0), (-5.0, -1.0), (math.nan, 3.0), (1.0, math.inf)])
def test_bad_spans_raise_naming_the_field(span: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="src_spans_s"):
        spans_s_to_idx([span], np.arange(10.0), 10.0, "src_spans_s")


def test_no_frames_raises() -> None:
    with pytest.raises(ValueError, match="no sampled frames"):
        spans_s_to_idx([(0.0, 1.0)], np.array([]), 10.0, "spans_s")


def test_frame_positions_are_unrounded_and_follow_the_timestamps() -> None:
    from d2vlm_ray.model.grounding import spans_s_to_frame_pos

    assert spans_s_to_frame_pos([(1.4, 3.6), (5.0, 2.5)], np.arange(8.0)) == [(1.4, 3.6), (2.5, 5.0)]
    # 2 fps starting at 0.25 s: 1.25 s is frame 2, 1.5 s halfway between frames 2 and 3.
    ts = 0.25 + 0.5 * np.arange(6)
    assert spans_s_to_frame_pos([(1.25, 1.5)], ts) == [(2.0, 2.5)]
    # Beyond the last frame the last interval continues: 3.0 s is frame 5.5.
    assert spans_s_to_frame_pos([(0.0, 3.0)], ts) == [(-0.5, 5.5)]


def test_soft_targets_of_fractional_spans() -> None:
    targets = soft_targets(torch.tensor([[1.5, 2.5]], dtype=torch.float64), 5, 2.0)
    torch.testing.assert_close(targets[0], torch.tensor([2**-1.5, 2**-0.5, 1.0, 2**-0.5, 2**-1.5]))


def test_half_second_ties_round_half_to_even_as_the_official_round() -> None:
    spans = [(0.5, 1.5), (4.5, 5.5), (2.5, 6.5)]
    want = [(round(s), round(e)) for s, e in spans]  # Python's round: 0, 2, 4, 6, 2, 6
    assert spans_s_to_idx(spans, np.arange(10.0), 10.0, "spans_s") == want
