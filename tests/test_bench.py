"""Tests of the benchmark framework and a tiny ``decode`` benchmark run (correctness, not speed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d2vlm_ray import bench
from d2vlm_ray.bench import common, decode
from d2vlm_ray.config import ConfigError, from_dict
from jobs import bench as bench_job

TINY = [
    "repeats=1",
    "warmup=0",
    "long_gop.duration_s=3",
    "long_gop.width=96",
    "long_gop.height=64",
    "long_gop.gop_size=40",
    "short_gop.n_clips=2",
    "short_gop.duration_s=3",
    "short_gop.width=64",
    "short_gop.height=48",
    "short_gop.gop_size=6",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny ``decode`` run through the job (clips cached for the module), without --append."""
    root = tmp_path_factory.mktemp("bench")
    md = root / "BENCHMARKS.md"
    rc = bench_job.main(
        ["decode", "--out-dir", str(root / "out"), "--benchmarks-md", str(md), *TINY, f"cache_dir={root / 'clips'}"]
    )
    reports = list((root / "out").glob("decode-*/decode.json"))
    return {"rc": rc, "root": root, "md": md, "reports": reports}


def test_registry_names_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"decode", "pipeline", "train", "serve", "gpu"} <= set(bench.names())
    assert {"decode", "pipeline", "train", "serve", "gpu"} <= set(bench.implemented())
    module = bench.load_benchmark("decode")
    assert module is decode and callable(module.run) and callable(module.markdown)
    with pytest.raises(bench.UnknownBenchmarkError, match="unknown benchmark 'nope'"):
        bench.load_benchmark("nope")
    monkeypatch.setitem(bench.REGISTRY, "planned", None)
    with pytest.raises(bench.BenchmarkNotImplementedError, match="not implemented"):
        bench.load_benchmark("planned")


def test_registry_rejects_module_without_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench.REGISTRY, "broken", "d2vlm_ray.bench.common")
    with pytest.raises(TypeError, match="lacks"):
        bench.load_benchmark("broken")


@pytest.mark.parametrize("name", ["nope", "planned"])
def test_unknown_or_unimplemented_name_exits_2(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(bench.REGISTRY, "planned", None)  # a registered name without a module yet
    assert bench_job.main([name, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert name in err and ("unknown" in err or "not implemented" in err)
    assert not any(tmp_path.iterdir())


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_job.main(["decode", "--out-dir", str(tmp_path), "repeats=0"]) == 2
    assert bench_job.main(["decode", "--out-dir", str(tmp_path), "cases=[long_gop, nope]"]) == 2
    assert bench_job.main(["decode", "--out-dir", str(tmp_path), "no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="repeats"):
        from_dict(decode.Config, {"repeats": 0})


def test_decode_report_schema(tiny_run: dict) -> None:
    assert tiny_run["rc"] == 0
    (path,) = tiny_run["reports"]
    report = json.loads(path.read_text())
    assert tuple(report) == common.REPORT_KEYS
    assert report["schema_version"] == common.SCHEMA_VERSION and report["benchmark"] == "decode"
    assert report["machine"]["cpu_count"] >= 1 and "load_avg_start" in report["machine"]
    assert "load_avg_end" in report["machine"]
    assert {"av", "numpy"} <= set(report["versions"])
    assert report["config"]["repeats"] == 1 and report["config"]["long_gop"]["width"] == 96
    assert (path.parent / "config.yaml").is_file()

    result = report["result"]
    assert set(result["cases"]) == {"long_gop", "short_gop"}
    for case, res in result["cases"].items():
        assert set(res["paths"]) == set(decode.PATHS)
        # 3 s at 1 fps: 3 sampled frames per clip.
        assert res["n_sampled"] == 3 * (1 if case == "long_gop" else 2)
        for name, p in res["paths"].items():
            assert len(p["wall_s"]) == len(p["cpu_s"]) == 1
            assert p["median_wall_s"] == p["wall_s"][0] > 0
            assert p["frames_per_s"] == pytest.approx(res["n_sampled"] / p["median_wall_s"], rel=1e-3)
            assert p["decoded_frames"] >= res["n_sampled"]
            assert p["decoded_count"] == ("inferred from decord's access pattern" if name == "official" else "counted")
        assert res["identical_frames"] == {"project_vs_official": True, "pyav_all_vs_official": True}
        assert res["official_rule_frames"] is True
        assert res["ratio_project_vs_official"] == pytest.approx(
            res["paths"]["project"]["frames_per_s"] / res["paths"]["official"]["frames_per_s"], rel=1e-2
        )
    long_paths = result["cases"]["long_gop"]["paths"]
    # Decode-all decodes every frame of the 3 s, 30 fps clip.
    assert long_paths["pyav_all"]["decoded_frames"] == 90
    # The project's path skips the frames after the last sample and non-reference B-frames.
    assert long_paths["project"]["decoded_frames"] < long_paths["official"]["decoded_frames"]
    assert result["checks"] == {
        "long_gop_identical_frames": True,
        "long_gop_official_rule_frames": True,
        "short_gop_identical_frames": True,
        "short_gop_official_rule_frames": True,
    }
    assert result["summary"]["target_ratio"] == 2.0 and isinstance(result["summary"]["target_met"], bool)


def test_markdown_line(tiny_run: dict) -> None:
    report = json.loads(tiny_run["reports"][0].read_text())
    line = report["markdown"]
    assert "\n" not in line and line.startswith("- ") and "**decode**" in line
    assert "CPUs, load" in line
    assert "long-GOP 3 s 96x64 30 fps GOP 40" in line and "short-GOP 2x3 s 64x48 3 fps GOP 6" in line
    assert "identical frames" in line and "FRAMES DIFFER" not in line
    ratio = report["result"]["cases"]["long_gop"]["ratio_project_vs_official"]
    assert f"**{ratio:.2f}x**" in line
    assert ("met" in line) and ("Target ≥2x" in line)


def test_append_only_when_asked(tiny_run: dict) -> None:
    root: Path = tiny_run["root"]
    md: Path = tiny_run["md"]
    assert not md.exists()  # the module's run had no --append
    args = ["decode", "--out-dir", str(root / "out2"), "--benchmarks-md", str(md), "--append", *TINY]
    args += [f"cache_dir={root / 'clips'}", "cases=[short_gop]", "short_gop.n_clips=1"]
    assert bench_job.main(args) == 0
    text = md.read_text()
    assert text.startswith(common.BENCHMARKS_MD_HEADER)
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(lines) == 1 and "short-GOP 1x3 s" in lines[0]
    report = json.loads(next((root / "out2").glob("decode-*/decode.json")).read_text())
    assert lines[0] == report["markdown"]
    # A second append keeps the header once and adds a line.
    common.append_markdown(md, "- another line")
    assert md.read_text().count("# Benchmarks") == 1 and md.read_text().endswith("- another line\n")
    with pytest.raises(ValueError, match="single line"):
        common.append_markdown(md, "two\nlines")


def test_frame_mismatch_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_run: dict) -> None:
    real = decode._PATH_FUNCS["project"]

    def shifted(path: str, sample_fps: float) -> tuple[np.ndarray, int]:
        frames, n = real(path, sample_fps)
        return frames[::-1].copy(), n

    monkeypatch.setitem(decode._PATH_FUNCS, "project", shifted)
    args = ["decode", "--out-dir", str(tmp_path), *TINY, f"cache_dir={tiny_run['root'] / 'clips'}", "cases=[long_gop]"]
    assert bench_job.main(args) == 1
    report = json.loads(next(tmp_path.glob("decode-*/decode.json")).read_text())
    assert report["result"]["checks"]["long_gop_identical_frames"] is False
    assert "FRAMES DIFFER" in report["markdown"]


def test_time_paths_interleaves_and_counts() -> None:
    calls: list[str] = []
    timings = common.time_paths(
        {"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, repeats=2, warmup=1
    )
    assert calls == ["a", "b", "b", "a", "a", "b"]  # the order rotates every round
    assert len(timings["a"].wall_s) == len(timings["b"].cpu_s) == 2
    assert timings["a"].output == 1 and timings["b"].output == 2
    with pytest.raises(ValueError, match="repeats"):
        common.time_paths({"a": lambda: None}, repeats=0)


def test_decord_access_pattern_model() -> None:
    # GOP 10, targets every 3 frames up to 27: sequential inside a GOP, seek at each new GOP.
    keys = np.array([0, 10, 20])
    # 0 (1) | 3 (1..3 = 3) | 6 (3) | 9 (3) | 12: new GOP -> 10..12 (3) | 15 (3) | 18 (3) | 21 -> 20..21 (2) | 24 (3) | 27 (3)
    assert decode.decord_decoded_frames(np.arange(0, 30, 3), keys, 30) == 1 + 3 + 3 + 3 + 3 + 3 + 3 + 2 + 3 + 3
    # Repeats are copied, not decoded again; a backwards target seeks to its keyframe.
    assert decode.decord_decoded_frames(np.array([5, 5, 2]), keys, 30) == 6 + 3
    np.testing.assert_array_equal(decode.official_indices(10, 30.0, 1.0), [0])
    np.testing.assert_array_equal(decode.official_indices(90, 30.0, 1.0), [0, 30, 60])
    np.testing.assert_array_equal(decode.official_indices(7, 2.5, 1.0), [0, 2, 5])


def test_decode_video_counted_matches_decode_video(tiny_run: dict) -> None:
    from d2vlm_ray.data.video import decode_video, decode_video_counted

    clip = next((tiny_run["root"] / "clips").glob("long_gop_*.mp4"))
    video, n_decoded = decode_video_counted(str(clip), 1.0)
    np.testing.assert_array_equal(video.frames, decode_video(str(clip), 1.0).frames)
    # 3 sampled frames of a 90-frame clip: the decoder stops after the last one and skips non-reference frames.
    assert n_decoded is not None and len(video.frames) <= n_decoded < 90
    video_decord, n_decord = decode_video_counted(str(clip), 1.0, backend="decord")
    assert n_decord is None
    np.testing.assert_array_equal(video_decord.frames, video.frames)
