"""``d2vlm-ray answer``: the serving path in one process, without Ray or Serve.

Example::

    d2vlm-ray answer runs/quickstart/data/videos/scene_0000.mp4 "When does the red circle move?" \\
        --ckpt runs/quickstart/ckpt --cache-root runs/quickstart/feature_cache --max-new-tokens 32

prints the same JSON body as ``POST /v1/answer`` (answer, evidence, grounding, timings,
and the decode's ``warnings`` / ``missing_timestamps_s``); each warning is also printed
on stderr as ``warning: ...``, so a partially decoded video never passes unnoticed. A
decode that lost more than ``--max-missing-frames-fraction`` of its sampled frames is
an error (``reason: partial_decode``, exit 1). Errors print ``{"detail", "reason", "status"}`` on stderr and exit with 1 (bad input) or
2 (bad arguments). Local paths and any fsspec URL are accepted: the media-root policy
guards the network service, not a user's own shell.
"""

from __future__ import annotations

import argparse
import json
import sys

from d2vlm_ray.cache import DEFAULT_MAX_MISSING_FRAMES_FRACTION
from d2vlm_ray.config.schema import DecodeSettings
from d2vlm_ray.serving.core import DTYPES, FeatureSettings, LocalPipeline
from d2vlm_ray.serving.errors import ServiceError
from d2vlm_ray.serving.schemas import AnswerResponse


def _span(text: str) -> tuple[float, float]:
    try:
        start_s, end_s = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START_S,END_S (e.g. 10,20), got {text!r}") from None
    if not 0 <= start_s <= end_s:
        raise argparse.ArgumentTypeError(f"need 0 <= START_S <= END_S, got {text!r}")
    return start_s, end_s


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``answer`` sub-command's arguments."""
    parser = argparse.ArgumentParser(
        prog="d2vlm-ray answer", description="Ground and answer a question about a video; prints JSON."
    )
    parser.add_argument("video", help="local path or fsspec URL of the video")
    parser.add_argument("question", help="the question (<evi> marks question-side spans)")
    parser.add_argument("--ckpt", required=True, help="d2vlm_ray checkpoint directory")
    parser.add_argument(
        "--src-span-s", type=_span, action="append", default=[], metavar="START_S,END_S",
        help="span of a question-side <evi> (repeat once per <evi>)",
    )
    parser.add_argument("--cache-root", default=None, help="feature cache root (default: no cache)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=64, help="bound on answer tokens")
    parser.add_argument("--max-grounding-tokens", type=_positive_int, default=16, help="bound on grounding tokens")
    parser.add_argument("--fps", type=float, default=1.0, help="frame sampling rate")
    parser.add_argument("--max-frames", type=_positive_int, default=128, help="frame cap")
    parser.add_argument(
        "--max-missing-frames-fraction", type=_fraction, default=DEFAULT_MAX_MISSING_FRAMES_FRACTION,
        help="largest share of sampled frames the decode may lose before the video is refused (partial_decode)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model compute dtype")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``answer`` sub-command; ``argv`` excludes the word ``answer``.

    Returns:
        0 on success, 1 when the input is rejected, 2 for bad arguments.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if not args.question.strip():
        print(json.dumps({"detail": "question: must not be empty", "reason": "invalid_request", "status": 422}),
              file=sys.stderr)
        return 2
    try:
        pipeline = LocalPipeline.from_checkpoint(
            args.ckpt,
            cache_root=args.cache_root,
            settings=FeatureSettings(
                fps=args.fps, max_frames=args.max_frames, max_missing_frames_fraction=args.max_missing_frames_fraction
            ),
            dtype=args.dtype,
            device=args.device,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(json.dumps({"detail": f"--ckpt: {exc}", "reason": "bad_checkpoint", "status": 2}), file=sys.stderr)
        return 2
    try:
        body = pipeline.run(
            args.video,
            args.question,
            src_spans_s=args.src_span_s,
            ground_settings=DecodeSettings(max_new_tokens=args.max_grounding_tokens),
            answer_settings=DecodeSettings(max_new_tokens=args.max_new_tokens),
        )
    except ServiceError as exc:
        print(json.dumps({**exc.to_dict(), "status": exc.status_code}), file=sys.stderr)
        return 1
    for warning in body["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if body["missing_timestamps_s"]:
        lost = ", ".join(f"{t:.3f}" for t in body["missing_timestamps_s"])
        print(f"warning: the answer was computed without the frames at {lost} s", file=sys.stderr)
    print(AnswerResponse.model_validate(body).model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
