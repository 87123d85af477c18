"""Factorized perturbation synthesis: rejected variants of a chosen grounded answer.

From one chosen sample (a :class:`~d2vlm_ray.types.VideoRecord` whose ``answer`` holds
``n`` grounding ``<evi>``, ``</evi>``, then an answer with ``n`` more ``<evi>``, and whose
``spans_s`` holds the ``n`` event spans) this module builds rejected variants, each
labelled with its family:

temporal (text unchanged unless the number of events changes)
    ``temporal_shift``   move one span, keeping its length;
    ``temporal_scale``   stretch or shrink one span about its centre;
    ``temporal_swap``    exchange the spans of two events;
    ``temporal_drop``    remove one event (its ``<evi>`` pair and its caption);
    ``temporal_merge``   fuse two events adjacent in time into one span;
    ``temporal_jitter``  move the two boundaries of one or more spans independently.
textual (spans unchanged)
    ``textual_swap``      exchange the captions of two events;
    ``textual_replace``   replace a caption with one from another sample of the same source;
    ``textual_repeat``    give one event another event's caption;
    ``textual_attribute`` replace a colour or object word (or, for synthetic data, a
                          shape, size or direction) with another of its kind.
``combined``
    one span-moving temporal perturbation and one textual perturbation together.

Guarantees (checked on every output, so a variant that cannot honour them is not made):
every span a temporal family changes has IoU ``< max_iou`` with the chosen span it
replaces (merge: the fused span with both originals; swap: the two spans with each
other); textual families change the text and keep every span; ``combined`` does both.
Rejected responses keep the ``2m <evi>`` layout for their ``m`` spans.

Everything is a pure function of ``(cfg.seed, sample_id)`` plus the sample and the
caption pool, so any partitioning of a data set gives the same pairs. For samples whose
source is ``synthetic``, replacement words come only from :mod:`d2vlm_ray.data.vocab`
(the tiny tokenizer maps other words to ``<unk>``).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from d2vlm_ray.data import vocab
from d2vlm_ray.types import PreferencePair, SpanS, VideoRecord

EVI = "<evi>"
EVI_END = "</evi>"
SYNTHETIC_SOURCE = "synthetic"

TEMPORAL_FAMILIES: tuple[str, ...] = (
    "temporal_shift",
    "temporal_scale",
    "temporal_swap",
    "temporal_drop",
    "temporal_merge",
    "temporal_jitter",
)
TEXTUAL_FAMILIES: tuple[str, ...] = ("textual_swap", "textual_replace", "textual_repeat", "textual_attribute")
COMBINED_FAMILY = "combined"
FAMILIES: tuple[str, ...] = (*TEMPORAL_FAMILIES, *TEXTUAL_FAMILIES, COMBINED_FAMILY)
# Temporal families that keep the number of events (the ones ``combined`` draws from).
_SPAN_MOVING: tuple[str, ...] = ("temporal_shift", "temporal_scale", "temporal_swap", "temporal_jitter")

# Equal thirds for temporal, textual and combined, split evenly inside each group.
DEFAULT_FAMILY_WEIGHTS: dict[str, float] = {
    **{f: 1.0 / len(TEMPORAL_FAMILIES) for f in TEMPORAL_FAMILIES},
    **{f: 1.0 / len(TEXTUAL_FAMILIES) for f in TEXTUAL_FAMILIES},
    COMBINED_FAMILY: 1.0,
}

# Attribute words for free-text (E.T.-Instruct style) captions.
COLOUR_WORDS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "black", "white", "brown", "orange", "purple", "pink",
    "grey", "gray", "silver", "golden", "gold", "beige", "cyan", "violet", "dark", "light",
)
OBJECT_WORDS: tuple[str, ...] = (
    "man", "woman", "person", "boy", "girl", "child", "baby", "dog", "cat", "horse", "bird",
    "cup", "bowl", "plate", "pan", "pot", "knife", "spoon", "fork", "bottle", "glass", "jar",
    "table", "chair", "door", "window", "phone", "book", "ball", "car", "bike", "box", "bag",
    "hat", "shirt", "towel", "brush", "water", "milk", "oil", "egg", "eggs", "bread", "cake",
    "onion", "tomato", "potato", "meat", "fish", "rice", "sauce", "cheese", "flour", "sugar",
    "salt", "butter", "paper", "guitar", "piano", "camera", "board", "rope", "tree", "wall",
)
DETERMINERS: frozenset[str] = frozenset(
    {"a", "an", "the", "his", "her", "their", "its", "some", "this", "that", "these", "those", "another"}
)
# Words a determiner can be followed by that are not the noun (kept simple on purpose).
_NON_NOUNS: frozenset[str] = frozenset(
    {"same", "other", "first", "second", "third", "last", "next", "few", "lot", "little", "new", "old",
     "small", "large", "big", "long", "short", "way", "end", "start", "video", "camera", "scene",
     "moment", "time", "event", "events", "one", "two", "three"}
) - frozenset(OBJECT_WORDS)

# Synthetic attribute categories: every word comes from the tiny vocabulary.
SYNTHETIC_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": vocab.COLOURS,
    "object": vocab.SHAPES,
    "size": vocab.SIZES,
    "direction": vocab.DIRECTIONS,
}
FREE_TEXT_ATTRIBUTES: dict[str, tuple[str, ...]] = {"colour": COLOUR_WORDS, "object": OBJECT_WORDS}

_WORD = re.compile(r"[A-Za-z]+")
_TAIL = re.compile(r"^([\s,:;\-]*)(.*?)([\s.!?]*)$", re.S)


class ResponseFormatError(ValueError):
    """A chosen answer does not have the ``n <evi> </evi> ... n <evi>`` layout for its spans."""


@dataclass(frozen=True)
class PerturbConfig:
    """How rejected variants are drawn.

    Attributes:
        seed: Seed; with the sample id it fixes every random choice.
        variants_per_sample: Rejected variants made per chosen sample (at most).
        family_weights: Relative frequency of each family (families left out get 0).
        max_iou: Every moved span has IoU below this with the chosen span it replaces.
        min_span_s: Shortest span a stretch, shrink or jitter may produce.
        max_tries: Random draws per family before it counts as not applicable.
        time_decimals: Rejected span times are rounded to this many decimals.
    """

    seed: int = 0
    variants_per_sample: int = 2
    family_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FAMILY_WEIGHTS))
    max_iou: float = 0.5
    min_span_s: float = 0.5
    max_tries: int = 32
    time_decimals: int = 1

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field that is out of range."""
        unknown = sorted(set(self.family_weights) - set(FAMILIES))
        if unknown:
            raise ValueError(f"family_weights: unknown families {unknown}; known: {list(FAMILIES)}")
        if any(w < 0 for w in self.family_weights.values()) or not any(w > 0 for w in self.family_weights.values()):
            raise ValueError("family_weights: weights must be >= 0 with at least one > 0")
        if not 0.0 < self.max_iou <= 1.0:
            raise ValueError(f"max_iou: must lie in (0, 1], got {self.max_iou}")
        if self.variants_per_sample < 1:
            raise ValueError(f"variants_per_sample: must be >= 1, got {self.variants_per_sample}")
        if self.min_span_s < 0 or self.max_tries < 1 or self.time_decimals < 0:
            raise ValueError("min_span_s, max_tries and time_decimals must be non-negative (max_tries >= 1)")


@dataclass(frozen=True)
class ParsedResponse:
    """A grounded response split into its parts.

    ``render()`` gives ``n × <evi>``, ``</evi>``, ``lead``, then ``<evi> + tails[k]`` per event.
    """

    lead: str
    tails: tuple[str, ...]

    @property
    def n_events(self) -> int:
        """Number of events n."""
        return len(self.tails)

    def render(self) -> str:
        """The response text."""
        return EVI * self.n_events + EVI_END + self.lead + "".join(EVI + t for t in self.tails)


@dataclass(frozen=True)
class Variant:
    """One rejected response: text and spans (``2m <evi>`` for ``m`` spans)."""

    text: str
    spans_s: tuple[SpanS, ...]


@dataclass
class SampleResult:
    """What synthesis made of one chosen sample.

    Attributes:
        pairs: The preference pairs.
        applied: Pairs made per family.
        skipped: Per family, how often it was drawn but could not apply to the sample.
        error: Why the whole sample was unusable (``no_spans``, ``bad_format: ...``), else ``None``.
    """

    pairs: list[PreferencePair]
    applied: Counter[str]
    skipped: Counter[str]
    error: str | None = None


def parse_response(answer: str, n_spans: int) -> ParsedResponse:
    """Split ``answer`` into lead text and per-event tails.

    Raises:
        ResponseFormatError: If the grounding part is not exactly ``n_spans`` ``<evi>`` or
            the answer part does not hold ``n_spans`` ``<evi>``.
    """
    if EVI_END not in answer:
        raise ResponseFormatError(f"answer: no {EVI_END} separating grounding and answer")
    grounding, rest = answer.split(EVI_END, 1)
    if grounding.replace(EVI, "").strip() or grounding.count(EVI) != n_spans:
        raise ResponseFormatError(f"answer: the grounding part must be exactly {n_spans} {EVI}, got {grounding!r}")
    parts = rest.split(EVI)
    if len(parts) - 1 != n_spans:
        raise ResponseFormatError(f"answer: the answer part has {len(parts) - 1} {EVI} for {n_spans} spans")
    return ParsedResponse(lead=parts[0], tails=tuple(parts[1:]))


def split_tail(tail: str) -> tuple[str, str, str]:
    """``(prefix punctuation, caption core, suffix punctuation)`` of one event's text."""
    match = _TAIL.match(tail)
    assert match is not None  # the pattern matches every string
    return match.group(1), match.group(2), match.group(3)


def caption_core(tail: str) -> str:
    """The caption words of an event's text (``", the red square jumps. "`` → ``the red square jumps``)."""
    return split_tail(tail)[1]


def _has_words(text: str) -> bool:
    return bool(_WORD.search(text))


def span_iou(a: SpanS, b: SpanS) -> float:
    """Temporal IoU of two closed spans in seconds (two equal points have IoU 1)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    if union <= 0:
        return 1.0 if (a[0], a[1]) == (b[0], b[1]) else 0.0
    return inter / union


def sample_rng(seed: int, sample_id: str, purpose: str = "perturb") -> random.Random:
    """The sample's own RNG; string seeds hash with sha512, so this is stable across processes."""
    return random.Random(f"d2vlm-fpo:{purpose}:{seed}:{sample_id}")


def hash_fraction(seed: int, key: str) -> float:
    """A stable pseudo-random number in ``[0, 1)`` for ``key`` (for splits and sampling)."""
    digest = hashlib.sha256(f"d2vlm-fpo:split:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


# --- temporal ---------------------------------------------------------------------------


class _Ctx:
    """Per-sample state shared by the family functions."""

    def __init__(
        self,
        record: VideoRecord,
        parsed: ParsedResponse,
        rng: random.Random,
        cfg: PerturbConfig,
        pool: Mapping[str, Sequence[str]] | None,
    ) -> None:
        self.record = record
        self.parsed = parsed
        self.rng = rng
        self.cfg = cfg
        self.pool = pool or {}
        self.spans = tuple(record.spans_s)
        self.duration_s = record.duration_s
        self.synthetic = record.source == SYNTHETIC_SOURCE

    def round(self, t_s: float) -> float:
        return round(min(max(t_s, 0.0), self.duration_s), self.cfg.time_decimals)

    def moved(self, old: SpanS, new: SpanS, min_len_s: float) -> bool:
        """``new`` is a valid span inside the video that moved far enough from ``old``."""
        return (
            0.0 <= new[0] <= new[1] <= self.duration_s
            and new[1] - new[0] >= min_len_s
            and span_iou(old, new) < self.cfg.max_iou
        )


def _shift(ctx: _Ctx) -> Variant | None:
    for _ in range(ctx.cfg.max_tries):
        k = ctx.rng.randrange(len(ctx.spans))
        start, end = ctx.spans[k]
        length = end - start
        # IoU of a span shifted by d (< length) is (L - d) / (L + d): below b once d > L (1 - b) / (1 + b).
        need = length * (1 - ctx.cfg.max_iou) / (1 + ctx.cfg.max_iou)
        room = {-1: start, 1: ctx.duration_s - end}
        direction = ctx.rng.choice([-1, 1])
        if room[direction] <= need:
            direction = -direction
        if room[direction] <= need:
            continue
        offset = ctx.rng.uniform(need, room[direction]) * direction
        new = (ctx.round(start + offset), ctx.round(end + offset))
        if ctx.moved((start, end), new, min(length, ctx.cfg.min_span_s)):
            return Variant(ctx.parsed.render(), _replace_span(ctx.spans, k, new))
    return None


def _scale(ctx: _Ctx) -> Variant | None:
    b = ctx.cfg.max_iou
    for _ in range(ctx.cfg.max_tries):
        k = ctx.rng.randrange(len(ctx.spans))
        start, end = ctx.spans[k]
        length = end - start
        if length <= 0:
            continue
        # Concentric spans have IoU = shorter / longer, so shrink below b or stretch above 1 / b.
        factor = ctx.rng.uniform(0.1, b) if ctx.rng.random() < 0.5 else ctx.rng.uniform(1.0 / b, 3.0 / b)
        centre = (start + end) / 2.0
        half = length * factor / 2.0
        new = (ctx.round(centre - half), ctx.round(centre + half))
        if ctx.moved((start, end), new, ctx.cfg.min_span_s):
            return Variant(ctx.parsed.render(), _replace_span(ctx.spans, k, new))
    return None


def _jitter(ctx: _Ctx) -> Variant | None:
    for _ in range(ctx.cfg.max_tries):
        count = ctx.rng.randint(1, len(ctx.spans))
        chosen = sorted(ctx.rng.sample(range(len(ctx.spans)), count))
        spans = list(ctx.spans)
        ok = True
        for k in chosen:
            start, end = spans[k]
            scale = max(end - start, ctx.cfg.min_span_s)
            for _ in range(ctx.cfg.max_tries):
                new = (
                    ctx.round(start + ctx.rng.uniform(-1.5, 1.5) * scale),
                    ctx.round(end + ctx.rng.uniform(-1.5, 1.5) * scale),
                )
                if ctx.moved((start, end), new, ctx.cfg.min_span_s):
                    spans[k] = new
                    break
            else:
                ok = False
                break
        if ok:
            return Variant(ctx.parsed.render(), tuple(spans))
    return None


def _swap_spans(ctx: _Ctx) -> Variant | None:
    pairs = [
        (i, j)
        for i in range(len(ctx.spans))
        for j in range(i + 1, len(ctx.spans))
        if span_iou(ctx.spans[i], ctx.spans[j]) < ctx.cfg.max_iou
    ]
    if not pairs:
        return None
    i, j = ctx.rng.choice(pairs)
    spans = list(ctx.spans)
    spans[i], spans[j] = spans[j], spans[i]
    return Variant(ctx.parsed.render(), tuple(spans))


def _remove_event(parsed: ParsedResponse, j: int) -> ParsedResponse:
    """Drop event ``j``'s ``<evi>`` and the text it owns.

    An event owns the text after its ``<evi>`` (its caption); the last event of a list
    whose tail is only punctuation (``"<evi>, <evi>."``) instead takes the separator
    before it, so the closing punctuation survives.
    """
    tails = list(parsed.tails)
    if j == len(tails) - 1 and j > 0 and not _has_words(tails[j]):
        del tails[j - 1]
    else:
        del tails[j]
        if j == len(tails) and tails:
            # The new last event's caption ended with the separator before the dropped one.
            tails[-1] = tails[-1].rstrip()
    return ParsedResponse(parsed.lead, tuple(tails))


def _drop(ctx: _Ctx) -> Variant | None:
    if len(ctx.spans) < 2:
        return None
    j = ctx.rng.randrange(len(ctx.spans))
    spans = ctx.spans[:j] + ctx.spans[j + 1 :]
    return Variant(_remove_event(ctx.parsed, j).render(), spans)


def _merge(ctx: _Ctx) -> Variant | None:
    order = sorted(range(len(ctx.spans)), key=lambda k: (ctx.spans[k][0], ctx.spans[k][1], k))
    options = []
    for a, b in zip(order, order[1:]):
        fused = (min(ctx.spans[a][0], ctx.spans[b][0]), max(ctx.spans[a][1], ctx.spans[b][1]))
        if span_iou(fused, ctx.spans[a]) < ctx.cfg.max_iou and span_iou(fused, ctx.spans[b]) < ctx.cfg.max_iou:
            options.append((a, b, fused))
    if not options:
        return None
    keep, gone, fused = ctx.rng.choice(options)
    spans = list(ctx.spans)
    spans[keep] = fused
    del spans[gone]
    return Variant(_remove_event(ctx.parsed, gone).render(), tuple(spans))


def _replace_span(spans: tuple[SpanS, ...], k: int, new: SpanS) -> tuple[SpanS, ...]:
    return spans[:k] + (new,) + spans[k + 1 :]


# --- textual ----------------------------------------------------------------------------


def _with_core(tail: str, core: str) -> str:
    prefix, _, suffix = split_tail(tail)
    return prefix + core + suffix


def _captioned(parsed: ParsedResponse) -> list[int]:
    return [k for k, t in enumerate(parsed.tails) if _has_words(caption_core(t))]


def _distinct_pairs(parsed: ParsedResponse) -> list[tuple[int, int]]:
    idx = _captioned(parsed)
    cores = [caption_core(t).lower() for t in parsed.tails]
    return [(i, j) for i in idx for j in idx if i != j and cores[i] != cores[j]]


def _text_swap(ctx: _Ctx) -> ParsedResponse | None:
    pairs = [(i, j) for i, j in _distinct_pairs(ctx.parsed) if i < j]
    if not pairs:
        return None
    i, j = ctx.rng.choice(pairs)
    tails = list(ctx.parsed.tails)
    core_i, core_j = caption_core(tails[i]), caption_core(tails[j])
    tails[i], tails[j] = _with_core(tails[i], core_j), _with_core(tails[j], core_i)
    return ParsedResponse(ctx.parsed.lead, tuple(tails))


def _text_repeat(ctx: _Ctx) -> ParsedResponse | None:
    pairs = _distinct_pairs(ctx.parsed)
    if not pairs:
        return None
    src, dst = ctx.rng.choice(pairs)
    tails = list(ctx.parsed.tails)
    tails[dst] = _with_core(tails[dst], caption_core(tails[src]))
    return ParsedResponse(ctx.parsed.lead, tuple(tails))


def _text_replace(ctx: _Ctx) -> ParsedResponse | None:
    idx = _captioned(ctx.parsed)
    own = {caption_core(t).lower() for t in ctx.parsed.tails} | {c.lower() for c in ctx.record.captions}
    candidates = ctx.pool.get(ctx.record.source, ())
    if not idx or not candidates:
        return None
    k = ctx.rng.choice(idx)
    for _ in range(ctx.cfg.max_tries):
        caption = ctx.rng.choice(candidates)
        if caption.lower() not in own:
            tails = list(ctx.parsed.tails)
            tails[k] = _with_core(tails[k], caption)
            return ParsedResponse(ctx.parsed.lead, tuple(tails))
    return None


def attribute_words(text: str, synthetic: bool) -> list[tuple[int, int, str]]:
    """Replaceable attribute words of ``text`` as ``(start, end, category)``.

    Synthetic text: words of the vocabulary's colour, shape, size and direction lists.
    Free text: colour words, words of a common-object list, and simple noun detection:
    the first word after a determiner (skipping colour words and a few adjectives).

    Args:
        text: A caption (no ``<evi>`` inside).
        synthetic: Use the synthetic vocabulary's categories.
    """
    words = [(m.start(), m.end(), m.group(0).lower()) for m in _WORD.finditer(text)]
    found: list[tuple[int, int, str]] = []
    if synthetic:
        for start, end, word in words:
            for category, options in SYNTHETIC_ATTRIBUTES.items():
                if word in options:
                    found.append((start, end, category))
                    break
        return found
    after_det = False
    for start, end, word in words:
        if word in COLOUR_WORDS:
            found.append((start, end, "colour"))
            continue  # "a white cup": the noun after the colour still counts
        if word in OBJECT_WORDS or (after_det and word not in DETERMINERS and word not in _NON_NOUNS and len(word) > 2):
            found.append((start, end, "object"))
        after_det = word in DETERMINERS
    return found


def corrupt_attribute(text: str, rng: random.Random, synthetic: bool) -> str | None:
    """``text`` with one attribute word replaced by another of its category, or ``None``."""
    found = attribute_words(text, synthetic)
    if not found:
        return None
    start, end, category = rng.choice(found)
    table = SYNTHETIC_ATTRIBUTES if synthetic else FREE_TEXT_ATTRIBUTES
    original = text[start:end]
    options = [w for w in table[category] if w != original.lower()]
    new = rng.choice(options)
    if original[0].isupper():
        new = new[0].upper() + new[1:]
    return text[:start] + new + text[end:]


def _text_attribute(ctx: _Ctx) -> ParsedResponse | None:
    segments = [ctx.parsed.lead, *ctx.parsed.tails]
    candidates = [k for k, seg in enumerate(segments) if attribute_words(seg, ctx.synthetic)]
    if not candidates:
        return None
    k = ctx.rng.choice(candidates)
    new = corrupt_attribute(segments[k], ctx.rng, ctx.synthetic)
    if new is None or new == segments[k]:
        return None
    segments[k] = new
    return ParsedResponse(segments[0], tuple(segments[1:]))


_TEMPORAL: dict[str, Callable[[_Ctx], Variant | None]] = {
    "temporal_shift": _shift,
    "temporal_scale": _scale,
    "temporal_swap": _swap_spans,
    "temporal_drop": _drop,
    "temporal_merge": _merge,
    "temporal_jitter": _jitter,
}
_TEXTUAL: dict[str, Callable[[_Ctx], ParsedResponse | None]] = {
    "textual_swap": _text_swap,
    "textual_replace": _text_replace,
    "textual_repeat": _text_repeat,
    "textual_attribute": _text_attribute,
}


def _combined(ctx: _Ctx) -> Variant | None:
    temporal = list(_SPAN_MOVING)
    textual = list(TEXTUAL_FAMILIES)
    ctx.rng.shuffle(temporal)
    ctx.rng.shuffle(textual)
    moved = next((v for v in (_TEMPORAL[f](ctx) for f in temporal) if v is not None), None)
    if moved is None:
        return None
    text = next((p for p in (_TEXTUAL[f](ctx) for f in textual) if p is not None), None)
    if text is None:
        return None
    return Variant(text.render(), moved.spans_s)


def perturb(
    record: VideoRecord,
    family: str,
    rng: random.Random,
    cfg: PerturbConfig,
    caption_pool: Mapping[str, Sequence[str]] | None = None,
) -> Variant | None:
    """One rejected variant of ``record`` from ``family``, or ``None`` where it cannot apply.

    Args:
        record: The chosen sample (answer with ``<evi>``, spans in seconds).
        family: One of :data:`FAMILIES`.
        rng: Random source (see :func:`sample_rng`).
        cfg: Perturbation settings.
        caption_pool: Captions per source for ``textual_replace`` (see :func:`build_caption_pool`).

    Raises:
        ValueError: On an unknown family.
        ResponseFormatError: If the answer's layout does not match its spans.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: unknown {family!r}; known: {list(FAMILIES)}")
    parsed = parse_response(record.answer, len(record.spans_s))
    if not record.spans_s:
        return None
    ctx = _Ctx(record, parsed, rng, cfg, caption_pool)
    if family in _TEMPORAL:
        return _TEMPORAL[family](ctx)
    if family in _TEXTUAL:
        new = _TEXTUAL[family](ctx)
        return None if new is None else Variant(new.render(), ctx.spans)
    return _combined(ctx)


def build_caption_pool(
    records: Iterable[VideoRecord], max_per_source: int = 5000, seed: int = 0
) -> dict[str, tuple[str, ...]]:
    """Captions per source, for ``textual_replace``.

    A caption is an entry of ``record.captions`` or the caption core of an answer event.
    Sources with more than ``max_per_source`` captions keep a hash-selected subset, so the
    pool is the same whatever order the records come in.

    Returns:
        ``{source: sorted captions}``.
    """
    found: dict[str, set[str]] = {}
    for record in records:
        bucket = found.setdefault(record.source, set())
        bucket.update(c.strip() for c in record.captions if _has_words(c))
        try:
            parsed = parse_response(record.answer, len(record.spans_s))
        except ResponseFormatError:
            continue
        bucket.update(caption_core(t) for t in parsed.tails if _has_words(caption_core(t)))
    out = {}
    for source, captions in sorted(found.items()):
        ranked = sorted(captions, key=lambda c: (hash_fraction(seed, c), c))[:max_per_source]
        out[source] = tuple(sorted(ranked))
    return out


def synthesize_sample(
    record: VideoRecord, cfg: PerturbConfig, caption_pool: Mapping[str, Sequence[str]] | None = None
) -> SampleResult:
    """Up to ``cfg.variants_per_sample`` preference pairs for one chosen sample.

    Families are drawn by ``cfg.family_weights``; a family that cannot apply to the sample
    is counted in ``skipped`` and not drawn again for it. Identical rejected variants are
    made once. Deterministic for a given ``(cfg, record, caption_pool)``.
    """
    applied: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    if not record.spans_s:
        return SampleResult([], applied, skipped, error="no_spans")
    try:
        parse_response(record.answer, len(record.spans_s))
    except ResponseFormatError as exc:
        return SampleResult([], applied, skipped, error=f"bad_format: {exc}")
    rng = sample_rng(cfg.seed, record.sample_id)
    weights = {f: w for f, w in cfg.family_weights.items() if w > 0}
    families = [f for f in FAMILIES if f in weights]
    failed: set[str] = set()
    seen = {(record.answer, tuple(record.spans_s))}
    pairs: list[PreferencePair] = []
    for _ in range(4 * cfg.variants_per_sample):
        if len(pairs) >= cfg.variants_per_sample:
            break
        options = [f for f in families if f not in failed]
        if not options:
            break
        family = rng.choices(options, weights=[weights[f] for f in options])[0]
        variant = perturb(record, family, rng, cfg, caption_pool)
        if variant is None:
            failed.add(family)
            skipped[family] += 1
            continue
        key = (variant.text, variant.spans_s)
        if key in seen:
            continue
        seen.add(key)
        pairs.append(
            PreferencePair(
                sample_id=record.sample_id,
                family=family,
                variant_idx=applied[family],
                video=record.video,
                duration_s=record.duration_s,
                task=record.task,
                prompt=record.query,
                chosen_text=record.answer,
                chosen_spans_s=record.spans_s,
                rejected_text=variant.text,
                rejected_spans_s=variant.spans_s,
                src_spans_s=record.src_spans_s,
            )
        )
        applied[family] += 1
    return SampleResult(pairs, applied, skipped)
