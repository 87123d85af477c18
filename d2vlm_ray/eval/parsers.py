"""Parsers that turn free model text into spans, points, letters and captions.

These re-implement, in this project's own code, the behaviour of the E.T. Bench
official parsers (``tvg_format``, ``dvc_format``, the multiple-choice stages and the
VHD number rule) and of D2VLM's modified scorer, as described in the project's
evaluation-protocol notes. Every number is read as seconds; no parser knows the
video duration.

No function here raises on model text. Where the official code crashes, the
documented reading used instead is:

* ``"1..5 - 3"`` (and any other match whose number is not a valid float, such as
  ``"from 3 to 1..2"``): the official parser raises ``ValueError`` from
  ``float('1..5')``. Here a match containing an unreadable number is dropped;
  if every match of a stage is dropped the stage counts as empty and the next
  stage is tried (so ``"1..5 - 3"`` alone is a parse failure, ``None``).
* The dense-caption parser wraps everything, so any internal surprise becomes a
  parse failure, exactly as the official ``try``/``except`` does.

Other documented readings that follow the official code (and are tested):
reversed spans are sorted, zero-length spans are kept, signs are dropped
(``"-5 - 10"`` reads [5, 10]), ``"1e2 - 3e2"`` reads [2, 3], percentages are read
as seconds when a keyword sentence carries them, clock times ``"1:05 - 1:10"``
read [1, 5], en/em dashes, ``~`` and bracketed pairs are not separators.
"""

from __future__ import annotations

import re

Span = list[float]

# Official interval regex: digits, any run of dots, optional digits. "1..5" matches
# (and is unreadable); "5.5.5" only matches its "5.5" prefix.
_RANGE_RE = re.compile(r"(\d+\.*\d*)\s*-\s*(\d+\.*\d*)")
_RANGE_TEXT_RE = re.compile(r"(\d+\.*\d*\s*-\s*\d+\.*\d*)")
_TO_RE = re.compile(r"(\d+\.*\d*)\s* to \s*(\d+\.*\d*)")
_SENTENCE_SPLIT_RE = re.compile(r"[!?\n]")
_FIRST_NUMBER_RE = re.compile(r"\b(\d+\.\d+\b|\b\d+)\b")
_CLOCK_RE = re.compile(r"\b(\d{1,2}:\d{2}:\d{2})\b")
_KEYWORDS = ("starts", "ends", "happens in", "start time", "end time", "start", "end", "happen")
_VHD_NUMBER_RE = re.compile(r"[-+]?\d*\.\d+|[-+]?\d+")
_PAREN_LETTER_RE = re.compile(r"\(([A-Za-z])\)")

EVIDENCE_DELIMITER = "</evi>"
"""The delimiter D2VLM writes between its evidence part and its answer part."""


def _to_float(text: str, strip_trailing_dot: bool = False) -> float | None:
    """``float(text)``, or ``None`` where the official code would raise."""
    if strip_trailing_dot:
        text = text.rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return value


def _pairs(matches: list[tuple[str, str]], strip_trailing_dot: bool = False) -> list[Span]:
    """Turn regex pairs into float pairs, dropping pairs with an unreadable number."""
    spans: list[Span] = []
    for start_text, end_text in matches:
        start_s = _to_float(start_text, strip_trailing_dot)
        end_s = _to_float(end_text, strip_trailing_dot)
        if start_s is None or end_s is None:
            continue
        spans.append([start_s, end_s])
    return spans


def _keyword_sentences(text: str) -> list[str]:
    return [sentence for sentence in _SENTENCE_SPLIT_RE.split(text) if any(k in sentence for k in _KEYWORDS)]


def _pair_consecutive(times_s: list[float]) -> list[Span]:
    times_s = times_s[: len(times_s) // 2 * 2]
    return [[times_s[i], times_s[i + 1]] for i in range(0, len(times_s), 2)]


def parse_spans(answer: str, strip_trailing_dot: bool = False, to_stage: bool = True) -> list[Span] | None:
    """Read every time span in ``answer`` with the official four-stage rule.

    Stages, first non-empty wins: (1) all ``a - b`` ranges in the lower-cased
    text; (2) all ``a to b`` ranges (spaces around "to" required); (3) in each
    sentence (split on ``!``, ``?``, newline only) that holds a start/end keyword,
    its first number, paired consecutively; (4) the same with ``h:mm:ss`` clock
    times. Every pair is then ordered ``[min, max]``.

    Args:
        answer: Raw model text.
        strip_trailing_dot: D2VLM's variant strips trailing dots from the
            stage-1 numbers (``"10. - 20."``).
        to_stage: Run stage 2 (``a to b``). TimeChat's ``extract_time`` has no
            such stage, so its variant passes ``False``.

    Returns:
        The spans in seconds, or ``None`` (a parse failure) if none was found.
    """
    text = answer.lower()
    spans = _pairs(_RANGE_RE.findall(text), strip_trailing_dot)
    if not spans and to_stage:
        spans = _pairs(_TO_RE.findall(text))
    if not spans:
        times_s: list[float] = []
        for sentence in _keyword_sentences(text):
            numbers = _FIRST_NUMBER_RE.findall(sentence)
            if numbers:
                times_s.append(float(numbers[0]))
        spans = _pair_consecutive(times_s)
    if not spans:
        times_s = []
        for sentence in _keyword_sentences(text):
            clocks = _CLOCK_RE.findall(sentence)
            if clocks:
                hours, minutes, seconds = (int(part) for part in clocks[0].split(":"))
                times_s.append(float(hours * 3600 + minutes * 60 + seconds))
        spans = _pair_consecutive(times_s)
    if not spans:
        return None
    return [[min(span), max(span)] for span in spans]


def parse_evidence_spans(evidence: str) -> list[Span] | None:
    """Read D2VLM evidence spans: stage-1 ``a - b`` ranges only, NOT sorted.

    D2VLM's scorer keeps evidence spans in written order, so a reversed evidence
    span stays reversed (and then covers nothing in EVS bins).

    Args:
        evidence: The text before the first ``</evi>``.

    Returns:
        The spans in seconds, or ``None`` if there are none.
    """
    spans = _pairs(_RANGE_RE.findall(evidence.lower()))
    return spans or None


def parse_dense_evidence(answer: str, delimiter: str = EVIDENCE_DELIMITER) -> list[Span]:
    """D2VLM dvc/slc evidence: every ``a - b`` range before the first delimiter.

    As D2VLM's scorer reads it: lower-cased, runs of two or more dots collapsed
    to a space, spans kept in written order (not sorted).

    Args:
        answer: Raw model text.
        delimiter: Separator, ``</evi>`` by default.

    Returns:
        The evidence spans in seconds; empty when there are none.
    """
    evidence = answer.split(delimiter)[0] if delimiter else answer
    return _pairs(_RANGE_RE.findall(re.sub(r"\.{2,}", " ", evidence.lower())))


def split_evidence(answer: str, delimiter: str = EVIDENCE_DELIMITER) -> tuple[str, str] | None:
    """Split D2VLM text into (evidence, answer) on ``delimiter``.

    The evidence is the text before the first delimiter and the answer the text
    after the last one, as D2VLM's scorer does.

    Args:
        answer: Raw model text.
        delimiter: Separator, ``</evi>`` by default; must be non-empty.

    Returns:
        ``(evidence, answer)``, or ``None`` when the delimiter is absent.
    """
    if not delimiter:
        return None
    parts = answer.split(delimiter)
    if len(parts) < 2:
        return None
    return parts[0], parts[-1]


def parse_vhd_point(answer: str) -> float | None:
    """Official VHD rule: the first signed number anywhere in the raw text.

    ``"clip 3 at 12.0s"`` reads 3, ``"1:05"`` reads 1, ``".5"`` reads 0.5 and
    ``"-3.5"`` reads -3.5.

    Args:
        answer: Raw model text.

    Returns:
        The point in seconds, or ``None`` if the text has no number.
    """
    match = _VHD_NUMBER_RE.search(answer)
    if match is None:
        return None
    return float(match.group(0))


def parse_vhd_midpoint(answer_part: str) -> float | None:
    """D2VLM VHD rule: the midpoint of the first span of the answer part.

    A bare number such as ``"12.5"`` has no span and fails.

    Args:
        answer_part: The text after ``</evi>``.

    Returns:
        The midpoint in seconds, or ``None``.
    """
    spans = parse_spans(answer_part)
    if spans is None:
        return None
    start_s, end_s = spans[0]
    return (start_s + end_s) / 2


def _clip_window(center_s: float, radius_s: float = 20.0) -> str:
    """The official ±20 s window around a single time, written as text."""
    if center_s > radius_s:
        return f"{center_s - radius_s} - {center_s + radius_s}"
    return f"{center_s} - {center_s + 2 * radius_s}"


def _fallback_time_text(time_part: str) -> str | None:
    """Fallback time reading for one caption line (official ``extract_time_part``)."""
    ranges = re.findall(r"\d+\.*\d*\s*-\s*\d+\.*\d*", time_part)
    if ranges:
        return ranges[0]
    colon_count = time_part.count(":")
    if colon_count in (1, 2):
        clocks = re.findall(r"\d+\.*\d*:\d+\.*\d*", time_part)
        seconds = [int(c.split(":")[0]) * 60 + int(c.split(":")[1]) for c in clocks]
        if colon_count == 1:
            # Official indexes the first clock match; with none it raises and the
            # caller skips the line.
            return _clip_window(seconds[0])
        if colon_count == 2 and len(seconds) == 2:
            return f"{seconds[0]} - {seconds[1]}"
        if colon_count == 2:
            # Official unpacks exactly two clock values; anything else raises and the
            # caller skips the line.
            raise ValueError("two colons but not two clock values")
    numbers = re.findall(r"\d+\.*\d*(?!\.)", time_part)
    if len(numbers) == 1:
        return _clip_window(float(numbers[0]))
    if len(numbers) == 2:
        return f"{numbers[0]} - {numbers[1]}"
    return None


def _paragraph_captions(paragraph: str) -> tuple[list[Span], list[str]]:
    """Stage (a)/(b) of the official dense-caption parser; raises where it would."""
    text = paragraph.lower()
    timestamps: list[Span] = []
    captions: list[str] = []
    matches = _RANGE_RE.findall(text)
    if matches:
        # Unreadable numbers raise inside the official try-block, failing the parse.
        timestamps = [[float(a), float(b)] for a, b in matches]
        rest = text
        for range_text in _RANGE_TEXT_RE.findall(text):
            rest = rest.replace(range_text, "\n")
        captions = rest.replace("seconds", "").split("\n")
    if not timestamps:
        starts = re.findall(r"(?:start(?:ing)? time: (\d+\.*\d*)(?:s| seconds)?)", text, re.DOTALL | re.IGNORECASE)
        ends = re.findall(r"(?:end(?:ing)? time: (\d+\.*\d*)(?:s| seconds)?)", text, re.DOTALL | re.IGNORECASE)
        if starts and ends:
            timestamps = [[float(a), float(b)] for a, b in zip(starts, ends)]
            captions = re.findall(r"description: (.*)", text)
            if not captions:
                captions = re.findall(r"\*\s*(.*)", text)
    if not timestamps and re.findall(r"start time (\d+\.*\d*), end time (\d+\.*\d*)", text):
        # The official parser deliberately asserts here, so this format always fails.
        raise ValueError("'start time x, end time y' format is rejected")
    captions = [c.strip().strip(", ").rstrip() for c in captions if len(c) > 5]
    keep = min(len(timestamps), len(captions))
    return timestamps[:keep], captions[:keep]


def _fallback_captions(full_text: str) -> tuple[list[Span], list[str]]:
    """Line-by-line fallback of the official parser: the first line with a time wins."""
    if "\n" in full_text:
        lines = [line for line in full_text.split("\n") if len(line) > 7]
    else:
        lines = [piece + "." for piece in full_text.split(".") if len(piece) > 7]
    for line in lines:
        parts = [part.strip(",") for part in line.split("seconds")]
        try:
            time_text = _fallback_time_text(parts[0])
            if time_text is None:
                continue
            start_text, end_text = time_text.split("-")[:2]
            span = [round(float(start_text.strip()), 2), round(float(end_text.strip()), 2)]
        except (ValueError, IndexError):
            continue
        return [span], [parts[-1].strip()]
    return [], []


def parse_dense_captions(
    answer: str, delimiter: str | None = None
) -> tuple[list[Span], list[str]] | None:
    """Read ``"s - e seconds, caption"`` lines (official ``dvc_format``).

    Official mode (``delimiter=None``): stage (a) reads every ``a - b`` range and
    the text between ranges as captions (chunks of more than 5 characters); stage
    (b) reads "start time: x / end time: y / description:" blocks; otherwise the
    line fallback reads the first line with a range, a clock time or bare
    numbers (single times become ±20 s windows).

    D2VLM mode (``delimiter="</evi>"``): text without the delimiter fails; stages
    (a)/(b) read the second chunk after collapsing runs of dots, and the line
    fallback still reads the whole text, as D2VLM's scorer does. Where that
    scorer crashes (an exception inside stage (a)/(b)), this returns a failure.

    Args:
        answer: Raw model text.
        delimiter: ``None`` for the official parser, else D2VLM's delimiter.

    Returns:
        ``(spans, captions)`` with spans ordered ``[min, max]``, or ``None``.
    """
    paragraph = answer
    if delimiter is not None:
        chunks = answer.split(delimiter) if delimiter else [answer]
        if len(chunks) < 2:
            return None
        paragraph = re.sub(r"\.{2,}", " ", chunks[1].lower())
    try:
        spans, captions = _paragraph_captions(paragraph)
    except (ValueError, IndexError):
        return None
    if not spans:
        spans, captions = _fallback_captions(answer)
    if not spans:
        return None
    return [[min(span), max(span)] for span in spans], captions


def letter_map(option_count: int) -> dict[str, int]:
    """``{'a': 0, 'b': 1, ...}`` for ``option_count`` options."""
    return {chr(ord("a") + i): i for i in range(min(option_count, 26))}


def paren_letter(answer: str) -> str | None:
    """The first ``(X)`` letter anywhere in the raw text, lower-cased."""
    match = _PAREN_LETTER_RE.search(answer)
    return match.group(1).lower() if match else None


def strip_choice_prefix(answer: str, lower: bool = True) -> str:
    """Drop a ``best option:`` prefix, then leading spaces and ``(``.

    Args:
        answer: Raw model text.
        lower: The referring scorer lower-cases first; GVQ keeps the case.

    Returns:
        The processed answer that the letter and similarity stages read.
    """
    text = answer.lower() if lower else answer
    if text.lower().startswith("best option:"):
        text = text[12:]
    return text.lstrip().lstrip("(").lstrip()


def leading_letter(processed: str) -> str | None:
    """The leading option letter of an already processed answer, lower-cased.

    A letter is read when the text is one character long or its second character
    is one of ``. , space )``. ``"A man opens the door"`` therefore reads "a".
    """
    if not processed:
        return None
    if len(processed) == 1 or processed[1] in (".", ",", " ", ")"):
        return processed[0].lower()
    return None
