"""Cache-building pipeline: manifests, the Ray-free row bodies, the dry run, and two runs on local Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from d2vlm_ray.cache import FeatureCache, SharedRootError, entry_nbytes, video_sha256
from d2vlm_ray.config import ConfigError, ModelConfig, from_dict, load_config
from d2vlm_ray.data.synthetic import generate_benchmark
from d2vlm_ray.data.video import VideoDecodeError, decode_video
from d2vlm_ray.pipelines.build_cache import (
    BuildCacheConfig,
    decode_row,
    encode_row,
    lookup_video,
    read_manifest,
)
from jobs import build_cache as job
from tests.helpers_decode import write_damaged_clip

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "jobs" / "configs" / "build_cache_tiny.yaml"
N_VIDEOS = 10


class FakeEncoder:
    encoder_id = "fake/v1"
    transform_id = "fake/8"
    image_size = 8

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(frames), dtype=torch.float32).mean(dim=(1, 2))  # [F, 3]
        return x[:, None, :].expand(-1, 4, -1) / 255.0  # [F, 4, 3]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten short, small synthetic videos, a corrupt file, a damaged one, and manifests over them."""
    root = tmp_path_factory.mktemp("bench")
    generate_benchmark(root, N_VIDEOS, seed=3, fractions=(1.0, 0.0, 0.0), fps=4, size=32)
    videos = sorted(str(p) for p in (root / "videos").glob("*.mp4"))
    (root / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 50)
    write_damaged_clip(root / "damaged.mp4")
    (root / "good.txt").write_text("# ten synthetic videos\n" + "\n".join(videos) + "\n")
    (root / "mixed.txt").write_text("\n".join([*videos, str(root / "bad.mp4"), "missing.mp4", videos[0]]) + "\n")
    (root / "damaged.txt").write_text("\n".join([*videos, str(root / "bad.mp4"), str(root / "damaged.mp4")]) + "\n")
    return root


def _cfg(bench: Path, tmp_path: Path, *extra: str) -> BuildCacheConfig:
    return load_config(BuildCacheConfig, TINY_YAML, [
        f"manifest={bench / 'annotations' / 'train.json'}", f"video_root={bench}", f"run_dir={tmp_path / 'run'}",
        f"features.cache_root={tmp_path / 'cache'}", *extra,
    ])


def test_read_manifest_formats(bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evi, malformed = read_manifest(str(bench / "annotations" / "train.json"), video_root=str(bench))
    assert len(evi) == N_VIDEOS and malformed == 0 and all(Path(p).is_file() for p in evi)
    monkeypatch.chdir(bench.parent)  # relative manifest and root, as in the job's YAML
    relative, _ = read_manifest(f"{bench.name}/annotations/train.json", "evi", bench.name)
    assert [str(bench.parent / p) for p in relative] == evi
    listed, _ = read_manifest(str(bench / "mixed.txt"))
    assert len(listed) == N_VIDEOS + 2  # duplicate dropped, first-seen order kept
    assert listed[-1] == str(bench / "missing.mp4")  # relative to the manifest's folder
    (tmp_path / "list.json").write_text(json.dumps(["a.mp4", "s3://bucket/b.mp4"]))
    assert read_manifest(str(tmp_path / "list.json"), "list", "/videos")[0] == ["/videos/a.mp4", "s3://bucket/b.mp4"]
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_manifest(str(tmp_path / "nope.txt"))
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        read_manifest(str(tmp_path / "dict.json"))


def test_config_is_strict(bench: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="decode_taks"):
        _cfg(bench, tmp_path, "decode_taks=2")
    with pytest.raises(ConfigError, match="fps"):
        _cfg(bench, tmp_path, "features.fps=0")
    assert job.main(["--config", str(TINY_YAML), "manifest_format=xml"]) == 2


def test_row_bodies_without_ray(bench: Path, tmp_path: Path) -> None:
    cache = FeatureCache(str(tmp_path / "cache"))
    enc = FakeEncoder()
    ids = {"fps": 1.0, "max_frames": 0, "transform_id": enc.transform_id, "encoder_id": enc.encoder_id}
    video = str(next((bench / "videos").glob("*.mp4")))

    missing = lookup_video(str(bench / "missing.mp4"), cache, **ids)
    assert (missing["status"], missing["reason"], missing["stage"]) == ("failed", "not_found", "lookup")
    row = lookup_video(video, cache, **ids)
    assert row["status"] == "todo" and row["sha256"] == video_sha256(video)

    decoded = decode_row(row, fps=1.0, max_frames=0)
    assert decoded["status"] == "decoded" and decoded["frames"].shape[0] == len(decoded["timestamps_s"])
    out = encode_row(decoded, enc, cache, fps=1.0, max_frames=0)
    assert out["status"] == "computed" and out["n_frames"] == decoded["frames"].shape[0] and out["bytes"] > 0
    assert "frames" not in out
    assert lookup_video(video, FeatureCache(str(tmp_path / "cache")), **ids)["status"] == "cached"

    bad = decode_row({**lookup_video(str(bench / "bad.mp4"), cache, **ids)}, fps=1.0, max_frames=0)
    assert bad["status"] == "failed" and bad["stage"] == "decode" and bad["reason"] in ("corrupt", "no_video_stream")
    passed = encode_row(bad, enc, cache, fps=1.0, max_frames=0)
    assert passed["status"] == "failed" and passed["reason"] == bad["reason"]


def test_dry_run_prints_projected_bytes(bench: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vision = from_dict(ModelConfig, {"preset": "tiny"}).vision
    num_patches = (vision.image_size // vision.patch_size) ** 2
    videos = sorted((bench / "videos").glob("*.mp4"))
    expected = sum(entry_nbytes(len(decode_video(str(v), 1.0).timestamps_s), num_patches, vision.hidden_size)
                   for v in videos)
    args = ["--config", str(TINY_YAML), "--dry-run", f"manifest={bench / 'mixed.txt'}",
            f"run_dir={tmp_path / 'run'}", f"features.cache_root={tmp_path / 'cache'}", "features.cache_quota_bytes=1000"]
    assert job.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"projected cache bytes: {expected} ")
    projection = json.loads(lines[-1])
    assert projection["videos"] == N_VIDEOS + 2 and projection["projected_bytes"] == expected
    assert projection["unreadable"]["not_found"] == 1 and sum(projection["unreadable"].values()) == 2
    assert projection["fits_quota"] is False
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # no work done


@pytest.mark.ray
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "extra",
    [
        ("decode_tasks=1", "decode_num_cpus=0.5", "encode_num_cpus=0.5"),
        ("decode_in_encoder=true", "encode_actors=2", "encode_num_cpus=0.5"),
    ],
    ids=["decode-tasks", "decode-in-encoder"],
)
def test_pipeline_runs_twice_second_all_hits(
    ray_cluster: None, bench: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...]
) -> None:
    from d2vlm_ray.pipelines.build_cache import build_cache

    start = time.perf_counter()
    first = build_cache(_cfg(bench, tmp_path, f"manifest={bench / 'mixed.txt'}", *extra))
    first_s = time.perf_counter() - start
    assert first["videos"] == N_VIDEOS + 2 and first["computed"] == N_VIDEOS and first["hits"] == 0
    assert first["failed"] == 2 and first["failed_by_reason"]["not_found"] == 1
    assert sum(first["failed_by_reason"].values()) == 2 and first["bytes_written"] > 0
    failures = pq.read_table(tmp_path / "run" / "failures.parquet").to_pylist()
    by_source = {Path(r["source"]).name: r for r in failures}
    assert set(by_source) == {"bad.mp4", "missing.mp4"}
    bad = by_source["bad.mp4"]
    assert bad["stage"] == "decode" and bad["reason"] in ("corrupt", "no_video_stream")
    summary_file = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary_file["computed"] == N_VIDEOS and (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "checkpoint" / "config.json").is_file()  # tiny preset initialised
    sealed = sorted((tmp_path / "cache" / "entries").glob("*/*.json"))
    assert len(sealed) == N_VIDEOS
    mtimes = [p.stat().st_mtime_ns for p in sealed]

    start = time.perf_counter()
    second = build_cache(_cfg(bench, tmp_path, f"manifest={bench / 'good.txt'}", *extra))
    second_s = time.perf_counter() - start
    assert second["hits"] == N_VIDEOS and second["decoded"] == 0 and second["computed"] == 0
    assert second["bytes_written"] == 0 and second["failed"] == 0
    assert [p.stat().st_mtime_ns for p in sealed] == mtimes  # nothing rewritten

    from d2vlm_ray.model.checkpoint import load_frame_encoder

    encoder = load_frame_encoder(tmp_path / "run" / "checkpoint")
    video = str(sorted((bench / "videos").glob("*.mp4"))[0])
    from d2vlm_ray.cache import features_for_video

    feats, hit = features_for_video(FeatureCache(str(tmp_path / "cache")), encoder, video)
    vision = encoder.model.config
    assert hit and feats.patches.shape[1:] == ((vision.image_size // vision.patch_size) ** 2, vision.hidden_size)
    with capsys.disabled():
        print(f"\nbuild_cache on {N_VIDEOS} videos: first run {first_s:.1f} s, second run {second_s:.1f} s "
              f"(stages {first['stage_seconds']} / {second['stage_seconds']})")

    with pytest.raises(SharedRootError, match="memory://"):
        build_cache(_cfg(bench, tmp_path, "features.cache_root=memory://cache"))


@pytest.mark.ray
@pytest.mark.slow  # two pipeline runs, ~30 s on 2 cores; the row bodies are tested without Ray in test_decode_warnings
@pytest.mark.timeout(240)
def test_pipeline_lists_partial_decodes_with_their_warnings(ray_cluster: None, bench: Path, tmp_path: Path) -> None:
    """Every file is computed, partial (with its warnings) or a typed failure, also on a rerun."""
    from d2vlm_ray.pipelines.build_cache import build_cache

    damaged = str(bench / "damaged.mp4")
    video = str(sorted((bench / "videos").glob("*.mp4"))[0])
    (tmp_path / "few.txt").write_text("\n".join([video, str(bench / "bad.mp4"), damaged]) + "\n")
    manifest = f"manifest={tmp_path / 'few.txt'}"
    try:
        decoded = decode_video(damaged, 1.0)
    except VideoDecodeError as exc:
        pytest.fail(f"the damaged clip no longer decodes at all ({exc.reason}); damage it less")
    assert decoded.warnings, "the damaged clip decodes without a warning; damage it more"

    def failures() -> dict[str, dict]:
        rows = pq.read_table(tmp_path / "run" / "failures.parquet").to_pylist()
        return {Path(r["source"]).name: r for r in rows}

    # A policy that accepts any loss: the damaged file is computed from what could be decoded.
    lenient = build_cache(_cfg(bench, tmp_path, manifest, "features.max_missing_frames_fraction=1.0"))
    assert (lenient["videos"], lenient["computed"], lenient["partial"], lenient["failed"]) == (3, 1, 1, 1)
    assert set(lenient["failed_by_reason"]) <= {"corrupt", "no_video_stream"}
    listed = failures()
    assert listed["damaged.mp4"]["status"] == "partial" and listed["damaged.mp4"]["warnings"] == decoded.warnings
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["partial"] == 1

    # A rerun under the default policy still lists the cached partial entry, or refuses it when it lost too much.
    strict = build_cache(_cfg(bench, tmp_path, manifest, "features.max_missing_frames_fraction=0.1"))
    assert (strict["computed"], strict["partial"], strict["decoded"]) == (0, 0, 1)  # only bad.mp4 is decoded again
    listed = failures()
    assert listed["damaged.mp4"]["warnings"] == decoded.warnings
    if decoded.missing_fraction > 0.1:
        assert (listed["damaged.mp4"]["status"], listed["damaged.mp4"]["reason"]) == ("failed", "partial_decode")
        assert (strict["hits"], strict["hits_partial"], strict["failed"]) == (1, 0, 2)
    else:
        assert listed["damaged.mp4"]["status"] == "partial"
        assert (strict["hits"], strict["hits_partial"], strict["failed"]) == (2, 1, 1)
