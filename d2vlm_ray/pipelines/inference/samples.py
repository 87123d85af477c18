"""Samples of an evaluation: the annotation file read, format detected, videos resolved, ids checked."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2vlm_ray.pipelines.inference.config import EvaluateConfig

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """One sample to predict.

    Attributes:
        sample_id: Unique id (``id`` of evi.json, ``idx`` of E.T. Bench).
        record: The parsed record (video path resolved).
        base: The E.T. Bench record the prediction extends (original fields for E.T. Bench).
    """

    sample_id: str
    record: dict[str, Any]
    base: dict[str, Any]


@dataclass
class SampleSet:
    """What the annotation file yielded.

    Attributes:
        samples: Well-formed samples in file order (after ``limit``).
        format: ``evi`` or ``etbench``.
        video_root: The folder relative video paths were joined to.
        annotation_errors: Malformed annotation records, as strings (not predicted).
    """

    samples: list[Sample]
    format: str
    video_root: str
    annotation_errors: list[str] = field(default_factory=list)


def detect_format(items: Any, path: str) -> str:
    """``evi`` or ``etbench`` from the first record's fields.

    Raises:
        ValueError: If the file is not a non-empty list of records of either kind.
    """
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        raise ValueError(f"annotations {path!r}: expected a non-empty JSON list of records")
    first = items[0]
    if "conversations" in first:
        return "evi"
    if "q" in first and "idx" in first:
        return "etbench"
    raise ValueError(
        f"annotations {path!r}: cannot tell the format (no 'conversations' for evi, no 'q'/'idx' for "
        "etbench); set format"
    )


def _default_video_root(annotation_path: Path, first_video: str) -> str:
    here = annotation_path.parent
    if "://" in first_video or os.path.isabs(first_video) or (here / first_video).exists():
        return str(here)
    if (here.parent / first_video).exists():
        return str(here.parent)
    return str(here)


def natural_key(sample_id: str) -> tuple[int, int, str]:
    return (0, int(sample_id), "") if sample_id.isdigit() else (1, 0, sample_id)


def sort_by_sample_id(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records sorted by ``sample_id``: numeric ids numerically first, then the rest as strings."""
    return sorted(items, key=lambda r: natural_key(str(r["sample_id"])))


def load_samples(cfg: EvaluateConfig) -> SampleSet:
    """Read and select the samples of ``cfg.annotations``.

    Raises:
        ValueError: For an unreadable file, an unknown format or duplicate sample ids.
    """
    from d2vlm_ray.data.annotations import read_etbench_json, read_evi_json, record_to_etbench

    path = Path(cfg.annotations)
    if not path.is_file():
        raise ValueError(f"annotations: file {str(path)!r} does not exist")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"annotations {str(path)!r}: not valid JSON ({exc})") from None
    fmt = detect_format(items, str(path)) if cfg.format == "auto" else cfg.format
    video_root = cfg.video_root or _default_video_root(path, str(items[0].get("video", "")) if items else "")
    reader = read_evi_json if fmt == "evi" else read_etbench_json
    result = reader(path, video_root=video_root, on_error="collect")
    errors = [str(issue) for issue in result.errors]
    raw_by_id: dict[str, dict[str, Any]] = {}
    if fmt == "etbench":
        for item in items:
            if isinstance(item, dict) and "idx" in item:
                raw_by_id.setdefault(str(item["idx"]), item)
    samples: list[Sample] = []
    seen: set[str] = set()
    for position, record in enumerate(result.records):
        sid = record.sample_id
        if sid in seen:
            raise ValueError(f"annotations {str(path)!r}: duplicate sample id {sid!r}; ids key resume and merge")
        seen.add(sid)
        if fmt == "etbench":
            base = {k: v for k, v in raw_by_id[sid].items() if k != "a"}
        else:
            base = record_to_etbench(record, position, video_root=video_root)
        base["sample_id"] = sid
        samples.append(Sample(sample_id=sid, record=record.to_dict(), base=base))
    if cfg.limit:
        samples = samples[: cfg.limit]
    return SampleSet(samples=samples, format=fmt, video_root=video_root, annotation_errors=errors)
