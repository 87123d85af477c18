"""GVL's discrete temporal tokens: vocabulary, time <-> bin, parsing, expansion, rendering."""

from __future__ import annotations

import math
import random

import pytest

from d2vlm_ray.model.temporal_tokens import (
    TemporalProblem,
    add_temporal_tokens,
    bin_to_time,
    collapse_to_evidence,
    expand_evidence,
    first_temporal_id,
    parse_bins,
    parse_temporal_ids,
    parse_temporal_text,
    quantisation_error,
    span_to_bins,
    temporal_token_strings,
    time_to_bin,
)
from d2vlm_ray.model.tokenizer import (
    EVI_END_TOKEN,
    EVI_TOKEN,
    TokenIds,
    build_tiny_llm_tokenizer,
    detokenize,
    format_span,
    load_llm_tokenizer,
)

M = 300
D = 30.0


@pytest.fixture(scope="module")
def tok_with_bins():
    tok = build_tiny_llm_tokenizer()
    first = add_temporal_tokens(tok, 10)
    return tok, first


def test_token_strings() -> None:
    strings = temporal_token_strings(4)
    assert strings == [f"<{k}>" for k in range(5)]
    with pytest.raises(ValueError, match="num_bins"):
        temporal_token_strings(0)


def test_add_tokens_contiguous_idempotent_and_unsplit() -> None:
    tok = build_tiny_llm_tokenizer()
    size_before = len(tok)
    with pytest.raises(ValueError, match="<0>"):
        first_temporal_id(tok, 20)
    first = add_temporal_tokens(tok, 20)
    assert len(tok) == size_before + 21
    for k, s in enumerate(temporal_token_strings(20)):
        assert tok.convert_tokens_to_ids(s) == first + k
    assert add_temporal_tokens(tok, 20) == first
    assert len(tok) == size_before + 21
    assert first_temporal_id(tok, 20) == first
    ids = tok("at <3><17> red", add_special_tokens=False)["input_ids"]
    assert first + 3 in ids and first + 17 in ids
    assert "<3>" in tok.decode(ids, skip_special_tokens=False)
    # A larger M than was added names the first missing token.
    with pytest.raises(ValueError, match="<21>"):
        first_temporal_id(tok, 21)


def test_non_contiguous_ids_rejected() -> None:
    tok = build_tiny_llm_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<1>"]}, replace_extra_special_tokens=False)
    with pytest.raises(ValueError, match="contiguous"):
        add_temporal_tokens(tok, 3)


def test_round_trip_through_save_and_load(tmp_path) -> None:
    tok = build_tiny_llm_tokenizer()
    first = add_temporal_tokens(tok, 50)
    tok.save_pretrained(tmp_path)
    loaded = load_llm_tokenizer(tmp_path)
    assert first_temporal_id(loaded, 50) == first
    assert add_temporal_tokens(loaded, 50) == first
    assert len(loaded) == len(tok)
    text = "at <0><50> red"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_time_to_bin_half_up_and_clamped() -> None:
    # 0.5 bins exactly: banker's round would give 0 (and 2 for 2.5); half-up gives 1 and 3.
    assert time_to_bin(0.5, 10.0, 10) == 1
    assert time_to_bin(2.5, 10.0, 10) == 3
    assert time_to_bin(2.49, 10.0, 10) == 2
    assert time_to_bin(-4.0, 10.0, 10) == 0
    assert time_to_bin(12.0, 10.0, 10) == 10
    assert time_to_bin(10.0, 10.0, 10) == 10
    assert bin_to_time(3, 10.0, 10) == pytest.approx(3.0)
    assert span_to_bins((1.0, 2.26), 10.0, 10) == (1, 2)


@pytest.mark.parametrize(
    ("t_s", "duration_s", "num_bins", "field"),
    [
        (1.0, 0.0, 10, "duration_s"),
        (1.0, -1.0, 10, "duration_s"),
        (1.0, 5.0, 0, "num_bins"),
        (math.nan, 5.0, 10, "t_s"),
        (math.inf, 5.0, 10, "t_s"),
        (1.0, math.inf, 10, "duration_s"),
    ],
)
def test_time_to_bin_rejects_bad_input(t_s: float, duration_s: float, num_bins: int, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        time_to_bin(t_s, duration_s, num_bins)


def test_bin_to_time_and_span_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="duration_s"):
        bin_to_time(1, 0.0, 10)
    with pytest.raises(ValueError, match="span_s"):
        span_to_bins((3.0, 1.0), 10.0, 10)


@pytest.mark.parametrize("num_bins", [50, 100, 300])
def test_round_trip_error_bounded(num_bins: int) -> None:
    rng = random.Random(num_bins)
    for _ in range(2000):
        d = rng.uniform(0.5, 600.0)
        t = rng.choice([0.0, d, rng.uniform(0.0, d)])
        back = bin_to_time(time_to_bin(t, d, num_bins), d, num_bins)
        assert abs(t - back) <= d / (2 * num_bins) + 1e-9


def test_quantisation_error() -> None:
    spans = [(0.5, 2.0), (1.0, 9.9)]
    durations = [10.0, 20.0]
    out = quantisation_error(spans, durations, 10)
    errs = [abs(t - bin_to_time(time_to_bin(t, d, 10), d, 10)) for (s, e), d in zip(spans, durations) for t in (s, e)]
    rels = [errs[0] / 10, errs[1] / 10, errs[2] / 20, errs[3] / 20]
    assert out["n"] == 4
    assert out["mean_abs_s"] == pytest.approx(sum(errs) / 4)
    assert out["max_abs_s"] == pytest.approx(max(errs))
    assert out["mean_rel"] == pytest.approx(sum(rels) / 4)
    assert out["max_abs_s"] > 0
    with pytest.raises(ValueError, match="durations_s"):
        quantisation_error(spans, [10.0], 10)
    with pytest.raises(ValueError, match="spans_s"):
        quantisation_error([], [], 10)


def _t(k: int) -> float:
    return bin_to_time(k, D, M)


@pytest.mark.parametrize(
    ("text", "bins", "problems"),
    [
        ("", [], []),
        ("no markers here", [], []),
        ("<12>", [], [TemporalProblem("lone_start", 0, (12,))]),
        ("<20><10>", [], [TemporalProblem("end_before_start", 0, (20, 10))]),
        ("<305><1><2>", [(1, 2)], [TemporalProblem("out_of_range", 0, (305,))]),
        ("<1><305><2>", [(1, 2)], [TemporalProblem("out_of_range", 1, (305,))]),
        ("from <4> until about <9>.", [(4, 9)], []),
        ("<7><7>", [(7, 7)], []),
        ("<1><5> and <10><300>", [(1, 5), (10, 300)], []),
        ("<evi> <1> <|end|> <5></evi>", [(1, 5)], []),
        ("<0><300><8>", [(0, 300)], [TemporalProblem("lone_start", 2, (8,))]),
        ("<9><3><4><6>", [(4, 6)], [TemporalProblem("end_before_start", 0, (9, 3))]),
    ],
)
def test_parse_text_edge_cases(text: str, bins: list, problems: list) -> None:
    parse = parse_temporal_text(text, D, M)
    assert parse.bins == bins
    assert parse.spans_s == [(_t(s), _t(e)) for s, e in bins]
    assert parse.problems == problems
    assert parse.ok == (not problems)


def test_parse_ids_and_bins_agree_with_text() -> None:
    first = 1000
    values = [4, 9, 20, 10, 6]
    ids = [5, first + 4, 7, first + 9, first + 20, first + 10, 3, first + 6, first + M + 1, 999]
    by_ids = parse_temporal_ids(ids, first, M, D)
    assert by_ids == parse_bins(values, D, M)
    assert by_ids == parse_temporal_text("".join(f"<{v}>" for v in values), D, M)
    assert by_ids.bins == [(4, 9)]
    assert [p.kind for p in by_ids.problems] == ["end_before_start", "lone_start"]


def test_expand_evidence_ids_and_labels() -> None:
    evi, first = 7, 100
    ids = [7, 8, 20, 7, 21, 6]
    labels = [-100, 8, 20, 7, 21, 6]
    out_ids, out_labels = expand_evidence(ids, evi, [(3, 5), (0, 9)], first, labels)
    assert out_ids == [103, 105, 8, 20, 100, 109, 21, 6]
    assert out_labels == [-100, -100, 8, 20, 100, 109, 21, 6]
    only_ids, none_labels = expand_evidence(ids, evi, [(3, 5), (0, 9)], first)
    assert only_ids == out_ids and none_labels is None
    with pytest.raises(ValueError, match="spans_bins"):
        expand_evidence(ids, evi, [(3, 5)], first)
    with pytest.raises(ValueError, match="labels"):
        expand_evidence(ids, evi, [(3, 5), (0, 9)], first, labels[:-1])


def _ids(tok, words: list[str]) -> list[int]:
    return [tok.convert_tokens_to_ids(w) for w in words]


def _render(tok, ids: list[int], first: int, num_bins: int, duration_s: float):
    """GVL ids as the project renders them: collapsed to ``<evi>`` and detokenized."""
    neutral, parse = collapse_to_evidence(ids, TokenIds.from_tokenizer(tok).evi, first, num_bins, duration_s)
    return detokenize(tok, neutral, parse.spans_s), parse


def test_render_matches_d2vlm_detokenize(tok_with_bins) -> None:
    tok, first = tok_with_bins
    duration_s, num_bins = 12.0, 10
    tail = ["at", "<evi>", ",", "it", "turned", "red", ".", "<|end|>"]
    d2vlm_ids = _ids(tok, [EVI_TOKEN, EVI_END_TOKEN, *tail])
    span = (bin_to_time(3, duration_s, num_bins), bin_to_time(7, duration_s, num_bins))
    expected = detokenize(tok, d2vlm_ids, [span, span])
    gvl_ids, _ = expand_evidence(d2vlm_ids, TokenIds.from_tokenizer(tok).evi, [(3, 7), (3, 7)], first)
    assert gvl_ids[:2] == [first + 3, first + 7]
    text, parse = _render(tok, gvl_ids, first, num_bins, duration_s)
    assert text == expected
    assert parse.ok and parse.bins == [(3, 7), (3, 7)]
    assert parse_temporal_text(text, duration_s, num_bins).bins == []
    neutral, _ = collapse_to_evidence(gvl_ids, TokenIds.from_tokenizer(tok).evi, first, num_bins, duration_s)
    assert neutral == d2vlm_ids, "collapsing undoes expand_evidence"


def test_render_lone_and_ill_ordered_markers(tok_with_bins) -> None:
    tok, first = tok_with_bins
    duration_s, num_bins = 12.0, 10
    ids = [first + 8, first + 2, tok.convert_tokens_to_ids("red"), first + 5, tok.convert_tokens_to_ids("<|end|>")]
    text, parse = _render(tok, ids, first, num_bins, duration_s)
    # Malformed markers give no span and stay visible verbatim: the reader sees what was emitted.
    assert text == "<8> <2> red <5>"
    assert parse.spans_s == []
    assert [p.kind for p in parse.problems] == ["end_before_start", "lone_start"]


def test_render_keeps_text_between_pair_markers(tok_with_bins) -> None:
    tok, first = tok_with_bins
    red, end = tok.convert_tokens_to_ids("red"), tok.convert_tokens_to_ids("<|end|>")
    text, parse = _render(tok, [first + 1, red, first + 4, end], first, 10, 10.0)
    evi = TokenIds.from_tokenizer(tok).evi
    assert text == detokenize(tok, [evi, red, end], [(1.0, 4.0)])
    assert text.startswith(format_span((1.0, 4.0))) and text.endswith("red")
    assert parse.bins == [(1, 4)]


def test_decoding_agrees_with_the_official_parser_and_encoding_is_within_one_bin_of_its_training() -> None:
    """The official code (WHB139426/Grounded-Video-LLM) reads ``<k>`` as ``duration * k / M``
    (inference.py) and writes training times as ``min(int(M * t / d), M)`` (datasets/mix_sft.py);
    the project rounds instead, so it lands on the official bin or the next one."""
    rng = random.Random(1)
    for _ in range(2000):
        num_bins = rng.choice([50, 100, 300])
        duration_s = rng.uniform(1.0, 600.0)
        t_s = rng.uniform(0.0, duration_s)
        official_bin = min(int(num_bins * t_s / duration_s), num_bins)
        assert time_to_bin(t_s, duration_s, num_bins) - official_bin in (0, 1)
        k = rng.randint(0, num_bins)
        assert bin_to_time(k, duration_s, num_bins) == pytest.approx(duration_s * k / num_bins, rel=1e-12)
