"""``d2vlm-ray metrics``: score a prediction file and print ONE JSON object.

Usage (``argv`` excludes the word ``metrics``)::

    d2vlm-ray metrics --benchmark etbench|charades|youcook2 [--variant NAME] PRED_PATH [--gt GT_PATH]

Accepted ``PRED_PATH`` formats:

* a ``.json`` file (a list of records, or a TimeChat-style dict for charades and
  youcook2), a ``.jsonl`` file (one record per line), or a directory whose
  ``.json``/``.jsonl`` files (sorted by name; files whose name starts with
  ``metrics`` are skipped, so an earlier output is never re-read) are
  concatenated. Directory mode needs record lists.
* etbench: E.T. Bench prediction records (``task``, ``source``, ``a`` and the GT
  fields); variants ``official`` (default), ``d2vlm``, ``d2vlm-strict``, ``fixed``.
* charades: records with ``a`` and ``tgt`` (``duration`` is ignored, as in every
  official evaluator), E.T. Chat records (``pred``, ``span``), or a TimeChat
  ``{qid: {"timestamp": ...}}`` dict with ``--gt``; variants ``standard``
  (default), ``etchat``, ``timechat``, ``d2vlm``.
* youcook2: records with ``a``, ``tgt`` (list of spans) and ``g`` (captions), or a
  TimeChat ``{video: [{"timestamp", "caption"}]}`` dict with ``--gt``; variants
  ``official`` (default), ``timechat``, ``d2vlm``, ``fixed``.

Output: the metrics as one JSON object on stdout (NaN written as ``null``), exit
code 0. Bad input (unreadable file, unknown benchmark/variant, malformed records,
missing sentence model): ``{"error": "..."}`` on stdout, the same message on
stderr, exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

from d2vlm_ray.eval.coco import CaptionScorerError
from d2vlm_ray.eval.similarity import SimilarityModelError

BENCHMARKS = ("etbench", "charades", "youcook2")
DEFAULT_VARIANTS = {"etbench": "official", "charades": "standard", "youcook2": "official"}
EXIT_BAD_INPUT = 2


class _UsageError(Exception):
    """Argument errors, raised instead of argparse's print-and-exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="d2vlm-ray metrics", description="Score predictions and print one JSON object.")
    parser.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    parser.add_argument("--variant", default=None, help="scorer variant (default depends on the benchmark)")
    parser.add_argument("--gt", default=None, help="ground-truth file for TimeChat-format predictions")
    parser.add_argument("--no-coco", action="store_true", help="skip the optional pycocoevalcap metrics")
    parser.add_argument("pred_path", help="prediction .json/.jsonl file or directory")
    return parser


def _read_json_file(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def load_predictions(path: str | Path) -> Any:
    """Read a prediction file or directory (formats in the module docstring).

    Raises:
        ValueError: Missing path, no files, bad JSON, or mixed layouts in a directory.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.suffix in (".json", ".jsonl") and p.is_file() and not p.name.startswith("metrics"))
        if not files:
            raise ValueError(f"no .json/.jsonl prediction files in {path}")
        records: list[Any] = []
        for file in files:
            content = _read_json_file(file)
            if not isinstance(content, list):
                raise ValueError(f"{file} is not a list of records (directory mode)")
            records.extend(content)
        return records
    if not path.is_file():
        raise ValueError(f"prediction path {path} does not exist")
    return _read_json_file(path)


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf by None so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run_metrics(benchmark: str, variant: str, pred_path: str, gt_path: str | None, with_coco: bool) -> dict[str, Any]:
    """Load the predictions and score them; the library entry behind ``main``.

    Raises:
        ValueError: On any bad input.
    """
    preds = load_predictions(pred_path)
    gt = load_predictions(gt_path) if gt_path else None
    if benchmark == "etbench":
        from d2vlm_ray.eval.etbench import evaluate_etbench

        if not isinstance(preds, list):
            raise ValueError("E.T. Bench predictions must be a list of records")
        return evaluate_etbench(preds, variant=variant, with_coco=with_coco)
    if benchmark == "charades":
        from d2vlm_ray.eval.charades import evaluate_charades, load_items

        return evaluate_charades(load_items(preds, gt), convention=variant) | {"variant": variant}
    from d2vlm_ray.eval.youcook2 import evaluate_youcook2, load_videos

    return evaluate_youcook2(load_videos(preds, gt, variant), with_coco=with_coco, variant=variant) | {
        "variant": variant}


def _fail(message: str) -> int:
    payload = json.dumps({"error": message})
    print(payload)
    print(message, file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``d2vlm-ray metrics``.

    Args:
        argv: Arguments without the program name and without ``metrics``;
            ``None`` reads ``sys.argv[1:]``.

    Returns:
        0 on success, 2 on bad input (the error is printed as JSON).
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except _UsageError as exc:
        return _fail(f"usage error: {exc}")
    except SystemExit as exc:
        # --help prints and exits 0 through argparse.
        return int(exc.code or 0)
    variant = args.variant or DEFAULT_VARIANTS[args.benchmark]
    try:
        result = run_metrics(args.benchmark, variant, args.pred_path, args.gt, with_coco=not args.no_coco)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError, SimilarityModelError,
            CaptionScorerError) as exc:
        return _fail(f"{type(exc).__name__}: {exc}")
    print(json.dumps(_json_safe(result), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
