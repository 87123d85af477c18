"""Tests of video decoding, sampling, typed errors and the probe CLI, on barcoded clips."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from d2vlm_ray.data import probe
from d2vlm_ray.data import video as video_module
from d2vlm_ray.data.testclips import ClipInfo, barcode_frame, read_barcode, write_audio_only_clip, write_barcode_clip
from d2vlm_ray.data.video import REASONS, VideoDecodeError, decode_video, probe_video, sample_frame_indices

VFR_TIMES_S = (0.0, 0.1, 0.15, 0.5, 0.55, 1.3, 1.31, 2.0, 2.45)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ClipInfo]:
    """Small barcoded clips, written once per module."""
    root = tmp_path_factory.mktemp("clips")
    return {
        "cfr": write_barcode_clip(root / "cfr.mp4", fps=10, duration_s=3.0),
        "bframes": write_barcode_clip(root / "bframes.mp4", fps=10, duration_s=4.0, gop_size=12, b_frames=3),
        "rot90": write_barcode_clip(root / "rot90.mp4", fps=10, duration_s=2.0, b_frames=2, rotation_deg=90),
        "rot180": write_barcode_clip(root / "rot180.mp4", fps=10, duration_s=2.0, rotation_deg=180),
        "rot270": write_barcode_clip(root / "rot270.mp4", fps=10, duration_s=2.0, rotation_deg=270),
        "vfr": write_barcode_clip(root / "vfr.mp4", fps=10, frame_times_s=VFR_TIMES_S, b_frames=2),
        "offset": write_barcode_clip(root / "offset.mp4", fps=10, duration_s=3.0, start_offset_s=1.5, b_frames=2),
        "ntsc": write_barcode_clip(root / "ntsc.mp4", fps=30000 / 1001, duration_s=4.0, gop_size=30, b_frames=3),
        "mkv": write_barcode_clip(root / "clip.mkv", fps=10, duration_s=3.0, b_frames=2),
    }


def _codes(frames: np.ndarray) -> list[int]:
    return [read_barcode(frame) for frame in frames]


def test_barcode_round_trip_and_rejects_wrong_orientation() -> None:
    for number in (0, 1, 255, 4097, 65535):
        frame = barcode_frame(number, 96, 64)
        assert read_barcode(frame) == number
        assert read_barcode(np.ascontiguousarray(np.rot90(frame, 2))) == -1
    assert read_barcode(np.full((64, 96, 3), 128, dtype=np.uint8)) == -1


def test_cfr_matches_official_sampling_rule(clips: dict[str, ClipInfo]) -> None:
    for name, fps in (("cfr", 1.0), ("cfr", 3.0), ("ntsc", 1.0), ("ntsc", 3.0), ("bframes", 2.5)):
        info = clips[name]
        video = decode_video(info.path, fps)
        n_frames, avg_fps = info.n_frames, info.n_frames / info.duration_s
        official_idx = np.round(np.arange(0, n_frames, avg_fps / fps)).astype(int).clip(0, n_frames - 1)
        assert _codes(video.frames) == official_idx.tolist(), (name, fps)
        np.testing.assert_allclose(video.timestamps_s, np.array(info.frame_times_s)[official_idx], atol=1e-6)
        assert video.duration_s == pytest.approx(info.duration_s, abs=1e-3)
        assert video.source_fps == pytest.approx(avg_fps, rel=1e-3)
        assert video.frames.dtype == np.uint8 and video.frames.shape[1:] == (info.height, info.width, 3)
        assert (video.width, video.height) == (info.width, info.height)
        assert video.warnings == []


def test_vfr_timestamps_are_presentation_times(clips: dict[str, ClipInfo]) -> None:
    info = clips["vfr"]
    video = decode_video(info.path, 1.0)
    # Targets 0, 1, 2 s; nearest frames are at 0.0, 1.3 and 2.0 s (frames 0, 5, 7).
    assert _codes(video.frames) == [0, 5, 7]
    np.testing.assert_allclose(video.timestamps_s, [0.0, 1.3, 2.0], atol=1e-6)
    assert video.duration_s == pytest.approx(info.duration_s, abs=1e-3)
    video = decode_video(info.path, 4.0)
    codes = _codes(video.frames)
    np.testing.assert_allclose(video.timestamps_s, np.array(VFR_TIMES_S)[codes], atol=1e-6)
    # Targets 0, 0.25, ..., 2.5 s (duration 2.55 s), each to the nearest frame time.
    assert codes == [0, 2, 3, 4, 5, 5, 6, 7, 7, 8, 8]


def test_start_offset_is_removed(clips: dict[str, ClipInfo]) -> None:
    info = clips["offset"]
    assert info.start_offset_s == 1.5
    video = decode_video(info.path, 2.0)
    assert _codes(video.frames) == [0, 5, 10, 15, 20, 25]
    np.testing.assert_allclose(video.timestamps_s, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5], atol=1e-6)
    assert video.duration_s == pytest.approx(3.0, abs=1e-3)


@pytest.mark.parametrize("name", ["cfr", "bframes", "rot90", "rot180", "rot270", "vfr", "offset", "ntsc", "mkv"])
def test_backends_return_identical_frames(clips: dict[str, ClipInfo], name: str) -> None:
    info = clips[name]
    pyav = decode_video(info.path, 3.0, backend="pyav")
    decord = decode_video(info.path, 3.0, backend="decord")
    assert pyav.frames.shape == decord.frames.shape
    assert np.array_equal(pyav.frames, decord.frames)
    np.testing.assert_array_equal(pyav.timestamps_s, decord.timestamps_s)
    codes = _codes(pyav.frames)
    assert -1 not in codes
    np.testing.assert_allclose(pyav.timestamps_s, np.array(info.frame_times_s)[codes], atol=1e-6)


@pytest.mark.parametrize("n_cpus", [1, 2, 3, 16])
def test_gops_decoded_in_parallel_match_the_official_rule(
    clips: dict[str, ClipInfo], monkeypatch: pytest.MonkeyPatch, n_cpus: int
) -> None:
    # The decoder count follows the usable cores; every count must return the same frames,
    # with sampled GOPs adjacent (2.5 fps) or with gaps between them (0.5 fps).
    monkeypatch.setattr(video_module, "_usable_cpus", lambda: n_cpus)
    for name, fps in (("bframes", 2.5), ("bframes", 0.5), ("ntsc", 1.0), ("ntsc", 0.3)):
        info = clips[name]
        video = decode_video(info.path, fps)
        n_frames, avg_fps = info.n_frames, info.n_frames / info.duration_s
        official_idx = np.round(np.arange(0, n_frames, avg_fps / fps)).astype(int).clip(0, n_frames - 1)
        assert _codes(video.frames) == official_idx.tolist(), (name, fps)
        assert video.warnings == []


def test_gop_groups_are_contiguous_balanced_and_keep_open_gops_together() -> None:
    # Six GOPs of ten packets; GOP 3 is sent whole and GOP 4's sampled leading pictures need it.
    plan = video_module._GopPlan(
        gop_of_packet=[g for g in range(6) for _ in range(10)],
        first_pos=[10 * g for g in range(6)],
        last_needed_pos={0: 9, 1: 19, 3: 39, 4: 49, 5: 59},
        needs_previous={4},
    )
    assert video_module._split_gops(plan, 1) == [{0, 1, 3, 4, 5}]
    assert video_module._split_gops(plan, 2) == [{0, 1}, {3, 4, 5}]
    groups = video_module._split_gops(plan, 4)
    assert [sorted(g) for g in groups] == [[0], [1], [3, 4], [5]]
    assert len(video_module._split_gops(plan, 50)) == 4


@pytest.mark.parametrize("name", ["rot90", "rot180", "rot270"])
def test_rotation_is_applied(clips: dict[str, ClipInfo], name: str) -> None:
    info = clips[name]
    video = decode_video(info.path, 2.0)
    # The clip is 96x64 as displayed; the coded picture is rotated back.
    assert (video.width, video.height) == (96, 64)
    assert video.frames.shape[1:3] == (64, 96)
    assert _codes(video.frames) == [0, 5, 10, 15]


def test_max_frames_resamples_uniformly(clips: dict[str, ClipInfo]) -> None:
    info = clips["bframes"]
    full = decode_video(info.path, 5.0)
    assert len(full.frames) == 20
    capped = decode_video(info.path, 5.0, max_frames=4)
    keep = np.round(np.linspace(0, 19, 4)).astype(int)
    assert _codes(capped.frames) == [_codes(full.frames)[i] for i in keep]
    np.testing.assert_allclose(capped.timestamps_s, full.timestamps_s[keep])
    assert len(decode_video(info.path, 1.0, max_frames=100).frames) == 4


def test_max_side_downscales_identically(clips: dict[str, ClipInfo]) -> None:
    info = clips["rot90"]
    small = decode_video(info.path, 1.0, max_side=48, backend="pyav")
    assert small.frames.shape[1:] == (32, 48, 3)
    assert (small.width, small.height) == (48, 32)
    assert _codes(small.frames) == [0, 10]
    other = decode_video(info.path, 1.0, max_side=48, backend="decord")
    assert np.array_equal(small.frames, other.frames)


def test_max_duration_rejects_long_video(clips: dict[str, ClipInfo]) -> None:
    with pytest.raises(VideoDecodeError) as err:
        decode_video(clips["cfr"].path, 1.0, max_duration_s=2.0)
    assert err.value.reason == "too_long"
    assert len(decode_video(clips["cfr"].path, 1.0, max_duration_s=3.0).frames) == 3


def test_memory_and_file_urls(clips: dict[str, ClipInfo]) -> None:
    fsspec = pytest.importorskip("fsspec")
    info = clips["offset"]
    url = "memory://d2vlm-test/offset.mp4"
    with fsspec.open(url, "wb") as handle:
        handle.write(Path(info.path).read_bytes())
    try:
        local = decode_video(info.path, 1.0)
        for backend in ("pyav", "decord"):
            remote = decode_video(url, 1.0, backend=backend)
            assert np.array_equal(remote.frames, local.frames)
            np.testing.assert_array_equal(remote.timestamps_s, local.timestamps_s)
        via_file = decode_video(Path(info.path).as_uri(), 1.0)
        assert np.array_equal(via_file.frames, local.frames)
        with pytest.raises(VideoDecodeError) as err:
            decode_video("memory://d2vlm-test/missing.mp4")
        assert err.value.reason == "not_found"
    finally:
        fsspec.filesystem("memory").rm("/d2vlm-test", recursive=True)


def _expect_error(source: str, reason: str) -> VideoDecodeError:
    with pytest.raises(VideoDecodeError) as err:
        decode_video(source, 1.0)
    assert err.value.reason == reason, err.value
    assert err.value.reason in REASONS
    assert err.value.to_dict() == {"reason": reason, "message": err.value.message, "source": source}
    return err.value


def test_typed_errors_on_bad_files(tmp_path: Path, clips: dict[str, ClipInfo]) -> None:
    _expect_error(str(tmp_path / "missing.mp4"), "not_found")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    _expect_error(str(empty), "empty")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    _expect_error(str(text), "corrupt")
    audio = write_audio_only_clip(tmp_path / "audio.m4a")
    _expect_error(audio, "no_video_stream")
    # mp4 writes its index (moov) last, so a cut file has no index at all.
    data = Path(clips["cfr"].path).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    _expect_error(str(cut), "corrupt")


def test_truncated_stream_yields_decodable_frames_with_warning(tmp_path: Path, clips: dict[str, ClipInfo]) -> None:
    # Matroska has its header first: a cut file still demuxes up to the cut.
    data = Path(clips["mkv"].path).read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    for backend in ("pyav", "decord"):
        try:
            video = decode_video(str(cut), 5.0, backend=backend)
        except VideoDecodeError as err:
            assert err.reason == "corrupt"
            continue
        assert any("truncated" in w for w in video.warnings)
        codes = _codes(video.frames)
        assert codes and -1 not in codes
        assert codes == sorted(codes) and max(codes) < clips["mkv"].n_frames
        np.testing.assert_allclose(video.timestamps_s, np.array(clips["mkv"].frame_times_s)[codes], atol=1e-6)


def test_invalid_arguments(clips: dict[str, ClipInfo]) -> None:
    with pytest.raises(ValueError):
        decode_video(clips["cfr"].path, 0.0)
    with pytest.raises(ValueError):
        decode_video(clips["cfr"].path, 1.0, backend="opencv")
    with pytest.raises(ValueError):
        sample_frame_indices(np.array([0.0]), 1.0, 1.0, max_frames=0)


def test_sample_frame_indices_rule() -> None:
    times_s = np.arange(0, 100) / 2.5
    official = np.round(np.arange(0, 100, 2.5)).astype(int).clip(0, 99)
    assert sample_frame_indices(times_s, 40.0, 1.0).tolist() == official.tolist()
    # Irregular times: nearest frame to 0, 1, 2.
    assert sample_frame_indices(np.array([0.0, 0.4, 1.2, 1.9]), 2.5, 1.0).tolist() == [0, 2, 3]


def test_probe_video_matches_decode(clips: dict[str, ClipInfo]) -> None:
    index = probe_video(clips["rot90"].path)
    assert (index.width, index.height, index.rotation_deg) == (96, 64, 90)
    assert (index.coded_width, index.coded_height) == (64, 96)
    assert len(index.pts) == clips["rot90"].n_frames


def test_probe_cli_output(clips: dict[str, ClipInfo], capsys: pytest.CaptureFixture[str]) -> None:
    info = clips["vfr"]
    assert probe.main([info.path, "--fps", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"duration_s", "source_fps", "width", "height", "n_frames", "timestamps_s"}
    assert report["n_frames"] == 3
    assert report["timestamps_s"] == pytest.approx([0.0, 1.3, 2.0])
    assert (report["width"], report["height"]) == (96, 64)
    assert report["duration_s"] == pytest.approx(info.duration_s, abs=1e-3)
    assert report["counts_from"] == "container_index"


def test_probe_cli_decode_reports_what_decoding_gives(
    tmp_path: Path, clips: dict[str, ClipInfo], capsys: pytest.CaptureFixture[str]
) -> None:
    info = clips["cfr"]
    assert probe.main([info.path, "--fps", "2", "--decode"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts_from"] == "decode" and report["missing_timestamps_s"] == []
    assert report["timestamps_s"] == pytest.approx(decode_video(info.path, 2.0).timestamps_s.tolist())
    # A damaged packet: the metadata still lists the frame, decoding reports it missing.
    with av.open(info.path) as container:
        packets = sorted((p.pos, p.size, p.pts) for p in container.demux(video=0) if p.size and p.pos is not None)
    data = bytearray(Path(info.path).read_bytes())
    for pos, size, _ in packets[1:]:
        data[pos : pos + size] = bytes(size)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    assert probe.main([str(damaged), "--fps", "2"]) == 0
    metadata = json.loads(capsys.readouterr().out)
    code = probe.main([str(damaged), "--fps", "2", "--decode"])
    decoded = json.loads(capsys.readouterr().out)
    assert code == 0, decoded
    assert decoded["n_frames"] + len(decoded["missing_timestamps_s"]) == metadata["n_frames"]
    assert decoded["missing_timestamps_s"] and decoded["warnings"]


def test_probe_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.mp4")
    assert probe.main([missing]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert json.loads(out) == {"error": {"reason": "not_found", "message": "no such file", "source": missing}}


def test_sample_aspect_ratio_is_kept_by_default_and_applied_on_request(tmp_path: Path) -> None:
    path = tmp_path / "sar.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(3, 2)
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 10)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert probe_video(str(path)).sample_aspect_ratio == Fraction(3, 2)
    stored = decode_video(str(path), 5.0)
    assert stored.frames.shape[1:3] == (48, 64) and (stored.width, stored.height) == (64, 48)
    shown = decode_video(str(path), 5.0, apply_sar=True)
    assert shown.frames.shape[1:3] == (48, 96) and (shown.width, shown.height) == (96, 48)
    assert decode_video(str(path), 5.0, apply_sar=True, max_side=48).frames.shape[1:3] == (24, 48)


def test_cover_art_is_not_a_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "song.mp3"
    with av.open(str(path), "w") as container:
        audio = container.add_stream("libmp3lame", rate=16000)
        art = container.add_stream("png", rate=1)
        art.width, art.height, art.pix_fmt = 32, 32, "rgb24"
        art.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 90, dtype=np.uint8), format="rgb24")
        container.mux(art.encode(picture))
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1152
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))
    with av.open(str(path)) as container:
        assert any(s.disposition & av.stream.Disposition.attached_pic for s in container.streams.video)
    err = _expect_error(str(path), "no_video_stream")
    assert "cover art" in err.message
