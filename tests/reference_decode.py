"""An independent reference decode for conformance tests (test-only helper).

It shares nothing with :mod:`d2vlm_ray.data.video` except the sampling rule
(:func:`~d2vlm_ray.data.video.sample_frame_indices`), which is the definition being
conformed to. Everything else is done the plainest way, like the FFmpeg CLI:

* one decoder, one sequential pass over **every** packet of the video stream (no GOP
  groups, no skipping, no seeking), single-threaded: on damaged streams the concealed
  pixels depend on the threading mode (measured on ``decord_corrupted.mp4``: no
  threads, slice threads and frame threads give three different frames after the
  damage), and frame-threaded decodes of ``mp4parse_no_timescale_broken.mp4`` differed
  between runs on a loaded machine, so only one thread gives a fixed answer;
* a packet that fails to decode is counted and the next one is sent anyway, so frames
  after damage are recovered as ``ffmpeg -i F -f null -`` recovers them;
* the frame times are the packets' presentation times; a decoded frame is labelled
  with its ``pts``, or with its ``dts`` when the decoder's output ``pts`` go backwards
  (containers such as AVI store no pts, and the parser's guess is wrong for packed
  B-frames; the decoder's output order is the display order);
* rotation comes from the first decoded frame's display matrix, used only when the
  matrix is a rotation by a multiple of 90 degrees (an all-zero or sheared matrix is
  ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import av
import numpy as np

from d2vlm_ray.data.video import sample_frame_indices


@dataclass
class ReferenceDecode:
    """What the reference decode of one file gives.

    Attributes:
        times_s: Relative presentation time of every frame the container lists, ascending.
        duration_s: First frame's start to the last frame's end, seconds.
        sampled_times_s: Relative times of the sampled frames (the sampling rule's choice).
        frames: ``{relative time rounded to 1 us: RGB frame [H, W, 3] after rotation}`` for
            the sampled frames the decoder produced.
        rotation_deg: Counter-clockwise display rotation applied (0, 90, 180, 270).
        n_decoded: Frames the decoder produced in total.
        n_errors: Packets whose decoding raised an error.
        label: ``"pts"`` or ``"dts"``, which timestamp labelled the decoded frames.
    """

    times_s: np.ndarray
    duration_s: float
    sampled_times_s: np.ndarray
    frames: dict[float, np.ndarray] = field(default_factory=dict)
    rotation_deg: int = 0
    n_decoded: int = 0
    n_errors: int = 0
    label: str = "pts"

    @property
    def recovered_times_s(self) -> list[float]:
        """Sampled times (rounded to 1 us) for which the reference has a frame."""
        return sorted(self.frames)


def key_s(time_s: float) -> float:
    """Round a time to 1 us, the key of :attr:`ReferenceDecode.frames`."""
    return round(float(time_s), 6)


def _matrix_rotation_deg(frame: av.VideoFrame) -> int:
    """Counter-clockwise rotation of a valid display matrix, else 0."""
    try:
        side_data = list(frame.side_data)
    except ValueError:
        side_data = []
    for item in side_data:
        if item.type != av.sidedata.sidedata.Type.DISPLAYMATRIX:
            continue
        matrix = np.frombuffer(bytes(item), dtype="<i4").astype(np.float64)
        a, b, c, d = matrix[0] / 65536, matrix[1] / 65536, matrix[3] / 65536, matrix[4] / 65536
        # Entries of a rotation by a multiple of 90 degrees are 0 or +-1, determinant +1.
        entries_ok = all(min(abs(x), abs(abs(x) - 1)) < 1e-3 for x in (a, b, c, d))
        if not entries_ok or abs(a * d - b * c - 1) > 1e-3:
            return 0
        # FFmpeg stores the matrix transposed: atan2(b, a) is the clockwise turn a player
        # applies (ffprobe prints its negative as "rotation").
        clockwise_deg = round(float(np.degrees(np.arctan2(b, a))))
        return (-clockwise_deg) % 360
    return 0


def reference_decode(path: str, fps: float, max_frames: int | None = None) -> ReferenceDecode:
    """Decode ``path`` sequentially and pick the frames sampled at ``fps``.

    Args:
        path: A local media file.
        fps: Sampling rate in frames per second.
        max_frames: Cap as in :func:`~d2vlm_ray.data.video.sample_frame_indices`.

    Returns:
        A :class:`ReferenceDecode`.

    Raises:
        LookupError: If the file has no video stream other than attached pictures, or
            lists no frame.
    """
    with av.open(path) as container:
        streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not streams:
            raise LookupError("no video stream")
        stream = streams[0]
        stream.codec_context.thread_type = "NONE"
        time_base = float(stream.time_base)
        packet_pts: list[int] = []
        packet_duration: dict[int, int] = {}
        outputs: list[tuple[int | None, int | None, av.VideoFrame]] = []
        n_errors = 0

        def collect(frames: list[av.VideoFrame]) -> None:
            outputs.extend((frame.pts, frame.dts, frame) for frame in frames)

        try:
            for packet in container.demux(stream):
                if packet.pts is not None and packet.size > 0:
                    packet_pts.append(int(packet.pts))
                    packet_duration[int(packet.pts)] = int(packet.duration or 0)
                try:
                    collect(stream.codec_context.decode(packet))
                except av.error.FFmpegError:
                    n_errors += 1
        except av.error.FFmpegError:
            n_errors += 1
        try:
            collect(stream.codec_context.decode(None))
        except av.error.EOFError:
            pass  # the demuxer's last (empty) packet already drained the decoder
        except av.error.FFmpegError:
            n_errors += 1
    if not packet_pts:
        raise LookupError("no frames listed")
    pts = np.array(sorted(set(packet_pts)), dtype=np.int64)
    last = packet_duration.get(int(pts[-1]), 0) or (int(np.median(np.diff(pts))) if len(pts) > 1 else 0)
    duration_s = float(pts[-1] - pts[0] + last) * time_base
    times_s = (pts - pts[0]).astype(np.float64) * time_base
    idx = sample_frame_indices(times_s, duration_s, fps, max_frames)
    wanted = {int(pts[i]) for i in idx}

    def increasing(values: list[int | None]) -> bool:
        known = [v for v in values if v is not None]
        return all(b > a for a, b in zip(known, known[1:]))

    label = "pts"
    if not increasing([p for p, _, _ in outputs]) and increasing([d for _, d, _ in outputs]):
        label = "dts"
    result = ReferenceDecode(
        times_s=times_s,
        duration_s=duration_s,
        sampled_times_s=times_s[idx],
        n_decoded=len(outputs),
        n_errors=n_errors,
        label=label,
    )
    if outputs:
        result.rotation_deg = _matrix_rotation_deg(outputs[0][2])
    for frame_pts, frame_dts, frame in outputs:
        stamp = frame_pts if label == "pts" else frame_dts
        if stamp is None or int(stamp) not in wanted:
            continue
        key = key_s((int(stamp) - int(pts[0])) * time_base)
        if key in result.frames:
            continue
        rgb = frame.to_ndarray(format="rgb24")
        result.frames[key] = np.ascontiguousarray(np.rot90(rgb, result.rotation_deg // 90))
    return result
