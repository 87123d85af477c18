"""Factorized perturbations: every family honours its guarantee (property-style, pure Python)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from d2vlm_ray.data.perturb import (
    COLOUR_WORDS,
    FAMILIES,
    OBJECT_WORDS,
    PerturbConfig,
    ResponseFormatError,
    attribute_words,
    build_caption_pool,
    corrupt_attribute,
    parse_response,
    perturb,
    span_iou,
    synthesize_sample,
)
from d2vlm_ray.data.synthetic import plan_benchmark, scene_records
from d2vlm_ray.types import VideoRecord
from tests.helpers_model import tiny_tokenizers

MAX_IOU = 0.5
FREE_TEXT = [
    VideoRecord(
        video="cook.mp4", duration_s=60.0, query="Describe the video.", task="dvc", source="ET-Instruct",
        spans_s=[(3.0, 15.0), (20.0, 41.0), (45.0, 52.0)],
        answer="<evi><evi><evi></evi><evi>, a man pours milk into a white cup. <evi>, he stirs the coffee with "
        "a spoon. <evi>, the woman drinks from the red mug.",
        sample_id="et_dvc_0",
    ),
    VideoRecord(
        video="dog.mp4", duration_s=30.0, query="When does the dog jump?", task="tvg", source="ET-Instruct",
        spans_s=[(4.0, 9.5)], answer="<evi></evi>The event happens in <evi>.", sample_id="et_tvg_0",
    ),
    VideoRecord(
        video="park.mp4", duration_s=40.0, query="What happened?", task="gqa", source="ET-Instruct",
        spans_s=[(10.0, 16.0)], answer="<evi></evi>At <evi>, a girl throws a ball to her black dog.",
        sample_id="et_gqa_0",
    ),
]


@pytest.fixture(scope="module")
def records() -> list[VideoRecord]:
    synthetic = [r for scene in plan_benchmark(30, seed=7) for r in scene_records(scene)]
    return synthetic + FREE_TEXT


@pytest.fixture(scope="module")
def pool(records: list[VideoRecord]) -> dict:
    return build_caption_pool(records)


def _inside(span, duration_s: float) -> bool:
    return 0.0 <= span[0] <= span[1] <= duration_s


def check_variant(record: VideoRecord, family: str, text: str, spans: tuple) -> None:
    """Independent statement of each family's guarantee."""
    chosen = tuple(record.spans_s)
    n, m = len(chosen), len(spans)
    assert text.count("<evi>") == 2 * m, (family, text)
    parse_response(text, m)  # the rejected text keeps the n <evi> </evi> ... n <evi> layout
    assert all(_inside(s, record.duration_s) for s in spans), (family, spans)
    if family in ("temporal_shift", "temporal_scale", "temporal_jitter", "temporal_swap"):
        assert text == record.answer and m == n
        changed = [k for k in range(n) if spans[k] != chosen[k]]
        assert changed, family
        if family in ("temporal_shift", "temporal_scale"):
            assert len(changed) == 1
        if family == "temporal_swap":
            i, j = changed
            assert (spans[i], spans[j]) == (chosen[j], chosen[i])
        for k in changed:
            assert span_iou(chosen[k], spans[k]) < MAX_IOU, (family, chosen[k], spans[k])
    elif family == "temporal_drop":
        assert m == n - 1 and any(chosen[:k] + chosen[k + 1 :] == spans for k in range(n))
    elif family == "temporal_merge":
        assert m == n - 1
        new = [s for s in spans if s not in chosen]
        assert len(new) == 1
        covered = [c for c in chosen if c not in spans]
        assert len(covered) == 2
        assert new[0] == (min(c[0] for c in covered), max(c[1] for c in covered))
        assert all(span_iou(new[0], c) < MAX_IOU for c in covered)
    elif family.startswith("textual_"):
        assert spans == chosen and text != record.answer
        assert text.split("</evi>")[0] == record.answer.split("</evi>")[0]
    else:
        assert family == "combined" and m == n and text != record.answer
        assert any(span_iou(c, s) < MAX_IOU for c, s in zip(chosen, spans))
        assert all(c == s or span_iou(c, s) < MAX_IOU for c, s in zip(chosen, spans))


def test_every_family_honours_its_guarantee(records: list[VideoRecord], pool: dict) -> None:
    cfg = PerturbConfig(max_iou=MAX_IOU)
    unk = tiny_tokenizers().llm.unk_token_id
    made: Counter[str] = Counter()
    for seed in range(6):
        for record in records:
            for family in FAMILIES:
                variant = perturb(record, family, random.Random(f"{seed}:{record.sample_id}:{family}"), cfg, pool)
                if variant is None:
                    continue
                made[family] += 1
                check_variant(record, family, variant.text, variant.spans_s)
                if record.source == "synthetic":
                    ids = tiny_tokenizers().llm(variant.text, add_special_tokens=False)["input_ids"]
                    assert unk not in ids, f"{family} wrote a word outside the tiny vocabulary: {variant.text!r}"
    # Every family applies to a good share of the samples it is meant for.
    assert set(made) == set(FAMILIES), made
    assert min(made.values()) >= 30, made


def test_free_text_attribute_words() -> None:
    text = "a man pours milk into a white cup"
    found = {text[s:e]: cat for s, e, cat in attribute_words(text, synthetic=False)}
    assert found == {"man": "object", "milk": "object", "white": "colour", "cup": "object"}
    # A noun outside the object list is still found after a determiner.
    assert ("saxophone", "object") in {(t[s:e], c) for t in ["she plays the saxophone"]
                                       for s, e, c in attribute_words(t, False)}
    for seed in range(40):
        out = corrupt_attribute(text, random.Random(seed), synthetic=False)
        assert out is not None and out != text
        diff = [(a, b) for a, b in zip(text.split(), out.split()) if a != b]
        assert len(diff) == 1 and diff[0][1] in (COLOUR_WORDS + OBJECT_WORDS)
    capital = corrupt_attribute("The dog runs.", random.Random(0), synthetic=False)
    assert capital is not None and capital.split()[1][0].islower() and capital != "The dog runs."
    assert attribute_words("it goes up and down", synthetic=False) == []


def test_synthetic_attributes_stay_in_vocabulary() -> None:
    found = attribute_words("the red square moves left", synthetic=True)
    assert [c for _, _, c in found] == ["colour", "object", "direction"]
    for seed in range(20):
        out = corrupt_attribute("the red square moves left", random.Random(seed), synthetic=True)
        assert out != "the red square moves left"
        ids = tiny_tokenizers().llm(out, add_special_tokens=False)["input_ids"]
        assert tiny_tokenizers().llm.unk_token_id not in ids


def test_synthesis_is_deterministic_and_follows_weights(records: list[VideoRecord], pool: dict) -> None:
    cfg = PerturbConfig(seed=3, variants_per_sample=3)
    first = [synthesize_sample(r, cfg, pool).pairs for r in records]
    again = [synthesize_sample(r, cfg, pool).pairs for r in records]
    assert first == again
    other = [synthesize_sample(r, PerturbConfig(seed=4, variants_per_sample=3), pool).pairs for r in records]
    assert first != other
    # The pool does not depend on record order.
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    assert build_caption_pool(shuffled) == pool
    # Only families with weight are drawn, in about their proportions.
    weighted = PerturbConfig(family_weights={"temporal_shift": 3.0, "temporal_scale": 1.0}, variants_per_sample=1)
    counts = Counter(p.family for r in records for p in synthesize_sample(r, weighted, pool).pairs)
    assert set(counts) == {"temporal_shift", "temporal_scale"}
    share = counts["temporal_shift"] / sum(counts.values())
    assert 0.65 < share < 0.85, counts
    # Variant indices count per family within a sample.
    for pairs in first:
        per_family = Counter()
        for p in pairs:
            assert p.variant_idx == per_family[p.family]
            per_family[p.family] += 1


def test_skips_and_errors_are_reported() -> None:
    cfg = PerturbConfig(family_weights={"textual_swap": 1.0, "temporal_drop": 1.0})
    result = synthesize_sample(FREE_TEXT[1], cfg)  # one event, no caption
    assert result.pairs == [] and result.skipped == Counter({"textual_swap": 1, "temporal_drop": 1})
    empty = VideoRecord(video="v", duration_s=5.0, query="q", answer="</evi>(A)", sample_id="mc")
    assert synthesize_sample(empty, cfg).error == "no_spans"
    broken = VideoRecord(video="v", duration_s=5.0, query="q", answer="<evi> no separator <evi>", spans_s=[(1, 2)])
    assert synthesize_sample(broken, cfg).error.startswith("bad_format")
    with pytest.raises(ResponseFormatError):
        parse_response("<evi></evi>x", 2)
    with pytest.raises(ValueError, match="family_weights"):
        PerturbConfig(family_weights={"temporal_teleport": 1.0}).validate()
    with pytest.raises(ValueError, match="family"):
        perturb(FREE_TEXT[0], "temporal_teleport", random.Random(0), PerturbConfig())
