"""Decode warnings travel with the features: cache entry (and its hits), build_cache rows and
failures table, prediction records, the serving core and the answer CLI; the
``max_missing_frames_fraction`` policy turns a worse decode into ``partial_decode``.

A partial decode is made two ways (see ``helpers_decode``): ``lossy_decoder`` wraps the
real decoder and drops chosen sampled frames, recording them as the decoder does, so the
loss is exact whatever the decoder's resilience; ``write_damaged_clip`` overwrites bytes in
the middle of a real H.264 file, and what the decoder makes of it must arrive unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import d2vlm_ray.data.video as video_mod
from d2vlm_ray.cache import FeatureCache, FeatureSpec, features_for_video, storage_key, video_sha256
from d2vlm_ray.cache.store import SharedStore
from d2vlm_ray.config import ModelConfig, from_dict, to_dict
from d2vlm_ray.data.testclips import write_barcode_clip
from d2vlm_ray.data.video import VideoDecodeError, decode_video
from d2vlm_ray.model.checkpoint import init_checkpoint
from d2vlm_ray.pipelines.build_cache import (
    _write_failures,
    decode_row,
    encode_row,
    failure_table_rows,
    lookup_video,
)
from tests.helpers_decode import lossy_decoder, write_damaged_clip

P, C = 4, 3


class MeanEncoder:
    """A deterministic stand-in frame encoder: per-frame RGB means repeated over P patches."""

    encoder_id = "fake/mean/v1"
    transform_id = "fake/8"
    image_size = 8

    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(frames), dtype=torch.float32).mean(dim=(1, 2))  # [F, 3]
        return x[:, None, :].expand(-1, P, -1) / 255.0  # [F, P, C]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    write_barcode_clip(root / "ten.mp4", fps=2, duration_s=10)  # 10 frames sampled at 1 fps
    write_barcode_clip(root / "six.mp4", fps=2, duration_s=6)
    write_damaged_clip(root / "damaged.mp4")
    return {"ten": root / "ten.mp4", "six": root / "six.mp4", "damaged": root / "damaged.mp4", "root": root}


# --- cache -----------------------------------------------------------------------------------


def test_cache_entry_keeps_warnings_across_hits_and_reads_old_entries(
    clips: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(video_mod, "decode_video", lossy_decoder([3]))
    enc, root = MeanEncoder(), str(tmp_path / "cache")
    source = str(clips["ten"])
    feats, hit = features_for_video(FeatureCache(root), enc, source, max_missing_frames_fraction=0.1)
    assert not hit and feats.num_frames == 9 and feats.missing_timestamps_s == [3.0]
    assert any("1 of 10 sampled frames" in w for w in feats.warnings)

    cache = FeatureCache(root)  # a fresh process: the shared tier
    shared, hit = features_for_video(cache, enc, source, max_missing_frames_fraction=0.1)
    memory, hit_again = features_for_video(cache, enc, source, max_missing_frames_fraction=0.1)
    assert hit and hit_again and cache.stats()["hits_shared"] == 1 and cache.stats()["hits_memory"] == 1
    for got in (shared, memory):
        assert got.warnings == feats.warnings and got.missing_timestamps_s == [3.0]
    # The sidecar repeats them (a look-up that trusts the sidecar sees them) and the index lists them.
    key = storage_key(video_sha256(source), feats.n_sampled, FeatureSpec(), enc.transform_id, enc.encoder_id)
    digest = key.digest()
    sidecar = SharedStore(root).read_sidecar(digest)
    assert sidecar["warnings"] == feats.warnings and sidecar["missing_timestamps_s"] == [3.0]
    cache.compact_index()
    index = pq.read_table(tmp_path / "cache" / "index" / "index.parquet").to_pylist()
    assert index[0]["n_missing_frames"] == 1 and index[0]["warnings"] == feats.warnings

    # A reader with a stricter policy refuses the stored entry instead of serving it as clean.
    with pytest.raises(VideoDecodeError) as strict:
        features_for_video(FeatureCache(root), enc, source, max_missing_frames_fraction=0.05)
    assert strict.value.reason == "partial_decode" and "1 of 10" in strict.value.message

    # An entry written before warnings were stored (no fields in data or sidecar) reads as clean.
    store = SharedStore(root)
    _rewrite_without_warnings(store, digest)
    old = FeatureCache(root).get(key)
    assert old is not None and old.warnings == [] and old.missing_timestamps_s == []
    ids = {"fps": 1.0, "max_frames": 0, "transform_id": enc.transform_id, "encoder_id": enc.encoder_id}
    looked = lookup_video(source, FeatureCache(root), **ids)
    assert looked["status"] == "cached" and json.loads(looked["warnings_json"]) == []


def _rewrite_without_warnings(store: SharedStore, digest: str) -> None:
    """Turn an entry into the format of before this change: no warnings in data or sidecar."""
    import hashlib
    import io

    sidecar = store.read_sidecar(digest)
    data_path = f"{store.data_dir(digest)}/{sidecar['data']}"
    table = pq.read_table(data_path)
    meta_key = next(iter(table.schema.metadata))
    meta = json.loads(table.schema.metadata[meta_key])
    del meta["warnings"], meta["missing_timestamps_s"]
    sink = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({meta_key: json.dumps(meta).encode()}), sink, compression="none")
    data = sink.getvalue()
    Path(data_path).write_bytes(data)
    del sidecar["warnings"], sidecar["missing_timestamps_s"]
    sidecar |= {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
    Path(store.sidecar_path(digest)).write_text(json.dumps(sidecar))


def test_over_the_limit_is_a_typed_error_and_is_not_cached(
    clips: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(video_mod, "decode_video", lossy_decoder([1, 4]))
    cache = FeatureCache(str(tmp_path / "cache"))
    with pytest.raises(VideoDecodeError) as exc:
        features_for_video(cache, MeanEncoder(), str(clips["six"]), max_missing_frames_fraction=0.1)
    assert exc.value.reason == "partial_decode" and "2 of 6" in exc.value.message
    assert cache.stats()["puts"] == 0
    feats, _ = features_for_video(cache, MeanEncoder(), str(clips["six"]), max_missing_frames_fraction=0.5)
    assert feats.missing_timestamps_s == [1.0, 4.0]


# --- build_cache -----------------------------------------------------------------------------


def test_build_cache_rows_count_partial_and_fail_beyond_the_policy(
    clips: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = MeanEncoder()
    ids = {"fps": 1.0, "max_frames": 0, "transform_id": enc.transform_id, "encoder_id": enc.encoder_id}
    cache = FeatureCache(str(tmp_path / "cache"))
    monkeypatch.setattr(video_mod, "decode_video", lossy_decoder([3]))
    looked = lookup_video(str(clips["ten"]), cache, **ids)
    decoded = decode_row(looked, fps=1.0, max_frames=0, max_missing_frames_fraction=0.1)
    assert decoded["status"] == "decoded" and decoded["frames"].shape[0] == 9
    row = encode_row(decoded, enc, cache, fps=1.0, max_frames=0)
    assert row["status"] == "partial" and row["n_frames"] == 9 and row["bytes"] > 0
    assert json.loads(row["missing_timestamps_json"]) == [3.0]

    monkeypatch.undo()
    over = decode_row(lookup_video(str(clips["six"]), cache, **ids), fps=1.0, max_frames=0,
                      max_missing_frames_fraction=0.0)
    assert over["status"] == "decoded"  # a clean decode passes even a zero tolerance
    monkeypatch.setattr(video_mod, "decode_video", lossy_decoder([0, 1]))
    over = decode_row(lookup_video(str(clips["six"]), cache, **ids), fps=1.0, max_frames=0,
                      max_missing_frames_fraction=0.1)
    assert (over["status"], over["stage"], over["reason"]) == ("failed", "decode", "partial_decode")
    assert encode_row(over, enc, cache, fps=1.0, max_frames=0)["status"] == "failed"

    # A rerun finds the partial entry by its sidecar and still reports it.
    hit = lookup_video(str(clips["ten"]), FeatureCache(str(tmp_path / "cache")), **ids)
    assert hit["status"] == "cached" and json.loads(hit["missing_timestamps_json"]) == [3.0]
    # Under a stricter policy the same entry is a partial_decode failure, as a fresh decode would be.
    refused = lookup_video(str(clips["ten"]), cache, **ids, max_missing_frames_fraction=0.05)
    assert (refused["status"], refused["stage"], refused["reason"]) == ("failed", "lookup", "partial_decode")
    assert "1 of 10" in refused["message"] and json.loads(refused["warnings_json"]) == listed_warnings(hit)
    # At exactly the limit (1 of 10 under 0.1) the lookup keeps the entry, as the decode above did.
    assert lookup_video(str(clips["ten"]), cache, **ids, max_missing_frames_fraction=0.1)["status"] == "cached"
    listed = failure_table_rows([row, over, hit])
    assert [(r["status"], r["reason"]) for r in listed] == [
        ("partial", "partial"), ("failed", "partial_decode"), ("partial", "partial")
    ]
    assert listed[0]["warnings"] and listed[0]["warnings"] == listed[2]["warnings"]
    assert len(listed[1]["warnings"]) == 1 and "2 of 6" in listed[1]["warnings"][0]
    table = pq.read_table(_write_failures(listed, tmp_path)).to_pylist()
    assert [r["status"] for r in table] == ["partial", "failed", "partial"] and table[0]["warnings"] == listed[0]["warnings"]


def listed_warnings(row: dict) -> list[str]:
    return json.loads(row["warnings_json"])


# --- evaluation predictions --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(init_checkpoint(from_dict(ModelConfig, {"preset": "tiny"}), tmp_path_factory.mktemp("ckpt"), seed=0))


def test_predictions_carry_the_decode_warnings(
    clips: dict[str, Path], tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from d2vlm_ray.eval.report import compute_metrics
    from d2vlm_ray.pipelines.inference import PredictBatch, as_config

    monkeypatch.setattr(video_mod, "decode_video", lossy_decoder([3]))
    cfg = as_config({"checkpoint_dir": str(tiny_ckpt), "annotations": "unused.json", "output_dir": str(tmp_path),
                     "features": {"cache_root": str(tmp_path / "cache")}, "decoding": {"max_new_tokens": 4}})
    udf = PredictBatch(to_dict(cfg))

    def sample(sid: str, video: Path) -> tuple[str, dict, dict]:
        record = {"video": str(video), "duration_s": 10.0, "query": "when does it move ?", "task": "tvg",
                  "src_spans_s": []}
        base = {"idx": 0, "task": "tvg", "source": "test", "video": video.name, "duration": 10.0,
                "tgt": [1.0, 2.0], "q": record["query"], "sample_id": sid}
        return sid, record, base

    first = udf.predict([sample("0", clips["ten"])])[0]
    assert first["status"] == "ok" and first["n_frames"] == 9 and not first["cache_hit"]
    assert first["missing_timestamps_s"] == [3.0] and any("1 of 10" in w for w in first["warnings"])
    hit = PredictBatch(to_dict(cfg)).predict([sample("0", clips["ten"])])[0]
    assert hit["cache_hit"] and hit["warnings"] == first["warnings"] and hit["missing_timestamps_s"] == [3.0]

    monkeypatch.setattr(video_mod, "decode_video", lossy_decoder([0, 1]))
    failed = udf.predict([sample("1", clips["six"])])[0]
    assert failed["status"] == "failed" and failed["error"]["reason"] == "video:partial_decode"
    # The metric readers take the records with the extra keys as they are.
    metrics = compute_metrics([first, failed], "synthetic")
    assert metrics["counts"]["total"] == 2 and metrics["counts"]["failed"] == 1


# --- serving core and the answer CLI ------------------------------------------------------------


def test_feature_service_and_cli_report_warnings(
    clips: dict[str, Path], tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import d2vlm_ray.serving.core as core
    from d2vlm_ray.serving import offline
    from d2vlm_ray.serving.errors import BadVideo

    monkeypatch.setattr(video_mod, "decode_video", lossy_decoder([3]))
    settings = core.FeatureSettings(fps=1.0, max_frames=128)  # the CLI's default cap, so it hits this entry
    service = core.FeatureService.from_checkpoint(tiny_ckpt, cache_root=str(tmp_path / "cache"), settings=settings)
    miss = service.features(str(clips["ten"]))
    hit = service.features(str(clips["ten"]))
    assert not miss.cache_hit and hit.cache_hit
    for result in (miss, hit):
        ref = result.ref()
        assert ref.missing_timestamps_s == [3.0] and any("1 of 10" in w for w in ref.warnings)

    argv = [str(clips["ten"]), "what happens ?", "--ckpt", str(tiny_ckpt), "--cache-root", str(tmp_path / "cache"),
            "--max-new-tokens", "3", "--max-grounding-tokens", "2", "--device", "cpu"]
    assert offline.main(argv) == 0
    captured = capsys.readouterr()
    body = json.loads(captured.out)
    assert body["grounding"]["cache"] == "hit"
    assert body["missing_timestamps_s"] == [3.0] and body["grounding"]["missing_timestamps_s"] == [3.0]
    assert body["warnings"] == ref.warnings and body["grounding"]["warnings"] == ref.warnings
    assert "warning: 1 of 10 sampled frames" in captured.err and "3.000 s" in captured.err

    # An upload is decoded from a temporary file: its path must not reach the warnings.
    monkeypatch.setattr(video_mod, "decode_video", lossy_decoder([3], name_the_file=True))
    upload = service.features_from_bytes(clips["ten"].read_bytes()[:-1] + b"\0", ".mp4").ref()
    assert "the index of <video> ends early" in upload.warnings
    assert not any("d2vlm-upload-" in w for w in upload.warnings)

    monkeypatch.setattr(video_mod, "decode_video", lossy_decoder([0, 1]))
    with pytest.raises(BadVideo) as over:
        service.features(str(clips["six"]))
    assert (over.value.status_code, over.value.reason) == (422, "partial_decode")
    assert str(clips["root"]) not in over.value.message
    assert offline.main([str(clips["six"]), "q", "--ckpt", str(tiny_ckpt), "--device", "cpu"]) == 1
    err = json.loads(capsys.readouterr().err)
    assert (err["status"], err["reason"]) == (422, "partial_decode") and "2 of 6 sampled frames" in err["detail"]
    assert offline.main([str(clips["six"]), "q", "--ckpt", str(tiny_ckpt), "--device", "cpu",
                         "--max-missing-frames-fraction", "0.5", "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["missing_timestamps_s"] == [0.0, 1.0]
    assert offline.main([str(clips["six"]), "q", "--ckpt", str(tiny_ckpt), "--max-missing-frames-fraction", "2"]) == 2
    capsys.readouterr()


def test_a_really_damaged_file_reports_what_the_decoder_lost(
    clips: dict[str, Path], tiny_ckpt: Path, tmp_path: Path
) -> None:
    """No stand-in: whatever the decoder recovers from the damaged file reaches the features unchanged."""
    import d2vlm_ray.serving.core as core
    from d2vlm_ray.serving.errors import BadVideo

    source = str(clips["damaged"])
    decoded = decode_video(source, 1.0, max_frames=16)
    assert decoded.warnings, "the damaged clip decodes without a warning; damage it more"
    settings = core.FeatureSettings(fps=1.0, max_frames=16, max_missing_frames_fraction=1.0)
    service = core.FeatureService.from_checkpoint(tiny_ckpt, cache_root=str(tmp_path / "cache"), settings=settings)
    for result in (service.features(source), service.features(source)):
        assert result.features.warnings == decoded.warnings
        assert result.features.missing_timestamps_s == decoded.missing_timestamps_s
    strict = core.FeatureService.from_checkpoint(
        tiny_ckpt, cache_root=str(tmp_path / "cache"), settings=core.FeatureSettings(fps=1.0, max_frames=16)
    )
    if decoded.missing_fraction > 0.1:
        with pytest.raises(BadVideo) as over:
            strict.features(source)
        assert over.value.reason == "partial_decode"
    else:
        assert strict.features(source).features.warnings == decoded.warnings
