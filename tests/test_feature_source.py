"""One feature source: keys hold the frame cap applied, each video is hashed once.

The cheap tests use a stand-in encoder; the end-to-end ones use the tiny checkpoint and
the real build / train / evaluate / serve paths. The Serve test builds the cache exactly
as the quickstart configures it and asks the Serve app (with its own 128-frame cap) for
a cached video.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import requests
import torch

from d2vlm_ray.cache import (
    FeatureCache,
    FeatureSource,
    FeatureSpec,
    VideoManifest,
    content_hash_counts,
    lookup_keys,
    manifest_root,
    storage_key,
)
from d2vlm_ray.config import ModelConfig, from_dict, to_dict
from d2vlm_ray.data.testclips import write_barcode_clip
from d2vlm_ray.model.checkpoint import init_checkpoint, load_frame_encoder

P = 4


class CountingEncoder:
    """A stand-in frame encoder: per-frame RGB means over ``P`` patches; counts its calls."""

    encoder_id = "fake/mean/v1"
    transform_id = "fake/8"
    image_size = 8

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = torch.as_tensor(np.asarray(frames), dtype=torch.float32).mean(dim=(1, 2))  # [F, 3]
        return x[:, None, :].expand(-1, P, -1) / 255.0  # [F, P, C]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("source_clips")
    write_barcode_clip(root / "six.mp4", fps=2, duration_s=6)  # 6 frames sampled at 1 fps
    write_barcode_clip(root / "ten.mp4", fps=2, duration_s=10)
    return {"six": root / "six.mp4", "ten": root / "ten.mp4"}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(init_checkpoint(from_dict(ModelConfig, {"preset": "tiny"}), tmp_path_factory.mktemp("ckpt"), seed=0))


def test_a_cap_the_video_does_not_reach_shares_the_uncapped_entry(clips: dict[str, Path], tmp_path: Path) -> None:
    root, video = str(tmp_path / "cache"), str(clips["six"])
    encoder = CountingEncoder()
    job = FeatureSource(encoder, FeatureSpec(max_frames=0, cache_root=root))
    built = job.features(video)
    assert not built.cache_hit and built.key.max_frames == 0 and built.features.num_frames == 6

    # Serve's cap of 128 (and a cap of exactly 6) do not thin a 6-frame sampling: same key, a hit.
    for cap in (128, 7):
        served = FeatureSource(encoder, FeatureSpec(max_frames=cap, cache_root=root)).features(video)
        assert served.cache_hit and served.key == built.key
        torch.testing.assert_close(served.features.patches, built.features.patches)
    assert encoder.calls == 1

    # A cap the video exceeds thins the frames: another key, decoded once, then a hit.
    capped = FeatureSource(encoder, FeatureSpec(max_frames=4, cache_root=root))
    first, again = capped.features(video), capped.features(video)
    assert not first.cache_hit and again.cache_hit and first.key.max_frames == 4 and first.features.num_frames == 4
    assert encoder.calls == 2
    # A decode that returns exactly the cap may have been thinned: it keeps the capped key.
    exact = FeatureSource(encoder, FeatureSpec(max_frames=6, cache_root=str(tmp_path / "other")))
    assert exact.features(video).key.max_frames == 6
    # The uncapped entry is not served to a reader whose cap it exceeds.
    assert FeatureSource(encoder, FeatureSpec(max_frames=5, cache_root=root)).find(built.key.video_sha256) is None


def test_a_capped_reader_does_not_download_an_uncapped_entry_it_cannot_use(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    """The frame count comes from the sidecar; the 10-frame entry is never read for a cap of 4."""
    root, video = str(tmp_path / "cache"), str(clips["ten"])
    encoder = CountingEncoder()
    FeatureSource(encoder, FeatureSpec(max_frames=0, cache_root=root)).features(video)
    capped = FeatureSource(encoder, FeatureSpec(max_frames=4, cache_root=root))
    capped.features(video)  # miss: decodes and writes the capped entry
    fresh = FeatureSource(encoder, FeatureSpec(max_frames=4, cache_root=root))  # a new process's cache
    assert fresh.features(video).cache_hit
    stats = fresh.cache.stats()
    assert stats["hits_shared"] == 1 and stats["memory_entries"] == 1


def test_entries_under_the_old_configured_cap_key_are_still_read(clips: dict[str, Path], tmp_path: Path) -> None:
    root, video = str(tmp_path / "cache"), str(clips["six"])
    encoder = CountingEncoder()
    feats = FeatureSource(encoder, FeatureSpec(), cache=None).features(video).features
    sha = VideoManifest(None).sha256(video)
    # Before the applied-cap rule, a server with a cap of 128 wrote a 6-frame video here.
    old_key = lookup_keys(sha, FeatureSpec(max_frames=128), encoder.transform_id, encoder.encoder_id)[-1]
    assert old_key.max_frames == 128
    FeatureCache(root).put(old_key, feats)
    server = FeatureSource(encoder, FeatureSpec(max_frames=128, cache_root=root))
    result = server.features(video)
    assert result.cache_hit and result.key == old_key and encoder.calls == 1
    assert storage_key(sha, 6, FeatureSpec(max_frames=128), encoder.transform_id, encoder.encoder_id).max_frames == 0


def test_manifest_hashes_once_per_version_and_again_after_an_edit(clips: dict[str, Path], tmp_path: Path) -> None:
    memory_video = f"memory://featsource-{uuid.uuid4().hex}/clip.mp4"
    fs = fsspec.filesystem("memory")
    fs.pipe(memory_video, clips["six"].read_bytes())
    local_video = tmp_path / "clip.mp4"
    local_video.write_bytes(clips["six"].read_bytes())
    root = manifest_root(str(tmp_path / "cache"))
    for video, name in ((memory_video, memory_video), (f"file://{local_video}", str(local_video.resolve()))):
        start = content_hash_counts().get(name, 0)
        digests = {VideoManifest(root).sha256(video) for _ in range(3)}  # three "processes", one manifest
        assert len(digests) == 1 and content_hash_counts()[name] == start + 1
    # A changed object (new bytes, new version) is hashed again, and the new hash is recorded.
    fs.pipe(memory_video, clips["ten"].read_bytes())
    changed = VideoManifest(root).sha256(memory_video)
    assert changed == VideoManifest(None).sha256(str(clips["ten"])) and changed not in digests
    assert content_hash_counts()[memory_video] == 2
    assert VideoManifest(root).sha256(memory_video) == changed and content_hash_counts()[memory_video] == 2


def test_build_train_evaluate_and_serve_hash_each_remote_video_once(
    clips: dict[str, Path], tiny_ckpt: Path, tmp_path: Path
) -> None:
    from d2vlm_ray.pipelines.build_cache import decode_row, encode_row, lookup_video
    from d2vlm_ray.pipelines.inference import PredictBatch, as_config
    from d2vlm_ray.serving.core import FeatureService, FeatureSettings
    from d2vlm_ray.train.data import TrainingFeatures

    bucket = f"memory://featsource-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    videos = []
    for name, path in clips.items():
        fs.pipe(f"{bucket}/videos/{name}.mp4", path.read_bytes())
        videos.append(f"{bucket}/videos/{name}.mp4")
    cache_root = f"{bucket}/cache"
    encoder = load_frame_encoder(tiny_ckpt)
    spec = FeatureSpec(cache_root=cache_root)
    start = {v: content_hash_counts().get(v, 0) for v in videos}

    # Build: the cache job's own row functions (its Ray Data stages without Ray).
    cache = FeatureCache(cache_root, memory_bytes=0)
    ids = {"fps": spec.fps, "max_frames": spec.max_frames, "transform_id": encoder.transform_id,
           "encoder_id": encoder.encoder_id}
    for video in videos:
        row = encode_row(decode_row(lookup_video(video, cache, **ids), fps=spec.fps, max_frames=spec.max_frames),
                         encoder, cache, fps=spec.fps, max_frames=spec.max_frames)
        assert row["status"] == "computed"

    # Train: two epochs through the training feature join, as a worker builds it.
    training_source = FeatureSource(encoder, spec)
    training = TrainingFeatures(training_source)
    for _ in range(2):
        for video in videos:
            training(video)
    assert training.stats()["feature_hits"] == 4 and training_source.counters()["decodes"] == 0

    # Evaluate: the prediction UDF's feature path.
    cfg = as_config({"checkpoint_dir": str(tiny_ckpt), "annotations": "unused.json", "output_dir": str(tmp_path),
                     "features": {"cache_root": cache_root}, "decoding": {"max_new_tokens": 2}})
    udf = PredictBatch(to_dict(cfg))
    for video in videos:
        assert udf.features({"video": video, "duration_s": 10.0}).cache_hit
    assert udf.source.counters()["decodes"] == 0

    # Serve: a FrameEncoder's feature service with Serve's own cap.
    service = FeatureService(encoder, FeatureCache(cache_root), FeatureSettings(max_frames=128))
    assert all(service.features(video).cache_hit for video in videos)
    assert service.counters()["decodes"] == 0

    hashed = {v: content_hash_counts().get(v, 0) - start[v] for v in videos}
    assert hashed == {v: 1 for v in videos}, f"each video must be streamed through sha256 once: {hashed}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_hits_the_cache_the_quickstart_build_wrote(ray_cluster: None, tmp_path: Path) -> None:
    from ray import serve

    from d2vlm_ray.data.synthetic import generate_benchmark
    from d2vlm_ray.pipelines.build_cache import BuildCacheConfig, build_cache
    from d2vlm_ray.serving.app import start_app, stop_app
    from jobs.quickstart import QuickstartConfig, build_cache_settings, serve_args

    cfg = from_dict(QuickstartConfig, {"out_dir": str(tmp_path / "quickstart"), "n_videos": 2})
    out = Path(cfg.out_dir)
    generate_benchmark(out / "synth", 2, seed=0, fractions=(1.0, 0.0, 0.0), size=32)
    videos = sorted((out / "synth" / "videos").glob("*.mp4"))
    manifest = out / "build_cache" / "manifest.txt"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("\n".join(str(v) for v in videos) + "\n")
    ckpt = init_checkpoint(cfg.model, out / "checkpoints" / "init", seed=cfg.seed)
    settings = build_cache_settings(cfg, out, manifest, ckpt)
    assert settings["features"]["max_frames"] == 0  # the jobs' "no cap"
    summary = build_cache(from_dict(BuildCacheConfig, settings))
    assert summary["computed"] == len(videos) and summary["failed"] == 0

    args = serve_args(cfg, out, str(ckpt))
    assert args["features"]["max_frames"] == 128  # Serve's cap, above every video's frame count
    name = "featsource-quickstart"
    url = start_app(args, port=_free_port(), name=name)
    try:
        response = requests.post(f"{url}/v1/ground", json={"video": str(videos[0]), "query": "what happens ?"},
                                 timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["cache"] == "hit"
        counters = serve.get_deployment_handle("FrameEncoder", app_name=name).counters.remote().result(timeout_s=60)
        assert counters["decodes"] == 0 and counters["encodes"] == 0, counters
        assert counters["cache_hits"] == 1 and counters["cache"]["hits"] >= 1
    finally:
        stop_app(name)


def test_configs_of_the_old_layout_say_where_each_key_went() -> None:
    from d2vlm_ray.config import ConfigError
    from d2vlm_ray.pipelines.build_cache import BuildCacheConfig
    from d2vlm_ray.serving.args import ServeArgs
    from d2vlm_ray.train.config import SFTJobConfig

    with pytest.raises(ConfigError, match=r"fps -> features\.fps.*cache\.root -> features\.cache_root"):
        from_dict(BuildCacheConfig, {"manifest": "m.txt", "fps": 2.0, "cache": {"root": "c"}})
    with pytest.raises(ConfigError, match=r"data\.cache_dir -> features\.cache_root"):
        from_dict(SFTJobConfig, {"data": {"train": "t.json", "cache_dir": "c"}})
    with pytest.raises(ValueError, match=r"cache_root -> features\.cache_root"):
        ServeArgs.model_validate({"checkpoint_dir": "x", "cache_root": "c", "max_frames": 128})
    with pytest.raises(ValueError, match="max_frames must be >= 1"):
        ServeArgs.model_validate({"checkpoint_dir": "x", "features": {"cache_root": "c", "max_frames": 0}})
    assert ServeArgs.model_validate({"checkpoint_dir": "x", "features": {"cache_root": "c"}}).features.max_frames == 128
