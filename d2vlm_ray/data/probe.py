"""``d2vlm-ray probe VIDEO [--fps F]``: print what decoding a video at ``fps`` would give.

Prints one JSON object ``{duration_s, source_fps, width, height, n_frames, timestamps_s}``
(``n_frames`` and ``timestamps_s`` describe the frames sampled at ``--fps``, sizes are
after rotation) and exits 0, or prints ``{"error": {"reason", "message", "source"}}`` and
exits 2. Only the index pass runs (demux plus the first frame), so probing is cheap.
"""

from __future__ import annotations

import argparse
import json
import sys

from d2vlm_ray.data.video import VideoDecodeError, probe_video, sample_frame_indices

EXIT_OK = 0
EXIT_DECODE_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2vlm-ray probe", description=__doc__.splitlines()[0])
    parser.add_argument("video", help="local path or fsspec URL of the video")
    parser.add_argument("--fps", type=float, default=1.0, help="sampling rate in frames per second (default 1)")
    parser.add_argument("--max-frames", type=int, default=None, help="cap on the number of sampled frames")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the probe command.

    Args:
        argv: Arguments after ``probe`` (``sys.argv[2:]`` style); ``None`` reads ``sys.argv[1:]``.

    Returns:
        0 on success, 2 if the video cannot be decoded (argparse exits 2 on bad usage too).
    """
    args = _parser().parse_args(argv)
    try:
        index = probe_video(args.video)
        frame_idx = sample_frame_indices(index.times_s, index.duration_s, args.fps, args.max_frames)
    except VideoDecodeError as exc:
        print(json.dumps({"error": exc.to_dict()}))
        return EXIT_DECODE_ERROR
    except ValueError as exc:
        print(json.dumps({"error": {"reason": "invalid_argument", "message": str(exc), "source": args.video}}))
        return EXIT_DECODE_ERROR
    times_s = index.times_s[frame_idx]
    report = {
        "duration_s": round(index.duration_s, 6),
        "source_fps": round(index.source_fps, 6),
        "width": index.width,
        "height": index.height,
        "n_frames": int(len(frame_idx)),
        "timestamps_s": [round(float(t), 6) for t in times_s],
    }
    if index.warnings:
        report["warnings"] = list(index.warnings)
    print(json.dumps(report))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
