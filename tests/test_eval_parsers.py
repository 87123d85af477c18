"""Edge cases of the free-text parsers (eval-protocols §6); none may raise."""

from __future__ import annotations

import pytest

from d2vlm_ray.eval.parsers import (
    leading_letter,
    paren_letter,
    parse_dense_captions,
    parse_spans,
    parse_vhd_midpoint,
    parse_vhd_point,
    split_evidence,
    strip_choice_prefix,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no timestamps here", None),
        ("", None),
        ("12.5", None),
        ("20.5 - 12.0", [[12.0, 20.5]]),  # reversed -> sorted
        ("12 - 12", [[12.0, 12.0]]),  # zero-length kept
        ("step 1 - 2 ...: 10 - 20 seconds", [[1.0, 2.0], [10.0, 20.0]]),
        ("10 \u2013 20", None),  # en dash
        ("10 \u2014 20", None),  # em dash
        ("10 ~ 20", None),
        ("[10, 20]", None),
        ("(10.0, 20.0)", None),
        ("10s - 20s", None),
        ("10s to 20s", None),
        ("from 10 till 20", None),
        ("10 to 20", [[10.0, 20.0]]),
        ("-5 - 10", [[5.0, 10.0]]),  # sign dropped
        ("1e2 - 3e2", [[2.0, 3.0]]),
        ("30% - 50%", None),
        ("from 30% to 50%", None),
        ("starts at 30%\nends at 50%", [[30.0, 50.0]]),  # percentages read as seconds
        ("0.3 - 0.5 of the video", [[0.3, 0.5]]),
        ("1:05 - 1:10", [[1.0, 5.0]]),
        ("start at 0:01:05\nend at 0:01:10", [[0.0, 0.0]]),  # bare-number stage wins
        ("The event starts at 00:01:05 and ends at 00:01:10", None),
        ("It starts at 30 and ends at 20.", None),  # one sentence, first number only
        ("It starts at 30.\nIt ends at 20.", [[20.0, 30.0]]),
        ("Starts: 5s. Ends: 9s.", None),
        ("1..5 - 3", None),  # official crashes; documented reading: failure
        ("from 3 to 1..2", None),
        ("1..5 - 3 and 4 - 6", [[4.0, 6.0]]),  # only the unreadable match is dropped
        ("5.5.5 - 8", [[5.5, 8.0]]),
        ("10 - 20. seconds", [[10.0, 20.0]]),
    ],
)
def test_parse_spans_edge_cases(text: str, expected: list[list[float]] | None) -> None:
    assert parse_spans(text) == expected


def test_parse_spans_trailing_dot_variant() -> None:
    """D2VLM strips trailing dots in stage 1; '10. - 20.' still reads [10, 20] both ways."""
    assert parse_spans("10. - 20.", strip_trailing_dot=True) == [[10.0, 20.0]]
    assert parse_spans("1..5 - 3", strip_trailing_dot=True) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The man cuts onions.", None),
        ("", None),
        ("start time 5, end time 9, cut the onion", None),  # deliberately rejected format
        ("Starting time: 5s, ending time: 9s, description: cut the onion", ([[5.0, 9.0]], ["cut the onion"])),
        ("At 30 seconds the man cuts onions", ([[10.0, 50.0]], ["the man cuts onions."])),
        ("At 1:05 the man cuts onions", ([[45.0, 85.0]], ["At 1:05 the man cuts onions."])),
        ("5 seconds the man cuts onions", ([[5.0, 45.0]], ["the man cuts onions."])),
        ("0 - 10, ab", ([[0.0, 10.0]], ["0 - 10, ab."])),  # 5-char caption filter -> fallback
        ("0.0 - 10.0 seconds: crack eggs.", ([[0.0, 10.0]], [": crack eggs."])),
        ("1..5 - 3 seconds, crack the eggs", None),
        ("20 - 10 seconds, crack the eggs\n30 - 40 seconds, whisk them", (
            [[10.0, 20.0], [30.0, 40.0]], ["crack the eggs", "whisk them"])),
    ],
)
def test_parse_dense_captions_edge_cases(text: str, expected: tuple | None) -> None:
    assert parse_dense_captions(text) == expected


def test_parse_dense_captions_d2vlm_needs_delimiter() -> None:
    text = "0 - 10 seconds, crack the eggs"
    assert parse_dense_captions(text, "</evi>") is None
    parsed = parse_dense_captions("0 - 10 </evi> 0 - 10 seconds, crack the eggs", "</evi>")
    assert parsed == ([[0.0, 10.0]], ["crack the eggs"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("clip 3 at 12.0s", 3.0), ("Highlight at 1:05", 1.0), (".5", 0.5), ("-3.5", -3.5), ("none", None), ("", None)],
)
def test_vhd_first_number(text: str, expected: float | None) -> None:
    assert parse_vhd_point(text) == expected


def test_vhd_midpoint_needs_interval() -> None:
    assert parse_vhd_midpoint("8 - 16") == 12.0
    assert parse_vhd_midpoint("12.5") is None


def test_split_evidence() -> None:
    assert split_evidence("a </evi> b </evi> c") == ("a ", " c")
    assert split_evidence("no delimiter") is None
    assert split_evidence("x", "") is None


@pytest.mark.parametrize(
    ("text", "paren", "lead"),
    [
        ("A man opens the door", None, "a"),  # an article read as option A
        ("(A) but actually the woman cooks", "a", "a"),
        ("I think (b)", "b", "i"),
        ("Best Option: (C) the dog", "c", "c"),
        ("", None, None),
        ("B", None, "b"),
        ("Because", None, None),
    ],
)
def test_choice_letters(text: str, paren: str | None, lead: str | None) -> None:
    assert paren_letter(text) == paren
    assert leading_letter(strip_choice_prefix(text)) == lead
