"""Tests of the annotation readers and writers on small hand-written fixtures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from d2vlm_ray.data.annotations import (
    AnnotationError,
    read_activitynet_captions,
    read_annotations,
    read_charades_sta,
    read_etbench_json,
    read_evi_json,
    read_qvhighlights,
    read_youcook2,
    write_etbench_json,
    write_evi_json,
)
from d2vlm_ray.types import VideoRecord


def _conv(query: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"<image>\n{query}"}, {"from": "gpt", "value": answer}]


def _write_lines(path: Path, items: list[object]) -> Path:
    """A JSON list with one item per line, so item ``i`` sits on line ``i + 2``."""
    path.write_text("[\n" + ",\n".join(json.dumps(i) for i in items) + "\n]\n", encoding="utf-8")
    return path


EVI_GOOD = {
    "id": "a",
    "video": "v/a.mp4",
    "duration": 30.0,
    "task": "tvg",
    "source": "synthetic",
    "tgt": [12.0, 5.0],
    "conversations": _conv("Find it.", "<evi></evi>The event happens in <evi>."),
}
EVI_DVC = {
    "video": "v/b.mp4",
    "duration": 20.0,
    "task": "dvc",
    "source": "youcook2",
    "tgt": [[1.0, 4.0], [15.0, 25.0]],
    "conversations": _conv("Describe.", "<evi><evi></evi><evi>, crack eggs. <evi>, whisk."),
    "captions": ["crack eggs", "whisk"],
}
EVI_SRC = {
    "id": "c",
    "video": "s3://bucket/c.mp4",
    "duration": 40.0,
    "task": "rvq",
    "source": "star",
    "src": [2.0, 6.0],
    "conversations": _conv("What happens during <evi>?", "</evi>(B) a dog."),
    "options": ["a cat", "a dog"],
    "answer": "a dog",
}


def test_evi_reader_repairs_and_counts(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "evi.json", [EVI_GOOD, EVI_DVC, EVI_SRC])
    result = read_evi_json(path, video_root="/data", split="train")
    assert not result.errors
    a, b, c = result.records
    assert a.spans_s == ((5.0, 12.0),) and a.query == "Find it." and a.video == "/data/v/a.mp4"
    assert a.sample_id == "a" and a.split == "train" and a.answer.startswith("<evi></evi>")
    assert b.spans_s == ((1.0, 4.0), (15.0, 20.0)) and b.captions == ("crack eggs", "whisk")
    assert b.sample_id == "1"
    assert c.video == "s3://bucket/c.mp4" and c.src_spans_s == ((2.0, 6.0),) and c.answer_idx == 1
    assert result.counters["spans_reordered"] == 1
    assert result.counters["spans_clipped"] == 1
    assert result.counters["records"] == 3


def _bad_evi_items() -> list[object]:
    return [
        EVI_GOOD,
        {**EVI_GOOD, "tgt": [1.0, 2.0, 3.0]},
        {**EVI_GOOD, "tgt": [[1.0, 2.0], [3.0, 4.0]]},
        {k: v for k, v in EVI_GOOD.items() if k != "duration"},
        {**EVI_GOOD, "tgt": [31.0, 35.0]},
        "not a record",
        {**EVI_GOOD, "conversations": {"chosen": []}},
        {**EVI_SRC, "src": [1.0, 2.0, 3.0, 4.0]},
        EVI_DVC,
    ]


def test_evi_policies_report_file_and_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_lines(tmp_path / "bad.json", _bad_evi_items())
    with pytest.raises(AnnotationError) as info:
        read_evi_json(path)
    assert info.value.issues[0].line == 3 and info.value.issues[0].record == "1"
    assert f"{path}:3" in str(info.value)

    collected = read_evi_json(path, on_error="collect")
    assert len(collected.records) == 2
    assert [e.line for e in collected.errors] == [3, 4, 5, 6, 7, 8, 9]
    reasons = " | ".join(e.reason for e in collected.errors)
    for fragment in ("even number", "expected 4", "duration", "starts at or after", "JSON object", "FPO", "src"):
        assert fragment in reasons
    assert collected.counters["skipped"] == 7
    with pytest.raises(AnnotationError):
        collected.raise_if_errors()

    with caplog.at_level(logging.WARNING, logger="d2vlm_ray.data.annotations"):
        skipped = read_evi_json(path, on_error="skip")
    assert len(skipped.records) == 2 and len(skipped.errors) == 7
    assert sum("skipping malformed" in r.message for r in caplog.records) == 7


def test_line_numbers_in_pretty_printed_json(tmp_path: Path) -> None:
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps([EVI_GOOD, {**EVI_GOOD, "duration": -1}], indent=2), encoding="utf-8")
    result = read_evi_json(path, on_error="collect")
    text = path.read_text().splitlines()
    line = result.errors[0].line
    assert line is not None and text[line - 1].strip() == "{"
    assert '"duration": -1' in "\n".join(text[line - 1 : line + 6])


def test_invalid_json_file_always_raises(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n{"video": "a.mp4",\n', encoding="utf-8")
    for policy in ("fail", "skip", "collect"):
        with pytest.raises(AnnotationError, match="invalid JSON"):
            read_evi_json(path, on_error=policy)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_error"):
        read_evi_json(path, on_error="ignore")  # type: ignore[arg-type]


def _sample_records() -> list[VideoRecord]:
    return [
        VideoRecord(
            video="videos/x.mp4", duration_s=30.5, query="Find the red square.", task="tvg", source="synthetic",
            spans_s=((3.2, 7.9),), answer="<evi></evi>The event happens in <evi>.", sample_id="7", split="val",
        ),
        VideoRecord(
            video="videos/y.mp4", duration_s=20.0, query="Describe.", task="dvc", source="synthetic",
            spans_s=((1.0, 4.0), (6.0, 9.5)), captions=("one", "two"),
            answer="<evi><evi></evi><evi>, one. <evi>, two.", sample_id="8", split="val",
        ),
        VideoRecord(
            video="videos/z.mp4", duration_s=12.0, query="What happens during <evi>?", task="rvq", source="star",
            src_spans_s=((2.0, 5.0),), options=("a", "b", "c"), answer_idx=2, answer="</evi>(C) c",
            sample_id="9", split="val",
        ),
    ]


def test_evi_round_trip(tmp_path: Path) -> None:
    records = _sample_records()
    assert write_evi_json(records, tmp_path / "out" / "evi.json") == 3
    result = read_evi_json(tmp_path / "out" / "evi.json", split="val")
    assert result.records == records
    data = json.loads((tmp_path / "out" / "evi.json").read_text())
    assert data[0]["tgt"] == [3.2, 7.9] and data[0]["conversations"][0]["value"].startswith("<image>\n")
    assert data[2]["answer"] == "c"


def test_etbench_round_trip(tmp_path: Path) -> None:
    records = [r.__class__(**{**r.to_dict(), "answer": ""}) for r in _sample_records()]
    write_etbench_json(records, tmp_path / "etb.json")
    data = json.loads((tmp_path / "etb.json").read_text())
    assert data[0]["tgt"] == [3.2, 7.9] and data[0]["idx"] == 7 and data[0]["version"] == 1.0
    assert data[1]["tgt"] == [[1.0, 4.0], [6.0, 9.5]] and data[1]["g"] == ["one", "two"]
    assert data[2]["p"] == 2 and data[2]["src"] == [2.0, 5.0]
    assert read_etbench_json(tmp_path / "etb.json", split="val").records == records


def test_etbench_reader_variants(tmp_path: Path) -> None:
    items = [
        {"version": 1.0, "idx": 0, "task": "rar", "source": "perception_test", "video": "p/a.mp4",
         "duration": 20.0, "src": [3.0, 8.0], "o": ["run", "walk"], "p": 1, "q": "What happens in <vid>?"},
        {"version": 1.0, "idx": 1, "task": "eca", "source": "charades_sta", "video": "c/b.mp4",
         "duration": 20.0, "o": [[1, 2.5], [4, 6]], "p": 0, "q": "Which span?", "a": "(A)"},
        {"version": 1.0, "idx": 2, "task": "vhd", "source": "qvhighlights", "video": "q/c.mp4",
         "duration": 50.0, "tgt": [[[1, 3], [5, 8]], [[2, 4]]], "q": "Highlight?"},
        {"version": 1.0, "idx": 3, "task": "tvg", "source": "x", "video": "x.mp4", "duration": 9.0,
         "tgt": [2, 12], "q": "q"},
        {"version": 1.0, "idx": 4, "task": "tvg", "source": "x", "video": "x.mp4", "duration": 9.0, "q": "q"},
        {"version": 1.0, "idx": 5, "task": "rvq", "source": "x", "video": "x.mp4", "duration": 9.0,
         "o": ["a"], "p": 3, "q": "q"},
    ]
    result = read_etbench_json(_write_lines(tmp_path / "etb.json", items), on_error="collect")
    rar, eca, vhd, tvg, no_tgt = result.records
    assert rar.query == "What happens in <evi>?" and rar.src_spans_s == ((3.0, 8.0),) and rar.answer_idx == 1
    assert eca.options == ("1 - 2.5", "4 - 6")
    assert vhd.spans_s == ((1.0, 3.0), (5.0, 8.0), (2.0, 4.0))
    assert tvg.spans_s == ((2.0, 9.0),) and no_tgt.spans_s == ()
    assert [e.line for e in result.errors] == [7] and "not an index" in result.errors[0].reason
    assert result.counters["annotator_spans_merged"] == 1
    assert result.counters["vid_placeholders_converted"] == 1
    assert result.counters["spans_clipped"] == 1


def test_charades_sta(tmp_path: Path) -> None:
    path = tmp_path / "charades_sta_test.txt"
    path.write_text(
        "3MSZA 24.3 30.4##person turn a light on.\n"
        "\n"
        "3MSZA 30.4 24.3##person turns the light off.\n"
        "ABCDE 1.0 5.0##person sits.\n"
        "3MSZA 1.0 5.0 person without separator\n"
        "3MSZA 40.0 45.0##after the end.\n"
        "3MSZA x 5.0##bad number.\n",
        encoding="utf-8",
    )
    result = read_charades_sta(path, durations_s={"3MSZA": 29.0}, on_error="collect")
    assert [r.sample_id for r in result.records] == ["0", "1"]
    first, second = result.records
    assert first.spans_s == ((24.3, 29.0),) and first.query == "person turn a light on."
    assert first.video == "3MSZA.mp4" and first.task == "tvg" and first.source == "charades_sta"
    assert second.spans_s == ((24.3, 29.0),)
    assert result.counters["spans_clipped"] == 2 and result.counters["spans_reordered"] == 1
    assert [(e.line, e.record) for e in result.errors] == [(4, "2"), (5, "3"), (6, "4"), (7, "5")]
    assert "no duration" in result.errors[0].reason and "##" in result.errors[1].reason

    with_default = read_charades_sta(path, durations_s={"3MSZA": 29.0}, default_duration_s=32.0, on_error="skip")
    assert len(with_default.records) == 3 and with_default.counters["default_duration"] == 1
    with pytest.raises(AnnotationError, match=r"charades_sta_test.txt:4"):
        read_charades_sta(path, durations_s={"3MSZA": 29.0})


def test_qvhighlights(tmp_path: Path) -> None:
    lines = [
        {"qid": 9, "query": "A man talks.", "vid": "abc_60.0_210.0", "duration": 150,
         "relevant_windows": [[40, 60], [2, 10]]},
        {"qid": 10, "query": "Hidden test.", "vid": "def", "duration": 150},
        "{broken",
        {"qid": 11, "query": "End.", "vid": "ghi", "duration": 150, "relevant_windows": [[140, 152]]},
    ]
    path = tmp_path / "highlight_val.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    result = read_qvhighlights(path, video_root="root", on_error="collect")
    first, last = result.records
    assert first.spans_s == ((2.0, 10.0), (40.0, 60.0)) and first.sample_id == "9"
    assert first.video == "root/abc_60.0_210.0.mp4" and first.source == "qvhighlights"
    assert last.spans_s == ((140.0, 150.0),)
    assert [e.line for e in result.errors] == [2, 3]
    assert result.counters["spans_clipped"] == 1 and result.counters["multi_window_queries"] == 1


def test_activitynet_captions(tmp_path: Path) -> None:
    data = {
        "v_a": {"duration": 60.0, "timestamps": [[30, 40], [0, 10]], "sentences": [" Second. ", "First."]},
        "v_b": {"duration": 60.0, "timestamps": [[0, 10]], "sentences": ["x", "y"]},
        "v_c": {"duration": 10.0, "timestamps": [[5, 12]], "sentences": ["clip me"]},
    }
    path = tmp_path / "val_1.json"
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    result = read_activitynet_captions(path, on_error="collect")
    a, c = result.records
    assert a.task == "dvc" and a.spans_s == ((0.0, 10.0), (30.0, 40.0)) and a.captions == ("First.", "Second.")
    assert a.sample_id == "v_a" and a.video == "v_a.mp4"
    assert c.spans_s == ((5.0, 10.0),)
    assert [e.record for e in result.errors] == ["v_b"] and "1 timestamps but 2 sentences" in result.errors[0].reason
    line = result.errors[0].line
    assert line is not None and '"v_b"' in path.read_text().splitlines()[line - 1]
    assert result.counters["events_sorted"] == 1 and result.counters["spans_clipped"] == 1


def test_youcook2_layouts(tmp_path: Path) -> None:
    coco = {
        "annotations": [
            {"image_id": "xHr8X2Wpmno.mp4", "segments": [[47, 60], [67, 89]], "duration": 206.9,
             "pure_cap": "pick the ends off the verdalago. combine lemon juice and oil.", "id": 0},
            {"image_id": "bad.mp4", "segments": [[1, 2]], "duration": 20, "pure_cap": "one. two.", "id": 1},
            {"image_id": "over.mp4", "segments": [[1, 2], [10, 30]], "duration": 20, "pure_cap": " a. b", "id": 2},
        ]
    }
    path = _write_lines(tmp_path / "val.caption_coco_format.json", [])
    path.write_text('{"info": 1,\n "annotations": [\n' + ",\n".join(json.dumps(a) for a in coco["annotations"])
                    + "\n]}\n", encoding="utf-8")
    result = read_youcook2(path, video_root="yc2", on_error="collect")
    first, over = result.records
    assert first.captions == ("pick the ends off the verdalago", "combine lemon juice and oil")
    assert first.video == "yc2/xHr8X2Wpmno.mp4" and first.sample_id == "xHr8X2Wpmno" and first.source == "youcook2"
    assert over.captions == ("a", "b") and over.spans_s == ((1.0, 2.0), (10.0, 20.0))
    assert [(e.line, e.record) for e in result.errors] == [(4, "1")]

    official = {"database": {
        "vid1": {"duration": 100.0, "subset": "validation",
                 "annotations": [{"segment": [10, 20], "sentence": "cut"}, {"segment": [1, 5], "sentence": "wash"}]},
        "vid2": {"duration": 100.0, "subset": "training", "annotations": [{"segment": [1, 2]}]},
    }}
    path2 = tmp_path / "youcookii_annotations.json"
    path2.write_text(json.dumps(official, indent=2), encoding="utf-8")
    result2 = read_youcook2(path2, on_error="collect")
    (vid1,) = result2.records
    assert vid1.split == "val" and vid1.captions == ("wash", "cut")
    assert result2.errors[0].record == "vid2" and "sentence" in result2.errors[0].reason

    path3 = tmp_path / "yc2_anet.json"
    path3.write_text(json.dumps({"v": {"duration": 9, "timestamps": [[1, 3]], "sentences": ["go"]}}), encoding="utf-8")
    assert read_annotations(path3, "youcook2").records[0].source == "youcook2"
    with pytest.raises(ValueError, match="unknown annotation format"):
        read_annotations(path3, "coco")
