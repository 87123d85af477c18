"""Feature cache: round trip, corruption and sidecar rules, concurrent writers, LRU bound, quota, shared root."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from d2vlm_ray.cache import (
    CachedFeatures,
    FeatureCache,
    SharedRootError,
    entry_nbytes,
    FeatureSpec,
    features_for_video,
    validate_shared_root,
    storage_key,
    video_sha256,
)
from d2vlm_ray.cache.store import SharedStore
from d2vlm_ray.data.synthetic import plan_scene, render_scene
from d2vlm_ray.types import FeatureKey

P, C = 6, 8  # patches per frame, patch width of the fake encoder


class CountingEncoder:
    """A deterministic stand-in for the frame encoder that counts its calls."""

    encoder_id = "fake/mean-pool/v1"
    transform_id = "fake/16"
    image_size = 16

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = torch.as_tensor(np.asarray(frames), dtype=torch.float32) / 255.0  # [F, H, W, 3]
        pooled = x.mean(dim=(1, 2))  # [F, 3]
        ramp = torch.linspace(0.5, 1.5, P * C).reshape(1, P, C)
        return pooled.sum(dim=1).reshape(-1, 1, 1) * ramp  # [F, P, C]


def _key(i: int) -> FeatureKey:
    return FeatureKey(video_sha256=f"{i:064x}", fps=1.0, transform_id="t/16", encoder_id="e/abc")


def _features(seed: int, n_frames: int = 5) -> CachedFeatures:
    gen = torch.Generator().manual_seed(seed)
    return CachedFeatures(
        patches=torch.randn(n_frames, P, C, generator=gen) * 3.0,
        timestamps_s=np.array([0.0, 0.1, 1.0 / 3.0, 2.7182818, 7.0][:n_frames]) + seed,
        duration_s=7.25 + seed,
        source_fps=29.97,
    )


def _data_files(root: Path) -> list[Path]:
    return sorted(root.glob("entries/*/*/*.parquet"))


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    render_scene(plan_scene(seed=0, idx=5), path, fps=4, size=32)
    return str(path)


def test_round_trip_fp16_values_and_exact_timestamps(tmp_path: Path) -> None:
    feats = _features(1)
    FeatureCache(str(tmp_path)).put(_key(1), feats)
    reader = FeatureCache(str(tmp_path))  # a fresh process's view: nothing in memory
    got = reader.get(_key(1))
    assert got is not None and reader.stats()["hits_shared"] == 1
    assert got.patches.dtype == torch.float32 and got.patches.shape == (5, P, C)
    torch.testing.assert_close(got.patches, feats.patches, rtol=1e-3, atol=1e-3)
    assert not torch.equal(got.patches, feats.patches), "fp16 storage should round"
    np.testing.assert_array_equal(got.timestamps_s, feats.timestamps_s)
    assert (got.duration_s, got.source_fps) == (feats.duration_s, feats.source_fps)
    assert reader.get(_key(2)) is None and reader.stats()["misses_absent"] == 1

    exact = FeatureCache(str(tmp_path / "f32"), storage_dtype="float32")
    exact.put(_key(1), feats)
    assert torch.equal(FeatureCache(str(tmp_path / "f32")).get(_key(1)).patches, feats.patches)


def test_put_rejects_bad_features(tmp_path: Path) -> None:
    cache = FeatureCache(str(tmp_path))
    with pytest.raises(ValueError, match="timestamps_s"):
        cache.put(_key(0), CachedFeatures(torch.zeros(3, P, C), np.zeros(2), 1.0, 1.0))
    with pytest.raises(ValueError, match="float32"):
        cache.put(_key(0), CachedFeatures(torch.full((1, P, C), 1e6), np.zeros(1), 1.0, 1.0))
    with pytest.raises(ValueError, match="storage_dtype"):
        FeatureCache(str(tmp_path), storage_dtype="int8")
    assert not _data_files(tmp_path)


def test_features_for_video_hits_after_first_call(tmp_path: Path, video: str) -> None:
    enc = CountingEncoder()
    cache = FeatureCache(str(tmp_path))
    first, hit1 = features_for_video(cache, enc, video, fps=2.0)
    second, hit2 = features_for_video(FeatureCache(str(tmp_path)), enc, video, fps=2.0)
    assert (hit1, hit2) == (False, True) and enc.calls == 1
    assert torch.equal(first.patches, second.patches), "a miss returns what a later hit returns"
    np.testing.assert_array_equal(first.timestamps_s, second.timestamps_s)
    _, hit3 = features_for_video(cache, enc, video, fps=1.0)  # fps is part of the key
    assert not hit3 and enc.calls == 2
    assert video_sha256(video) == hashlib.sha256(Path(video).read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError):
        video_sha256(str(tmp_path / "missing.mp4"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "sidecar"])
def test_corrupt_entry_is_a_counted_miss_and_is_recomputed(tmp_path: Path, video: str, damage: str) -> None:
    enc = CountingEncoder()
    good, _ = features_for_video(FeatureCache(str(tmp_path)), enc, video)
    (data,) = _data_files(tmp_path)
    raw = bytearray(data.read_bytes())
    if damage == "flip":
        mid = len(raw) // 2
        raw[mid : mid + 4] = bytes(b ^ 0xFF for b in raw[mid : mid + 4])
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(bytes(raw[:-100]))
    else:
        next(tmp_path.glob("entries/*/*.json")).write_text("{not json")

    cache = FeatureCache(str(tmp_path))
    again, hit = features_for_video(cache, enc, video)
    stats = cache.stats()
    assert not hit and enc.calls == 2
    assert stats["misses_corrupt"] == 1 and stats["puts"] == 1
    torch.testing.assert_close(again.patches, good.patches)
    fresh = FeatureCache(str(tmp_path))
    key = storage_key(video_sha256(video), again.n_sampled, FeatureSpec(), enc.transform_id, enc.encoder_id)
    assert fresh.get(key) is not None and fresh.stats()["hits_shared"] == 1


def test_entry_without_sidecar_is_a_miss(tmp_path: Path) -> None:
    FeatureCache(str(tmp_path)).put(_key(3), _features(3))
    next(tmp_path.glob("entries/*/*.json")).unlink()  # the writer died before sealing
    cache = FeatureCache(str(tmp_path))
    assert _data_files(tmp_path)
    assert cache.get(_key(3)) is None and not cache.contains(_key(3))
    assert cache.stats()["misses_unsealed"] == 1 and cache.stats()["misses_corrupt"] == 0


def test_interleaved_writers_leave_a_valid_entry(tmp_path: Path) -> None:
    """A writes data, B writes data and seals, then A seals: the entry must be A's, intact."""
    store_a, store_b = SharedStore(str(tmp_path)), SharedStore(str(tmp_path))
    b_done = threading.Event()
    write_a = store_a._write

    def paused_write(path: str, data: bytes) -> None:
        if path.endswith(".json"):  # A's sidecar waits until B has finished everything
            assert b_done.wait(10)
        write_a(path, data)

    store_a._write = paused_write  # type: ignore[method-assign]
    cache_a, cache_b = FeatureCache(str(tmp_path)), FeatureCache(str(tmp_path))
    cache_a.store = store_a
    cache_b.store = store_b
    feats_a, feats_b = _features(10), _features(11)
    thread = threading.Thread(target=cache_a.put, args=(_key(7), feats_a))
    thread.start()
    while not _data_files(tmp_path):
        thread.join(0.01)
    cache_b.put(_key(7), feats_b)
    b_done.set()
    thread.join(10)

    assert len(_data_files(tmp_path)) == 2  # B's data is now an orphan
    got = FeatureCache(str(tmp_path)).get(_key(7))
    assert got is not None
    torch.testing.assert_close(got.patches, feats_a.patches, rtol=1e-3, atol=1e-3)
    report = FeatureCache(str(tmp_path)).store.compact_index(orphan_grace_s=0.0)
    assert report["orphans_deleted"] == 1 and report["entries"] == 1
    assert FeatureCache(str(tmp_path)).get(_key(7)) is not None


def test_concurrent_writer_threads_of_one_key(tmp_path: Path) -> None:
    writers = [_features(20 + i) for i in range(8)]
    barrier = threading.Barrier(len(writers))

    def write(feats: CachedFeatures) -> None:
        cache = FeatureCache(str(tmp_path))
        barrier.wait()
        for _ in range(5):
            cache.put(_key(9), feats)

    threads = [threading.Thread(target=write, args=(f,)) for f in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    reader = FeatureCache(str(tmp_path))
    got = reader.get(_key(9))
    assert got is not None and reader.stats()["misses_corrupt"] == 0
    matches = [torch.allclose(got.patches, f.patches, rtol=1e-3, atol=1e-3) for f in writers]
    assert sum(matches) == 1
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_memory_tier_is_bounded_and_lru(tmp_path: Path) -> None:
    item_bytes = 5 * P * C * 2 + 5 * 8  # fp16 patches + float64 timestamps
    cache = FeatureCache(str(tmp_path), memory_bytes=int(2.5 * item_bytes))
    cache.put(_key(0), _features(0))
    cache.put(_key(1), _features(1))
    assert cache.get(_key(0)) is not None  # 0 becomes most recently used
    cache.put(_key(2), _features(2))  # evicts 1, the least recently used
    stats = cache.stats()
    assert stats["memory_entries"] == 2 and stats["memory_evictions"] == 1
    assert stats["memory_bytes_used"] == 2 * item_bytes <= cache.memory_bytes
    for i in (0, 2, 1):
        assert cache.get(_key(i)) is not None
    stats = cache.stats()
    assert (stats["hits_memory"], stats["hits_shared"]) == (3, 1)  # only 1 came from the shared tier
    for i in range(3, 10):
        cache.put(_key(i), _features(i))
        assert cache.stats()["memory_bytes_used"] <= cache.memory_bytes

    tiny = FeatureCache(str(tmp_path), memory_bytes=item_bytes - 1)  # an entry larger than the budget
    tiny.get(_key(0))
    assert tiny.stats()["memory_entries"] == 0


def test_shared_quota_evicts_least_recently_accessed(tmp_path: Path) -> None:
    probe = FeatureCache(str(tmp_path / "probe"))
    probe.put(_key(0), _features(0))
    entry = sum(p.stat().st_size for p in (tmp_path / "probe" / "entries").rglob("*") if p.is_file())

    root = str(tmp_path / "quota")
    quota = int(2.5 * entry)
    writer = FeatureCache(root, memory_bytes=0, quota_bytes=quota, touch_interval_s=0.0)
    writer.put(_key(0), _features(0))
    writer.put(_key(1), _features(1))
    assert writer.get(_key(0)) is not None  # 0 accessed after 1 was written: 1 is now the LRU
    writer.put(_key(2), _features(2))
    assert writer.stats()["shared_evictions"] == 1
    reader = FeatureCache(root, memory_bytes=0)
    assert reader.get(_key(1)) is None and reader.stats()["misses_absent"] == 1
    assert reader.get(_key(0)) is not None and reader.get(_key(2)) is not None
    _, used = reader.store.scan()
    assert used <= quota

    driver = FeatureCache(root, quota_bytes=int(1.5 * entry))
    evicted = driver.enforce_quota()
    assert evicted == [_key(0).digest()] or evicted == [_key(2).digest()]
    assert driver.store.scan()[1] <= int(1.5 * entry)
    index = driver.compact_index()
    assert index["entries"] == 1


def test_entry_nbytes_matches_phi3_mini_figure() -> None:
    per_frame = entry_nbytes(1, 256, 1408)
    assert per_frame == 256 * 1408 * 2 + 8  # ~704 KiB
    assert 240e6 < entry_nbytes(350, 256, 1408) < 260e6


def test_validate_shared_root() -> None:
    for root in ("memory://cache", "memory://"):
        validate_shared_root(root, 1)
        with pytest.raises(SharedRootError, match="memory://"):
            validate_shared_root(root, 2)
    for root in ("/data/cache", "runs/cache", "file:///data/cache"):
        validate_shared_root(root, 1)
        with pytest.raises(SharedRootError, match="node-local"):
            validate_shared_root(root, 3)
        validate_shared_root(root, 3, shared_filesystem=True)
    validate_shared_root("s3://bucket/cache", 8)
    validate_shared_root("gs://bucket/cache", 8)
    with pytest.raises(ValueError, match="num_nodes"):
        validate_shared_root("s3://bucket/cache", 0)


def test_cache_pickles_with_settings_only(tmp_path: Path) -> None:
    import pickle

    cache = FeatureCache(str(tmp_path), memory_bytes=1234, quota_bytes=10_000, storage_dtype="float32")
    cache.put(_key(0), _features(0))
    clone = pickle.loads(pickle.dumps(cache))
    assert (clone.root, clone.memory_bytes, clone.quota_bytes, clone.storage_dtype) == (
        str(tmp_path), 1234, 10_000, "float32")
    assert clone.stats()["puts"] == 0 and clone.get(_key(0)) is not None
