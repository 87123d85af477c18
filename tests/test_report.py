"""Metrics, Markdown summary and PNG plots from hand-made predictions (no Ray, no model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from d2vlm_ray.eval.plots import TimelineItem, plot_recall_curves, plot_timelines
from d2vlm_ray.eval.report import (
    compute_metrics,
    gt_spans,
    option_hit,
    predicted_spans,
    summary_markdown,
    tal_f1,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pred(sid: str, task: str, tgt: Any, a: str, pred: list | None = None, evidence: list | None = None,
          **extra: Any) -> dict[str, Any]:
    return {"sample_id": sid, "idx": 0, "task": task, "source": "synthetic", "video": f"videos/{sid}.mp4",
            "duration": 40.0, "tgt": tgt, "q": "?", "a": a, "pred_spans_s": pred or [],
            "grounding_spans_s": evidence or [], "truncated": False, "status": "ok", "error": None} | extra


def _failed(sid: str, task: str, tgt: Any, reason: str = "video:corrupt") -> dict[str, Any]:
    return _pred(sid, task, tgt, "", status="failed", error={"reason": reason, "message": "boom"})


@pytest.fixture()
def predictions() -> list[dict[str, Any]]:
    return [
        # IoU 1 in every reading.
        _pred("t1", "tvg", [10.0, 20.0], "10 - 20 </evi> The event happens in 10 - 20.", [[10.0, 20.0]],
              [[10.0, 20.0]]),
        # Text: IoU 0.6 ([10, 16] vs [10, 20]); structured spans differ (IoU 0.4); evidence IoU 0.
        _pred("t2", "tvg", [10.0, 20.0], "0 - 5 </evi> The event happens in 10 - 16.", [[10.0, 14.0]], [[0.0, 5.0]],
              truncated=True),
        # No </evi>: the text reading fails, the structured one still reads IoU 1.
        _pred("t3", "tvg", [0.0, 4.0], "The event happens in 0 - 4.", [[0.0, 4.0]]),
        _failed("t4", "tvg", [5.0, 9.0]),
        _pred("d1", "dvc", [[0.0, 10.0], [20.0, 30.0]], "0 - 10 20 - 30 </evi> 0 - 10 , a jumps. 20 - 30 , b moves.",
              [[0.0, 10.0], [20.0, 30.0]]),
        _failed("d2", "dvc", [[0.0, 10.0]], reason="too_long"),
        _pred("l1", "tal", [[0.0, 10.0], [20.0, 30.0]], "0 - 10 </evi> 0 - 10.", [[0.0, 10.0]]),
        _pred("g1", "gqa", [20.0, 30.0], "20 - 30 </evi> At 20 - 30, it turned red.", [[20.0, 30.0]],
              o=["blue", "red", "green", "white"], p=1),
        _pred("g2", "gqa", [20.0, 30.0], "0 - 4 </evi> At 0 - 4, it turned blue or red.", [[0.0, 4.0]],
              o=["blue", "red", "green", "white"], p=1),
        _pred("x1", "rvq", [1.0, 2.0], "(A)"),
    ]


def test_readings_and_gt_shapes(predictions: list[dict[str, Any]]) -> None:
    t2 = predictions[1]
    assert predicted_spans(t2, "text") == [[10.0, 16.0]]
    assert predicted_spans(t2, "structured") == [[10.0, 14.0]]
    assert predicted_spans(t2, "evidence") == [[0.0, 5.0]]
    assert predicted_spans(predictions[2], "text") is None
    assert predicted_spans(predictions[3], "structured") is None
    with pytest.raises(ValueError, match="reading"):
        predicted_spans(t2, "bogus")
    assert gt_spans({"tgt": [1, 2]}) == [[1.0, 2.0]]
    assert gt_spans({"tgt": [[1, 2], [3, 4]]}) == [[1.0, 2.0], [3.0, 4.0]]
    assert gt_spans({"tgt": [[[1, 2]], [[3, 4], [5, 6]]]}) == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert gt_spans({}) == []


def test_option_hit_rules() -> None:
    colours = ["blue", "red", "green"]
    assert option_hit("At 3 - 5, it turned RED.", colours, 1)
    assert not option_hit("it turned blue or red", colours, 1)  # ambiguous
    assert not option_hit("it turned reddish", colours, 1)  # word boundaries
    moves = ["went out to the left", "left", "jumped"]
    # A distractor inside the correct option does not count against it.
    assert option_hit("it went out to the left", moves, 0)
    assert not option_hit("it went left", moves, 0)
    assert not option_hit("red", colours, 7)


def test_tal_f1_by_hand() -> None:
    # G = 2, P = 1 with IoU [[1], [0]]: recall 1/2, precision 1 -> F1 2/3 at every threshold;
    # the second sample has no prediction and scores 0, so the mean is 1/3.
    out = tal_f1([[[0.0, 10.0]], None], [[[0.0, 10.0], [20.0, 30.0]], [[1.0, 2.0]]])
    assert out["F1"] == pytest.approx(1 / 3)
    assert out["F1@0.7"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        tal_f1([None], [])


def test_synthetic_metrics_by_hand(predictions: list[dict[str, Any]]) -> None:
    m = compute_metrics(predictions, "synthetic")
    tvg = m["tasks"]["tvg"]
    assert (tvg["n"], tvg["failed"], tvg["truncated"]) == (4, 1, 1)
    # text IoUs: 1, 0.6, fail, fail -> R@0.5 = 2/4, R@0.7 = 1/4, mIoU = 1.6/4.
    assert tvg["text"] == {"R@0.3": 0.5, "R@0.5": 0.5, "R@0.7": 0.25, "mIoU": 0.4}
    # structured IoUs: 1, 0.4, 1, fail.
    assert tvg["structured"]["R@0.5"] == 0.5 and tvg["structured"]["R@0.3"] == 0.75
    assert tvg["structured"]["mIoU"] == pytest.approx(2.4 / 4)
    # evidence IoUs: 1, 0, fail, fail.
    assert tvg["evidence"]["R@0.3"] == 0.25
    # dvc: one video perfect, one failed -> parse rate 1/2 scales P and R: F1 = 0.5.
    assert m["tasks"]["dvc"]["text"]["F1"] == pytest.approx(0.5)
    assert m["tasks"]["tal"]["text"]["F1"] == pytest.approx(0.66667, abs=1e-5)
    gqa = m["tasks"]["gqa"]
    assert gqa["text"] == {"Acc": 0.5, "correct": 1}
    assert gqa["structured"]["R@0.7"] == 0.5
    assert m["merged"]["score"] == pytest.approx((0.5 + 0.5 + 0.66667 + 0.5) / 4, abs=1e-5)
    assert m["unscored_tasks"] == {"rvq": 1}
    counts = m["counts"]
    assert (counts["total"], counts["failed"], counts["truncated"]) == (10, 2, 1)
    assert counts["failure_reasons"] == {"too_long": 1, "video:corrupt": 1}
    curves = m["curves"]
    assert set(curves["R@1"]) == {"tvg", "gqa"}
    assert len(curves["R@1"]["tvg"]["text"]) == len(curves["thresholds"])
    assert curves["R@1"]["tvg"]["text"][curves["thresholds"].index(0.5)] == 0.5
    with pytest.raises(ValueError, match="benchmark"):
        compute_metrics(predictions, "nope")


def test_summary_markdown(predictions: list[dict[str, Any]]) -> None:
    metrics = compute_metrics(predictions, "synthetic")
    metrics["run"] = {"checkpoint_dir": "ckpt", "decoding": {"preset": "greedy", "max_new_tokens": 9}, "seed": 5}
    text = summary_markdown(metrics)
    assert "| tvg | R@0.5 | 0.5000 | 0.5000 | 0.2500 |" in text
    assert "| **all** | 10 | 2 | 1 |" in text
    assert "`video:corrupt` × 1" in text and "seed 5" in text
    assert "## Merged" in text and "Unscored tasks (samples): rvq 1" in text


def test_etbench_metrics_and_summary(tmp_path: Path) -> None:
    preds = [
        _pred("1", "tvg", [10.0, 20.0], "10 - 20", source="charades_sta"),
        _pred("2", "tvg", [10.0, 20.0], "nothing here", source="charades_sta"),
    ]
    m = compute_metrics(preds, "etbench", variant="official")
    group = m["etbench"]["tvg"]["charades_sta"]
    assert (group["Total"], group["Failed"], group["F1@0.5"]) == (2, 1, 0.5)
    text = summary_markdown(m)
    assert "E.T. Bench (variant `official`)" in text and "| tvg | charades_sta | 2 | 1 |" in text
    assert "TVG (F1)" in text
    mixed = compute_metrics([*preds, _pred("3", "gqa", [1.0, 2.0], "x")], "etbench")
    assert mixed["unscored_tasks"] == {"gqa": 1} and "gqa 1" in summary_markdown(mixed)


def test_write_report_files_and_plots(predictions: list[dict[str, Any]], tmp_path: Path) -> None:
    metrics = compute_metrics(predictions, "synthetic")
    metrics["tasks"]["tvg"]["text"]["nan_example"] = float("nan")
    paths = write_report(tmp_path, predictions, metrics, timeline_samples=5)
    stored = json.loads(paths["metrics"].read_text())
    assert stored["tasks"]["tvg"]["text"]["nan_example"] is None  # strict JSON
    assert paths["summary"].read_text().startswith("# Evaluation summary (synthetic)")
    names = sorted(p.name for p in paths["plots"])
    assert names == ["recall_iou.png", "timelines.png"]
    for png in paths["plots"]:
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    no_plots = write_report(tmp_path / "np", predictions, metrics, plots=False)
    assert no_plots["plots"] == [] and not (tmp_path / "np" / "plots").exists()


def test_plot_functions_edge_cases(tmp_path: Path) -> None:
    empty = plot_timelines([], tmp_path / "empty.png")
    assert empty.read_bytes()[:8] == PNG_MAGIC
    item = TimelineItem("s [tvg]", 10.0, [[2.0, 4.0]], [[4.0, 2.0]], [[3.0, 3.0]], note="IoU 1.00")
    assert plot_timelines([item], tmp_path / "one.png").is_file()
    assert plot_recall_curves([0.5], {}, tmp_path / "none.png").is_file()
    with pytest.raises(ValueError, match="thresholds"):
        plot_recall_curves([0.1, 0.2], {"tvg": {"text": [1.0]}}, tmp_path / "bad.png")
