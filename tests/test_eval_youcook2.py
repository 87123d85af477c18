"""YouCook2 dense captioning: P/R/F1 over IoU {.3,.5,.7,.9}, SODA DP, TimeChat-format input."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from d2vlm_ray.eval.similarity import SentenceSimilarity
from d2vlm_ray.eval.youcook2 import (
    CaptionVideo,
    evaluate_youcook2,
    load_videos,
    soda_assignment_score,
    soda_c,
)


@pytest.fixture(scope="session")
def minilm() -> Iterator[SentenceSimilarity]:
    """The packaged MiniLM, loaded once per test session."""
    yield SentenceSimilarity()


VIDEO_1 = CaptionVideo([[0, 10], [20, 30]], ["crack the eggs", "whisk the eggs"], [[0, 10], [40, 50]],
                       ["crack the eggs", "fry the bacon"])
VIDEO_EMPTY = CaptionVideo([[0, 5]], ["add salt"], [], [])


def test_soda_dp_preserves_order() -> None:
    """Diagonal 2; anti-diagonal only 1 (crossing pairs are not allowed); mixed picks the single .9."""
    assert soda_assignment_score(np.array([[1.0, 0.0], [0.0, 1.0]])) == 2.0
    assert soda_assignment_score(np.array([[0.0, 1.0], [1.0, 0.0]])) == 1.0
    assert soda_assignment_score(np.array([[0.5, 0.9], [0.8, 0.1]])) == pytest.approx(0.9)
    assert soda_assignment_score(np.zeros((0, 3))) == 0.0


def test_soda_c_exact_match_score() -> None:
    """Only GT0-pred0 overlaps (IoU 1) with equal captions -> best 1, p = r = 1/2 -> F = .5."""
    assert soda_c(VIDEO_1, lambda ref, hyp: float(ref == hyp)) == pytest.approx(0.5)
    assert soda_c(VIDEO_EMPTY, lambda ref, hyp: 1.0) == 0.0


def test_precision_recall_f1(minilm: SentenceSimilarity) -> None:
    """Video 1: P = R = 1/2 at every θ (IoU 1 > .9) -> F1_v .5; the empty video scores 0.
    Means over the 2 videos: P@θ = R@θ = 25.0, F1_Score = 25.0, n_preds = 1.0."""
    out = evaluate_youcook2([VIDEO_1, VIDEO_EMPTY], similarity=minilm, with_coco=False)
    for thr in (0.3, 0.5, 0.7, 0.9):
        assert out[f"Precision@{thr}"] == 25.0 and out[f"Recall@{thr}"] == 25.0
    assert out["F1_Score"] == 25.0 and out["n_preds"] == 1.0
    assert "SODA_c" not in out and 20.0 <= out["SODA_c_sim"] <= 25.0
    assert out["notes"]


def test_load_records_and_timechat_dict() -> None:
    recs = [{"video": "v", "a": "0 - 10 seconds, crack the eggs.", "tgt": [[0, 10]], "g": ["crack the eggs"]},
            {"video": "w", "a": "no idea", "tgt": [[0, 5]], "g": ["add salt"]}]
    videos = load_videos(recs)
    assert videos[0].pred_spans_s == [[0.0, 10.0]] and videos[1].pred_spans_s == []
    gt = {"annotations": [{"image_id": "x.mp4", "segments": [[0, 10], [20, 30]], "pure_cap": "cut it. fry it."}]}
    preds = {"x.mp4": [{"timestamp": [0, 10], "caption": "cut it"}]}
    (video,) = load_videos(preds, gt)
    assert video.gt_captions == ["cut it", "fry it."] and video.pred_captions == ["cut it"]
    with pytest.raises(ValueError):
        load_videos(preds)
    with pytest.raises(ValueError):
        load_videos(recs, variant="nope")
