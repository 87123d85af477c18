"""Deterministic writers of barcoded test clips, and the barcode reader.

Every frame of a barcoded clip shows its own frame number as a grid of large black and
white cells, so a test can tell exactly which source frame a decoder returned, even
after lossy H.264 compression, rescaling or rotation:

* the frame is split into ``_GRID_ROWS x _GRID_COLS`` cells, read row by row;
* cells 0, 1 are orientation markers (white, black), the last two cells are (white, white),
  so a frame turned upside down never reads as valid;
* the cells in between carry 16 bits of the frame number (most significant first) then
  4 check bits, so a misread (wrong orientation, a grey frame) fails the check.

Clips are written with PyAV and libx264 with explicit presentation times (time base
1/90000 s), which is how the variable-frame-rate and start-offset clips are made.
Rotated clips use PyAV 18's ``VideoStream.set_display_rotation``, which writes the
container's display matrix; the stored (coded) picture is the displayed picture rotated
back, so a reader that ignores the display matrix reads no valid barcode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

_GRID_ROWS = 4
_GRID_COLS = 6
_N_DATA_BITS = 16
_N_CHECK_BITS = 4
_WHITE = 235
_BLACK = 20
_TIME_BASE = Fraction(1, 90000)
MAX_FRAME_NUMBER = (1 << _N_DATA_BITS) - 1
"""Largest frame number a barcode can carry."""


@dataclass(frozen=True)
class ClipInfo:
    """What a writer put into a test clip.

    Attributes:
        path: Where the clip was written.
        frame_times_s: Presentation time of every frame relative to the first frame, seconds.
        start_offset_s: Presentation time of the first frame in the container, seconds.
        duration_s: Time from the first frame's start to the last frame's end, seconds.
        width: Displayed width (after rotation).
        height: Displayed height (after rotation).
        rotation_deg: Counter-clockwise display rotation written into the container.
    """

    path: str
    frame_times_s: tuple[float, ...]
    start_offset_s: float
    duration_s: float
    width: int
    height: int
    rotation_deg: int

    @property
    def n_frames(self) -> int:
        """Number of frames in the clip."""
        return len(self.frame_times_s)


def _check_bits(number: int) -> list[int]:
    """The 4 check bits of ``number`` (an affine hash, so 0 does not map to all-zero)."""
    check = (number * 7 + 3 + (number >> 4) * 5 + (number >> 8) * 11 + (number >> 12) * 13) % 16
    return [(check >> (_N_CHECK_BITS - 1 - i)) & 1 for i in range(_N_CHECK_BITS)]


def _cell_values(number: int) -> list[int]:
    """Cell bits (1 = white) of the barcode of ``number``, row by row."""
    data = [(number >> (_N_DATA_BITS - 1 - i)) & 1 for i in range(_N_DATA_BITS)]
    return [1, 0, *data, *_check_bits(number), 1, 1]


def barcode_frame(number: int, width: int, height: int, *, texture: bool = False) -> np.ndarray:
    """Render the uint8 RGB frame ``[height, width, 3]`` whose barcode is ``number``.

    Args:
        number: Frame number, ``0 <= number <= MAX_FRAME_NUMBER``.
        width: Frame width in pixels (at least ``2 * _GRID_COLS``).
        height: Frame height in pixels (at least ``2 * _GRID_ROWS``).
        texture: Overlay a moving low-amplitude texture so the clip compresses like
            real footage (used for benchmark clips); the barcode stays readable.
    """
    if not 0 <= number <= MAX_FRAME_NUMBER:
        raise ValueError(f"frame number {number} outside 0..{MAX_FRAME_NUMBER}")
    if width < 2 * _GRID_COLS or height < 2 * _GRID_ROWS:
        raise ValueError(f"frame {width}x{height} too small for a {_GRID_COLS}x{_GRID_ROWS} barcode")
    cells = np.array(_cell_values(number), dtype=np.uint8).reshape(_GRID_ROWS, _GRID_COLS)
    row_idx = np.arange(height) * _GRID_ROWS // height
    col_idx = np.arange(width) * _GRID_COLS // width
    bits = cells[row_idx[:, None], col_idx[None, :]]
    gray = np.where(bits == 1, _WHITE, _BLACK).astype(np.int16)
    frame = np.repeat(gray[:, :, None], 3, axis=2)
    if texture:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = number * 0.35
        wave = 22.0 * np.sin(xx / 9.0 + phase) * np.cos(yy / 13.0 - 0.6 * phase)
        noise = np.random.default_rng(number).integers(-6, 7, size=(height, width), dtype=np.int16)
        delta = wave.astype(np.int16) + noise
        frame[:, :, 0] += delta
        frame[:, :, 1] -= delta // 2
        frame[:, :, 2] += delta // 3
    return np.clip(frame, 0, 255).astype(np.uint8)


def read_barcode(frame: np.ndarray) -> int:
    """Read the frame number from a barcoded RGB frame ``[H, W, 3]`` (uint8).

    Only the middle half of each cell is looked at, so block edges blurred by
    compression or rescaling do not matter.

    Returns:
        The frame number, or ``-1`` if the frame holds no valid barcode (wrong
        orientation, not a barcoded frame, too damaged).
    """
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an RGB frame [H, W, 3], got shape {frame.shape}")
    height, width = frame.shape[:2]
    gray = frame.astype(np.float32).mean(axis=2)
    bits: list[int] = []
    for row in range(_GRID_ROWS):
        top, bottom = row * height / _GRID_ROWS, (row + 1) * height / _GRID_ROWS
        for col in range(_GRID_COLS):
            left, right = col * width / _GRID_COLS, (col + 1) * width / _GRID_COLS
            y0, y1 = int(top + (bottom - top) / 4), int(math.ceil(bottom - (bottom - top) / 4))
            x0, x1 = int(left + (right - left) / 4), int(math.ceil(right - (right - left) / 4))
            bits.append(1 if gray[y0:y1, x0:x1].mean() > (_WHITE + _BLACK) / 2 else 0)
    if bits[:2] != [1, 0] or bits[-2:] != [1, 1]:
        return -1
    data = bits[2 : 2 + _N_DATA_BITS]
    number = int("".join(map(str, data)), 2)
    if bits[2 + _N_DATA_BITS : -2] != _check_bits(number):
        return -1
    return number


def write_barcode_clip(
    path: str | Path,
    *,
    fps: float = 10.0,
    duration_s: float = 3.0,
    width: int = 96,
    height: int = 64,
    gop_size: int | None = None,
    b_frames: int = 0,
    rotation_deg: int = 0,
    start_offset_s: float = 0.0,
    frame_times_s: Sequence[float] | None = None,
    texture: bool = False,
    crf: int = 18,
    preset: str = "veryfast",
    fixed_b_frames: bool = False,
) -> ClipInfo:
    """Write a barcoded H.264 clip (mp4/mkv chosen by the file suffix).

    Args:
        path: Output file.
        fps: Frame rate of a constant-frame-rate clip; the nominal rate of a VFR clip.
        duration_s: Length of a constant-frame-rate clip (``round(duration_s * fps)`` frames).
        width: Displayed width in pixels (even).
        height: Displayed height in pixels (even).
        gop_size: Keyframe interval in frames (libx264's default when ``None``).
        b_frames: Maximum consecutive B-frames.
        rotation_deg: Counter-clockwise display rotation to record (0, 90, 180, 270).
        start_offset_s: Presentation time of the first frame (a non-zero start offset).
        frame_times_s: Explicit frame times relative to the first frame (strictly
            increasing, starting at 0) for a variable-frame-rate clip; overrides
            ``duration_s``.
        texture: Overlay a moving texture (see :func:`barcode_frame`).
        crf: libx264 constant rate factor (lower is higher quality).
        preset: libx264 preset.
        fixed_b_frames: Always use ``b_frames`` B-frames (``b-adapt=0``) instead of
            letting x264 choose; textured clips otherwise get almost none.

    Returns:
        A :class:`ClipInfo` describing the clip.
    """
    if rotation_deg % 90 or rotation_deg % 360 not in (0, 90, 180, 270):
        raise ValueError(f"rotation_deg must be a multiple of 90, got {rotation_deg}")
    if width % 2 or height % 2:
        raise ValueError("width and height must be even for yuv420p")
    rotation_deg %= 360
    tick_s = float(_TIME_BASE)
    if frame_times_s is None:
        n_frames = max(1, round(duration_s * fps))
        times_s = [i / fps for i in range(n_frames)]
        last_duration_s = 1.0 / fps
    else:
        times_s = [float(t) for t in frame_times_s]
        if not times_s or times_s[0] != 0.0 or any(b <= a for a, b in zip(times_s, times_s[1:])):
            raise ValueError("frame_times_s must start at 0 and strictly increase")
        last_duration_s = 1.0 / fps
    pts = [round((start_offset_s + t) / tick_s) for t in times_s]
    if len(set(pts)) != len(pts):
        raise ValueError("frame times closer than the 1/90000 s time base")

    durations = [b - a for a, b in zip(pts, pts[1:])] + [round(last_duration_s / tick_s)]

    # The coded picture is the displayed one rotated back (clockwise), so that applying
    # the recorded counter-clockwise display rotation restores it.
    k_back = -(rotation_deg // 90)
    coded_w, coded_h = (height, width) if rotation_deg in (90, 270) else (width, height)

    path = Path(path)
    with av.open(str(path), mode="w") as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream("libx264", rate=rate)
        stream.width = coded_w
        stream.height = coded_h
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = _TIME_BASE
        stream.time_base = _TIME_BASE
        options = {"crf": str(crf), "preset": preset, "bframes": str(b_frames)}
        if fixed_b_frames:
            options["b-adapt"] = "0"
        if gop_size is not None:
            # Fixed keyframe interval: no scene-cut keyframes, so GOPs are exactly gop_size.
            options.update({"keyint": str(gop_size), "min-keyint": str(gop_size), "scenecut": "0"})
        stream.codec_context.options = {"x264-params": ":".join(f"{k}={v}" for k, v in options.items())}
        if gop_size is not None:
            stream.codec_context.gop_size = gop_size
        if rotation_deg:
            stream.set_display_rotation(rotation_deg)
        for number, frame_pts in enumerate(pts):
            image = barcode_frame(number, width, height, texture=texture)
            if k_back:
                image = np.ascontiguousarray(np.rot90(image, k_back))
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = frame_pts
            frame.time_base = _TIME_BASE
            # Explicit durations let the muxer record the true length of the last frame.
            frame.duration = durations[number]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)

    return ClipInfo(
        path=str(path),
        frame_times_s=tuple(times_s),
        start_offset_s=float(start_offset_s),
        duration_s=times_s[-1] + last_duration_s,
        width=width,
        height=height,
        rotation_deg=rotation_deg,
    )


def write_long_gop_clip(
    path: str | Path,
    *,
    duration_s: float = 120.0,
    fps: float = 30.0,
    width: int = 640,
    height: int = 360,
    gop_size: int = 250,
    b_frames: int = 3,
) -> ClipInfo:
    """Write the decoding benchmark clip: long GOP, B-frames, textured, barcoded.

    Defaults: 120 s at 30 fps, 640x360, keyframe every 250 frames, 3 B-frames between
    reference frames (fixed, with x264's default B-pyramid: one of the three is a
    reference), like typical web video.
    """
    return write_barcode_clip(
        path,
        fps=fps,
        duration_s=duration_s,
        width=width,
        height=height,
        gop_size=gop_size,
        b_frames=b_frames,
        texture=True,
        crf=23,
        preset="veryfast",
        fixed_b_frames=True,
    )


def write_audio_only_clip(path: str | Path, *, duration_s: float = 1.0, sample_rate: int = 16000) -> str:
    """Write a file with a single AAC audio stream and no video (a ``no_video_stream`` case).

    Returns:
        The path written.
    """
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=sample_rate)
        stream.layout = "mono"
        n_samples = int(duration_s * sample_rate)
        tone = (0.2 * np.sin(2 * np.pi * 440.0 * np.arange(n_samples) / sample_rate)).astype(np.float32)
        chunk = 1024
        for start in range(0, n_samples, chunk):
            samples = tone[None, start : start + chunk]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return str(path)
