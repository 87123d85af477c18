"""The quickstart's smoke preset runs every stage end to end (as CI does)."""

from __future__ import annotations

import json

import pytest

from jobs.quickstart import SMOKE, QuickstartConfig, run
from d2vlm_ray.config import from_dict


@pytest.mark.timeout(600)
def test_smoke_quickstart_runs_every_stage(ray_cluster: None, tmp_path) -> None:
    cfg = from_dict(QuickstartConfig, {**SMOKE, "out_dir": str(tmp_path / "qs"), "serve_port": 18123})
    summary = run(cfg, "smoke")
    assert set(summary["models"]) == {"untrained", "sft", "sft_fpo"}
    for metrics in summary["models"].values():
        assert {"R@0.3", "R@0.5", "R@0.7", "mIoU", "dvc_F1"} <= set(metrics)
    assert set(summary["baselines"]) == {"whole_video", "training_mean_span", "blank_frames"}
    assert summary["serve_demo"]["status"] == [200, 200]
    assert "spans_s" in summary["serve_demo"]["ground"] and "answer" in summary["serve_demo"]["answer"]
    assert summary["cache"]["failed"] == 0
    stages = summary["stage_seconds"]
    for stage in ("render", "feature cache", "preference pairs", "SFT", "FPO", "evaluate sft_fpo", "serve"):
        assert any(stage in name for name in stages), stage
    on_disk = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert on_disk["bars"].keys() == summary["bars"].keys()
    assert (tmp_path / "qs" / "eval" / "sft_fpo" / "summary.md").is_file()
