"""Tiny runs of the ``pipeline`` and ``serve`` benchmarks through ``jobs.bench`` (correctness, not speed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from d2vlm_ray import bench
from d2vlm_ray.bench import pipeline, serve
from d2vlm_ray.config import ConfigError, from_dict
from jobs import bench as bench_job


def _run(name: str, root: Path, overrides: list[str]) -> tuple[int, dict[str, Any]]:
    rc = bench_job.main([name, "--out-dir", str(root / "out"), "--benchmarks-md", str(root / "B.md"), *overrides])
    (path,) = list((root / "out").glob(f"{name}-*/{name}.json"))
    return rc, json.loads(path.read_text())


def _rc_matches_checks(rc: int, report: dict[str, Any]) -> None:
    checks = report["result"]["checks"]
    assert all(isinstance(v, bool) for v in checks.values())
    assert rc == (0 if all(checks.values()) else 1)


def test_registered_and_configs_strict() -> None:
    assert bench.load_benchmark("pipeline") is pipeline and bench.load_benchmark("serve") is serve
    with pytest.raises(ConfigError, match="n_videos"):
        from_dict(pipeline.Config, {"n_videos": 0})
    with pytest.raises(ConfigError, match="encoder"):
        from_dict(pipeline.Config, {"encoder": "vit-huge"})
    with pytest.raises(ConfigError, match="concurrency"):
        from_dict(serve.Config, {"concurrency": 0})
    with pytest.raises(ConfigError):
        from_dict(serve.Config, {"no_such_key": 1})


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_pipeline_tiny(ray_cluster: None, tmp_path: Path) -> None:
    overrides = ["n_videos=2", "repeats=1", "warmup=0", "video_size=64", "encoder=tiny", "encode_num_cpus=0.5",
                 f"data_dir={tmp_path / 'videos'}", f"work_dir={tmp_path / 'work'}"]
    rc, report = _run("pipeline", tmp_path, overrides)
    result = report["result"]
    _rc_matches_checks(rc, report)
    assert result["checks"]["same_frames_all_paths"] and result["checks"]["rerun_decodes_nothing"]
    assert set(result["checks"]) == {"same_frames_all_paths", "rerun_decodes_nothing", "ray_throughput_target"}
    assert result["ray_started_by_benchmark"] is False  # the session cluster was used
    assert result["videos"] == 2 and result["frames"] >= 20  # synthetic videos last at least 10 s
    for name in pipeline.PATHS:
        p = result["paths"][name]
        assert len(p["wall_s"]) == len(p["cpu_s"]) == 1 and p["median_wall_s"] > 0
        assert p["videos_per_s"] == pytest.approx(2 / p["median_wall_s"], rel=1e-2)
        assert p["output"]["frames"] == result["frames"] and p["output"]["hits"] == 0
    assert result["rerun"]["decoded"] == 0 and result["rerun"]["hits"] == 2 and result["rerun"]["wall_s"] > 0
    best_wall_s = min(result["paths"]["loop"]["median_wall_s"], result["paths"]["pool"]["median_wall_s"])
    expected_ratio = best_wall_s / result["paths"]["ray"]["median_wall_s"]
    assert result["ratio_ray_vs_best"] == pytest.approx(expected_ratio, rel=1e-2, abs=1e-3)
    summary = result["summary"]
    assert summary["target_met"] == result["checks"]["ray_throughput_target"]
    assert "**pipeline**" in report["markdown"] and "cache-hit rerun" in report["markdown"]
    assert not (tmp_path / "B.md").exists()
    assert not any((tmp_path / "work").iterdir())  # checkpoint and caches removed


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_serve_tiny(ray_cluster: None, tmp_path: Path) -> None:
    from ray import serve as ray_serve

    overrides = ["n_cold=1", "n_hit=2", "video_size=64", "max_frames=4", "max_new_tokens=2", "max_grounding_tokens=2",
                 "concurrency=2", "n_throughput_requests=4", "throughput_rounds=1", "max_batch_size=2",
                 "http_timeout_s=60", "phase_budget_s=60", f"data_dir={tmp_path / 'videos'}",
                 f"work_dir={tmp_path / 'work'}"]
    rc, report = _run("serve", tmp_path, overrides)
    result = report["result"]
    _rc_matches_checks(rc, report)
    checks = result["checks"]
    assert checks["all_requests_ok"] and checks["cold_requests_missed_cache"] and checks["repeated_requests_hit_cache"]
    assert {"ground_cache_speedup_target", "answer_cache_speedup_target", "batching_speedup_target"} <= set(checks)
    for ep in serve.ENDPOINTS:
        e = result["endpoints"][ep]
        assert e["cold"]["latency_ms"]["n"] == 1 and e["hit"]["latency_ms"]["n"] == 2
        (cold,) = e["cold"]["requests"]
        assert cold["timings_ms"]["features.decode"] > 0 and "features.encode" in cold["timings_ms"]
        assert all("features.decode" not in r["timings_ms"] for r in e["hit"]["requests"])
        assert e["features_speedup_p50"] == pytest.approx(
            e["cold"]["features_service_ms"]["p50"] / e["hit"]["features_service_ms"]["p50"], rel=1e-2
        )
    t = result["throughput"]
    assert set(t["rounds"]) == {"batched", "unbatched"}
    for rounds in t["rounds"].values():
        (r,) = rounds
        assert r["requests"] == r["ok"] == 4 and r["requests_per_s"] > 0
    # Batch size 1 really is unbatched; the batched mode never exceeds its bound.
    assert t["rounds"]["unbatched"][0]["grounder_mean_batch_size"] == 1.0
    assert t["counters_end"]["Answerer"]["max_batch_size_seen"] <= 2
    assert "**serve**" in report["markdown"] and "/v1/answer" in report["markdown"]
    assert not any(a.startswith("d2vlm-bench") for a in ray_serve.status().applications)  # app deleted
