"""Charades-STA R@1/mIoU under the standard, E.T. Chat, TimeChat and D2VLM conventions."""

from __future__ import annotations

import pytest

from d2vlm_ray.eval.charades import evaluate_charades, load_items


def _records(texts: list[str]) -> list[dict]:
    return [{"a": t, "tgt": [0, 10], "duration": 30.0} for t in texts]


TEXTS = ["0 - 5", "The event happens in 2 - 12 seconds.", "I cannot tell", "3 - 10"]


def test_standard_counts_failures_in_denominator() -> None:
    """IoUs .5, 2/3, miss, .7 -> R@.3 = R@.5 = 3/4, R@.7 = 1/4, mIoU = (.5+2/3+.7)/4."""
    out = evaluate_charades(load_items(_records(TEXTS)))
    assert out["Failed"] == 1 and out["Total"] == 4
    assert (out["R@0.3"], out["R@0.5"], out["R@0.7"]) == (0.75, 0.75, 0.25)
    assert out["mIoU"] == pytest.approx((0.5 + 2 / 3 + 0.7) / 4)


def test_timechat_percent_no_miou() -> None:
    out = evaluate_charades(load_items(_records(TEXTS)), "timechat")
    assert (out["R@0.3"], out["R@0.5"], out["R@0.7"]) == (75.0, 75.0, 25.0)
    assert "mIoU" not in out


def test_timechat_dict_with_gt_file() -> None:
    """Three GT queries; qid 0 predicts [0,5] (IoU .5), qid 1 is empty, qid 2 is missing -> R@.3 = 100/3."""
    gt = {"annotations": [{"image_id": "v.mp4", "caption": "c", "timestamp": [0, 10], "id": i} for i in range(3)]}
    preds = {"0": {"timestamp": [[0, 5]]}, "1": {"timestamp": []}}
    out = evaluate_charades(load_items(preds, gt), "timechat")
    assert out["R@0.3"] == pytest.approx(100 / 3) and out["R@0.7"] == 0.0
    with pytest.raises(ValueError):
        load_items(preds, None)


def test_etchat_raw_pairs() -> None:
    """pred [8,2] (reversed -> IoU 0), [0,5] (.5), [1] (not 2 values: failure): R1@.3 = .333, mIoU = .167."""
    recs = [{"span": [0, 10], "pred": p} for p in ([8, 2], [0, 5], [1])]
    out = evaluate_charades(load_items(recs), "etchat")
    assert out["R1@0.3"] == 0.333 and out["mIoU"] == 0.167 and out["Failed"] == 1


def test_d2vlm_evidence_fallback_and_denominator() -> None:
    """Answer [0,5] -> .5; no answer interval -> evidence [0,10] -> 1; nothing -> excluded.
    Over 2 scored: R@0 = R@.5 = 100, R@.7 = 50, mIoU = .75."""
    texts = ["0 - 10 </evi> The event happens in 0 - 5", "0 - 10 </evi> no time", "nothing at all"]
    out = evaluate_charades(load_items(_records(texts)), "d2vlm")
    assert out["Scored"] == 2 and out["Failed"] == 1
    assert (out["R@0.0"], out["R@0.5"], out["R@0.7"]) == (100.0, 100.0, 50.0)
    assert out["mIoU"] == 0.75


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        evaluate_charades(load_items(_records(TEXTS)), "nope")
    with pytest.raises(ValueError):
        load_items([{"foo": 1}])
    with pytest.raises(ValueError):
        evaluate_charades([])
