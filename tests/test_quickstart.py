"""The quickstart's smoke preset runs every stage end to end (as CI does)."""

from __future__ import annotations

import json
import time

import pytest

from d2vlm_ray.config import from_dict
from jobs.quickstart import SMOKE, QuickstartConfig, _train_config, main, run


def _scrape(port: int, wanted: dict[str, str], timeout_s: float = 60.0) -> set[str]:
    """Metric names of ``wanted`` (name -> required label) seen on the Prometheus endpoint."""
    import requests

    found: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and found != set(wanted):
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        found = {n for n, label in wanted.items() if any(line.startswith(n + "{") and label in line for line in text.splitlines())}
        time.sleep(1)
    return found


@pytest.mark.timeout(600)
def test_smoke_quickstart_runs_every_stage(ray_cluster: None, ray_metrics_port: int, tmp_path) -> None:
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
    # Each stage time and the wall clock are rounded to 0.1 s, so their sum may exceed it by that much.
    rounding_s = 0.05 * (len(stages) + 1)
    assert summary["wall_seconds"] >= summary["total_seconds"] - rounding_s > 0
    assert (tmp_path / "qs" / "eval" / "sft_fpo" / "summary.md").is_file()
    # The run's custom metrics reached the dashboard's Prometheus export.
    wanted = {
        "ray_d2vlm_frames_decoded_total": 'stage="build_cache"',
        "ray_d2vlm_cache_lookups_total": 'stage="evaluate"',
        "ray_d2vlm_train_step_loss_bucket": 'phase="sft"',
        "ray_d2vlm_train_samples_total": 'phase="fpo"',
        "ray_d2vlm_latency_ms_bucket": 'stage="serve_total"',
        "ray_d2vlm_evidence_spans_bucket": 'stage="serve"',
    }
    assert _scrape(ray_metrics_port, wanted) == set(wanted)


def test_a_bad_override_is_a_config_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fpo_lr=fast"]) == 2
    assert "config error: fpo_lr: expected a float" in capsys.readouterr().err


def test_model_lora_overrides_reach_both_training_stages(tmp_path) -> None:
    cfg = from_dict(QuickstartConfig, {"out_dir": str(tmp_path), "model": {"lora": {"r": 4, "tuning_mode": "heads"}}})
    for stage in ("sft", "fpo"):
        lora = _train_config(cfg, stage, tmp_path, str(tmp_path / "init"), {"train": "x.json"}).model.lora
        assert (lora.r, lora.tuning_mode) == (4, "heads")


def test_real_small_preset_is_a_valid_config_whose_training_keeps_its_lora_policy(tmp_path) -> None:
    from jobs.quickstart import REAL_SMALL

    cfg = from_dict(QuickstartConfig, {**REAL_SMALL, "out_dir": str(tmp_path)})
    assert (cfg.benchmark, cfg.model.preset, cfg.model.llm.family) == ("montage", "real-small", "llama")
    for stage in ("sft", "fpo"):
        tc = _train_config(cfg, stage, tmp_path, str(tmp_path / "init"), {"train": "x.json"})
        assert tc.model.lora.vocab_rows == "new" and "q_proj" in tc.model.lora.target_modules
        assert tc.scaling.num_workers == 1 and tc.scaling.cpus_per_worker == 2.0
        assert tc.optim.compressor_lr == cfg.compressor_lr > 0
        # The head warm-up is SFT's: FPO starts from SFT's heads and has no such setting.
        if stage == "sft":
            assert (tc.head_warmup.steps, tc.head_warmup.max_samples) == (2000, 200)
        else:
            assert not hasattr(tc, "head_warmup")


def test_real_small_without_clips_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    monkeypatch.delenv("D2VLM_REAL_MEDIA_DIR", raising=False)
    assert main(["--preset", "real-small", f"out_dir={tmp_path}"]) == 2
    assert "clips_dir" in capsys.readouterr().err
    assert main(["--preset", "real-small", f"out_dir={tmp_path}", f"clips_dir={tmp_path / 'nope'}"]) == 2
    assert "is not a folder" in capsys.readouterr().err
