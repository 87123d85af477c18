"""Video decoding: sample frames at a fixed rate, with their presentation times.

:func:`decode_video` returns uint8 RGB frames sampled at ``fps`` plus each frame's
presentation time, for local paths and fsspec URLs.

How it works:

1. **Index pass (PyAV, in process).** The video stream is demuxed without decoding to
   list every frame's presentation time (pts) and keyframe flag, and the first frame is
   decoded to read the display rotation. This pass also validates the file, and every
   failure becomes a :class:`VideoDecodeError` with a ``reason``.
2. **Sampling by presentation time** (:func:`sample_frame_indices`). Times are relative
   to the first frame's pts (so a stream with a start offset starts at 0). For each
   target time ``k / fps`` (``k = 0, 1, ...`` while ``k / fps < duration_s``) the frame
   with the *nearest* pts is taken; an exact tie goes to the even frame index. On a
   constant-frame-rate clip whose first frame is at 0 that is frame
   ``round(k * avg_fps / fps)`` with numpy's half-to-even rounding, clipped to the last
   frame: exactly the official ``round(arange(0, N, avg_fps / fps))``. (Nearest rather
   than "last at or before" is what reproduces the official rule on 29.97 fps video,
   where ``k * 29.97`` falls just below an integer.) When ``fps`` exceeds the source
   rate, frames repeat, as in the official code. ``max_frames`` then keeps
   ``round(linspace(0, n - 1, max_frames))`` of the sampled frames.
3. **Decoding** with one of two backends that return identical pixels (tests check it on
   barcoded clips, rotated ones included, and on real-world files):

   * ``pyav`` (the default, ``auto``): in the *planned* mode it sends a decoder only what
     the samples need: whole GOPs without a sampled frame are not sent at all (a drain +
     flush at each gap replaces a seek), GOP tails after the last sampled frame are
     dropped, and non-reference frames that are not sampled are skipped inside the
     decoder (``skip_frame=NONREF``, toggled per packet). Only sampled frames are
     converted to RGB. For codecs whose keyframes reset decoding (H.264, HEVC, VP8, VP9,
     AV1) the GOPs to decode are split into one contiguous group per usable core, each
     decoded by its own single-threaded decoder in a thread (PyAV releases the GIL);
     each decoder that starts later than the first GOP is first primed with the stream's
     first packet, which carries stream-level facts FFmpeg needs (e.g. the x264 version
     SEI that switches on its workarounds for old x264 4:4:4 streams; without it frames
     came out green). A *sequential* mode (one decoder, every packet, single-threaded)
     is used for MPEG-4 Part 2, whose packets can carry two frames (packed B-frames in
     AVI), for streams with inconsistent timestamps, and as a redo whenever the planned
     mode meets a decode error, a concealed frame or pts going backwards: it recovers
     the frames the FFmpeg CLI recovers (on damaged streams the concealed pixels are a
     single-threaded decoder's, which are reproducible). In both modes a packet that fails to decode is passed over
     and decoding goes on; sampled frames that no packet produced are listed in
     ``DecodedVideo.missing_timestamps_s`` and named in ``DecodedVideo.warnings``. See
     :func:`_decode_pyav`.
   * ``decord`` (the official reader): ``VideoReader.get_batch`` on the sampled
     indices. decord's frame *i* is the *i*-th frame in presentation order; the index
     pass checks that decord counts the same frames.

   Rotation: the display matrix's rotation (multiples of 90 degrees, counter-clockwise)
   is applied with ``np.rot90``. A matrix that is not a rotation by a multiple of 90
   degrees (all-zero, mirrored, scaled, sheared) is ignored with a warning. The pinned
   ``eva-decord`` build applies pure rotations itself (measured); a decord that
   returns the coded (unrotated) shape for a 90/270 degree clip is rotated here.
   ``max_side`` downscales the rotated frames with the same antialiased bilinear
   filter for both backends, so they stay identical.

   Sample aspect ratio: frames keep their stored size by default (as decord returns
   them and as the official model was trained); ``apply_sar=True`` resizes the width
   (the displayed width, after rotation the height) by the stream's sample aspect
   ratio, with :func:`d2vlm_ray.data.transforms.apply_sample_aspect_ratio`.

Safety: media are opened with a whitelist of container formats (:data:`ALLOWED_FORMATS`)
and the ``file`` protocol only, for paths and in-memory bytes alike: playlists (HLS,
DASH), concat lists, image sequences and nested protocols are refused
(``reason="unsupported"``) before they can open any other file. PyAV runs in process;
the index pass (whitelisted open, demux, decode the first frame) rejects unreadable or
disallowed files before decord, whose bundled FFmpeg is older, ever sees them. decord is
not isolated in a subprocess (that would cost a process start and a copy of every frame
per video); use the default backend for untrusted input.

Measured on this project's 2-core CPU machine (quiet, load ~1; medians of 5), 1 fps
sampling of the long-GOP benchmark clip from
:func:`d2vlm_ray.data.testclips.write_long_gop_clip` (120 s, 30 fps, 640x360, GOP 250,
3 B-frames per reference frame, textured; 3 600 frames, 120 sampled), frames identical:

* default path (``decode_video(backend="auto")``, PyAV, two decoders): 0.57 s end to
  end; the decoders reconstructed 1 662 frames, 13.9 per sampled frame (non-reference
  B-frames skipped). One decoder with frame threads took 1.15 s.
* official path (decord ``get_batch`` on ``round(arange(0, N, avg_fps))``): 1.70 s;
  decord decodes sequentially through every frame, 30 per sampled frame.
* On the same clip written with x264's adaptive B-frames (few B-frames), the PyAV path
  decoded 3 227 frames (26.9 per sampled frame) and took 1.13 s against decord's 1.87 s.

These figures predate the real-world fixes (priming, passing over bad packets, the
sequential mode). Since them the decoders reconstruct 13.9 frames per sampled frame on
that clip (one more keyframe per run: the second decoder's priming), frames identical;
three alternating runs of the old and the new code at load 7-18 (2 cores, 2026-12-07)
measured 1.19-1.78x and 1.22-1.92x decord's frames/s (CPU time 1.80-2.12x and
1.85-2.21x): no difference the load lets one see. Streams decoded sequentially (MPEG-4
Part 2, damaged or mis-stamped streams) cost what decoding every frame costs.

``python -m jobs.bench decode`` repeats this comparison (medians, CPU time next to wall
time, frames checked identical; figures in ``BENCHMARKS.md``), using
:func:`decode_video_counted` for the decoded-frame count. The decoder work left is the
reference chain itself: with x264's B-pyramid and ``ref=3``, P-frames reference the
B-reference frames (skipping all B-frames changed 98 of the first 400 frames), so
``NONREF`` is the deepest safe skip, and the saved non-reference frames are the cheap
ones: CPU time falls less than the decoded-frame count.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, BinaryIO

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter

from d2vlm_ray.data.transforms import apply_sample_aspect_ratio
from d2vlm_ray.types import DecodedVideo

REASONS = ("not_found", "no_video_stream", "corrupt", "empty", "too_long", "unsupported", "partial_decode")
"""Every value :attr:`VideoDecodeError.reason` can take."""

BACKENDS = ("auto", "pyav", "decord")
"""Accepted values of ``decode_video(..., backend=)``; ``auto`` is ``pyav``."""

ALLOWED_FORMATS = (
    "mov",
    "mp4",
    "m4a",
    "3gp",
    "3g2",
    "mj2",
    "matroska",
    "webm",
    "avi",
    "mpegts",
    "mpeg",
    "flv",
    "ogg",
    "asf",
    "h264",
    "hevc",
    "m4v",
    "mpegvideo",
    "ivf",
    "mp3",
    "aac",
    "wav",
    "flac",
)
"""FFmpeg demuxers the decoder may open (``format_whitelist``); all others are refused
with ``reason="unsupported"``.

Chosen deliberately: the containers video files come in (MP4/MOV/3GP, Matroska/WebM,
AVI, MPEG transport and program streams, FLV, Ogg, ASF/WMV), raw elementary video
streams (H.264, HEVC, MPEG-4 Part 2, MPEG-1/2, IVF for VP8/VP9/AV1), and the common
audio-only formats, so that an audio file (or an mp3 with cover art) gets
``no_video_stream`` rather than ``unsupported``. Left out on purpose: every demuxer
that opens other files or URLs named inside the input (HLS and DASH playlists,
``concat``, ``image2`` patterns, ``tee``, ...), image and device demuxers. MOV's
external data references stay off (FFmpeg's ``enable_drefs`` default)."""

_TIME_EPS_S = 1e-6
_FRACTION_EPS = 1e-6  # a share exactly at the limit passes despite float rounding
# Frames converted to float at once when downscaling: bounds the float32 copy's memory.
_RESIZE_CHUNK = 32


class VideoDecodeError(Exception):
    """A video could not be decoded.

    Attributes:
        reason: One of :data:`REASONS`.
        source: The path or URL that failed.
        message: Human-readable detail.
    """

    def __init__(self, reason: str, message: str, source: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown VideoDecodeError reason {reason!r}")
        super().__init__(f"{reason}: {message} ({source})")
        self.reason = reason
        self.message = message
        self.source = source

    def to_dict(self) -> dict[str, str]:
        """``{"reason", "message", "source"}`` for JSON error bodies."""
        return {"reason": self.reason, "message": self.message, "source": self.source}


@dataclass
class VideoIndex:
    """What the index pass learns about a video stream without decoding it.

    Attributes:
        source: The path or URL.
        pts: Presentation time stamps of every frame, ascending, in ``time_base`` units.
        time_base: Seconds per pts unit.
        duration_s: From the first frame's start to the last frame's end.
        source_fps: Average frame rate (``n_frames / duration_s``).
        coded_width: Width of the coded picture (before rotation).
        coded_height: Height of the coded picture (before rotation).
        rotation_deg: Counter-clockwise display rotation, one of 0, 90, 180, 270.
        decode_order: ``(pts, is_keyframe)`` of every packet in decode order.
        codec_name: FFmpeg's name of the video decoder (``h264``, ``mpeg4``, ...).
        sample_aspect_ratio: Width over height of one stored pixel (1 when unknown).
        inconsistent_timestamps: Some packet is presented before it is decoded
            (``pts < dts``) or decode times do not rise: the pts cannot be trusted to
            name the decoder's output, so decoding is sequential.
        warnings: Non-fatal problems seen while indexing.
    """

    source: str
    pts: np.ndarray
    time_base: Fraction
    duration_s: float
    source_fps: float
    coded_width: int
    coded_height: int
    rotation_deg: int
    decode_order: list[tuple[int, bool]]
    codec_name: str = ""
    sample_aspect_ratio: Fraction = Fraction(1)
    inconsistent_timestamps: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def times_s(self) -> np.ndarray:
        """Presentation time of every frame relative to the first frame, seconds."""
        return (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)

    @property
    def width(self) -> int:
        """Displayed width (after rotation)."""
        return self.coded_height if self.rotation_deg in (90, 270) else self.coded_width

    @property
    def height(self) -> int:
        """Displayed height (after rotation)."""
        return self.coded_width if self.rotation_deg in (90, 270) else self.coded_height


@dataclass(frozen=True)
class _Source:
    """An opened source: a local path, or the bytes of a remote object."""

    name: str
    local_path: str | None
    data: bytes | None

    def open(self) -> str | BinaryIO:
        """What PyAV and decord accept: the path, or a fresh file object over the bytes."""
        if self.local_path is not None:
            return self.local_path
        assert self.data is not None
        return io.BytesIO(self.data)


def _resolve_source(source: str) -> _Source:
    """Check that ``source`` exists and is non-empty; read remote objects into memory."""
    if "://" not in source:
        local_path: str | None = source
    else:
        try:
            import fsspec
            from fsspec.implementations.local import LocalFileSystem

            fs, path = fsspec.core.url_to_fs(source)
        except (ImportError, ValueError) as exc:
            raise VideoDecodeError("unsupported", f"no filesystem for this URL: {exc}", source) from exc
        local_path = path if isinstance(fs, LocalFileSystem) else None
        if local_path is None:
            try:
                with fs.open(path, "rb") as handle:
                    data = handle.read()
            except FileNotFoundError as exc:
                raise VideoDecodeError("not_found", "no such object", source) from exc
            except IsADirectoryError as exc:
                raise VideoDecodeError("not_found", "is a directory", source) from exc
            if not data:
                raise VideoDecodeError("empty", "the object has zero bytes", source)
            return _Source(name=source, local_path=None, data=data)
    assert local_path is not None
    if not os.path.exists(local_path):
        raise VideoDecodeError("not_found", "no such file", source)
    if os.path.isdir(local_path):
        raise VideoDecodeError("not_found", "is a directory", source)
    if os.path.getsize(local_path) == 0:
        raise VideoDecodeError("empty", "the file has zero bytes", source)
    return _Source(name=source, local_path=local_path, data=None)


def _open_container(src: _Source) -> Any:
    """``av.open`` restricted to :data:`ALLOWED_FORMATS` and the ``file`` protocol.

    The whitelist is enforced by FFmpeg while it probes (``format_whitelist``), so a
    playlist or concat list is refused before its demuxer reads a line of it; any
    file a demuxer would open beside the input needs a protocol, and only ``file``
    (for a path) or none at all (for in-memory bytes, read through Python) is allowed.
    FFmpeg errors are mapped to :class:`VideoDecodeError`.
    """
    options = {"format_whitelist": ",".join(ALLOWED_FORMATS), "protocol_whitelist": "file"}
    try:
        container = av.open(src.open(), mode="r", container_options=options)
    except av.error.FileNotFoundError as exc:
        raise VideoDecodeError("not_found", str(exc), src.name) from exc
    except (av.error.DemuxerNotFoundError, av.error.DecoderNotFoundError) as exc:
        raise VideoDecodeError("unsupported", str(exc), src.name) from exc
    except av.error.ArgumentError as exc:
        # EINVAL at open time is FFmpeg's "not on whitelist": the probe recognised a demuxer
        # that is not allowed (a playlist, concat list, image pattern, ...), or the path asks
        # for a protocol other than ``file`` (``concat:``, ``subfile,...:``).
        raise VideoDecodeError(
            "unsupported", f"not an allowed container format or protocol: {exc}", src.name
        ) from exc
    except av.error.FFmpegError as exc:
        raise VideoDecodeError("corrupt", f"cannot open the container: {exc}", src.name) from exc
    if not set(container.format.name.split(",")) & set(ALLOWED_FORMATS):
        container.close()
        raise VideoDecodeError("unsupported", f"container format {container.format.name!r} is not allowed", src.name)
    return container


def _video_stream(container: Any, src: _Source) -> Any:
    """The first video stream that is a moving picture (cover art is not a video)."""
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        what = "only an attached picture (cover art)" if container.streams.video else "no video stream"
        raise VideoDecodeError("no_video_stream", f"the container has {what}", src.name)
    stream = streams[0]
    if stream.codec_context is None:
        raise VideoDecodeError("unsupported", f"no decoder for codec id of stream {stream.index}", src.name)
    return stream


def _display_rotation(frame: Any) -> tuple[int, str | None]:
    """Counter-clockwise display rotation of a decoded frame, validated.

    The display matrix is used only when it is a rotation by a multiple of 90 degrees
    (entries 0 or +-1, determinant +1). Anything else (an all-zero matrix, which PyAV
    turns into a rotation of -2**31, a mirror, a shear or an odd angle) gives rotation
    0 and a warning: showing the picture as coded is the least wrong choice.

    Returns:
        ``(rotation_deg, warning or None)``.
    """
    matrix: np.ndarray | None = None
    try:
        side_data = list(frame.side_data)
    except ValueError:
        # PyAV 18 raises on side-data types newer than its enum; fall back to its angle.
        side_data = []
        try:
            angle = float(frame.rotation)
        except (TypeError, ValueError):
            angle = math.nan
        if math.isfinite(angle) and abs(angle) <= 360 and abs(angle / 90 - round(angle / 90)) < 1e-3:
            return int(round(angle / 90.0)) * 90 % 360, None
        return 0, f"the display matrix gives no usable rotation ({angle}); frames are shown as coded"
    for item in side_data:
        if item.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            # [9] int32: 16.16 fixed point except the last column; a, b, c, d at 0, 1, 3, 4.
            matrix = np.frombuffer(bytes(item), dtype="<i4").astype(np.float64)
    if matrix is None:
        return 0, None
    a, b, c, d = matrix[0] / 65536, matrix[1] / 65536, matrix[3] / 65536, matrix[4] / 65536
    unit_entries = all(min(abs(x), abs(abs(x) - 1.0)) < 1e-3 for x in (a, b, c, d))
    if not unit_entries or abs(a * d - b * c - 1.0) > 1e-3:
        return 0, (
            f"the display matrix [[{a:g}, {b:g}], [{c:g}, {d:g}]] is not a rotation by a multiple of 90 degrees; "
            "ignored, frames are shown as coded"
        )
    # FFmpeg's av_display_rotation_get is -atan2(b, a) (its matrix is stored transposed); that
    # is the counter-clockwise angle PyAV reports as frame.rotation.
    return int(round(-math.degrees(math.atan2(b, a)) / 90.0)) * 90 % 360, None


def _first_frame_rotation(src: _Source) -> tuple[int, int, int, list[str]]:
    """Decode the first frame: validates the codec and reads width, height and rotation.

    Packets that fail to decode are passed over as the FFmpeg CLI does; only a stream
    of which no frame decodes at all is ``corrupt``.

    Returns:
        ``(coded_width, coded_height, rotation_deg, warnings)``.
    """
    last_error = "no frame"
    with _open_container(src) as container:
        stream = _video_stream(container, src)
        codec = stream.codec_context
        try:
            for packet in container.demux(stream):
                try:
                    frames = codec.decode(packet)
                except av.error.FFmpegError as exc:
                    last_error = str(exc)
                    continue
                for frame in frames:
                    rotation_deg, warning = _display_rotation(frame)
                    return frame.width, frame.height, rotation_deg, [warning] if warning else []
        except av.error.FFmpegError as exc:
            last_error = str(exc)
    raise VideoDecodeError("corrupt", f"no frame of the video stream decodes: {last_error}", src.name)


def _declared_video_duration_s(container: Any, stream: Any) -> float | None:
    """The video stream's own declared duration, else the container's if video is all it holds.

    Audio, subtitle or data tracks may legitimately outlast the video, so the
    container's duration only says something about the video when nothing else is in it.
    """
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    for key, value in (stream.metadata or {}).items():
        # Matroska muxers write a per-track "DURATION" (or "DURATION-<lang>") tag, HH:MM:SS.fraction.
        if key.upper().split("-")[0] == "DURATION":
            try:
                hours, minutes, seconds = str(value).split(":")
                return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
            except ValueError:
                continue
    if container.duration and len(container.streams) == 1:
        return container.duration / 1e6
    return None


def _index(src: _Source) -> VideoIndex:
    """The index pass: demux every video packet (no decoding) and decode the first frame."""
    warnings: list[str] = []
    decode_order: list[tuple[int, bool]] = []
    durations: dict[int, int] = {}
    inconsistent = False
    last_dts: int | None = None
    with _open_container(src) as container:
        stream = _video_stream(container, src)
        time_base = stream.time_base
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:
                    continue
                if packet.pts is None:
                    warnings.append("packets without presentation time were skipped")
                    continue
                decode_order.append((int(packet.pts), bool(packet.is_keyframe)))
                if packet.dts is not None:
                    inconsistent |= packet.pts < packet.dts or (last_dts is not None and packet.dts <= last_dts)
                    last_dts = int(packet.dts)
                durations[int(packet.pts)] = int(packet.duration or 0)
        except av.error.FFmpegError as exc:
            if not decode_order:
                raise VideoDecodeError("corrupt", f"cannot read the video stream: {exc}", src.name) from exc
            warnings.append(f"the file ends in unreadable data after {len(decode_order)} frames: {exc}")
        avg_rate = stream.average_rate or stream.guessed_rate
        declared_s = _declared_video_duration_s(container, stream)
        codec_name = stream.codec_context.name
        sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
        sample_aspect_ratio = Fraction(sar) if sar and sar > 0 else Fraction(1)
    if time_base is None:
        raise VideoDecodeError("unsupported", "the video stream has no time base", src.name)
    if not decode_order:
        raise VideoDecodeError("empty", "the video stream holds no frames", src.name)
    pts = np.array(sorted({p for p, _ in decode_order}), dtype=np.int64)
    if len(pts) != len(decode_order):
        warnings.append("duplicate presentation times; keeping one frame per time")

    tb_s = float(time_base)
    last_duration = durations.get(int(pts[-1]), 0)
    if last_duration <= 0:
        # No recorded duration: assume the last frame lasts as long as the frames before it.
        if len(pts) > 1:
            last_duration = int(np.median(np.diff(pts)))
        elif avg_rate:
            last_duration = max(1, round(1.0 / (float(avg_rate) * tb_s)))
        else:
            last_duration = 0
    duration_s = float(pts[-1] - pts[0] + last_duration) * tb_s
    source_fps = len(pts) / duration_s if duration_s > 0 else float(avg_rate or 0.0)
    # A cut file (e.g. Matroska, whose header comes first) demuxes cleanly up to the cut;
    # only the header's duration tells. The slack avoids warning about muxers' rounding.
    if declared_s is not None and declared_s - duration_s > max(0.5, 2.0 / max(source_fps, 1e-6)):
        warnings.append(
            f"the video stream lasts {duration_s:.3f} s but declares {declared_s:.3f} s; "
            "the file is probably truncated"
        )

    coded_width, coded_height, rotation_deg, rotation_warnings = _first_frame_rotation(src)
    warnings.extend(rotation_warnings)
    return VideoIndex(
        source=src.name,
        pts=pts,
        time_base=Fraction(time_base),
        duration_s=duration_s,
        source_fps=source_fps,
        coded_width=coded_width,
        coded_height=coded_height,
        rotation_deg=rotation_deg,
        decode_order=decode_order,
        codec_name=codec_name,
        sample_aspect_ratio=sample_aspect_ratio,
        inconsistent_timestamps=inconsistent,
        warnings=warnings,
    )


def sample_frame_indices(
    times_s: np.ndarray, duration_s: float, fps: float, max_frames: int | None = None
) -> np.ndarray:
    """Pick the frames sampled at ``fps`` (see the module docstring for the rule).

    Args:
        times_s: Presentation time of every frame relative to the first, ascending.
        duration_s: Stream duration; targets are ``k / fps`` for ``k / fps < duration_s``.
        fps: Sampling rate in frames per second.
        max_frames: If set and exceeded, keep ``round(linspace(0, n - 1, max_frames))``.

    Returns:
        int64 indices into ``times_s``, non-decreasing (repeats when ``fps`` exceeds the
        source rate).
    """
    if fps <= 0 or not math.isfinite(fps):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    times_s = np.asarray(times_s, dtype=np.float64)
    n_targets = max(1, math.ceil(duration_s * fps - _TIME_EPS_S))
    targets_s = np.arange(n_targets, dtype=np.float64) / fps
    before_idx = np.searchsorted(times_s, targets_s + _TIME_EPS_S, side="right") - 1
    before_idx = np.clip(before_idx, 0, len(times_s) - 1)
    after_idx = np.minimum(before_idx + 1, len(times_s) - 1)
    gap_s = times_s[after_idx] - times_s[before_idx]
    frac = np.where(gap_s > 0, (targets_s - times_s[before_idx]) / np.where(gap_s > 0, gap_s, 1.0), 0.0)
    tie = np.abs(frac - 0.5) <= _TIME_EPS_S
    chosen = np.where(frac > 0.5, after_idx, before_idx)
    # numpy's round() sends x.5 to the even integer; do the same so CFR clips match the official rule.
    chosen = np.where(tie, np.where(before_idx % 2 == 0, before_idx, after_idx), chosen)
    # Before the first frame (targets earlier than any pts) the first frame is nearest.
    chosen = np.where(targets_s < times_s[0], 0, chosen).astype(np.int64)
    if max_frames is not None and len(chosen) > max_frames:
        keep = np.round(np.linspace(0, len(chosen) - 1, max_frames)).astype(np.int64)
        chosen = chosen[keep]
    return chosen


def _rotate(frame: np.ndarray, rotation_deg: int) -> np.ndarray:
    """Apply a counter-clockwise display rotation to an ``[H, W, 3]`` frame."""
    if rotation_deg == 0:
        return frame
    return np.ascontiguousarray(np.rot90(frame, rotation_deg // 90))


@dataclass
class _GopPlan:
    """Which packets of which GOPs the PyAV backend sends to a decoder.

    Attributes:
        gop_of_packet: GOP number of every packet in decode order (a GOP starts at a keyframe).
        first_pos: Decode-order position of every GOP's first packet (its keyframe).
        last_needed_pos: For every GOP that must be decoded, the decode-order position of
            its last packet that must be sent; packets after it are dropped.
        needs_previous: GOPs whose sampled leading pictures (open GOP) reference the
            previous GOP, so both must go through the same decoder in sequence.
    """

    gop_of_packet: list[int]
    first_pos: list[int]
    last_needed_pos: dict[int, int]
    needs_previous: set[int]

    def cost(self, gop: int) -> int:
        """Packets of ``gop`` that are sent: from its keyframe to its last needed packet."""
        return self.last_needed_pos[gop] - self.first_pos[gop] + 1


def _plan_gops(index: VideoIndex, wanted: set[int]) -> _GopPlan:
    """Group packets into GOPs (decode order, split at keyframes) and decide which to send."""
    gop_of_packet: list[int] = []
    first_pos: list[int] = []
    keyframe_pts: list[int] = []
    for pos, (pts, is_key) in enumerate(index.decode_order):
        if is_key or not first_pos:
            first_pos.append(pos)
            keyframe_pts.append(pts)
        gop_of_packet.append(len(first_pos) - 1)
    last_needed_pos: dict[int, int] = {}
    needs_previous: set[int] = set()
    for pos, (pts, _) in enumerate(index.decode_order):
        if pts in wanted:
            g = gop_of_packet[pos]
            last_needed_pos[g] = pos
            if pts < keyframe_pts[g] and g > 0:
                # A leading picture (open GOP) references the previous GOP: decode all of it.
                needs_previous.add(g)
                last_needed_pos[g - 1] = first_pos[g] - 1
    return _GopPlan(gop_of_packet, first_pos, last_needed_pos, needs_previous)


def _split_gops(plan: _GopPlan, n_parts: int) -> list[set[int]]:
    """Split the GOPs to decode into at most ``n_parts`` contiguous groups of similar cost.

    A GOP whose leading pictures need the previous GOP stays in that GOP's group.
    """
    runs: list[list[int]] = []
    for g in sorted(plan.last_needed_pos):
        if runs and g in plan.needs_previous and runs[-1][-1] == g - 1:
            runs[-1].append(g)
        else:
            runs.append([g])
    # Cut after the runs whose cumulative cost is nearest to each 1/n_parts share of the total.
    cum_cost = np.cumsum([sum(plan.cost(g) for g in run) for run in runs])
    cuts = sorted({int(np.abs(cum_cost - cum_cost[-1] * k / n_parts).argmin()) + 1 for k in range(1, n_parts)})
    bounds = [0, *(c for c in cuts if c < len(runs)), len(runs)]
    return [{g for run in runs[lo:hi] for g in run} for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_PARALLEL_GOP_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "libdav1d"})
"""Decoders whose keyframes reset every picture reference, so GOP groups may be decoded
by separate decoders (each primed with the stream's first packet, see :func:`_decode_pyav`)."""

_PACKED_BITSTREAM_CODECS = frozenset({"mpeg4"})
"""Decoders whose packets may carry two frames: MPEG-4 Part 2 (Xvid/DivX) in AVI packs a
B-frame into the packet of the next reference frame ("packed B-frames"). Skipping a
packet, or a non-reference frame inside one, can drop a frame that another packet's
timestamp names, so these streams are decoded sequentially, every packet."""


@dataclass
class _GroupResult:
    """What one decoder produced.

    Attributes:
        rgb_by_pts: Planned mode: rotated RGB frames whose ``pts`` is a wanted pts, converted
            in the decoder's thread (a planned result is only kept when its pts rise, so
            pts are the labels).
        by_pts: Sequential mode: decoded frames whose ``pts`` is a wanted pts (first kept).
        by_dts: Sequential mode: decoded frames whose ``dts`` is a wanted pts (the labels
            when pts are unusable).
        n_decoded: Frames the decoder produced (priming and unwanted ones included).
        pts_increasing: The decoder's output pts rose strictly (display order).
        dts_increasing: The decoder's output dts rose strictly.
        concealed: Some output frame carried FFmpeg's "corrupt" flag (errors concealed).
        errors: Per-packet decode errors passed over, and a demux error that ended the pass.
    """

    rgb_by_pts: dict[int, np.ndarray] = field(default_factory=dict)
    by_pts: dict[int, Any] = field(default_factory=dict)
    by_dts: dict[int, Any] = field(default_factory=dict)
    n_decoded: int = 0
    pts_increasing: bool = True
    dts_increasing: bool = True
    concealed: bool = False
    errors: list[str] = field(default_factory=list)


def _decode_pyav(
    src: _Source, index: VideoIndex, wanted_pts: np.ndarray
) -> tuple[dict[int, np.ndarray], int, list[str]]:
    """Decode the frames whose pts are in ``wanted_pts`` with PyAV.

    Two modes, chosen by mechanism rather than by file:

    * **Planned** (codecs in :data:`_PARALLEL_GOP_CODECS`, and other codecs without packed
      frames): only the GOPs holding sampled frames are sent, and non-reference frames
      nobody asked for are skipped inside the decoder. For the parallel-safe codecs the
      GOPs are split into one contiguous group per core, each decoded by its own
      single-threaded decoder in a thread (PyAV releases the GIL). Every decoder that
      does not start at the stream's first GOP is first *primed* with the stream's first
      packet, then flushed: stream-level facts that only the first packets carry (e.g. the
      x264 version SEI, from which FFmpeg enables its workarounds for old x264 4:4:4
      streams) then reach every decoder, as they reach a sequential one. Other codecs use
      one decoder with frame threads.
    * **Sequential** (codecs in :data:`_PACKED_BITSTREAM_CODECS`, streams with
      inconsistent timestamps (:attr:`VideoIndex.inconsistent_timestamps`) or whose
      decoded pts go backwards, e.g. AVI, where pts are the parser's guesses, and damaged
      streams): one decoder over every packet, nothing skipped, like the FFmpeg CLI. A
      planned decode that meets a decode error, a frame flagged corrupt or pts going
      backwards is redone this way: how a decoder conceals damage depends on every frame
      it has seen, so only a sequential pass recovers what the FFmpeg CLI recovers. It
      runs single-threaded: concealed pixels also depend on the threading mode (no
      threads, slice threads and frame threads gave three different frames after the
      damage in ``decord_corrupted.mp4``), and frame-threaded decodes of a damaged file
      differed between runs on a loaded machine; one thread gives the same answer
      every time.

    In both modes a packet that fails to decode is passed over and the next packet is
    sent (the FFmpeg CLI's behaviour), so damage costs only the frames it touches; the
    caller reports which sampled frames are missing. Decoded frames are labelled by
    ``pts``, or by ``dts`` when the output pts are not increasing but the dts are (the
    decoder outputs frames in display order; FFmpeg's ``best_effort_timestamp`` makes
    the same switch).

    Returns:
        ``{pts: rotated RGB frame}`` for the frames that decoded, the number of frames the
        decoders produced (the cost measure reported in the module docstring), and
        warnings (decode errors passed over, frames decoded with concealed errors).
    """
    wanted = {int(p) for p in wanted_pts}
    plan = _plan_gops(index, wanted)
    if index.codec_name in _PACKED_BITSTREAM_CODECS or index.inconsistent_timestamps:
        results = [_decode_gops(src, index, wanted, plan, set(), frame_threads=False, sequential=True)]
    else:
        results = _decode_planned(src, index, wanted, plan)
        if any(r.errors or r.concealed or not r.pts_increasing for r in results):
            results = [_decode_gops(src, index, wanted, plan, set(), frame_threads=False, sequential=True)]
    warnings: list[str] = []
    use_dts = not all(r.pts_increasing for r in results) and all(r.dts_increasing for r in results)
    if not all(r.pts_increasing for r in results) and not use_dts:
        warnings.append("decoded frames' timestamps are not in display order; sampled frames may be misplaced")
    if use_dts and index.codec_name not in _PACKED_BITSTREAM_CODECS:
        warnings.append(
            "the stream's presentation timestamps go backwards; decoded frames were matched to frame times "
            "by their decode timestamps, as FFmpeg's best-effort timestamp does"
        )
    # One swscale context for every conversion (a new one per frame costs 1.6 ms at 640x360).
    to_rgb = VideoReformatter()
    frames: dict[int, np.ndarray] = {}
    concealed: list[int] = []
    for result in results:
        for label, rgb in result.rgb_by_pts.items():
            frames.setdefault(label, rgb)
        for label, frame in (result.by_dts if use_dts else result.by_pts).items():
            if label in frames:
                continue
            if frame.is_corrupt:
                concealed.append(label)
            rgb = to_rgb.reformat(frame, format="rgb24").to_ndarray()
            frames[label] = _rotate(rgb, index.rotation_deg)
    errors = [error for result in results for error in result.errors]
    if errors:
        shown = "; ".join(errors[:3]) + ("; ..." if len(errors) > 3 else "")
        warnings.append(
            f"{len(errors)} packet(s) failed to decode and were passed over ({shown}); frames decoded "
            "after the damage may show the decoder's concealment"
        )
    if concealed:
        times = ", ".join(f"{_relative_s(index, p):.3f}" for p in sorted(concealed)[:10])
        warnings.append(
            f"{len(concealed)} sampled frame(s) decoded with errors the decoder concealed (at {times} s); "
            "their pixels may be damaged"
        )
    return frames, sum(r.n_decoded for r in results), warnings


def _relative_s(index: VideoIndex, pts: int) -> float:
    """Presentation time of ``pts`` relative to the first frame, seconds."""
    return float(pts - int(index.pts[0])) * float(index.time_base)


def _decode_planned(src: _Source, index: VideoIndex, wanted: set[int], plan: _GopPlan) -> list[_GroupResult]:
    """The planned mode of :func:`_decode_pyav`: GOP groups, in parallel where safe."""
    # One decoder per core. Medians of 5 on the long-GOP benchmark clip, 2 cores: one decoder
    # with frame threads 1.15 s, two decoders 0.57 s, four 0.61 s; decord 1.70 s.
    n_parts = _usable_cpus() if index.codec_name in _PARALLEL_GOP_CODECS else 1
    groups = _split_gops(plan, n_parts)
    if len(groups) == 1:
        return [_decode_gops(src, index, wanted, plan, groups[0], frame_threads=True, sequential=False)]
    with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="decode") as pool:
        return list(
            pool.map(
                lambda gops: _decode_gops(src, index, wanted, plan, gops, frame_threads=False, sequential=False),
                groups,
            )
        )


def _decode_gops(
    src: _Source,
    index: VideoIndex,
    wanted: set[int],
    plan: _GopPlan,
    gops: set[int],
    *,
    frame_threads: bool,
    sequential: bool,
) -> _GroupResult:
    """One pass over the video that sends a decoder the packets of ``gops`` (or all of them).

    Every decoder demuxes from the start instead of seeking to its first GOP: demuxing
    is cheap (the whole index pass over the 3 600-frame benchmark clip takes 0.02 s) and
    it does not depend on how precisely a container seeks.

    Args:
        gops: GOP numbers to decode (ignored when ``sequential``).
        frame_threads: Let FFmpeg decode with frame threads (one decoder per video).
        sequential: Send every packet, skip nothing (the sequential mode).
    """
    needed = {g: pos for g, pos in plan.last_needed_pos.items() if g in gops}
    last_pos = len(plan.gop_of_packet) - 1 if sequential else max(needed.values(), default=-1)
    # A decoder that starts later than the stream's first GOP is primed with its first packet.
    prime = not sequential and 0 not in needed
    result = _GroupResult()
    last_out: dict[str, int | None] = {"pts": None, "dts": None}
    # ``frame.to_ndarray(format=...)`` sets up a new swscale context for every frame
    # (1.6 ms at 640x360); one reformatter per decoder reuses it (0.13 ms), same pixels.
    to_rgb = VideoReformatter()

    def take(decoded: list[Any]) -> None:
        for frame in decoded:
            result.n_decoded += 1
            result.concealed |= bool(frame.is_corrupt)
            if frame.pts is not None:
                if last_out["pts"] is not None and frame.pts <= last_out["pts"]:
                    result.pts_increasing = False
                last_out["pts"] = frame.pts
                if frame.pts in wanted and sequential:
                    result.by_pts.setdefault(int(frame.pts), frame)
                elif frame.pts in wanted and frame.pts not in result.rgb_by_pts:
                    # Converted here, in the decoder's thread, so groups convert in parallel.
                    rgb = to_rgb.reformat(frame, format="rgb24").to_ndarray()
                    result.rgb_by_pts[int(frame.pts)] = _rotate(rgb, index.rotation_deg)
            if frame.dts is not None:
                if last_out["dts"] is not None and frame.dts <= last_out["dts"]:
                    result.dts_increasing = False
                last_out["dts"] = frame.dts
                if frame.dts in wanted and sequential:
                    result.by_dts.setdefault(int(frame.dts), frame)

    def send(packet: Any) -> None:
        try:
            take(codec.decode(packet))
        except av.error.FFmpegError as exc:
            # Like the FFmpeg CLI: note the damage and keep sending the following packets.
            result.errors.append(f"packet at pts {packet.pts}: {exc}")

    def drain_and_reset() -> None:
        try:
            take(codec.decode(None))
        except av.error.FFmpegError as exc:
            result.errors.append(f"draining the decoder: {exc}")
        codec.flush_buffers()

    with _open_container(src) as container:
        stream = _video_stream(container, src)
        codec = stream.codec_context
        codec.thread_type = "AUTO" if frame_threads else "NONE"
        codec.thread_count = 0 if frame_threads else 1
        pos = -1
        sending = False
        sent_any = False
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:
                    continue
                if prime:
                    # Decoded for its stream-level side effects only; its frame is not sampled here.
                    codec.skip_frame = "DEFAULT"
                    send(packet)
                    drain_and_reset()
                    prime = False
                    last_out.update(pts=None, dts=None)
                if packet.pts is None:
                    # Part of the bitstream even without a timestamp: send it where its neighbours go.
                    if sending or sequential:
                        send(packet)
                    continue
                pos += 1
                if pos >= len(plan.gop_of_packet) or pos > last_pos:
                    break
                if not sequential and pos > needed.get(plan.gop_of_packet[pos], -1):
                    sending = False
                    continue
                if not sending and sent_any and not sequential:
                    # Jumping over packets: drain what the decoder holds, then reset it, as after a seek.
                    drain_and_reset()
                sending = True
                if not sequential:
                    # Non-reference frames nobody asked for need not be reconstructed at all.
                    codec.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
                send(packet)
                sent_any = True
        except av.error.FFmpegError as exc:
            result.errors.append(f"the demuxer stopped: {exc}")
        if sent_any:
            try:
                take(codec.decode(None))
            except av.error.FFmpegError as exc:
                result.errors.append(f"draining the decoder: {exc}")
    return result


def _decode_decord(src: _Source, index: VideoIndex, frame_idx: np.ndarray) -> dict[int, np.ndarray]:
    """Decode frames (indices in presentation order) with decord's ``get_batch``."""
    import decord

    try:
        reader = decord.VideoReader(src.open(), ctx=decord.cpu(0), num_threads=0)
    except decord.DECORDError as exc:
        raise VideoDecodeError("corrupt", f"decord cannot open the video: {exc}", src.name) from exc
    if len(reader) != len(index.pts):
        raise VideoDecodeError(
            "unsupported",
            f"decord counts {len(reader)} frames where the demuxer found {len(index.pts)}",
            src.name,
        )
    unique_idx = np.unique(frame_idx)
    try:
        batch = reader.get_batch(unique_idx.tolist()).asnumpy()
    except decord.DECORDError as exc:
        raise VideoDecodeError("corrupt", f"decord failed to decode: {exc}", src.name) from exc
    frames: dict[int, np.ndarray] = {}
    for idx, frame in zip(unique_idx.tolist(), batch):
        if index.rotation_deg and frame.shape[:2] == (index.coded_height, index.coded_width) and (
            index.rotation_deg in (90, 270)
        ):
            # This decord build ignored the display matrix; rotate like the PyAV path.
            frame = _rotate(frame, index.rotation_deg)
        frames[int(index.pts[idx])] = np.ascontiguousarray(frame)
    return frames


def _downscale(frames: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink ``[F, H, W, 3]`` frames so that ``max(H, W) <= max_side``, keeping the aspect."""
    height, width = frames.shape[1:3]
    if max(height, width) <= max_side:
        return frames
    scale = max_side / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    out = np.empty((len(frames), new_h, new_w, 3), dtype=np.uint8)
    for start in range(0, len(frames), _RESIZE_CHUNK):
        chunk = torch.from_numpy(frames[start : start + _RESIZE_CHUNK]).permute(0, 3, 1, 2).float()
        resized = F.interpolate(chunk, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + _RESIZE_CHUNK] = resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def check_missing_share(
    missing_timestamps_s: Sequence[float], n_sampled: int, max_missing_frames_fraction: float, source: str
) -> None:
    """The partial-decode policy over counts: too many lost frames is an error, not a warning.

    The one statement of the rule, for a fresh decode (:func:`check_missing_frames`),
    features read back from a cache and a cache build's lookup of an existing entry, so
    all three reach the same verdict on the same loss.

    Args:
        missing_timestamps_s: Presentation times of the sampled frames that were lost.
        n_sampled: Frames the sampling rule asked for (kept plus lost).
        max_missing_frames_fraction: Largest share of sampled frames that may be missing
            (``0`` accepts only complete decodes, ``1`` accepts any partial decode).
        source: The path or URL, for the error.

    Raises:
        VideoDecodeError: ``partial_decode`` when more than the allowed share is missing.
        ValueError: If the limit is outside ``[0, 1]``.
    """
    if not 0.0 <= max_missing_frames_fraction <= 1.0:
        raise ValueError(f"max_missing_frames_fraction must be in [0, 1], got {max_missing_frames_fraction!r}")
    n_missing = len(missing_timestamps_s)
    if n_sampled and n_missing / n_sampled > max_missing_frames_fraction + _FRACTION_EPS:
        lost = ", ".join(f"{t:.3f}" for t in missing_timestamps_s[:10])
        more = "" if n_missing <= 10 else ", ..."
        raise VideoDecodeError(
            "partial_decode",
            f"{n_missing} of {n_sampled} sampled frames could not be decoded "
            f"(at {lost}{more} s), more than max_missing_frames_fraction={max_missing_frames_fraction}",
            source,
        )


def check_missing_frames(video: DecodedVideo, max_missing_frames_fraction: float, source: str) -> DecodedVideo:
    """Enforce the partial-decode policy (:func:`check_missing_share`) on a decoded video.

    Returns:
        ``video`` unchanged when the share is within the limit (its warnings still say
        what was lost).

    Raises:
        VideoDecodeError: ``partial_decode`` when more than the allowed share is missing.
        ValueError: If the limit is outside ``[0, 1]``.
    """
    check_missing_share(video.missing_timestamps_s, video.n_sampled, max_missing_frames_fraction, source)
    return video


def probe_video(source: str) -> VideoIndex:
    """Run the index pass only: frame times, duration, rate, size, rotation.

    Raises:
        VideoDecodeError: If the source is missing, empty, not a video or unreadable.
    """
    return _index(_resolve_source(str(source)))


def decode_video(
    source: str,
    fps: float = 1.0,
    *,
    max_frames: int | None = None,
    max_duration_s: float | None = None,
    max_side: int | None = None,
    backend: str = "auto",
    apply_sar: bool = False,
) -> DecodedVideo:
    """Decode the frames of ``source`` sampled at ``fps``, with their presentation times.

    Args:
        source: Local path or fsspec URL (``file://``, ``memory://``, ``s3://``, ...);
            non-local objects are read into memory.
        fps: Sampling rate in frames per second (the official model uses 1).
        max_frames: Cap on the number of frames; longer samplings are thinned uniformly.
        max_duration_s: Reject videos longer than this (``reason="too_long"``).
        max_side: Downscale frames (keeping the aspect) so the longer side is at most this.
        backend: ``"auto"`` / ``"pyav"`` or ``"decord"`` (the official reader); both
            return identical frames.
        apply_sar: Resize frames by the stream's sample aspect ratio to the shape a
            player displays (before ``max_side``). Off by default: the official model
            sees frames at their stored size, as decord returns them.

    Returns:
        A :class:`~d2vlm_ray.types.DecodedVideo` with RGB frames ``[F, H, W, 3]`` after
        rotation, ``timestamps_s`` relative to the first frame, the stream duration and
        average rate, and warnings about frames that could not be decoded.

    Raises:
        VideoDecodeError: With ``reason`` in :data:`REASONS`.
        ValueError: For invalid arguments.
    """
    video, _ = decode_video_counted(
        source,
        fps,
        max_frames=max_frames,
        max_duration_s=max_duration_s,
        max_side=max_side,
        backend=backend,
        apply_sar=apply_sar,
    )
    return video


def decode_video_counted(
    source: str,
    fps: float = 1.0,
    *,
    max_frames: int | None = None,
    max_duration_s: float | None = None,
    max_side: int | None = None,
    backend: str = "auto",
    apply_sar: bool = False,
) -> tuple[DecodedVideo, int | None]:
    """:func:`decode_video`, plus how many frames the decoder reconstructed.

    The count is the decoding cost that benchmarks report (frames skipped inside the
    decoder or never sent to it are not counted). It is ``None`` for the ``decord``
    backend, which does not report it.

    Args and Raises: as :func:`decode_video`.

    Returns:
        ``(video, n_decoded_frames)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    if fps <= 0 or not math.isfinite(fps):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    src = _resolve_source(str(source))
    index = _index(src)
    if max_duration_s is not None and index.duration_s > max_duration_s + _TIME_EPS_S:
        raise VideoDecodeError(
            "too_long", f"duration {index.duration_s:.3f} s exceeds max_duration_s={max_duration_s}", src.name
        )
    times_s = index.times_s
    frame_idx = sample_frame_indices(times_s, index.duration_s, fps, max_frames)
    wanted_pts = index.pts[frame_idx]

    n_decoded: int | None = None
    warnings = list(index.warnings)
    if backend == "decord":
        by_pts = _decode_decord(src, index, frame_idx)
    else:
        by_pts, n_decoded, decode_warnings = _decode_pyav(src, index, wanted_pts)
        warnings.extend(decode_warnings)

    ok = np.array([int(p) in by_pts for p in wanted_pts], dtype=bool)
    if not ok.any():
        detail = "; ".join(warnings[-2:])
        raise VideoDecodeError("corrupt", f"none of the sampled frames could be decoded ({detail})", src.name)
    if not ok.all():
        lost_s = times_s[frame_idx[~ok]]
        shown = ", ".join(f"{t:.3f}" for t in lost_s[:10]) + (", ..." if len(lost_s) > 10 else "")
        warnings.append(
            f"{int((~ok).sum())} of {len(ok)} sampled frames could not be decoded and were dropped "
            f"(at {shown} s): the decoder produced no frame with their timestamps"
        )
    frames = np.stack([by_pts[int(p)] for p in wanted_pts[ok]])
    if apply_sar and index.sample_aspect_ratio != 1:
        frames = apply_sample_aspect_ratio(
            frames, index.sample_aspect_ratio, rotated=index.rotation_deg in (90, 270)
        )
    if max_side is not None:
        frames = _downscale(frames, max_side)
    video = DecodedVideo(
        frames=frames,
        timestamps_s=times_s[frame_idx[ok]],
        duration_s=index.duration_s,
        source_fps=index.source_fps,
        width=int(frames.shape[2]),
        height=int(frames.shape[1]),
        warnings=warnings,
        missing_timestamps_s=[float(t) for t in times_s[frame_idx[~ok]]],
    )
    return video, n_decoded
