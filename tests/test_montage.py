"""The real-footage montage benchmark: descriptions, montage boundaries, splits, records.

Clips are tiny solid-colour videos written here, so each decoded montage frame tells which
clip it came from; one test builds from the real corpus where ``D2VLM_REAL_MEDIA_DIR`` is set.
"""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from d2vlm_ray.data.annotations import read_evi_json, record_to_etbench
from d2vlm_ray.data.montage import (
    DESCRIPTIONS_FORMAT,
    MAX_CLIP_SHARE,
    PACKAGED_DESCRIPTIONS,
    ClipDescription,
    DescriptionsError,
    MontageError,
    _prepare_clip,
    _Skip,
    build_montage_benchmark,
    descriptions_overlap,
    fit_square,
    load_descriptions,
    main,
)
from d2vlm_ray.data.synthetic import EVI_END, write_h264_mp4
from d2vlm_ray.data.video import REASONS, decode_video
from d2vlm_ray.eval.report import option_hit, synthetic_metrics
from d2vlm_ray.types import VideoRecord

FPS = 4
SIZE = 32
# name -> (RGB, description). Two pairs are made to collide: one description contains
# another, and two differ only in case; the builder must keep each pair apart.
CLIPS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red.mp4": ((220, 30, 30), "a red card"),
    "green.mp4": ((30, 200, 40), "a green card"),
    "blue.mp4": ((40, 60, 230), "a blue card"),
    "navy.mp4": ((20, 20, 110), "a blue card on a table"),
    "yellow.mp4": ((230, 220, 30), "a yellow card"),
    "magenta.mp4": ((210, 40, 200), "A Green Card"),
    "cyan.mp4": ((40, 210, 220), "a cyan card"),
    "white.mp4": ((235, 235, 235), "a white card"),
    "orange.mp4": ((240, 140, 20), "an orange card."),
}
# A clip that is red for 2 s, then purple for 2 s, described from 2 s on: no red frame of
# it may reach a montage.
TWO_TONE = ("twotone.mp4", (120, 40, 160), "a purple card")
PALETTE = {name: np.array(rgb, dtype=np.float64) for name, (rgb, _) in CLIPS.items()}
PALETTE[TWO_TONE[0]] = np.array(TWO_TONE[1], dtype=np.float64)
BUILD = {"seed": 3, "n_train": 6, "n_val": 1, "n_test": 3, "clips_per_montage": (3, 4), "min_clip_s": 1.0,
         "max_clip_s": 2.0, "fps": FPS, "size": SIZE, "held_out_fraction": 0.25}


def _solid_clip(
    path: Path, rgb: tuple[int, int, int], duration_s: float, fps: int = 8, then_rgb: tuple[int, int, int] | None = None
) -> str:
    # 48x32 (not square), so fitting into the montage square letterboxes it. With
    # ``then_rgb`` the second half of the clip has that colour.
    n_frames = round(duration_s * fps)
    frames = np.empty((n_frames, 32, 48, 3), dtype=np.uint8)  # [F, H, W, 3]
    frames[:] = rgb
    if then_rgb is not None:
        frames[n_frames // 2 :] = then_rgb
    write_h264_mp4(path, iter(frames), fps, 48, 32)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _descriptions_doc(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"format": DESCRIPTIONS_FORMAT, "clips": entries}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A clips folder with described clips, a broken and a too-short one, an undescribed file."""
    root = tmp_path_factory.mktemp("montage_clips")
    entries = []
    for name, (rgb, text) in CLIPS.items():
        entries.append({"sha256": _solid_clip(root / name, rgb, 3.0), "name": name, "description": text})
    name, rgb, text = TWO_TONE
    entries.append({"sha256": _solid_clip(root / name, CLIPS["red.mp4"][0], 4.0, then_rgb=rgb), "name": name,
                    "description": text, "start_s": 2.0, "end_s": 4.0})
    entries.append({"sha256": _solid_clip(root / "short.mp4", (90, 90, 90), 0.5), "name": "short.mp4",
                    "description": "a grey card"})
    broken = root / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    entries.append({"sha256": hashlib.sha256(broken.read_bytes()).hexdigest(), "name": "broken.mp4",
                    "description": "a broken file"})
    entries.append({"sha256": "ab" * 32, "name": "gone.mp4", "description": "a clip nobody has"})
    _solid_clip(root / "extra.mp4", (10, 10, 10), 1.0)
    (root / "README.md").write_text("not a clip\n")
    desc = root.parent / "descriptions.json"
    desc.write_text(json.dumps(_descriptions_doc(entries)))
    return root, desc


@pytest.fixture(scope="module")
def bench(corpus: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    clips_dir, desc = corpus
    out = tmp_path_factory.mktemp("montage_bench")
    return out, build_montage_benchmark(clips_dir, desc, out, **BUILD)


def _records(out: Path, split: str) -> list[VideoRecord]:
    result = read_evi_json(out / "annotations" / f"{split}.json", split=split)
    assert not result.errors
    return result.records


def _montages(records: list[VideoRecord]) -> dict[str, VideoRecord]:
    return {r.video: r for r in records if r.task == "dvc"}


def _colour_name(frame: np.ndarray) -> str:
    centre = frame[12:20, 12:20].reshape(-1, 3).mean(axis=0)
    return min(PALETTE, key=lambda name: float(np.sum((PALETTE[name] - centre) ** 2)))


def test_boundaries_agree_with_the_written_frames(bench: tuple[Path, dict[str, Any]]) -> None:
    out, _ = bench
    text_to_name = {text.rstrip("."): name for name, (_, text) in CLIPS.items()} | {TWO_TONE[2]: TWO_TONE[0]}
    shown = set()
    for split in ("train", "test"):
        for video, dvc in _montages(_records(out, split)).items():
            spans = dvc.spans_s
            assert spans[0][0] == 0.0 and spans[-1][1] == pytest.approx(dvc.duration_s)
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            decoded = decode_video(str(out / video), fps=FPS)
            assert decoded.frames.shape[1:] == (SIZE, SIZE, 3)
            # Letterboxed: the 48x32 clips leave black bars at the top and bottom.
            assert decoded.frames[:, :3].max() < 40
            for frame, t_s in zip(decoded.frames, decoded.timestamps_s):
                inside = [k for k, (s, e) in enumerate(spans) if s - 1e-6 <= t_s < e - 1e-6]
                assert len(inside) == 1, (video, t_s, spans)
                assert _colour_name(frame) == text_to_name[dvc.captions[inside[0]]], (video, t_s)
                shown.add(dvc.captions[inside[0]])
            # No clip fills half a montage, so the whole-video guess never reaches IoU 0.5.
            assert max(e - s for s, e in spans) <= MAX_CLIP_SHARE * dvc.duration_s + 1e-6
    assert TWO_TONE[2] in shown


def test_splits_hold_clips_out_and_test_orders_are_new(bench: tuple[Path, dict[str, Any]]) -> None:
    out, summary = bench
    unseen = {c["description"] for c in summary["clips"]["used"] if c["group"] == "unseen"}
    seen = {c["description"] for c in summary["clips"]["used"] if c["group"] == "seen"}
    assert len(unseen) >= 2 and len(unseen) + len(seen) == 10
    assert not {t.lower() for t in unseen} & {t.lower() for t in seen}
    train_orders = set()
    for split in ("train", "val"):
        for dvc in _montages(_records(out, split)).values():
            assert not set(dvc.captions) & unseen
            if split == "train":
                train_orders.add(dvc.captions)
    test = _records(out, "test")
    groups = json.loads((out / "annotations" / "test_groups.json").read_text())
    assert set(groups) == {r.sample_id for r in test}
    for dvc in _montages(test).values():
        assert dvc.captions not in train_orders
        assert set(dvc.captions) & unseen and set(dvc.captions) & seen
    for r in test:
        if r.task == "tvg":
            target = r.query.split("sentence: ")[1].split(". When")[0]
            assert groups[r.sample_id] == ("unseen" if target in unseen else "seen")
        elif r.task == "gqa":
            assert groups[r.sample_id] == ("unseen" if r.options[r.answer_idx] in unseen else "seen")
    for split in ("train", "val", "test"):
        for dvc in _montages(_records(out, split)).values():
            caps = dvc.captions
            assert not any(descriptions_overlap(a, b) for i, a in enumerate(caps) for b in caps[i + 1 :]), caps


def _spelled_out(record: VideoRecord) -> str:
    """The reference response with each answer ``<evi>`` written as its span, as a model would."""
    grounding, answer = record.answer.split(EVI_END, 1)
    for start_s, end_s in record.spans_s:
        answer = answer.replace("<evi>", f"{start_s:g} - {end_s:g}", 1)
    return f"{grounding}{EVI_END}{answer}"


def test_gqa_answers_are_scored_by_option_hit(bench: tuple[Path, dict[str, Any]]) -> None:
    out, _ = bench
    gqa = [r for split in ("train", "test") for r in _records(out, split) if r.task == "gqa"]
    assert gqa
    for r in gqa:
        opts = r.options
        assert len(opts) >= 3 and not any(descriptions_overlap(a, b) for i, a in enumerate(opts) for b in opts[i + 1 :])
        answer = r.answer.split(EVI_END, 1)[1].replace("<evi>", "2.5 - 4.0")
        assert answer.endswith(f", {opts[r.answer_idx]}.")
        assert option_hit(answer, opts, r.answer_idx)
        for i, other in enumerate(opts):
            if i != r.answer_idx:
                assert not option_hit(answer.replace(opts[r.answer_idx], other), opts, r.answer_idx)
    # End to end through the evaluation's scorer: the reference answers score full marks,
    # and a gqa answer naming another option scores nothing.
    test = _records(out, "test")
    preds = [record_to_etbench(r, i) | {"a": _spelled_out(r)} for i, r in enumerate(test)]
    tasks = synthetic_metrics(preds)["tasks"]
    assert tasks["tvg"]["text"]["R@0.5"] == 1.0 and tasks["dvc"]["text"]["F1"] == 1.0
    assert tasks["gqa"]["text"]["Acc"] == 1.0
    wrong = [p | {"a": p["a"].replace(p["o"][p["p"]], p["o"][(p["p"] + 1) % len(p["o"])])} for p in preds
             if p["task"] == "gqa"]
    assert synthetic_metrics(wrong)["tasks"]["gqa"]["text"]["Acc"] == 0.0
    # What the overlap guard prevents: had these two been options, naming the longer one
    # would have scored as the shorter one.
    assert option_hit("At 1.0 - 2.0, a blue card on a table.", ["a blue card", "a blue card on a table"], 0)
    assert descriptions_overlap("a blue card", "a blue card on a table")
    assert descriptions_overlap("A Green Card", "a green card")
    assert not descriptions_overlap("a card", "a cardboard box")


def test_summary_reports_skips_matches_and_baselines(bench: tuple[Path, dict[str, Any]]) -> None:
    out, summary = bench
    assert json.loads((out / "summary.json").read_text()) == summary
    skipped = {s["name"]: s["reason"] for s in summary["clips"]["skipped"]}
    assert skipped["short.mp4"] == "too_short"
    assert skipped["broken.mp4"] in REASONS
    assert summary["match"]["files_without_description"] == ["extra.mp4"]
    assert summary["match"]["descriptions_without_file"] == ["gone.mp4"]
    assert summary["montages"] == {"train": 6, "val": 1, "test": 3}
    for split in ("train", "val", "test"):
        records = _records(out, split)
        assert summary["records"][split] == {t: sum(r.task == t for r in records) for t in ("tvg", "dvc", "gqa")}
        assert all(r.source == "montage" and r.video.startswith("videos/") for r in records)
    assert summary["baselines"]["tvg"]["whole_video_r1"] == 0.0
    assert set(summary["baselines"]["tvg_by_group"]) == {"seen", "unseen"}
    assert sum(summary["test_groups"].values()) == len(_records(out, "test"))
    assert "an orange card" in {c["description"] for c in summary["clips"]["used"]}
    train_pairs = {(a, b) for d in _montages(_records(out, "train")).values() for a, b in zip(d.captions, d.captions[1:])}
    test_gqa = [r for r in _records(out, "test") if r.task == "gqa"]
    asked = [(r.query.split("right after ")[1].split("? Answer")[0], r.options[r.answer_idx]) for r in test_gqa]
    assert summary["test_gqa_pairs"] == {"n": len(test_gqa), "adjacent_in_train": sum(p in train_pairs for p in asked)}


def test_rebuild_is_deterministic_and_reuses_videos(
    corpus: tuple[Path, Path], bench: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    clips_dir, desc = corpus
    out, first = bench
    again = build_montage_benchmark(clips_dir, desc, out, **BUILD)
    assert again["n_encoded"] == 0 and again["n_reused"] == 10
    other = build_montage_benchmark(clips_dir, desc, tmp_path, **BUILD)
    assert other["n_encoded"] == 10
    for split in ("train", "val", "test"):
        assert (tmp_path / "annotations" / f"{split}.json").read_bytes() == (
            out / "annotations" / f"{split}.json"
        ).read_bytes()
    for video in sorted((out / "videos").glob("*.mp4")):
        assert (tmp_path / "videos" / video.name).read_bytes() == video.read_bytes()
    assert first["unseen_clips"] == other["unseen_clips"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"description": ""}, "is empty"),
        ({"description": "two of 3 cards"}, "digit"),
        ({"description": "a card <evi>"}, "'<'"),
        ({"description": "(a card)"}, "letter"),
        ({"sha256": "xyz"}, "64 hex"),
        ({"start_s": 4.0, "end_s": 2.0}, "after start_s"),
        ({"start_s": float("nan")}, "finite"),
        ({"begin_s": 1.0}, "unknown keys"),
    ],
)
def test_loader_rejects_bad_entries(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    base = {"sha256": "cd" * 32, "name": "x.mp4", "description": "a card"}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(_descriptions_doc([base | entry])))
    with pytest.raises(DescriptionsError, match=message):
        load_descriptions(path)


def test_loader_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    entry = {"sha256": "CD" * 32, "description": "  a  red card. "}
    path.write_text(json.dumps(_descriptions_doc([entry])))
    (loaded,) = load_descriptions(path)
    assert (loaded.sha256, loaded.description) == ("cd" * 32, "a red card")
    path.write_text(json.dumps(_descriptions_doc([entry, entry | {"description": "a blue card"}])))
    with pytest.raises(DescriptionsError, match=r"already described by clips\[0\]"):
        load_descriptions(path)
    path.write_text(json.dumps({"format": "other/1", "clips": []}))
    with pytest.raises(DescriptionsError, match="format"):
        load_descriptions(path)
    path.write_text("{not json")
    with pytest.raises(DescriptionsError, match="not valid JSON"):
        load_descriptions(path)
    with pytest.raises(DescriptionsError, match="cannot read"):
        load_descriptions(tmp_path / "missing.json")


def test_too_few_clips_and_bad_arguments_are_clear_errors(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    clips_dir, desc = corpus
    with pytest.raises(MontageError, match="3 <= lo"):
        build_montage_benchmark(clips_dir, desc, tmp_path, clips_per_montage=(2, 4))
    few = [d for d in load_descriptions(desc) if d.name in ("red.mp4", "green.mp4", "blue.mp4")]
    with pytest.raises(MontageError, match="seen clips with distinct descriptions"):
        build_montage_benchmark(clips_dir, few, tmp_path, n_train=1, n_test=1, size=SIZE, held_out_fraction=0.3)
    with pytest.raises(MontageError, match="short.mp4 \\(skipped: too_short\\)"):
        build_montage_benchmark(clips_dir, desc, tmp_path, size=SIZE, held_out_names=["short.mp4"])


def test_fit_square_letterbox_crop_and_pixel_aspect() -> None:
    frames = np.full((2, 20, 40, 3), 200, dtype=np.uint8)
    boxed = fit_square(frames, 16, "letterbox")
    assert boxed.shape == (2, 16, 16, 3)
    assert boxed[:, :4].max() == 0 and boxed[:, 12:].max() == 0 and (boxed[:, 4:12] == 200).all()
    cropped = fit_square(frames, 16, "crop")
    assert cropped.shape == (2, 16, 16, 3) and (cropped == 200).all()
    # Pixels twice as tall as wide: the 40x20 frame is shown 20 wide and 20 tall.
    assert (fit_square(frames, 16, "letterbox", pixel_aspect=0.5) == 200).all()


def test_clip_with_non_square_pixels_is_shown_at_its_display_aspect(tmp_path: Path) -> None:
    import av

    path = tmp_path / "sar.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(2, 1)  # shown 64x32
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 200, dtype=np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    desc = ClipDescription(hashlib.sha256(path.read_bytes()).hexdigest(), "a grey card")
    kwargs = {"fps": 4, "size": 16, "fit": "letterbox", "min_frames": 1, "max_source_s": 60.0}
    clip = _prepare_clip(str(path), desc, max_decode_bytes=1 << 30, **kwargs)
    assert clip.frames.shape == (8, 16, 16, 3)
    assert clip.frames[:, :3].max() < 30 and clip.frames[:, 13:].max() < 30 and clip.frames[:, 6:10].min() > 170
    with pytest.raises(_Skip, match="max_decode_bytes") as skip:
        _prepare_clip(str(path), desc, max_decode_bytes=8 * 32 * 32 * 3 - 1, **kwargs)
    assert skip.value.reason == "too_large"


def test_cli_prints_the_match_report(corpus: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from d2vlm_ray.cli import main as cli_main

    clips_dir, desc = corpus
    argv = ["montage", "--clips", str(clips_dir), "--descriptions", str(desc), "--out", str(tmp_path / "b"),
            "--n-train", "2", "--n-val", "0", "--n-test", "1", "--size", "32", "--min-clip-s", "1"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "files without a description (1): extra.mp4" in captured.err
    assert "descriptions without a file (1): gone.mp4" in captured.err
    assert "skipped short.mp4: too_short" in captured.err
    assert json.loads(captured.out)["montages"] == {"train": 2, "val": 0, "test": 1}
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert main(["--clips", str(clips_dir), "--descriptions", str(bad), "--out", str(tmp_path / "c")]) == 2
    assert "expected a JSON object" in capsys.readouterr().err


@pytest.mark.slow
def test_real_corpus_montages(real_media_dir: Path, tmp_path: Path) -> None:
    """Builds a few montages from the real corpus with the committed descriptions file."""
    summary = build_montage_benchmark(real_media_dir, PACKAGED_DESCRIPTIONS, tmp_path, seed=0, n_train=4, n_val=1, n_test=2, size=64)
    assert summary["clips"]["used"] and summary["unseen_clips"]
    unseen = {c["description"] for c in summary["clips"]["used"] if c["group"] == "unseen"}
    train_orders = {d.captions for d in _montages(_records(tmp_path, "train")).values()}
    for split in ("train", "val", "test"):
        for video, dvc in _montages(_records(tmp_path, split)).items():
            assert (split == "test") == bool(set(dvc.captions) & unseen)
            assert split != "test" or dvc.captions not in train_orders
            decoded = decode_video(str(tmp_path / video), fps=summary["params"]["fps"])
            frame_times = np.asarray(decoded.timestamps_s)
            for start_s, _ in dvc.spans_s:
                assert np.min(np.abs(frame_times - start_s)) < 1.0 / summary["params"]["fps"]
            assert dvc.spans_s[-1][1] == pytest.approx(decoded.duration_s)
