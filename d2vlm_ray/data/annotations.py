"""Readers and writers between annotation files and :class:`~d2vlm_ray.types.VideoRecord`.

Formats read:

- E.T.-Instruct / D2VLM ``evi.json`` (:func:`read_evi_json`): a JSON list of
  ``{video, duration, task, source, tgt?, src?, conversations: [human, gpt], ...}``;
  answer spans come from ``tgt`` and the gpt text carries ``<evi>`` placeholders.
- E.T. Bench (:func:`read_etbench_json`): ``{version, idx, task, source, video, duration,
  src?, tgt?, p?, o?, g?, q}``.
- Charades-STA (:func:`read_charades_sta`): lines ``vid start end##sentence``.
- QVHighlights (:func:`read_qvhighlights`): jsonl ``{qid, query, vid, duration, relevant_windows}``.
- ActivityNet Captions (:func:`read_activitynet_captions`): ``{vid: {duration, timestamps, sentences}}``.
- YouCook2 (:func:`read_youcook2`): TimeChat's COCO form ``{"annotations": [...]}``, the
  official ``{"database": {...}}`` form, or the ActivityNet form.

Every reader returns a :class:`ReadResult`. A malformed record is never dropped silently:
it is reported with its file, line (where the format has lines; JSON values are located
by the line they start on) and record index or key, and handled by ``on_error``:

- ``"fail"``: raise :class:`AnnotationError` at the first malformed record;
- ``"skip"``: leave the record out, log a warning, and list it in ``ReadResult.errors``;
- ``"collect"``: leave it out and list it, without logging (for validation reports;
  call :meth:`ReadResult.raise_if_errors` to turn the list into one exception).

A file that is not valid JSON at all raises :class:`AnnotationError` under every policy.

Spans are repaired, and every repair counted in ``ReadResult.counters``: reversed spans
are reordered (``spans_reordered``); spans that start before 0 or end after the duration
are clipped (``spans_clipped``). A span that starts at or after the end of the video
cannot be repaired and makes the record malformed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from d2vlm_ray.types import SpanS, VideoRecord

logger = logging.getLogger(__name__)

OnError = Literal["fail", "skip", "collect"]
EVI = "<evi>"
EVI_END = "</evi>"
IMAGE = "<image>"
VID = "<vid>"
# E.T. Bench tasks whose ground truth is a single flat ``[s, e]`` (its evaluators wrap it once).
ETBENCH_FLAT_TGT_TASKS = frozenset({"tvg", "epm", "gvq"})
_YOUCOOK2_SUBSETS = {"training": "train", "validation": "val", "testing": "test"}


@dataclass(frozen=True)
class AnnotationIssue:
    """One malformed record.

    Attributes:
        file: The annotation file.
        line: 1-based line the record starts on, where known.
        record: Record index (0-based) or key within the file.
        reason: What is wrong with it.
    """

    file: str
    line: int | None
    record: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: record {self.record}: {self.reason}"


class AnnotationError(ValueError):
    """Malformed annotations; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[AnnotationIssue]) -> None:
        self.issues = list(issues)
        shown = "; ".join(str(i) for i in self.issues[:5])
        more = f" (and {len(self.issues) - 5} more)" if len(self.issues) > 5 else ""
        super().__init__(f"{len(self.issues)} malformed annotation record(s): {shown}{more}")


@dataclass
class ReadResult:
    """What a reader produced.

    Attributes:
        records: The well-formed records, in file order.
        errors: The malformed records that were left out.
        counters: Repairs and notable events (``records``, ``skipped``,
            ``spans_clipped``, ``spans_reordered``, ``default_duration`` ...).
    """

    records: list[VideoRecord] = field(default_factory=list)
    errors: list[AnnotationIssue] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)

    def raise_if_errors(self) -> None:
        """Raise :class:`AnnotationError` listing every malformed record, if any."""
        if self.errors:
            raise AnnotationError(self.errors)


class _RecordError(ValueError):
    """Raised inside a record converter; the reader turns it into an issue."""


class _Reader:
    """Shared bookkeeping of one read: policy, issues and counters."""

    def __init__(self, path: str | os.PathLike[str], on_error: OnError) -> None:
        if on_error not in ("fail", "skip", "collect"):
            raise ValueError(f"on_error must be 'fail', 'skip' or 'collect', got {on_error!r}")
        self.path = os.fspath(path)
        self.on_error = on_error
        self.result = ReadResult()

    def add(
        self, line: int | None, record: str | int, convert: Callable[[], VideoRecord | None]
    ) -> None:
        """Run ``convert``; keep its record, or report why it failed."""
        try:
            out = convert()
        except (_RecordError, ValueError, TypeError, KeyError) as exc:
            reason = str(exc) if isinstance(exc, _RecordError) else f"{type(exc).__name__}: {exc}"
            self.issue(line, record, reason)
            return
        if out is not None:
            self.result.records.append(out)
            self.result.counters["records"] += 1

    def issue(self, line: int | None, record: str | int, reason: str) -> None:
        """Apply the policy to one malformed record."""
        issue = AnnotationIssue(self.path, line, str(record), reason)
        if self.on_error == "fail":
            raise AnnotationError([issue])
        if self.on_error == "skip":
            logger.warning("skipping malformed annotation: %s", issue)
        self.result.errors.append(issue)
        self.result.counters["skipped"] += 1

    def file_error(self, reason: str, line: int | None = None) -> AnnotationError:
        return AnnotationError([AnnotationIssue(self.path, line, "-", reason)])


# --- span helpers ----------------------------------------------------------------------


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _RecordError(f"{what} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise _RecordError(f"{what} is not finite: {value!r}")
    return out


def _duration(value: Any) -> float:
    duration_s = _number(value, "duration")
    if duration_s <= 0:
        raise _RecordError(f"duration must be positive, got {value!r}")
    return duration_s


def _pairs(raw: Any, what: str) -> list[tuple[float, float]]:
    """A flat ``[s1, e1, ...]`` or nested ``[[s1, e1], ...]`` list as pairs of numbers."""
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        raise _RecordError(f"{what} must be a list, got {type(raw).__name__}")
    if not raw:
        return []
    if all(isinstance(v, (list, tuple)) for v in raw):
        pairs = []
        for pair in raw:
            if len(pair) != 2:
                raise _RecordError(f"{what}: each span needs two values, got {list(pair)!r}")
            pairs.append((_number(pair[0], what), _number(pair[1], what)))
        return pairs
    if any(isinstance(v, (list, tuple)) for v in raw):
        raise _RecordError(f"{what} mixes numbers and lists: {raw!r}")
    if len(raw) % 2:
        raise _RecordError(f"{what}: a flat span list needs an even number of values, got {len(raw)}")
    values = [_number(v, what) for v in raw]
    return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]


def _repair_spans(
    pairs: Iterable[tuple[float, float]], duration_s: float, counters: Counter[str], what: str
) -> tuple[SpanS, ...]:
    """Reorder reversed spans and clip them to ``[0, duration_s]``, counting both."""
    out: list[SpanS] = []
    for start_s, end_s in pairs:
        if start_s > end_s:
            start_s, end_s = end_s, start_s
            counters["spans_reordered"] += 1
        if start_s >= duration_s:
            raise _RecordError(f"{what}: span ({start_s}, {end_s}) starts at or after the video's end ({duration_s} s)")
        if start_s < 0 or end_s > duration_s:
            start_s, end_s = max(start_s, 0.0), min(end_s, duration_s)
            counters["spans_clipped"] += 1
        out.append((start_s, end_s))
    return tuple(out)


def _question_spans(
    raw: Any, query: str, duration_s: float, counters: Counter[str], placeholder: str = EVI
) -> tuple[SpanS, ...]:
    """``src`` spans, one per placeholder in the question.

    A flat list with one value per placeholder is a list of time points (E.T. Chat's
    ``<vid>`` convention); each becomes a zero-length span.
    """
    n_slots = query.count(placeholder)
    if raw is None or (isinstance(raw, (list, tuple)) and not raw):
        if n_slots:
            raise _RecordError(f"question has {n_slots} {placeholder} but no src")
        return ()
    flat = isinstance(raw, (list, tuple)) and not any(isinstance(v, (list, tuple)) for v in raw)
    if flat and n_slots and len(raw) == n_slots:
        points = [_number(v, "src") for v in raw]
        counters["src_points"] += len(points)
        return _repair_spans(((t, t) for t in points), duration_s, counters, "src")
    pairs = _pairs(raw, "src")
    if len(pairs) != n_slots:
        raise _RecordError(f"question has {n_slots} {placeholder} but src has {len(pairs)} spans")
    return _repair_spans(pairs, duration_s, counters, "src")


def _join_video(video: Any, video_root: str | None) -> str:
    if not isinstance(video, str) or not video:
        raise _RecordError(f"video must be a non-empty string, got {video!r}")
    if video_root is None or "://" in video or os.path.isabs(video):
        return video
    # posixpath keeps fsspec URLs (s3://...) intact; local roots work the same on POSIX.
    return posixpath.join(video_root, video)


def _relative_video(video: str, video_root: str | None) -> str:
    if video_root is None:
        return video
    root = video_root.rstrip("/") + "/"
    return video[len(root) :] if video.startswith(root) else video


# --- JSON with line numbers ------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, pos: int) -> int:
    """Position of the first non-whitespace character at or after ``pos``."""
    match = _WS.match(text, pos)
    return match.end() if match else pos


def _load_json(reader: _Reader) -> tuple[str, Any]:
    text = Path(reader.path).read_text(encoding="utf-8")
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as exc:
        raise reader.file_error(f"invalid JSON: {exc.msg}", exc.lineno) from exc


def _container_lines(text: str, pos: int) -> Iterator[int]:
    """1-based line of each value of the JSON array or object starting at ``pos``.

    Only called on text that already parsed, so the grammar is not re-checked here.
    """
    decoder = json.JSONDecoder()
    opener = text[pos]
    closer = "]" if opener == "[" else "}"
    line, last = 1 + text.count("\n", 0, pos), pos
    pos = _skip_ws(text, pos + 1)
    if text[pos] == closer:
        return
    while True:
        if opener == "{":
            _, pos = decoder.raw_decode(text, pos)
            pos = _skip_ws(text, pos) + 1
            pos = _skip_ws(text, pos)
        line += text.count("\n", last, pos)
        last = pos
        yield line
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        if text[pos] == closer:
            return
        pos = _skip_ws(text, pos + 1)


def _value_pos(text: str, key: str) -> int:
    """Position of the value of top-level ``key`` in a JSON object (text already parsed)."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0) + 1
    while True:
        pos = _skip_ws(text, pos)
        name, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos) + 1
        pos = _skip_ws(text, pos)
        if name == key:
            return pos
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos) + 1


def _json_list(reader: _Reader, data: Any, text: str, pos: int, what: str) -> list[tuple[int, int, Any]]:
    if not isinstance(data, list):
        raise reader.file_error(f"{what} must be a JSON list, got {type(data).__name__}")
    return [(i, line, item) for i, (line, item) in enumerate(zip(_container_lines(text, pos), data))]


def _dict_record(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _RecordError(f"a record must be a JSON object, got {type(value).__name__}")
    return value


# --- E.T.-Instruct / D2VLM evi.json ----------------------------------------------------


def _evi_record(
    item: Any, index: int, video_root: str | None, split: str, counters: Counter[str]
) -> VideoRecord:
    rec = _dict_record(item)
    duration_s = _duration(rec.get("duration"))
    conv = rec.get("conversations")
    if isinstance(conv, dict):
        raise _RecordError("conversations is a dict (an FPO file?); evi.json needs a [human, gpt] list")
    if not isinstance(conv, list) or len(conv) != 2:
        raise _RecordError("conversations must be a list of one human and one gpt turn")
    human, gpt = conv
    if not (isinstance(human, dict) and human.get("from") == "human" and isinstance(human.get("value"), str)):
        raise _RecordError("the first conversation turn must be {'from': 'human', 'value': str}")
    if not (isinstance(gpt, dict) and gpt.get("from") == "gpt" and isinstance(gpt.get("value"), str)):
        raise _RecordError("the second conversation turn must be {'from': 'gpt', 'value': str}")
    query = human["value"]
    if query.startswith(IMAGE):
        query = query[len(IMAGE) :].lstrip("\n")
    elif IMAGE in query:
        query = query.replace(IMAGE, "").strip()
        counters["image_token_moved"] += 1
    answer = gpt["value"]
    spans = _repair_spans(_pairs(rec.get("tgt"), "tgt"), duration_s, counters, "tgt")
    n_evi = answer.count(EVI)
    if n_evi != 2 * len(spans):
        raise _RecordError(
            f"gpt text has {n_evi} {EVI} tokens but tgt has {len(spans)} spans (expected {2 * len(spans)})"
        )
    src = _question_spans(rec.get("src"), query, duration_s, counters)
    options = rec.get("options") or ()
    if not isinstance(options, (list, tuple)):
        raise _RecordError("options must be a list")
    answer_idx = rec.get("answer_idx")
    if answer_idx is None and options and rec.get("answer") in options:
        answer_idx = list(options).index(rec["answer"])
    if answer_idx is not None and not (isinstance(answer_idx, int) and 0 <= answer_idx < len(options)):
        raise _RecordError(f"answer_idx {answer_idx!r} is not an index into {len(options)} options")
    captions = rec.get("captions") or ()
    if captions and len(captions) != len(spans):
        raise _RecordError(f"{len(captions)} captions for {len(spans)} spans")
    return VideoRecord(
        video=_join_video(rec.get("video"), video_root),
        duration_s=duration_s,
        query=query,
        task=str(rec.get("task", "")),
        source=str(rec.get("source", "")),
        src_spans_s=src,
        spans_s=spans,
        captions=tuple(captions),
        options=tuple(options),
        answer=answer,
        answer_idx=answer_idx,
        sample_id=str(rec.get("id", index)),
        split=split,
    )


def read_evi_json(
    path: str | os.PathLike[str], *, video_root: str | None = None, split: str = "", on_error: OnError = "fail"
) -> ReadResult:
    """Read an E.T.-Instruct / D2VLM ``evi.json`` file.

    The gpt text must hold ``2 n`` ``<evi>`` tokens for the ``n`` spans of ``tgt``, and the
    question one ``<evi>`` per ``src`` span; a leading ``<image>\\n`` is removed from the query.

    Args:
        path: The JSON file (a list of records).
        video_root: Folder or URL prefix relative ``video`` paths are joined to.
        split: Split name stored in every record.
        on_error: Policy for malformed records (see the module docstring).

    Returns:
        The records, the malformed ones, and the repair counters.
    """
    reader = _Reader(path, on_error)
    text, data = _load_json(reader)
    counters = reader.result.counters
    for index, line, item in _json_list(reader, data, text, _skip_ws(text, 0), "evi.json"):
        reader.add(line, index, lambda: _evi_record(item, index, video_root, split, counters))
    return reader.result


CAPTION_QUERY = "Describe the video."


def caption_records(records: Sequence[VideoRecord]) -> list[VideoRecord]:
    """Video-caption pairs (task ``cap``) made from the dense-captioning records among ``records``.

    A video's caption is its event captions in order, without times and without ``<evi>``:
    Grounded-VideoLLM's first stage aligns the projected video tokens with the LLM on plain
    captions, before any temporal token is trained. Records of other tasks give nothing.
    """
    out = []
    for r in records:
        if r.task != "dvc" or not r.captions:
            continue
        out.append(
            VideoRecord(
                video=r.video,
                duration_s=r.duration_s,
                query=CAPTION_QUERY,
                task="cap",
                source=r.source,
                answer=" ".join(c.strip().rstrip(".") + "." for c in r.captions),
                sample_id=f"{r.sample_id}/cap",
                split=r.split,
            )
        )
    return out


def record_to_evi(record: VideoRecord, video_root: str | None = None) -> dict[str, Any]:
    """One ``evi.json`` record (plain JSON types) for a :class:`VideoRecord`.

    Args:
        record: The record; ``answer`` is written as the gpt turn.
        video_root: If given, video paths under it are written relative to it.

    Returns:
        ``{id, video, duration, task, source, tgt?, src?, conversations, captions?,
        options?, answer_idx?, answer?}``; ``answer`` is the text of the correct option.
    """
    out: dict[str, Any] = {
        "id": record.sample_id,
        "video": _relative_video(record.video, video_root),
        "duration": record.duration_s,
        "task": record.task,
        "source": record.source,
    }
    if record.spans_s:
        out["tgt"] = [v for span in record.spans_s for v in span]
    if record.src_spans_s:
        out["src"] = [v for span in record.src_spans_s for v in span]
    out["conversations"] = [
        {"from": "human", "value": f"{IMAGE}\n{record.query}"},
        {"from": "gpt", "value": record.answer},
    ]
    if record.captions:
        out["captions"] = list(record.captions)
    if record.options:
        out["options"] = list(record.options)
    if record.answer_idx is not None:
        out["answer_idx"] = record.answer_idx
        out["answer"] = record.options[record.answer_idx]
    return out


def _write_json_lines_list(items: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    # One record per line: diffs stay readable and reported line numbers point at records.
    body = ",\n".join(json.dumps(item, ensure_ascii=False, sort_keys=False) for item in items)
    text = f"[\n{body}\n]\n" if items else "[]\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")


def write_evi_json(
    records: Iterable[VideoRecord], path: str | os.PathLike[str], video_root: str | None = None
) -> int:
    """Write records as an ``evi.json`` list, one record per line; returns the count."""
    items = [record_to_evi(r, video_root) for r in records]
    _write_json_lines_list(items, path)
    return len(items)


# --- E.T. Bench ------------------------------------------------------------------------


def _option_text(option: Any) -> str:
    if isinstance(option, (list, tuple)) and len(option) == 2:
        # Span options are compared as "s - e", the form E.T. Bench's scorer renders.
        return f"{_number(option[0], 'o'):g} - {_number(option[1], 'o'):g}"
    if isinstance(option, str):
        return option
    raise _RecordError(f"option {option!r} is neither a string nor a [s, e] pair")


def _etbench_tgt(raw: Any, counters: Counter[str]) -> list[tuple[float, float]]:
    if isinstance(raw, list) and raw and all(isinstance(v, list) for v in raw) and all(
        v and all(isinstance(w, list) for w in v) for v in raw
    ):
        # VHD with several annotators: [[[s, e], ...], ...]. Their windows are merged.
        counters["annotator_spans_merged"] += 1
        raw = [w for v in raw for w in v]
    return _pairs(raw, "tgt")


def _etbench_record(item: Any, index: int, video_root: str | None, split: str, counters: Counter[str]) -> VideoRecord:
    rec = _dict_record(item)
    for key in ("idx", "task", "source", "video", "duration", "q"):
        if key not in rec:
            raise _RecordError(f"missing field {key!r}")
    duration_s = _duration(rec["duration"])
    query = rec["q"]
    if not isinstance(query, str):
        raise _RecordError("q must be a string")
    if VID in query:
        # D2VLM's ETBench/evi files use <evi> where E.T. Bench writes <vid>.
        query = query.replace(VID, EVI)
        counters["vid_placeholders_converted"] += 1
    spans = _repair_spans(_etbench_tgt(rec.get("tgt"), counters), duration_s, counters, "tgt")
    src = _question_spans(rec.get("src"), query, duration_s, counters)
    options = tuple(_option_text(o) for o in rec.get("o") or ())
    answer_idx = rec.get("p")
    if answer_idx is not None and not (isinstance(answer_idx, int) and 0 <= answer_idx < len(options)):
        raise _RecordError(f"p {answer_idx!r} is not an index into {len(options)} options")
    captions = rec.get("g") or ()
    if captions and len(captions) != len(spans):
        raise _RecordError(f"{len(captions)} captions (g) for {len(spans)} spans (tgt)")
    return VideoRecord(
        video=_join_video(rec["video"], video_root),
        duration_s=duration_s,
        query=query,
        task=str(rec["task"]),
        source=str(rec["source"]),
        src_spans_s=src,
        spans_s=spans,
        captions=tuple(captions),
        options=options,
        answer_idx=answer_idx,
        sample_id=str(rec["idx"]),
        split=split,
    )


def read_etbench_json(
    path: str | os.PathLike[str], *, video_root: str | None = None, split: str = "", on_error: OnError = "fail"
) -> ReadResult:
    """Read an E.T. Bench annotation (or prediction) file; ``sample_id`` is ``str(idx)``.

    ``tgt`` may be flat (``tvg``) or nested; VHD's per-annotator nesting is merged
    (counted as ``annotator_spans_merged``). ``<vid>`` in ``q`` becomes ``<evi>``. Span
    options ``[s, e]`` become ``"s - e"`` strings. A prediction's ``a`` is ignored.

    Args:
        path: The JSON file (a list of records).
        video_root: Folder or URL prefix relative ``video`` paths are joined to.
        split: Split name stored in every record.
        on_error: Policy for malformed records.

    Returns:
        The records, the malformed ones, and the repair counters.
    """
    reader = _Reader(path, on_error)
    text, data = _load_json(reader)
    counters = reader.result.counters
    for index, line, item in _json_list(reader, data, text, _skip_ws(text, 0), "E.T. Bench file"):
        reader.add(line, index, lambda: _etbench_record(item, index, video_root, split, counters))
    return reader.result


def record_to_etbench(record: VideoRecord, idx: int, video_root: str | None = None) -> dict[str, Any]:
    """One E.T. Bench record; ``tgt`` is flat ``[s, e]`` for ``tvg``/``epm``/``gvq``, nested otherwise."""
    out: dict[str, Any] = {
        "version": 1.0,
        "idx": idx,
        "task": record.task,
        "source": record.source,
        "video": _relative_video(record.video, video_root),
        "duration": record.duration_s,
    }
    if record.src_spans_s:
        out["src"] = [v for span in record.src_spans_s for v in span]
    if record.spans_s:
        if record.task in ETBENCH_FLAT_TGT_TASKS and len(record.spans_s) == 1:
            out["tgt"] = list(record.spans_s[0])
        else:
            out["tgt"] = [list(span) for span in record.spans_s]
    if record.answer_idx is not None:
        out["p"] = record.answer_idx
    if record.options:
        out["o"] = list(record.options)
    if record.captions:
        out["g"] = list(record.captions)
    out["q"] = record.query
    return out


def write_etbench_json(
    records: Iterable[VideoRecord], path: str | os.PathLike[str], video_root: str | None = None
) -> int:
    """Write records as an E.T. Bench list; ``idx`` is the numeric ``sample_id`` or the position."""
    items = []
    for position, record in enumerate(records):
        idx = int(record.sample_id) if record.sample_id.isdigit() else position
        items.append(record_to_etbench(record, idx, video_root))
    _write_json_lines_list(items, path)
    return len(items)


# --- Charades-STA ----------------------------------------------------------------------


def read_charades_sta(
    path: str | os.PathLike[str],
    *,
    durations_s: Mapping[str, float] | None = None,
    default_duration_s: float | None = None,
    video_template: str = "{vid}.mp4",
    video_root: str | None = None,
    split: str = "",
    on_error: OnError = "fail",
) -> ReadResult:
    """Read Charades-STA lines ``VID start end##sentence`` as ``tvg`` records.

    The txt file has no durations: pass ``durations_s`` (video id to seconds), else
    ``default_duration_s`` is used (counted as ``default_duration``); with neither, the
    record is malformed. Spans ending after the duration are clipped (``spans_clipped``;
    562 of the 3,720 test queries do). ``sample_id`` is the 0-based index of the line among
    non-blank lines, which matches the enumeration index of TimeIT's COCO version.

    Args:
        path: The txt file.
        durations_s: Duration of each video id.
        default_duration_s: Duration for ids missing from ``durations_s``.
        video_template: Video path from the id, e.g. ``"{vid}.mp4"``.
        video_root: Folder or URL prefix the video path is joined to.
        split: Split name stored in every record.
        on_error: Policy for malformed records.

    Returns:
        The records (query = the sentence), the malformed ones, and the counters.
    """
    reader = _Reader(path, on_error)
    counters = reader.result.counters

    def convert(text: str, index: int) -> VideoRecord:
        head, sep, sentence = text.partition("##")
        if not sep:
            raise _RecordError("missing '##' between the times and the sentence")
        fields = head.split()
        if len(fields) != 3:
            raise _RecordError(f"expected 'VID start end' before '##', got {head!r}")
        vid = fields[0]
        try:
            start_s, end_s = float(fields[1]), float(fields[2])
        except ValueError as exc:
            raise _RecordError(f"bad time in {head!r}") from exc
        if durations_s is not None and vid in durations_s:
            duration_s = _duration(durations_s[vid])
        elif default_duration_s is not None:
            duration_s = _duration(default_duration_s)
            counters["default_duration"] += 1
        else:
            raise _RecordError(f"no duration for video {vid!r} (pass durations_s or default_duration_s)")
        if not sentence.strip():
            raise _RecordError("empty sentence")
        spans = _repair_spans([(start_s, end_s)], duration_s, counters, "span")
        return VideoRecord(
            video=_join_video(video_template.format(vid=vid), video_root),
            duration_s=duration_s,
            query=sentence.strip(),
            task="tvg",
            source="charades_sta",
            spans_s=spans,
            sample_id=str(index),
            split=split,
        )

    index = 0
    with open(reader.path, encoding="utf-8") as handle:
        for line_no, raw in enumerate(handle, start=1):
            text = raw.strip()
            if not text:
                continue
            reader.add(line_no, index, lambda: convert(text, index))
            index += 1
    return reader.result


# --- QVHighlights ----------------------------------------------------------------------


def read_qvhighlights(
    path: str | os.PathLike[str],
    *,
    video_template: str = "{vid}.mp4",
    video_root: str | None = None,
    split: str = "",
    on_error: OnError = "fail",
) -> ReadResult:
    """Read QVHighlights jsonl (``qid, query, vid, duration, relevant_windows``) as ``tvg`` records.

    All relevant windows become spans, sorted by start. Lines without
    ``relevant_windows`` (the hidden test split) are malformed for this reader.

    Args:
        path: The jsonl file.
        video_template: Video path from ``vid``.
        video_root: Folder or URL prefix the video path is joined to.
        split: Split name stored in every record.
        on_error: Policy for malformed records.

    Returns:
        The records, the malformed ones, and the counters.
    """
    reader = _Reader(path, on_error)
    counters = reader.result.counters

    def convert(text: str) -> VideoRecord:
        try:
            rec = _dict_record(json.loads(text))
        except json.JSONDecodeError as exc:
            raise _RecordError(f"invalid JSON: {exc.msg}") from exc
        for key in ("qid", "query", "vid", "duration", "relevant_windows"):
            if key not in rec:
                raise _RecordError(f"missing field {key!r}")
        duration_s = _duration(rec["duration"])
        pairs = _pairs(rec["relevant_windows"], "relevant_windows")
        if not pairs:
            raise _RecordError("relevant_windows is empty")
        spans = _repair_spans(sorted(pairs), duration_s, counters, "relevant_windows")
        if len(spans) > 1:
            counters["multi_window_queries"] += 1
        return VideoRecord(
            video=_join_video(video_template.format(vid=rec["vid"]), video_root),
            duration_s=duration_s,
            query=str(rec["query"]).strip(),
            task="tvg",
            source="qvhighlights",
            spans_s=spans,
            sample_id=str(rec["qid"]),
            split=split,
        )

    with open(reader.path, encoding="utf-8") as handle:
        for line_no, raw in enumerate(handle, start=1):
            text = raw.strip()
            if text:
                reader.add(line_no, line_no - 1, lambda: convert(text))
    return reader.result


# --- ActivityNet Captions and YouCook2 -------------------------------------------------


def _dense_record(
    vid: str,
    duration: Any,
    raw_spans: Any,
    sentences: Any,
    *,
    source: str,
    video_template: str,
    video_root: str | None,
    split: str,
    counters: Counter[str],
) -> VideoRecord:
    duration_s = _duration(duration)
    pairs = _pairs(raw_spans, "timestamps")
    if not isinstance(sentences, (list, tuple)) or not all(isinstance(s, str) for s in sentences):
        raise _RecordError("sentences must be a list of strings")
    if len(pairs) != len(sentences):
        raise _RecordError(f"{len(pairs)} timestamps but {len(sentences)} sentences")
    if not pairs:
        raise _RecordError("no events")
    spans = _repair_spans(pairs, duration_s, counters, "timestamps")
    captions = [s.strip() for s in sentences]
    # Dense-captioning answers list events in time order.
    order = sorted(range(len(spans)), key=lambda i: spans[i])
    if order != list(range(len(spans))):
        counters["events_sorted"] += 1
    return VideoRecord(
        video=_join_video(video_template.format(vid=vid), video_root),
        duration_s=duration_s,
        query="",
        task="dvc",
        source=source,
        spans_s=tuple(spans[i] for i in order),
        captions=tuple(captions[i] for i in order),
        sample_id=vid,
        split=split,
    )


def _read_activitynet_like(
    reader: _Reader,
    text: str,
    data: Any,
    pos: int,
    source: str,
    video_template: str,
    video_root: str | None,
    split: str,
) -> ReadResult:
    if not isinstance(data, dict):
        raise reader.file_error(f"expected a JSON object keyed by video id, got {type(data).__name__}")
    counters = reader.result.counters
    for line, (vid, item) in zip(_container_lines(text, pos), data.items()):

        def convert(vid: str = vid, item: Any = item) -> VideoRecord:
            rec = _dict_record(item)
            for key in ("duration", "timestamps", "sentences"):
                if key not in rec:
                    raise _RecordError(f"missing field {key!r}")
            return _dense_record(
                vid, rec["duration"], rec["timestamps"], rec["sentences"], source=source,
                video_template=video_template, video_root=video_root, split=split, counters=counters,
            )

        reader.add(line, vid, convert)
    return reader.result


def read_activitynet_captions(
    path: str | os.PathLike[str],
    *,
    source: str = "activitynet",
    video_template: str = "{vid}.mp4",
    video_root: str | None = None,
    split: str = "",
    on_error: OnError = "fail",
) -> ReadResult:
    """Read ActivityNet Captions ``{vid: {duration, timestamps, sentences}}`` as ``dvc`` records.

    Events are sorted by start time (counted as ``events_sorted``); ``query`` is empty
    (the prompt is the caller's choice); ``sample_id`` is the video id.

    Args:
        path: The JSON file.
        source: Source name stored in the records.
        video_template: Video path from the id.
        video_root: Folder or URL prefix the video path is joined to.
        split: Split name stored in every record.
        on_error: Policy for malformed records.

    Returns:
        The records, the malformed ones, and the counters.
    """
    reader = _Reader(path, on_error)
    text, data = _load_json(reader)
    pos = _skip_ws(text, 0)
    return _read_activitynet_like(reader, text, data, pos, source, video_template, video_root, split)


def _split_pure_cap(pure_cap: str) -> list[str]:
    """TimeChat's ``pure_cap`` joins captions with ``". "``; the last keeps its period."""
    parts = [p.strip() for p in pure_cap.strip().split(". ")]
    if parts and parts[-1].endswith("."):
        parts[-1] = parts[-1][:-1].rstrip()
    return parts


def read_youcook2(
    path: str | os.PathLike[str],
    *,
    video_template: str = "{vid}.mp4",
    video_root: str | None = None,
    split: str = "",
    on_error: OnError = "fail",
) -> ReadResult:
    """Read YouCook2 dense captions as ``dvc`` records, in any of three layouts.

    - TimeChat COCO: ``{"annotations": [{"image_id", "segments", "pure_cap", "duration"}]}``;
      ``pure_cap`` is split on ``". "`` and must give one caption per segment.
    - Official: ``{"database": {vid: {"duration", "subset", "annotations": [{"segment", "sentence"}]}}}``;
      the split comes from ``subset`` unless ``split`` is given.
    - ActivityNet style: ``{vid: {duration, timestamps, sentences}}``.

    Args:
        path: The JSON file.
        video_template: Video path from the id (``image_id`` without its extension).
        video_root: Folder or URL prefix the video path is joined to.
        split: Split name stored in every record.
        on_error: Policy for malformed records.

    Returns:
        The records, the malformed ones, and the counters.
    """
    reader = _Reader(path, on_error)
    text, data = _load_json(reader)
    counters = reader.result.counters
    common = {"source": "youcook2", "video_template": video_template, "video_root": video_root, "counters": counters}
    if isinstance(data, dict) and "annotations" in data:
        items = _json_list(reader, data["annotations"], text, _value_pos(text, "annotations"), "annotations")
        for index, line, item in items:

            def convert(item: Any = item) -> VideoRecord:
                rec = _dict_record(item)
                for key in ("image_id", "segments", "pure_cap", "duration"):
                    if key not in rec:
                        raise _RecordError(f"missing field {key!r}")
                if not isinstance(rec["pure_cap"], str):
                    raise _RecordError("pure_cap must be a string")
                vid = posixpath.splitext(str(rec["image_id"]))[0]
                return _dense_record(
                    vid, rec["duration"], rec["segments"], _split_pure_cap(rec["pure_cap"]), split=split, **common
                )

            reader.add(line, index, convert)
        return reader.result
    if isinstance(data, dict) and "database" in data:
        database = data["database"]
        if not isinstance(database, dict):
            raise reader.file_error("database must be a JSON object")
        for line, (vid, item) in zip(_container_lines(text, _value_pos(text, "database")), database.items()):

            def convert_official(vid: str = vid, item: Any = item) -> VideoRecord:
                rec = _dict_record(item)
                events = rec.get("annotations")
                if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
                    raise _RecordError("annotations must be a list of {segment, sentence}")
                try:
                    spans = [e["segment"] for e in events]
                    sentences = [e["sentence"] for e in events]
                except KeyError as exc:
                    raise _RecordError(f"an event lacks {exc}") from exc
                subset = split or _YOUCOOK2_SUBSETS.get(str(rec.get("subset", "")), "")
                return _dense_record(vid, rec.get("duration"), spans, sentences, split=subset, **common)

            reader.add(line, vid, convert_official)
        return reader.result
    pos = _skip_ws(text, 0)
    return _read_activitynet_like(reader, text, data, pos, "youcook2", video_template, video_root, split)


READERS: dict[str, Callable[..., ReadResult]] = {
    "evi": read_evi_json,
    "etbench": read_etbench_json,
    "charades_sta": read_charades_sta,
    "qvhighlights": read_qvhighlights,
    "activitynet_captions": read_activitynet_captions,
    "youcook2": read_youcook2,
}
"""Reader of each format name, for configs that name the format as a string."""


def read_annotations(path: str | os.PathLike[str], fmt: str, **kwargs: Any) -> ReadResult:
    """Read ``path`` with the reader of format ``fmt`` (a key of :data:`READERS`)."""
    if fmt not in READERS:
        raise ValueError(f"unknown annotation format {fmt!r}; known: {sorted(READERS)}")
    return READERS[fmt](path, **kwargs)
