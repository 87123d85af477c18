"""Partial decodes for tests: a lossy stand-in for the decoder and a really damaged file."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from d2vlm_ray.data.testclips import write_barcode_clip
from d2vlm_ray.data.video import decode_video
from d2vlm_ray.types import DecodedVideo


def lossy_decoder(
    drop_idx: Sequence[int], real: Callable[..., DecodedVideo] = decode_video, *, name_the_file: bool = False
) -> Callable[..., DecodedVideo]:
    """``decode_video`` that loses the sampled frames at ``drop_idx``, reporting them as the decoder does.

    With ``name_the_file`` it adds a warning quoting the source path, as FFmpeg's error
    texts can (responses and cache entries must not carry it).
    """

    def decode(source: str, fps: float = 1.0, **kwargs: object) -> DecodedVideo:
        full = real(source, fps, **kwargs)
        keep = np.ones(len(full.timestamps_s), dtype=bool)
        keep[list(drop_idx)] = False
        lost = [float(t) for t in full.timestamps_s[~keep]]
        return DecodedVideo(
            frames=full.frames[keep],
            timestamps_s=full.timestamps_s[keep],
            duration_s=full.duration_s,
            source_fps=full.source_fps,
            width=full.width,
            height=full.height,
            warnings=[
                *full.warnings,
                *([f"the index of {source} ends early"] if name_the_file else []),
                f"{len(lost)} of {len(keep)} sampled frames could not be decoded and were dropped",
            ],
            missing_timestamps_s=lost,
        )

    return decode


def write_damaged_clip(path: Path) -> Path:
    """A 6 s H.264 clip (keyframe every second) with 400 bytes of garbage 30 % into the file."""
    write_barcode_clip(path, fps=4, duration_s=6, gop_size=4)
    data = bytearray(path.read_bytes())
    start = int(len(data) * 0.3)
    data[start : start + 400] = bytes((i * 37) % 256 for i in range(400))
    path.write_bytes(bytes(data))
    return path
