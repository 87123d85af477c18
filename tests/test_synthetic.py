"""Tests of the synthetic benchmark: determinism, format rules, vocabulary, difficulty."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from d2vlm_ray.data import synthetic as S
from d2vlm_ray.data import vocab
from d2vlm_ray.data.annotations import read_evi_json
from d2vlm_ray.types import VideoRecord

_SPECIALS = re.compile(r"<evi>|</evi>|<image>")
# The tiny tokenizer lower-cases and pre-tokenizes with \w+|[^\w\s]+ (HF ``Whitespace``).
_PRETOKENS = re.compile(r"\w+|[^\w\s]+")


@pytest.fixture(scope="module")
def scenes() -> list[S.Scene]:
    return S.plan_benchmark(300, seed=0)


@pytest.fixture(scope="module")
def records(scenes: list[S.Scene]) -> list[VideoRecord]:
    return [r for scene in scenes for r in S.scene_records(scene)]


def _decode(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_plans_and_annotations_are_deterministic(tmp_path: Path) -> None:
    assert S.plan_benchmark(40, seed=3) == S.plan_benchmark(40, seed=3)
    assert S.plan_benchmark(40, seed=3) != S.plan_benchmark(40, seed=4)
    for name in ("a", "b"):
        S.generate_benchmark(tmp_path / name, n_videos=40, seed=3, render=False)
    for split in S.SPLITS:
        a = (tmp_path / "a" / "annotations" / f"{split}.json").read_bytes()
        b = (tmp_path / "b" / "annotations" / f"{split}.json").read_bytes()
        assert a == b and len(a) > 10
    assert (tmp_path / "a" / "meta.json").read_bytes() == (tmp_path / "b" / "meta.json").read_bytes()


def test_rendered_frames_are_deterministic_and_show_the_scene(tmp_path: Path) -> None:
    scene = min(S.plan_benchmark(30, seed=0), key=lambda s: s.duration_s)
    n_frames = S.render_scene(scene, tmp_path / "a.mp4", fps=4, size=128)
    S.render_scene(scene, tmp_path / "b.mp4", fps=4, size=128)
    a, b = _decode(tmp_path / "a.mp4"), _decode(tmp_path / "b.mp4")
    assert n_frames == round(scene.duration_s * 4)
    assert a.shape == (n_frames, 128, 128, 3)
    assert np.array_equal(a, b)
    drawn = np.stack([S.render_frame(scene, i / 4) for i in range(n_frames)])
    # Lossy coding: the decoded frames stay close to what was drawn.
    assert np.abs(a.astype(np.int16) - drawn.astype(np.int16)).mean() < 6.0
    # Large shapes: at least one object covers a good part of every frame with objects.
    assert ((drawn != np.array(S.BACKGROUND_RGB, dtype=np.uint8)).any(-1).mean(axis=(1, 2)) > 0.03).all()


def test_events_change_the_pixels_inside_their_spans(scenes: list[S.Scene]) -> None:
    for scene in scenes[:20]:
        for event in scene.events:
            before = S.render_frame(scene, event.start_s, size=64).astype(np.int16)
            changed = 0.0
            for p in (0.25, 0.5, 0.75, 1.0):
                t_s = event.start_s + p * (event.end_s - event.start_s)
                during = S.render_frame(scene, t_s, size=64).astype(np.int16)
                changed = max(changed, float(np.abs(before - during).sum(-1).astype(bool).mean()))
            assert changed > 0.03, (scene.video_id, event)


def test_every_word_is_in_the_vocabulary(records: list[VideoRecord]) -> None:
    words = set(vocab.all_words())
    unknown: Counter[str] = Counter()
    for record in records:
        texts = [record.query, record.answer, *record.captions, *record.options]
        for text in texts:
            for token in _PRETOKENS.findall(_SPECIALS.sub(" ", text).lower()):
                if token not in words:
                    unknown[token] += 1
    assert not unknown, f"words missing from vocab.py: {dict(unknown)}"


def test_responses_have_two_evi_tokens_per_span(records: list[VideoRecord]) -> None:
    for record in records:
        n = len(record.spans_s)
        assert n >= 1
        grounding, sep, answer = record.answer.partition(S.EVI_END)
        assert sep and S.EVI_END not in answer
        assert grounding == S.EVI * n
        assert answer.count(S.EVI) == n
        assert record.answer.count(S.EVI) == 2 * n


def test_task_contents(records: list[VideoRecord], scenes: list[S.Scene]) -> None:
    by_task = Counter(r.task for r in records)
    assert set(by_task) == set(S.TASKS)
    assert by_task["tvg"] >= len(scenes)
    for record in records:
        assert S.MIN_DURATION_S <= record.duration_s <= S.MAX_DURATION_S
        for start_s, end_s in record.spans_s:
            assert 0 <= start_s < end_s <= record.duration_s
            assert end_s - start_s >= S.MIN_EVENT_S - 0.11
            assert end_s - start_s <= S.MAX_EVENT_FRACTION * record.duration_s + 0.11
        starts = [s for s, _ in record.spans_s]
        assert starts == sorted(starts)
        if record.task == "tvg":
            assert len(record.spans_s) == 1 and record.answer == "<evi></evi>The event happens in <evi>."
        if record.task == "dvc":
            assert len(record.captions) == len(record.spans_s)
            for caption in record.captions:
                assert f", {caption}." in record.answer
        if record.task == "tal":
            assert len(record.spans_s) >= 2
        if record.task == "gqa":
            assert len(record.spans_s) == 1 and record.answer_idx is not None
            assert len(record.options) == 4 and len(set(record.options)) == 4
            # The answer word sits right after the answer's <evi>, where the evidence is injected.
            assert record.answer == f"<evi></evi>At <evi> {record.options[record.answer_idx]}."


def test_tvg_queries_name_a_unique_event(scenes: list[S.Scene]) -> None:
    for scene in scenes[:50]:
        captions = [S.event_caption(scene, e) for e in scene.events]
        for record in S.scene_records(scene, tasks=("tvg",)):
            matches = [c for c in captions if f": {c}." in record.query]
            assert len(matches) == 1


def test_tasks_subset_does_not_change_records(scenes: list[S.Scene]) -> None:
    scene = scenes[1]
    everything = S.scene_records(scene)
    assert S.scene_records(scene, tasks=("gqa",)) == [r for r in everything if r.task == "gqa"]
    with pytest.raises(ValueError, match="unknown"):
        S.scene_records(scene, tasks=("vqa",))


def test_splits_are_disjoint_and_cover_all_videos(scenes: list[S.Scene], records: list[VideoRecord]) -> None:
    videos = {split: {s.video_id for s in scenes if s.split == split} for split in S.SPLITS}
    assert not (videos["train"] & videos["val"]) and not (videos["train"] & videos["test"])
    assert not (videos["val"] & videos["test"])
    assert sum(len(v) for v in videos.values()) == len(scenes)
    assert len(videos["val"]) == 30 and len(videos["test"]) == 30
    assert len({r.sample_id for r in records}) == len(records)
    assert S.assign_splits(300, seed=0) == [s.split for s in scenes]


def test_trivial_baselines_score_near_zero() -> None:
    scenes = S.plan_benchmark(1000, seed=0)
    records = [r for scene in scenes for r in S.scene_records(scene, tasks=("tvg",))]
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    result = S.grounding_baselines(train, test)
    assert result["n"] >= 200
    assert result["whole_video_r1"] <= 0.15
    assert result["train_mean_r1"] <= 0.15


def test_generate_benchmark_writes_readable_files(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    summary = S.generate_benchmark(out, n_videos=3, seed=11, fractions=(1, 1, 1), render=True, fps=2, size=64)
    assert summary["n_frames"] > 0
    scenes = S.plan_benchmark(3, seed=11, fractions=(1, 1, 1))
    for split in S.SPLITS:
        result = read_evi_json(out / "annotations" / f"{split}.json", video_root=str(out), split=split)
        assert not result.errors
        expected = [r for s in scenes if s.split == split for r in S.scene_records(s)]
        assert [r.sample_id for r in result.records] == [r.sample_id for r in expected]
        for got, want in zip(result.records, expected):
            assert got.spans_s == want.spans_s and got.answer == want.answer and got.query == want.query
            assert Path(got.video).is_file()
    frames = _decode(out / scenes[0].video_path)
    assert frames.shape[1:] == (64, 64, 3)


def test_cli_writes_annotations_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = S.main(["--out", str(tmp_path / "cli"), "--n-videos", "10", "--seed", "2", "--no-render"])
    assert code == 0
    assert (tmp_path / "cli" / "annotations" / "train.json").is_file()
    assert not (tmp_path / "cli" / "videos").exists()
    assert '"records"' in capsys.readouterr().out


def test_grounding_response_rejects_wrong_counts() -> None:
    assert S.grounding_response(2, ["<evi>, a. <evi>, b."]) == "<evi><evi></evi><evi>, a. <evi>, b."
    with pytest.raises(ValueError):
        S.grounding_response(2, ["<evi>, a."])


def _background_rgb(frame: np.ndarray) -> np.ndarray:
    """The frame's most frequent colour: the background, which covers more than any object."""
    colours, counts = np.unique(frame.reshape(-1, 3), axis=0, return_counts=True)
    return colours[counts.argmax()].astype(int)


def _tint(colour: str) -> np.ndarray:
    """The background colour an event tints toward ``colour``."""
    background = np.asarray(S.BACKGROUND_RGB, dtype=np.float64)
    return background + S.TINT_FRACTION * (np.asarray(S.COLOUR_RGB[colour]) - background)


def test_events_tint_the_background_with_the_actor_colour(scenes: list[S.Scene]) -> None:
    scene = scenes[0]
    idle_t_s = next(t for t in np.arange(0.0, scene.duration_s, 0.5)
                    if not any(e.start_s <= t < e.end_s for e in scene.events))
    assert tuple(_background_rgb(S.render_frame(scene, float(idle_t_s), size=64))) == S.BACKGROUND_RGB
    for event in scene.events:
        if event.kind == "move":
            continue
        frame = S.render_frame(scene, (event.start_s + event.end_s) / 2, size=64)
        for half, colour in ((frame[:32], event.before.colour), (frame[32:], event.after.colour)):
            assert np.abs(_background_rgb(half) - _tint(colour)).max() <= 1


def test_turns_and_moves_show_their_outcome_frame_wide() -> None:
    scenes = S.plan_benchmark(40, seed=0)
    turns = [(s, e) for s in scenes for e in s.events if e.kind == "turn"]
    moves = [(s, e) for s in scenes for e in s.events if e.kind == "move"]
    assert turns and moves
    for scene, event in turns:
        background = S.background_at(scene, (event.start_s + event.end_s) / 2, 64)
        assert np.allclose(background[40], _tint(event.after.colour))
    for scene, event in moves:
        background = S.background_at(scene, (event.start_s + event.end_s) / 2, 64).mean(axis=2)  # [H, W]
        # (far edge, near edge) of the frame for each direction of motion.
        edges = {
            "right": (background[:, -1], background[:, 0]),
            "left": (background[:, 0], background[:, -1]),
            "down": (background[-1], background[0]),
            "up": (background[0], background[-1]),
        }
        far, near = edges[event.direction]
        # Pixel centres of opposite edges lie 63/64 of the side apart along the motion.
        assert np.allclose(far - near, 2 * S.MOVE_RAMP * 255 * 63 / 64)


def test_the_planner_prefers_objects_that_have_not_acted(monkeypatch: pytest.MonkeyPatch) -> None:
    def repeated_share() -> float:
        plans = [S.plan_scene(0, idx) for idx in range(200)]
        flags = [sum(o.obj_idx == e.obj_idx for o in p.events) > 1 for p in plans for e in p.events]
        return sum(flags) / len(flags)

    preferred = repeated_share()  # 0.43 of events belong to an object that acts twice
    monkeypatch.setattr(S, "FRESH_ACTOR_WEIGHT", 1.0)
    assert preferred < 0.5 < repeated_share()  # 0.67 with uniform choice
