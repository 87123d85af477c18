"""``d2vlm-ray probe VIDEO [--fps F] [--decode]``: print a video's sampled frame times as JSON.

Prints one JSON object ``{duration_s, source_fps, width, height, sample_aspect_ratio,
n_frames, timestamps_s, counts_from}`` and exits 0, or prints
``{"error": {"reason", "message", "source"}}`` and exits 2. Sizes are after rotation.

By default only the index pass runs (demux plus the first frame), so probing is cheap,
and ``n_frames`` / ``timestamps_s`` are what the **container metadata** promises for the
frames sampled at ``--fps`` (``"counts_from": "container_index"``): a damaged file can
decode fewer. ``--decode`` decodes them as ``decode_video`` does and reports what
decoding gives (``"counts_from": "decode"``): the frames that decoded, plus
``missing_timestamps_s`` for those that did not, and the decoder's warnings.
"""

from __future__ import annotations

import argparse
import json
import sys

from d2vlm_ray.data.video import VideoDecodeError, decode_video, probe_video, sample_frame_indices

EXIT_OK = 0
EXIT_DECODE_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2vlm-ray probe", description=__doc__.splitlines()[0])
    parser.add_argument("video", help="local path or fsspec URL of the video")
    parser.add_argument("--fps", type=float, default=1.0, help="sampling rate in frames per second (default 1)")
    parser.add_argument("--max-frames", type=int, default=None, help="cap on the number of sampled frames")
    parser.add_argument(
        "--decode",
        action="store_true",
        help="decode the sampled frames and report what decoding gives (default: container metadata only)",
    )
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
        decoded = decode_video(args.video, args.fps, max_frames=args.max_frames) if args.decode else None
    except VideoDecodeError as exc:
        print(json.dumps({"error": exc.to_dict()}))
        return EXIT_DECODE_ERROR
    except ValueError as exc:
        print(json.dumps({"error": {"reason": "invalid_argument", "message": str(exc), "source": args.video}}))
        return EXIT_DECODE_ERROR
    report: dict[str, object] = {
        "duration_s": round(index.duration_s, 6),
        "source_fps": round(index.source_fps, 6),
        "width": index.width,
        "height": index.height,
        "sample_aspect_ratio": str(index.sample_aspect_ratio),
    }
    if decoded is None:
        times_s = index.times_s[frame_idx]
        report["n_frames"] = int(len(frame_idx))
        report["timestamps_s"] = [round(float(t), 6) for t in times_s]
        report["counts_from"] = "container_index"
        warnings = list(index.warnings)
    else:
        report["n_frames"] = int(len(decoded.timestamps_s))
        report["timestamps_s"] = [round(float(t), 6) for t in decoded.timestamps_s]
        report["missing_timestamps_s"] = [round(float(t), 6) for t in decoded.missing_timestamps_s]
        report["counts_from"] = "decode"
        warnings = list(decoded.warnings)
    if warnings:
        report["warnings"] = warnings
    print(json.dumps(report))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
