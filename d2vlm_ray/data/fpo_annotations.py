"""Preference pairs on disk: the Parquet pair table, the official FPO file, and splits.

- :data:`PAIR_SCHEMA` is the Arrow schema of a pair table: one row per
  :class:`~d2vlm_ray.types.PreferencePair`, spans as lists of ``[start_s, end_s]``.
  :func:`pairs_to_table`, :func:`table_to_pairs`, :func:`write_pairs` and :func:`read_pairs`
  convert; paths may be local or fsspec URLs.
- :func:`read_fpo_annotation` converts the official ``fpo_annotation.json`` (spec §5.1)
  into the same pairs: each record has ``conversations`` and ``tgt`` (or ``src``) as dicts
  keyed by ``'chosen'`` and by rejected-variant keys; the family is the third
  underscore-separated field of a rejected key.
- :func:`split_pairs` holds out a validation set by a stable hash of the sample id (or the
  video), so the split does not depend on order or partitioning.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from d2vlm_ray.data.annotations import AnnotationError, AnnotationIssue, OnError
from d2vlm_ray.data.perturb import hash_fraction
from d2vlm_ray.types import PreferencePair, SpanS

EVI = "<evi>"
IMAGE = "<image>"
CHOSEN_KEY = "chosen"

_SPANS = pa.list_(pa.list_(pa.float64()))
PAIR_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("family", pa.string()),
        ("variant_idx", pa.int64()),
        ("video", pa.string()),
        ("duration_s", pa.float64()),
        ("task", pa.string()),
        ("prompt", pa.string()),
        ("chosen_text", pa.string()),
        ("chosen_spans_s", _SPANS),
        ("rejected_text", pa.string()),
        ("rejected_spans_s", _SPANS),
        ("src_spans_s", _SPANS),
    ]
)
PAIR_COLUMNS: tuple[str, ...] = tuple(PAIR_SCHEMA.names)


def pairs_to_table(pairs: Iterable[PreferencePair]) -> pa.Table:
    """An Arrow table with :data:`PAIR_SCHEMA` (an empty table for no pairs)."""
    rows = [p.to_dict() for p in pairs]
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def table_to_pairs(table: pa.Table) -> list[PreferencePair]:
    """Pairs from a table holding at least the :data:`PAIR_SCHEMA` columns.

    Raises:
        ValueError: If a column is missing (the message lists them).
    """
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"pair table: missing columns {missing}")
    return [PreferencePair.from_dict(row) for row in table.select(list(PAIR_COLUMNS)).to_pylist()]


def sort_key(pair: PreferencePair) -> tuple[str, str, int]:
    """The canonical order of a pair table: ``(sample_id, family, variant_idx)``."""
    return (pair.sample_id, pair.family, pair.variant_idx)


def write_pairs(pairs: Iterable[PreferencePair], path: str | os.PathLike[str]) -> int:
    """Write pairs to one Parquet file (local path or fsspec URL); returns the count."""
    table = pairs_to_table(sorted(pairs, key=sort_key))
    fs, fs_path = fsspec.core.url_to_fs(os.fspath(path))
    parent = fs_path.rsplit("/", 1)[0] if "/" in fs_path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(fs_path, "wb") as handle:
        pq.write_table(table, handle)
    return table.num_rows


def read_pairs_table(path: str | os.PathLike[str]) -> pa.Table:
    """Read a pair table from a Parquet file or a folder of ``*.parquet`` files.

    Raises:
        FileNotFoundError: If the path does not exist or holds no Parquet file.
    """
    fs, fs_path = fsspec.core.url_to_fs(os.fspath(path))
    if not fs.exists(fs_path):
        raise FileNotFoundError(f"pairs path {os.fspath(path)!r} does not exist")
    if fs.isdir(fs_path):
        files = sorted(f for f in fs.find(fs_path) if f.endswith(".parquet"))
        if not files:
            raise FileNotFoundError(f"pairs path {os.fspath(path)!r} holds no .parquet file")
    else:
        files = [fs_path]
    tables = []
    for name in files:
        with fs.open(name, "rb") as handle:
            tables.append(pq.read_table(handle).select(list(PAIR_COLUMNS)).cast(PAIR_SCHEMA))
    return pa.concat_tables(tables)


def read_pairs(path: str | os.PathLike[str], *, sort: bool = True) -> list[PreferencePair]:
    """Pairs from :func:`read_pairs_table`, sorted by :func:`sort_key` unless ``sort=False``."""
    pairs = table_to_pairs(read_pairs_table(path))
    return sorted(pairs, key=sort_key) if sort else pairs


def is_validation(key: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether ``key`` (a sample id or video) falls in the held-out fraction."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction: must lie in [0, 1], got {val_fraction}")
    return hash_fraction(seed, key) < val_fraction


def split_pairs(
    pairs: Iterable[PreferencePair],
    val_fraction: float,
    *,
    seed: int = 0,
    by: Literal["sample_id", "video"] = "sample_id",
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split pairs into ``(train, val)`` by a stable hash of ``by``.

    Every pair of one sample (or one video) lands on the same side, so held-out
    preference accuracy is measured on samples never trained on.
    """
    if by not in ("sample_id", "video"):
        raise ValueError(f"by: expected 'sample_id' or 'video', got {by!r}")
    train, val = [], []
    for pair in pairs:
        (val if is_validation(getattr(pair, by), val_fraction, seed) else train).append(pair)
    return train, val


# --- the official fpo_annotation.json ---------------------------------------------------


@dataclass
class FPOReadResult:
    """What :func:`read_fpo_annotation` produced.

    Attributes:
        pairs: The pairs, in file order (record, then rejected key).
        errors: Malformed records or variants that were left out.
        counters: ``records``, ``pairs``, ``skipped``, ``family.<name>``, ``spans_clipped`` ...
    """

    pairs: list[PreferencePair] = field(default_factory=list)
    errors: list[AnnotationIssue] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)

    def raise_if_errors(self) -> None:
        """Raise :class:`AnnotationError` listing every malformed record, if any."""
        if self.errors:
            raise AnnotationError(self.errors)


class _VariantError(ValueError):
    """A malformed record or variant; the reader reports it with its location."""


def family_from_key(key: str) -> str:
    """The perturbation family named by a rejected-variant key: its third ``_`` field.

    Keys with fewer than three fields keep the whole key as the family.
    """
    parts = key.split("_")
    return parts[2] if len(parts) >= 3 and parts[2] else key


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise _VariantError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _flat_spans(raw: Any, what: str, duration_s: float, counters: Counter[str]) -> tuple[SpanS, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) % 2:
        raise _VariantError(f"{what} must be a flat list [s1, e1, s2, e2, ...] of seconds, got {raw!r}")
    values = [_number(v, what) for v in raw]
    spans = []
    for start, end in zip(values[0::2], values[1::2]):
        if start > end:
            start, end = end, start
            counters["spans_reordered"] += 1
        if start >= duration_s:
            raise _VariantError(f"{what}: span ({start}, {end}) starts at or after the video's end ({duration_s} s)")
        if start < 0 or end > duration_s:
            start, end = max(start, 0.0), min(end, duration_s)
            counters["spans_clipped"] += 1
        spans.append((start, end))
    return tuple(spans)


def _turns(conv: Any, what: str) -> tuple[str, str]:
    if not (isinstance(conv, list) and len(conv) == 2 and all(isinstance(t, dict) for t in conv)):
        raise _VariantError(f"{what} must be a [human, gpt] list")
    human, gpt = conv
    if human.get("from") != "human" or not isinstance(human.get("value"), str):
        raise _VariantError(f"{what}[0] must be {{'from': 'human', 'value': str}}")
    if gpt.get("from") != "gpt" or not isinstance(gpt.get("value"), str):
        raise _VariantError(f"{what}[1] must be {{'from': 'gpt', 'value': str}}")
    return human["value"], gpt["value"]


def _prompt(human: str) -> str:
    if human.startswith(IMAGE):
        return human[len(IMAGE) :].lstrip("\n")
    return human.replace(IMAGE, "").strip()


def _record_pairs(
    rec: Any, index: int, video_root: str | None, reader_issue, counters: Counter[str]
) -> list[PreferencePair]:
    if not isinstance(rec, dict):
        raise _VariantError(f"a record must be a JSON object, got {type(rec).__name__}")
    duration_s = _number(rec.get("duration"), "duration")
    if duration_s <= 0:
        raise _VariantError(f"duration must be positive, got {duration_s}")
    video = rec.get("video")
    if not isinstance(video, str) or not video:
        raise _VariantError(f"video must be a non-empty string, got {video!r}")
    if video_root is not None and "://" not in video and not os.path.isabs(video):
        video = f"{video_root.rstrip('/')}/{video}"
    convs = rec.get("conversations")
    if not isinstance(convs, dict) or CHOSEN_KEY not in convs:
        raise _VariantError("conversations must be a dict with a 'chosen' key (the official FPO layout)")
    tgt = rec.get("tgt")
    src = rec.get("src")
    if tgt is not None and not isinstance(tgt, dict):
        raise _VariantError("tgt must be a dict keyed like conversations")
    if src is not None and not isinstance(src, dict):
        raise _VariantError("src must be a dict keyed like conversations")
    human, chosen_text = _turns(convs[CHOSEN_KEY], "conversations['chosen']")
    prompt = _prompt(human)
    tgt = tgt or {}
    chosen_spans = _flat_spans(tgt.get(CHOSEN_KEY), "tgt['chosen']", duration_s, counters)
    if chosen_text.count(EVI) != 2 * len(chosen_spans):
        raise _VariantError(
            f"conversations['chosen'] has {chosen_text.count(EVI)} {EVI} for {len(chosen_spans)} tgt spans"
        )
    src_spans = _flat_spans((src or {}).get(CHOSEN_KEY), "src['chosen']", duration_s, counters)
    if prompt.count(EVI) != len(src_spans):
        raise _VariantError(f"the question has {prompt.count(EVI)} {EVI} but src['chosen'] has {len(src_spans)} spans")
    sample_id = str(rec.get("id", index))
    variant_counts: Counter[str] = Counter()
    pairs = []
    for key in convs:
        if key == CHOSEN_KEY:
            continue
        try:
            _, rejected_text = _turns(convs[key], f"conversations[{key!r}]")
            rejected_spans = _flat_spans(tgt.get(key), f"tgt[{key!r}]", duration_s, counters)
            if rejected_text.count(EVI) != 2 * len(rejected_spans):
                raise _VariantError(
                    f"conversations[{key!r}] has {rejected_text.count(EVI)} {EVI} for {len(rejected_spans)} tgt spans"
                )
        except _VariantError as exc:
            reader_issue(str(exc))
            continue
        family = family_from_key(key)
        pairs.append(
            PreferencePair(
                sample_id=sample_id,
                family=family,
                variant_idx=variant_counts[family],
                video=video,
                duration_s=duration_s,
                task=str(rec.get("task", "")),
                prompt=prompt,
                chosen_text=chosen_text,
                chosen_spans_s=chosen_spans,
                rejected_text=rejected_text,
                rejected_spans_s=rejected_spans,
                src_spans_s=src_spans,
            )
        )
        variant_counts[family] += 1
        counters[f"family.{family}"] += 1
    return pairs


def read_fpo_annotation(
    path: str | os.PathLike[str], *, video_root: str | None = None, on_error: OnError = "fail"
) -> FPOReadResult:
    """Convert the official ``fpo_annotation.json`` into preference pairs.

    One pair is made per rejected key of each record (the official builder later keeps one
    at random; here every variant is kept and labelled). A variant's ``variant_idx``
    counts the record's earlier keys of the same family. Text-only variants (``qwen``
    keys, no ``tgt`` entry) become pairs whose rejected side has no spans.

    Args:
        path: The JSON file (a list of records).
        video_root: Folder or URL prefix relative ``video`` paths are joined to.
        on_error: ``fail`` (raise at the first problem), ``skip`` or ``collect``.

    Raises:
        AnnotationError: On invalid JSON, or a malformed record when ``on_error='fail'``.
    """
    if on_error not in ("fail", "skip", "collect"):
        raise ValueError(f"on_error must be 'fail', 'skip' or 'collect', got {on_error!r}")
    file = os.fspath(path)
    result = FPOReadResult()
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AnnotationError([AnnotationIssue(file, exc.lineno, "-", f"invalid JSON: {exc.msg}")]) from None
    if not isinstance(data, list):
        raise AnnotationError([AnnotationIssue(file, None, "-", "fpo_annotation.json must be a JSON list")])

    for index, rec in enumerate(data):

        def issue(reason: str, index: int = index) -> None:
            found = AnnotationIssue(file, None, str(index), reason)
            if on_error == "fail":
                raise AnnotationError([found])
            result.errors.append(found)
            result.counters["skipped"] += 1

        try:
            pairs = _record_pairs(rec, index, video_root, issue, result.counters)
        except _VariantError as exc:
            issue(str(exc))
            continue
        result.pairs.extend(pairs)
        result.counters["records"] += 1
        result.counters["pairs"] += len(pairs)
    return result


def official_to_parquet(
    json_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, video_root: str | None = None
) -> dict[str, Any]:
    """Convert ``fpo_annotation.json`` to a pair Parquet file; returns the counters."""
    result = read_fpo_annotation(json_path, video_root=video_root, on_error="skip")
    write_pairs(result.pairs, out_path)
    return {"out_path": os.fspath(out_path), **dict(result.counters), "errors": len(result.errors)}


__all__: Sequence[str] = (
    "PAIR_SCHEMA",
    "FPOReadResult",
    "family_from_key",
    "is_validation",
    "official_to_parquet",
    "pairs_to_table",
    "read_fpo_annotation",
    "read_pairs",
    "read_pairs_table",
    "sort_key",
    "split_pairs",
    "table_to_pairs",
    "write_pairs",
)
