"""Grounded-VideoLLM's discrete temporal tokens ``<0> … <M>``.

A time ``t_s`` in a video of duration ``d`` becomes the token ``<k>`` with
``k = round(t_s / d · M)`` clamped to ``[0, M]``, and ``<k>`` reads back as ``k / M · d``.
The rounding is half-up (``floor(x + 0.5)``), not Python's banker's ``round``, so a time
exactly between two bins always goes to the later one; the round trip is then within
``d / (2M)`` for every ``t_s`` in ``[0, d]``.

The official Grounded-VideoLLM code differs in one place, checked against its source
(WHB139426/Grounded-Video-LLM, ``datasets/mix_sft.py``, ``inference.py``): it *encodes*
training times by truncation, ``min(int(M · t / d), M)``, and decodes ``<k>`` as ``d · k / M``
like :func:`bin_to_time`. So an official checkpoint's output reads back to the same seconds
here, but its spans sit on average half a bin (``d / 2M``) early, since every training time was
moved down to its bin's start; this project rounds, as the issue specifies, so its own
round trip is unbiased and within ``d / (2M)``, where truncation's is within ``d / M``.

Parsing rule (text, ids and plain bins alike). Malformed output is a typed
:class:`TemporalParse` with :class:`TemporalProblem` entries, never an exception:

* markers are read in order; ``position`` counts markers from 0;
* a value outside ``[0, M]`` is an ``out_of_range`` problem and is skipped;
* the remaining values pair up consecutively as (start, end), whatever text lies between;
* a pair with ``end < start`` is an ``end_before_start`` problem (position of its start)
  and gives no span; ``start == end`` is a valid zero-length span;
* a final unpaired value is a ``lone_start`` problem.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from d2vlm_ray.types import SpanS

ProblemKind = Literal["lone_start", "end_before_start", "out_of_range"]
IGNORE_INDEX = -100
_MARKER = re.compile(r"<(\d+)>")


def temporal_token_strings(num_bins: int) -> list[str]:
    """The ``num_bins + 1`` token strings ``["<0>", …, "<num_bins>"]``."""
    _check_bins(num_bins)
    return [f"<{k}>" for k in range(num_bins + 1)]


def first_temporal_id(tokenizer: PreTrainedTokenizerBase, num_bins: int) -> int:
    """The id of ``<0>``, after checking ``<0> … <M>`` are present with contiguous ids.

    Raises:
        ValueError: Naming the first token that is missing or out of sequence.
    """
    tokens = temporal_token_strings(num_bins)
    ids = [tokenizer.convert_tokens_to_ids(token) for token in tokens]
    for token, tid in zip(tokens, ids):
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no temporal token {token!r}; call add_temporal_tokens()")
    first = int(ids[0])
    for k, (token, tid) in enumerate(zip(tokens, ids)):
        if tid != first + k:
            raise ValueError(f"temporal token {token!r} has id {tid}, expected {first + k} (ids must be contiguous)")
    return first


def add_temporal_tokens(tokenizer: PreTrainedTokenizerBase, num_bins: int) -> int:
    """Add ``<0> … <M>`` as special tokens (never split, decoded verbatim) if absent.

    Idempotent. The caller resizes the LLM's embeddings to ``len(tokenizer)``.

    Args:
        tokenizer: The LLM tokenizer, changed in place.
        num_bins: M, the number of bins (M + 1 tokens).

    Returns:
        The id of ``<0>``; ``<k>`` has id ``first + k``.

    Raises:
        ValueError: If the tokens end up missing or with non-contiguous ids (e.g. some
            were already in the vocabulary at scattered ids); the missing ones have been
            added to ``tokenizer`` by then.
    """
    tokens = temporal_token_strings(num_bins)
    missing = [t for t in tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return first_temporal_id(tokenizer, num_bins)


def _check_bins(num_bins: int) -> None:
    if int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"num_bins: must be an integer >= 1, got {num_bins!r}")


def _check_duration(duration_s: float) -> None:
    if not math.isfinite(duration_s) or duration_s <= 0:
        raise ValueError(f"duration_s: must be finite and > 0, got {duration_s!r}")


def time_to_bin(t_s: float, duration_s: float, num_bins: int) -> int:
    """The bin of a time: ``floor(t_s / d · M + 0.5)`` (half-up) clamped to ``[0, M]``.

    Raises:
        ValueError: On a non-finite ``t_s``, ``duration_s <= 0`` or ``num_bins < 1``.
    """
    _check_bins(num_bins)
    _check_duration(duration_s)
    if not math.isfinite(t_s):
        raise ValueError(f"t_s: must be finite, got {t_s!r}")
    return min(max(math.floor(t_s / duration_s * num_bins + 0.5), 0), num_bins)


def bin_to_time(bin_idx: int, duration_s: float, num_bins: int) -> float:
    """The time of a bin, ``bin_idx / M · d`` seconds.

    Raises:
        ValueError: On ``duration_s <= 0`` or ``num_bins < 1``.
    """
    _check_bins(num_bins)
    _check_duration(duration_s)
    return bin_idx / num_bins * duration_s


def span_to_bins(span_s: SpanS, duration_s: float, num_bins: int) -> tuple[int, int]:
    """Both endpoints of a span as bins.

    Raises:
        ValueError: If the span ends before it starts, or as :func:`time_to_bin`.
    """
    if span_s[1] < span_s[0]:
        raise ValueError(f"span_s: end {span_s[1]} is before start {span_s[0]}")
    return time_to_bin(span_s[0], duration_s, num_bins), time_to_bin(span_s[1], duration_s, num_bins)


def quantisation_error(spans_s: Sequence[SpanS], durations_s: Sequence[float], num_bins: int) -> dict[str, float]:
    """How far span endpoints move when written as temporal tokens and read back.

    Args:
        spans_s: Ground-truth spans in seconds.
        durations_s: The video duration of each span.
        num_bins: M.

    Returns:
        ``mean_abs_s`` and ``max_abs_s`` (seconds), ``mean_rel`` (error / duration) and
        ``n`` (number of endpoints) over every endpoint.

    Raises:
        ValueError: On empty input or a length mismatch, or as :func:`time_to_bin`.
    """
    if len(spans_s) != len(durations_s):
        raise ValueError(f"durations_s: {len(durations_s)} durations for {len(spans_s)} spans")
    if not spans_s:
        raise ValueError("spans_s: empty")
    abs_s: list[float] = []
    rel: list[float] = []
    for span_s, duration_s in zip(spans_s, durations_s):
        for t_s in span_s:
            err_s = abs(t_s - bin_to_time(time_to_bin(t_s, duration_s, num_bins), duration_s, num_bins))
            abs_s.append(err_s)
            rel.append(err_s / duration_s)
    return {
        "mean_abs_s": sum(abs_s) / len(abs_s),
        "max_abs_s": max(abs_s),
        "mean_rel": sum(rel) / len(rel),
        "n": float(len(abs_s)),
    }


@dataclass(frozen=True)
class TemporalProblem:
    """One malformed stretch of temporal markers.

    Attributes:
        kind: ``lone_start``, ``end_before_start`` or ``out_of_range``.
        position: Index of the (first) offending marker among all markers.
        bins: The value(s) involved: ``(start, end)`` for ``end_before_start``, else one.
    """

    kind: ProblemKind
    position: int
    bins: tuple[int, ...]


@dataclass(frozen=True)
class TemporalParse:
    """Spans read from temporal markers, with what could not be read.

    Attributes:
        spans_s: Well-formed spans in seconds, in order.
        bins: The same spans as ``(start_bin, end_bin)``.
        problems: Malformed markers; empty when the output was well formed.
    """

    spans_s: list[tuple[float, float]]
    bins: list[tuple[int, int]]
    problems: list[TemporalProblem]

    @property
    def ok(self) -> bool:
        """Whether no marker was malformed."""
        return not self.problems


def _pair_markers(values: Sequence[int], num_bins: int) -> tuple[list[tuple[int, int]], list[TemporalProblem]]:
    """Positions of the well-formed (start, end) pairs, and the problems (module rule)."""
    pairs: list[tuple[int, int]] = []
    problems: list[TemporalProblem] = []
    pending: int | None = None
    for pos, value in enumerate(values):
        if not 0 <= value <= num_bins:
            problems.append(TemporalProblem("out_of_range", pos, (int(value),)))
        elif pending is None:
            pending = pos
        else:
            start, end = int(values[pending]), int(value)
            if end < start:
                problems.append(TemporalProblem("end_before_start", pending, (start, end)))
            else:
                pairs.append((pending, pos))
            pending = None
    if pending is not None:
        problems.append(TemporalProblem("lone_start", pending, (int(values[pending]),)))
    return pairs, problems


def parse_bins(values: Sequence[int], duration_s: float, num_bins: int) -> TemporalParse:
    """Read marker values (bins, in order) into spans under the module's rule.

    Raises:
        ValueError: Only on a bad ``duration_s`` or ``num_bins`` (never on the values).
    """
    _check_bins(num_bins)
    _check_duration(duration_s)
    pairs, problems = _pair_markers(values, num_bins)
    bins = [(int(values[a]), int(values[b])) for a, b in pairs]
    spans_s = [(bin_to_time(s, duration_s, num_bins), bin_to_time(e, duration_s, num_bins)) for s, e in bins]
    return TemporalParse(spans_s=spans_s, bins=bins, problems=problems)


def parse_temporal_text(text: str, duration_s: float, num_bins: int) -> TemporalParse:
    """Parse the ``<k>`` markers of a text; other angle-bracket text (``<evi>``) is ignored."""
    return parse_bins([int(m.group(1)) for m in _MARKER.finditer(text)], duration_s, num_bins)


def parse_temporal_ids(ids: Sequence[int], first_id: int, num_bins: int, duration_s: float) -> TemporalParse:
    """Parse the temporal tokens (ids in ``[first_id, first_id + M]``) of an id sequence."""
    return parse_bins([i - first_id for i in ids if first_id <= i <= first_id + num_bins], duration_s, num_bins)


def expand_evidence(
    ids: Sequence[int],
    evi_id: int,
    spans_bins: Sequence[tuple[int, int]],
    first_id: int,
    labels: Sequence[int] | None = None,
) -> tuple[list[int], list[int] | None]:
    """Write the k-th ``<evi>`` of a D2VLM-style sequence as GVL's ``<s_k> <e_k>``.

    Args:
        ids: Token ids holding one ``<evi>`` per span.
        evi_id: The id of ``<evi>``.
        spans_bins: ``(start_bin, end_bin)`` per ``<evi>``, in order.
        first_id: The id of ``<0>``.
        labels: Optional labels aligned with ``ids`` (-100 = no loss). An ``<evi>`` without
            loss gives two positions without loss; one with loss is supervised on the two
            new ids.

    Returns:
        The expanded ids, and the expanded labels (``None`` when none were given).

    Raises:
        ValueError: If the ``<evi>`` count differs from ``len(spans_bins)`` or the labels'
            length from the ids'.
    """
    n_evi = sum(1 for t in ids if t == evi_id)
    if n_evi != len(spans_bins):
        raise ValueError(f"spans_bins: {len(spans_bins)} spans for {n_evi} <evi> tokens")
    if labels is not None and len(labels) != len(ids):
        raise ValueError(f"labels: length {len(labels)} differs from ids length {len(ids)}")
    out_ids: list[int] = []
    out_labels: list[int] | None = None if labels is None else []
    spans = iter(spans_bins)
    for pos, tid in enumerate(ids):
        if tid != evi_id:
            out_ids.append(tid)
            if out_labels is not None:
                out_labels.append(labels[pos])
            continue
        start_bin, end_bin = next(spans)
        pair = [first_id + start_bin, first_id + end_bin]
        out_ids.extend(pair)
        if out_labels is not None:
            out_labels.extend([IGNORE_INDEX, IGNORE_INDEX] if labels[pos] == IGNORE_INDEX else pair)
    return out_ids, out_labels


def collapse_to_evidence(
    ids: Sequence[int], evi_id: int, first_id: int, num_bins: int, duration_s: float
) -> tuple[list[int], TemporalParse]:
    """Write each well-formed temporal pair of generated ids as one ``<evi>`` (the inverse of
    :func:`expand_evidence`), so D2VLM's :func:`~d2vlm_ray.model.tokenizer.detokenize`, the
    parsers and the serving payloads read GVL output as they read D2VLM's.

    The ``<evi>`` takes the pair's start position and the end marker is dropped; ids between
    the two markers stay, after the ``<evi>``. A malformed marker (see the module rule) keeps
    its raw id, so the text shows it verbatim (``<37>``), and it gives no span.

    Returns:
        The ids with one ``<evi>`` per span, and the parse (spans in ``<evi>`` order, problems).

    Raises:
        ValueError: Only on a bad ``duration_s`` or ``num_bins``.
    """
    parse = parse_temporal_ids(ids, first_id, num_bins, duration_s)
    markers = [pos for pos, tid in enumerate(ids) if first_id <= tid <= first_id + num_bins]  # positions in ids
    pairs, _ = _pair_markers([ids[pos] - first_id for pos in markers], num_bins)
    starts = {markers[a] for a, _ in pairs}
    ends = {markers[b] for _, b in pairs}
    out = [evi_id if pos in starts else tid for pos, tid in enumerate(ids) if pos not in ends]
    return out, parse
