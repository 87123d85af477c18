"""A synthetic, deterministic grounding benchmark: coloured shapes that act over time.

Each video shows two to four large shapes on a dark background. Over 10-60 s they enter,
leave, move, jump, change colour and change size, one event at a time with idle gaps, so
every event has a clean span. While an object acts it wears a white halo and the
background takes on a tint of the object's colour, so every frame of an event shows
*that* something happens and to whom. Two more frame-wide cues show *what* happens, the
answers of the ``gqa`` questions: while an object changes colour the lower half of the
background already takes its new colour, and while it moves the background brightens
toward where it goes. The planner prefers objects that have not acted
yet, so most queries can be grounded by who acts; when an object acts twice, which of its
events a query names has to be read from the motion. From the script of a scene (:class:`Scene`) the generator
writes annotations for four tasks in the E.T.-Instruct / D2VLM ``evi.json`` style:

- ``tvg``: one event described in words; one span.
- ``dvc``: every event, in time order, with a caption each.
- ``tal``: every occurrence of one action (e.g. every jump); several spans.
- ``gqa``: which colour an object turned or which way it moved; the answer is visible
  only inside the grounded span.

Planning (script and annotations) is separate from rendering, so annotation-only splits
are cheap: the baselines test plans hundreds of scenes without drawing a pixel.

Everything is a pure function of ``(seed, idx)``: the same seed gives byte-identical
annotation files and identical decoded frames. All text uses only words of
:mod:`d2vlm_ray.data.vocab` and no digits, so the tiny word-level tokenizer covers it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from d2vlm_ray.types import SpanS, VideoRecord

TASKS: tuple[str, ...] = ("tvg", "dvc", "tal", "gqa")
SOURCE = "synthetic"
SPLITS: tuple[str, ...] = ("train", "val", "test")
EVI = "<evi>"
EVI_END = "</evi>"

MIN_DURATION_S = 10.0
MAX_DURATION_S = 60.0
MIN_EVENT_S = 3.0
MAX_EVENT_S = 8.0
# Events never cover more than this fraction of the video, so a "whole video" guess
# never reaches IoU 0.5 with a single event.
MAX_EVENT_FRACTION = 0.3
MAX_EVENTS = 6

# Sizes are fractions of the frame side; both are large because the tiny model sees
# frames at 56x56 through a frozen random ViT.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.3, "large": 0.45}
JUMP_HEIGHT = 0.2
JUMP_HOPS = 2
BACKGROUND_RGB = (16, 16, 24)
# Width of the white halo around an acting object, as a fraction of the frame side. It
# makes events visible frame by frame: the tiny model's random frozen encoder and one
# token per frame cannot learn motion cues in a few CPU minutes (a halo-free benchmark
# stays at the BCE marginal for 400+ steps).
HALO_FRACTION = 0.06
HALO_RGB = (255, 255, 255)
# Share of the acting object's colour mixed into the background during its event. The
# halo alone tells *where* an object acts; a random frozen ViT with one token per frame
# mixes position and colour, and the tiny model learns "the red one acts" far faster from
# a frame-wide colour cue (R@0.5 0.09 -> 0.25 after 600 steps in a 100-query study).
# At 0.35 the actor's colour was decodable from the frozen features by a linear probe in
# 61 % of event frames (8 colours), and 2200 SFT steps picked the named event for 38 % of
# the test queries whose object acts once (R@0.5 0.22); at 0.6, for 89 % and 66 % in two
# seeds (R@0.5 0.77 and 0.60).
TINT_FRACTION = 0.6
# The frozen tiny encoder sees a frame as one 56x56 patch, so what an event does must show
# frame-wide to be readable from its span. A linear probe on the mean encoder feature of
# each event span (600 scenes) read a turn's new colour in 17 % of held-out events without
# the lower-half tint (8 colours) and 69 % with it, and a move's direction in 42 % without
# the ramp (4 directions) and 94 % with it. The ramp is the brightness added at the far
# edge in the direction of motion (and taken away at the near edge), as a fraction of 255.
MOVE_RAMP = 0.15
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 210),
    "orange": (250, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 220, 230),
}
SHAPE_NAMES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "cross")
DIRECTION_NAMES: tuple[str, ...] = ("left", "right", "up", "down")
EVENT_KINDS: tuple[str, ...] = ("enter", "leave", "move", "turn", "grow", "shrink", "jump")
# Actions that ``tal`` asks for, with the phrase used in its query.
TAL_ACTIONS: dict[str, str] = {"jump": "jumps", "turn": "changes colour", "move": "moves"}
# Relative chance of each kind when a slot is free; enter/leave are rarer so that
# objects stay on screen long enough to do things.
KIND_WEIGHTS: dict[str, float] = {
    "enter": 1.0,
    "leave": 0.6,
    "move": 1.0,
    "turn": 1.0,
    "grow": 1.0,
    "shrink": 1.0,
    "jump": 1.0,
}
# Weight multiplier of objects that have not acted yet: most objects act once, so the
# acting object's colour identifies most events (under the previous planner, 1-3 objects
# chosen uniformly, three quarters of the test tvg queries named an object that acted twice).
FRESH_ACTOR_WEIGHT = 10.0
_DIRECTION_VECTORS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
# Moves travel at least about the side of a small shape, so they are plain to see.
_MIN_MOVE = 0.3


@dataclass(frozen=True)
class ObjectState:
    """What one object looks like at one instant.

    Attributes:
        present: Whether the object is in (or entering/leaving) the frame.
        x: Centre x as a fraction of the frame side (may lie outside 0..1 when off screen).
        y: Centre y as a fraction of the frame side.
        size: ``small`` or ``large``.
        colour: Colour name (a key of :data:`COLOUR_RGB`).
    """

    present: bool
    x: float
    y: float
    size: str
    colour: str


@dataclass(frozen=True)
class SceneEvent:
    """One scripted event of one object.

    Attributes:
        obj_idx: Index of the object in :attr:`Scene.shapes`.
        kind: One of :data:`EVENT_KINDS`.
        start_s: Start of the event in seconds.
        end_s: End of the event in seconds.
        before: The object's state when the event starts.
        after: The object's state when the event ends.
        direction: Direction of ``enter`` (the side it comes from), ``leave`` (the side
            it goes to) and ``move``; empty otherwise.
    """

    obj_idx: int
    kind: str
    start_s: float
    end_s: float
    before: ObjectState
    after: ObjectState
    direction: str = ""


@dataclass(frozen=True)
class Scene:
    """The full script of one synthetic video.

    Attributes:
        video_id: Stable id, also the file stem of the video.
        seed: Benchmark seed the scene was planned from.
        idx: Index of the scene within the benchmark.
        duration_s: Duration in seconds (a multiple of 0.5 s).
        shapes: Shape of each object (distinct within a scene, so a shape names an object).
        initial: State of each object at time 0.
        events: Events in time order; they never overlap.
        tal_kind: The action repeated on purpose for the ``tal`` task.
        split: Split the scene belongs to, once assigned.
    """

    video_id: str
    seed: int
    idx: int
    duration_s: float
    shapes: tuple[str, ...]
    initial: tuple[ObjectState, ...]
    events: tuple[SceneEvent, ...]
    tal_kind: str
    split: str = ""

    @property
    def video_path(self) -> str:
        """Path of the video relative to the benchmark root."""
        return f"videos/{self.video_id}.mp4"


def _round_s(t_s: float) -> float:
    """Times are kept at 0.1 s resolution, as in E.T.-Instruct annotations."""
    return round(t_s, 1)


def _scene_rng(seed: int, idx: int, purpose: str) -> random.Random:
    # str seeds hash through sha512, so streams are stable across processes and runs.
    return random.Random(f"d2vlm-synth:{purpose}:{seed}:{idx}")


def _half(size: str) -> float:
    return SIZE_FRACTIONS[size] / 2


def _clamp_inside(value: float, size: str) -> float:
    half = _half(size)
    return min(max(value, half), 1.0 - half)


def _room(state: ObjectState, direction: str) -> float:
    """How far the object can move in ``direction`` and still be fully in the frame."""
    half = _half(state.size)
    dx, dy = _DIRECTION_VECTORS[direction]
    if dx < 0:
        return state.x - half
    if dx > 0:
        return 1.0 - half - state.x
    if dy < 0:
        return state.y - half
    return 1.0 - half - state.y


def _offscreen(state: ObjectState, direction: str) -> ObjectState:
    """The state just outside the frame on side ``direction``."""
    half = _half(state.size) + 0.02
    if direction == "left":
        return replace(state, x=-half)
    if direction == "right":
        return replace(state, x=1.0 + half)
    if direction == "up":
        return replace(state, y=-half)
    return replace(state, y=1.0 + half)


def _random_inside(rng: random.Random, size: str) -> tuple[float, float]:
    half = _half(size)
    return rng.uniform(half, 1.0 - half), rng.uniform(half, 1.0 - half)


def _event_candidates(states: list[ObjectState], kind: str | None, exclude: str) -> list[tuple[int, str]]:
    """Valid (object, kind) pairs for the next slot, given the objects' states."""
    n_present = sum(s.present for s in states)
    kinds = (kind,) if kind else tuple(k for k in EVENT_KINDS if k != exclude)
    out: list[tuple[int, str]] = []
    for obj_idx, state in enumerate(states):
        for k in kinds:
            if k == "enter":
                ok = not state.present
            elif not state.present:
                ok = False
            elif k == "leave":
                # Someone always stays on screen, so forced actions always have an actor.
                ok = n_present >= 2
            elif k == "grow":
                ok = state.size == "small"
            elif k == "shrink":
                ok = state.size == "large"
            else:
                ok = True
            if ok:
                out.append((obj_idx, k))
    return out


def _apply_event(
    rng: random.Random, state: ObjectState, kind: str, states: list[ObjectState]
) -> tuple[ObjectState, str]:
    """The state after ``kind`` and the event's direction word (if any)."""
    if kind == "enter":
        direction = rng.choice(DIRECTION_NAMES)
        x, y = _random_inside(rng, state.size)
        inside = replace(state, present=True, x=x, y=y)
        return inside, direction
    if kind == "leave":
        direction = rng.choice(DIRECTION_NAMES)
        return replace(_offscreen(state, direction), present=False), direction
    if kind == "move":
        rooms = {d: _room(state, d) for d in DIRECTION_NAMES}
        options = [d for d, r in rooms.items() if r >= _MIN_MOVE]
        direction = rng.choice(options) if options else max(rooms, key=lambda d: rooms[d])
        distance = rooms[direction] * (rng.uniform(0.8, 1.0) if options else 1.0)
        dx, dy = _DIRECTION_VECTORS[direction]
        return replace(state, x=state.x + dx * distance, y=state.y + dy * distance), direction
    if kind == "turn":
        in_use = {s.colour for s in states}
        colour = rng.choice([c for c in COLOUR_RGB if c not in in_use])
        return replace(state, colour=colour), ""
    if kind in ("grow", "shrink"):
        size = "large" if kind == "grow" else "small"
        return replace(state, size=size, x=_clamp_inside(state.x, size), y=_clamp_inside(state.y, size)), ""
    return state, ""


def _event_times(rng: random.Random, duration_s: float, n_events: int) -> list[tuple[float, float]]:
    """Non-overlapping spans, each 3-8 s and at most 30% of the video, placed at random."""
    max_len_s = max(MIN_EVENT_S, min(MAX_EVENT_S, MAX_EVENT_FRACTION * duration_s))
    lengths = [rng.uniform(MIN_EVENT_S, max_len_s) for _ in range(n_events)]
    # Keep at least a quarter of the video idle so events are short relative to it.
    while len(lengths) > 1 and sum(lengths) > 0.75 * duration_s:
        lengths.pop()
    idle_s = duration_s - sum(lengths)
    # Exponential weights = uniform random split of the idle time (a flat Dirichlet), so
    # event positions spread evenly over the video.
    weights = [rng.expovariate(1.0) for _ in range(len(lengths) + 1)]
    total = sum(weights)
    spans: list[tuple[float, float]] = []
    t_s = 0.0
    for length_s, weight in zip(lengths, weights):
        t_s += idle_s * weight / total
        start_s, end_s = _round_s(t_s), _round_s(t_s + length_s)
        spans.append((start_s, min(end_s, duration_s)))
        t_s += length_s
    return spans


def plan_scene(seed: int, idx: int) -> Scene:
    """Script scene ``idx`` of the benchmark with seed ``seed`` (no rendering).

    Args:
        seed: Benchmark seed.
        idx: Scene index; each (seed, idx) pair gives an independent scene.

    Returns:
        The scene, with events in time order.
    """
    rng = _scene_rng(seed, idx, "plan")
    duration_s = rng.randint(int(MIN_DURATION_S * 2), int(MAX_DURATION_S * 2)) / 2
    n_objects = rng.randint(2, 4)
    shapes = tuple(rng.sample(SHAPE_NAMES, n_objects))
    colours = rng.sample(list(COLOUR_RGB), n_objects)
    initial: list[ObjectState] = []
    for obj_idx in range(n_objects):
        size = rng.choice(tuple(SIZE_FRACTIONS))
        x, y = _random_inside(rng, size)
        present = obj_idx == 0 or rng.random() < 0.6
        state = ObjectState(present=present, x=x, y=y, size=size, colour=colours[obj_idx])
        initial.append(state if present else replace(_offscreen(state, "left"), present=False))

    # At most one event more than there are objects, so few objects need to act twice.
    max_events = min(MAX_EVENTS, n_objects + 1, max(2, int(duration_s // 7) + 1))
    spans = _event_times(rng, duration_s, rng.randint(2, max_events))
    tal_kind = rng.choice(tuple(TAL_ACTIONS))
    n_repeats = min(len(spans), rng.randint(2, 3))
    forced = set(rng.sample(range(len(spans)), n_repeats))

    states = list(initial)
    events: list[SceneEvent] = []
    for slot, (start_s, end_s) in enumerate(spans):
        candidates = _event_candidates(states, tal_kind if slot in forced else None, tal_kind)
        acted = {e.obj_idx for e in events}
        weights = [KIND_WEIGHTS[k] * (1.0 if i in acted else FRESH_ACTOR_WEIGHT) for i, k in candidates]
        obj_idx, kind = rng.choices(candidates, weights=weights)[0]
        before = states[obj_idx]
        after, direction = _apply_event(rng, before, kind, states)
        if kind == "enter":
            before = replace(_offscreen(after, direction), present=True)
        events.append(SceneEvent(obj_idx, kind, start_s, end_s, before, after, direction))
        states[obj_idx] = after
    return Scene(
        video_id=f"synth_{seed}_{idx:05d}",
        seed=seed,
        idx=idx,
        duration_s=duration_s,
        shapes=shapes,
        initial=tuple(initial),
        events=tuple(events),
        tal_kind=tal_kind,
    )


def event_caption(scene: Scene, event: SceneEvent) -> str:
    """Present-tense description, e.g. ``the red square turns green``."""
    name = f"the {event.before.colour} {scene.shapes[event.obj_idx]}"
    phrase = {
        "enter": f"enters from the {event.direction}",
        "leave": f"leaves to the {event.direction}",
        "move": f"moves {event.direction}",
        "turn": f"turns {event.after.colour}",
        "grow": "grows",
        "shrink": "shrinks",
        "jump": "jumps",
    }[event.kind]
    return f"{name} {phrase}"


def grounding_response(n_spans: int, answer_parts: Sequence[str]) -> str:
    """``n`` grounding ``<evi>`` tokens, ``</evi>``, then the answer text.

    Args:
        n_spans: Number of spans, i.e. of ``<evi>`` tokens in each half.
        answer_parts: The answer text; it must contain exactly ``n_spans`` ``<evi>``.

    Returns:
        The response with exactly ``2 * n_spans`` ``<evi>`` tokens.
    """
    answer = "".join(answer_parts)
    if answer.count(EVI) != n_spans:
        raise ValueError(f"answer has {answer.count(EVI)} {EVI} tokens, expected {n_spans}")
    return EVI * n_spans + EVI_END + answer


def _options(rng: random.Random, correct: str, pool: Sequence[str], n: int = 4) -> tuple[tuple[str, ...], int]:
    distractors = rng.sample([p for p in pool if p != correct], min(n - 1, len(pool) - 1))
    options = [correct, *distractors]
    rng.shuffle(options)
    return tuple(options), options.index(correct)


def _record(
    scene: Scene,
    task: str,
    k: int,
    query: str,
    spans: Sequence[SpanS],
    answer: str,
    captions: tuple[str, ...] = (),
    options: tuple[str, ...] = (),
    answer_idx: int | None = None,
) -> VideoRecord:
    return VideoRecord(
        video=scene.video_path,
        duration_s=scene.duration_s,
        query=query,
        task=task,
        source=SOURCE,
        spans_s=tuple(spans),
        answer=answer,
        sample_id=f"{scene.video_id}_{task}_{k}",
        split=scene.split,
        captions=captions,
        options=options,
        answer_idx=answer_idx,
    )


def _tvg_records(scene: Scene, rng: random.Random, max_queries: int) -> list[VideoRecord]:
    captions = [event_caption(scene, e) for e in scene.events]
    unique = [i for i, c in enumerate(captions) if captions.count(c) == 1]
    chosen = sorted(rng.sample(unique, min(max_queries, len(unique))))
    out = []
    for k, i in enumerate(chosen):
        query = (
            f"Find the visual event described by the sentence: {captions[i]}. "
            "When does it happen? Answer with its start and end time."
        )
        answer = grounding_response(1, ["The event happens in ", EVI, "."])
        event = scene.events[i]
        out.append(_record(scene, "tvg", k, query, [(event.start_s, event.end_s)], answer))
    return out


def _dvc_records(scene: Scene) -> list[VideoRecord]:
    captions = [event_caption(scene, e) for e in scene.events]
    query = "Describe all the events in the video, each with its start and end time."
    answer = grounding_response(len(captions), " ".join(f"{EVI}, {c}." for c in captions))
    spans = [(e.start_s, e.end_s) for e in scene.events]
    return [_record(scene, "dvc", 0, query, spans, answer, captions=tuple(captions))]


def _tal_records(scene: Scene) -> list[VideoRecord]:
    events = [e for e in scene.events if e.kind == scene.tal_kind]
    if len(events) < 2:
        return []
    query = (
        f"Find every occurrence of the action: an object {TAL_ACTIONS[scene.tal_kind]}. "
        "List the start and end time of each occurrence."
    )
    answer = grounding_response(len(events), ", ".join([EVI] * len(events)) + ".")
    return [_record(scene, "tal", 0, query, [(e.start_s, e.end_s) for e in events], answer)]


def _gqa_records(scene: Scene, rng: random.Random, max_queries: int) -> list[VideoRecord]:
    """Questions about one event whose answer is only visible inside that event.

    Only turns and moves are asked about: their outcome (new colour, direction) is drawn
    frame-wide, so the frozen tiny encoder can see it. A question about what an object did
    next would ask for the kind of its next event, which no frame-wide cue shows.
    """
    candidates: list[tuple[str, int, tuple[str, ...], int]] = []
    keys: list[str] = []
    for i, event in enumerate(scene.events):
        name = f"the {event.before.colour} {scene.shapes[event.obj_idx]}"
        if event.kind == "turn":
            question = f"What colour did {name} turn?"
            options, answer_idx = _options(rng, event.after.colour, tuple(COLOUR_RGB))
            candidates.append((question, i, options, answer_idx))
            keys.append(question)
        elif event.kind == "move":
            question = f"Which direction did {name} move?"
            options, answer_idx = _options(rng, event.direction, DIRECTION_NAMES)
            candidates.append((question, i, options, answer_idx))
            keys.append(question)
    unique = [c for c, key in zip(candidates, keys) if keys.count(key) == 1]
    chosen = sorted(rng.sample(range(len(unique)), min(max_queries, len(unique))))
    out = []
    for k, c_idx in enumerate(chosen):
        question, event_idx, options, answer_idx = unique[c_idx]
        event = scene.events[event_idx]
        query = f"{question} Answer with the time of the evidence."
        # The answer word comes right after the answer's <evi>, where the event's frame
        # features are injected, so the tiny LM reads it off at the same position. With
        # the word four tokens later ("At <evi>, it turned red.") it had to learn an
        # attention hop first, which the quickstart's SFT budget learnt in only some runs,
        # although a linear probe read the answer off the injected vector of a run that
        # missed it as well.
        answer = grounding_response(1, ["At ", EVI, f" {options[answer_idx]}."])
        out.append(
            _record(
                scene, "gqa", k, query, [(event.start_s, event.end_s)], answer, options=options, answer_idx=answer_idx
            )
        )
    return out


def scene_records(
    scene: Scene, tasks: Iterable[str] = TASKS, max_tvg: int = 3, max_gqa: int = 2
) -> list[VideoRecord]:
    """Annotations of one scene for the requested tasks (several per task at most).

    Args:
        scene: A planned scene.
        tasks: Task codes to produce, a subset of :data:`TASKS`.
        max_tvg: Most ``tvg`` queries per video (only uniquely described events qualify).
        max_gqa: Most ``gqa`` questions per video.

    Returns:
        Records in task order, then query order; deterministic for a given scene.
    """
    tasks = tuple(tasks)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown synthetic tasks {sorted(unknown)}; known: {TASKS}")
    rng = _scene_rng(scene.seed, scene.idx, "records")
    # All tasks are built from one stream in a fixed order, so a task's records do not
    # depend on which other tasks were requested.
    by_task = {
        "tvg": _tvg_records(scene, rng, max_tvg),
        "gqa": _gqa_records(scene, rng, max_gqa),
        "dvc": _dvc_records(scene),
        "tal": _tal_records(scene),
    }
    return [record for task in TASKS if task in tasks for record in by_task[task]]


def assign_splits(
    n_videos: int, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> list[str]:
    """Split name of every video index; a seeded permutation, so splits are disjoint.

    Args:
        n_videos: Number of videos.
        seed: Benchmark seed.
        fractions: Fractions of train, val and test (normalised to sum to 1).

    Returns:
        ``splits[idx]`` for each video index.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions!r}")
    total = sum(fractions)
    n_val = round(n_videos * fractions[1] / total)
    n_test = round(n_videos * fractions[2] / total)
    n_train = max(0, n_videos - n_val - n_test)
    order = list(range(n_videos))
    random.Random(f"d2vlm-synth:splits:{seed}").shuffle(order)
    out = [""] * n_videos
    for rank, idx in enumerate(order):
        out[idx] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out


def plan_benchmark(
    n_videos: int, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> list[Scene]:
    """Plan every scene of a benchmark, with its split set."""
    splits = assign_splits(n_videos, seed, fractions)
    return [replace(plan_scene(seed, idx), split=splits[idx]) for idx in range(n_videos)]


# --- rendering -------------------------------------------------------------------------


def object_state_at(scene: Scene, obj_idx: int, t_s: float) -> tuple[ObjectState, float, tuple[float, ...]]:
    """State of an object at time ``t_s``, with the size fraction and RGB colour blended.

    Returns:
        ``(state, size_fraction, rgb)``; during an event position, size and colour are
        interpolated linearly, and a jump adds a bounce to ``y``.
    """
    current: SceneEvent | None = None
    state = scene.initial[obj_idx]
    for event in scene.events:
        if event.obj_idx != obj_idx or event.start_s > t_s:
            continue
        if t_s < event.end_s:
            current = event
        else:
            state = event.after
    if current is None:
        return state, SIZE_FRACTIONS[state.size], tuple(float(c) for c in COLOUR_RGB[state.colour])
    a, b = current.before, current.after
    p = (t_s - current.start_s) / max(current.end_s - current.start_s, 1e-6)
    x = a.x + (b.x - a.x) * p
    y = a.y + (b.y - a.y) * p
    if current.kind == "jump":
        y -= JUMP_HEIGHT * abs(math.sin(math.pi * JUMP_HOPS * p))
    size = SIZE_FRACTIONS[a.size] + (SIZE_FRACTIONS[b.size] - SIZE_FRACTIONS[a.size]) * p
    rgb = tuple(ca + (cb - ca) * p for ca, cb in zip(COLOUR_RGB[a.colour], COLOUR_RGB[b.colour]))
    return replace(a, present=True, x=x, y=y), size, rgb


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half
    if shape == "triangle":
        # Apex up, base down: the half-width grows linearly from 0 at the apex to ``half``.
        return (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    if shape == "cross":
        arm = half / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= half)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= half))
    raise ValueError(f"unknown shape {shape!r}")


def is_acting(scene: Scene, obj_idx: int, t_s: float) -> bool:
    """Whether object ``obj_idx`` is inside one of its events at time ``t_s`` (``[start, end)``)."""
    return any(e.obj_idx == obj_idx and e.start_s <= t_s < e.end_s for e in scene.events)


def _tinted(rgb: np.ndarray, colour: str) -> np.ndarray:
    return rgb + TINT_FRACTION * (np.asarray(COLOUR_RGB[colour], dtype=np.float64) - rgb)


def background_at(scene: Scene, t_s: float, size: int) -> np.ndarray:
    """The background at ``t_s`` before objects are drawn, float RGB ``[size, size, 3]``.

    During an event its upper half is tinted with :data:`TINT_FRACTION` of the colour the
    acting object had when the event began, its lower half with the colour the object ends
    the event with (they differ only for ``turn``), and during a ``move`` a brightness ramp
    of :data:`MOVE_RAMP` rises toward the direction of motion.
    """
    upper = lower = np.asarray(BACKGROUND_RGB, dtype=np.float64)
    ramp_dir: tuple[float, float] | None = None
    for event in scene.events:
        if event.start_s <= t_s < event.end_s:
            upper, lower = _tinted(upper, event.before.colour), _tinted(lower, event.after.colour)
            if event.kind == "move":
                ramp_dir = _DIRECTION_VECTORS[event.direction]
    image = np.empty((size, size, 3), dtype=np.float64)  # [H, W, 3]
    image[: size // 2] = upper
    image[size // 2 :] = lower
    if ramp_dir is not None:
        centres = (np.arange(size) + 0.5) / size - 0.5
        # Position along the direction of motion, -0.5 at the near edge to 0.5 at the far one.
        along = ramp_dir[0] * centres[None, :] + ramp_dir[1] * centres[:, None]  # [H, W]
        image += 2 * MOVE_RAMP * 255 * along[:, :, None]
    return image


def render_frame(scene: Scene, t_s: float, size: int = 128) -> np.ndarray:
    """Draw the scene at time ``t_s`` as a uint8 RGB array ``[size, size, 3]``.

    Objects are drawn over :func:`background_at`; one that is acting at ``t_s`` over a
    white halo of its own shape, :data:`HALO_FRACTION` wider on every side.
    """
    image = background_at(scene, t_s, size)
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    frame = np.clip(np.round(image), 0, 255).astype(np.uint8)
    for obj_idx, shape in enumerate(scene.shapes):
        state, size_frac, rgb = object_state_at(scene, obj_idx, t_s)
        if not state.present:
            continue
        dx, dy = centres[None, :] - state.x, centres[:, None] - state.y
        if is_acting(scene, obj_idx, t_s):
            frame[_shape_mask(shape, dx, dy, size_frac / 2 + HALO_FRACTION)] = HALO_RGB
        frame[_shape_mask(shape, dx, dy, size_frac / 2)] = np.round(np.asarray(rgb)).astype(np.uint8)
    return frame


def write_h264_mp4(
    path: str | os.PathLike[str], frames: Iterable[np.ndarray], fps: int, width: int, height: int
) -> int:
    """Encode uint8 RGB frames as a small constant-rate H.264 (libx264, yuv420p) mp4.

    Frame ``i`` gets pts ``i`` in a ``1/fps`` time base, so it is shown at ``i / fps`` s.
    One encoder thread keeps the bitstream independent of the machine: the same frames
    give the same bytes.

    Args:
        path: Output file; its folder must exist.
        frames: Frames ``[height, width, 3]`` uint8, in display order.
        fps: Frame rate (frames per second).
        width: Frame width in pixels (even, for yuv420p).
        height: Frame height in pixels (even, for yuv420p).

    Returns:
        Number of frames written.

    Raises:
        ValueError: For an odd size, a non-positive fps or a frame of another shape.
    """
    import av

    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {width}x{height}")
    if fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps}")
    n_frames = 0
    with av.open(os.fspath(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "18", "preset": "ultrafast", "g": str(2 * fps)}
        for image in frames:
            if image.shape != (height, width, 3) or image.dtype != np.uint8:
                raise ValueError(f"frame {n_frames} is {image.dtype} {image.shape}, expected uint8 ({height}, {width}, 3)")
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = n_frames
            for packet in stream.encode(frame):
                container.mux(packet)
            n_frames += 1
        for packet in stream.encode():
            container.mux(packet)
    return n_frames


def render_scene(scene: Scene, path: str | os.PathLike[str], fps: int = 4, size: int = 128) -> int:
    """Encode the scene as an H.264 (libx264, yuv420p) mp4 at ``fps`` frames per second.

    Args:
        scene: A planned scene.
        path: Output file; its folder must exist.
        fps: Frame rate; frame ``i`` shows time ``i / fps``.
        size: Side of the square frame in pixels (even, for yuv420p).

    Returns:
        Number of frames written.
    """
    if size % 2:
        raise ValueError(f"size must be even for yuv420p, got {size}")
    n_frames = max(1, round(scene.duration_s * fps))
    images = (render_frame(scene, frame_idx / fps, size) for frame_idx in range(n_frames))
    return write_h264_mp4(path, images, fps, size, size)


def _render_job(job: tuple[Scene, str, int, int]) -> int:
    scene, path, fps, size = job
    return render_scene(scene, path, fps=fps, size=size)


# --- benchmark files -------------------------------------------------------------------


def generate_benchmark(
    out_dir: str | os.PathLike[str],
    n_videos: int,
    seed: int,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    tasks: Iterable[str] = TASKS,
    render: bool = True,
    fps: int = 4,
    size: int = 128,
    workers: int = 1,
) -> dict[str, object]:
    """Write ``videos/*.mp4`` and ``annotations/{train,val,test}.json`` under ``out_dir``.

    Annotation files are E.T.-Instruct / D2VLM ``evi.json`` lists (see
    :func:`d2vlm_ray.data.annotations.write_evi_json`); video paths in them are relative
    to ``out_dir``. A ``meta.json`` records the generation parameters.

    Args:
        out_dir: Benchmark root.
        n_videos: Number of videos (scenes).
        seed: Benchmark seed; everything is a function of it.
        fractions: Train/val/test fractions of the videos.
        tasks: Task codes to annotate.
        render: Also render the videos (``False`` writes annotations only).
        fps: Frame rate of the rendered videos.
        size: Frame side in pixels.
        workers: Rendering processes.

    Returns:
        A summary: record counts per split and task, paths and render time.
    """
    from d2vlm_ray.data.annotations import write_evi_json

    root = Path(out_dir)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    tasks = tuple(tasks)
    scenes = plan_benchmark(n_videos, seed, fractions)
    by_split: dict[str, list[VideoRecord]] = {s: [] for s in SPLITS}
    for scene in scenes:
        by_split[scene.split] += scene_records(scene, tasks)
    counts: dict[str, dict[str, int]] = {}
    paths: dict[str, str] = {}
    for split, records in by_split.items():
        path = root / "annotations" / f"{split}.json"
        write_evi_json(records, path)
        paths[split] = str(path)
        counts[split] = {t: sum(r.task == t for r in records) for t in tasks}
    meta = {"generator": "d2vlm_ray.data.synthetic", "version": 2, "seed": seed, "n_videos": n_videos,
            "fractions": list(fractions), "tasks": list(tasks), "fps": fps, "size": size, "halo": HALO_FRACTION, "tint": TINT_FRACTION}
    (root / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    render_s = 0.0
    n_frames = 0
    if render:
        (root / "videos").mkdir(exist_ok=True)
        jobs = [(scene, str(root / scene.video_path), fps, size) for scene in scenes]
        start = time.perf_counter()
        if workers > 1:
            # spawn: safe next to threads (Ray, torch) in the parent process.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                n_frames = sum(pool.imap_unordered(_render_job, jobs, chunksize=4))
        else:
            n_frames = sum(_render_job(job) for job in jobs)
        render_s = time.perf_counter() - start
    return {"out_dir": str(root), "n_videos": n_videos, "records": counts, "annotations": paths,
            "rendered": render, "n_frames": n_frames, "render_s": round(render_s, 3)}


# --- baselines -------------------------------------------------------------------------


def _iou(a: SpanS, b: SpanS) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def grounding_baselines(
    train: Sequence[VideoRecord], test: Sequence[VideoRecord], iou_threshold: float = 0.5, task: str = "tvg"
) -> dict[str, float]:
    """R@1 at ``iou_threshold`` (and mIoU) of two trivial grounding baselines on ``test``.

    - ``whole_video``: predict ``[0, duration]``.
    - ``train_mean``: predict the mean span of ``train``'s ``task`` records, in fractions
      of the duration, scaled to each test video.

    Args:
        train: Records the mean span is taken from.
        test: Records scored (only their first span, as in E.T. Bench ``tvg``).
        iou_threshold: IoU a prediction needs to count as a hit.
        task: Task code of the records to use.

    Returns:
        ``{"n", "whole_video_r1", "whole_video_miou", "train_mean_r1", "train_mean_miou",
        "train_mean_start_frac", "train_mean_end_frac"}``.
    """
    train_spans = [(r.spans_s[0], r.duration_s) for r in train if r.task == task and r.spans_s]
    test_spans = [(r.spans_s[0], r.duration_s) for r in test if r.task == task and r.spans_s]
    if not train_spans or not test_spans:
        raise ValueError(f"need {task} records in both train and test")
    start_frac = sum(s[0] / d for s, d in train_spans) / len(train_spans)
    end_frac = sum(s[1] / d for s, d in train_spans) / len(train_spans)
    whole = [_iou((0.0, d), gt) for gt, d in test_spans]
    mean = [_iou((start_frac * d, end_frac * d), gt) for gt, d in test_spans]
    n = len(test_spans)
    return {
        "n": float(n),
        "whole_video_r1": sum(v >= iou_threshold for v in whole) / n,
        "whole_video_miou": sum(whole) / n,
        "train_mean_r1": sum(v >= iou_threshold for v in mean) / n,
        "train_mean_miou": sum(mean) / n,
        "train_mean_start_frac": start_frac,
        "train_mean_end_frac": end_frac,
    }


# --- CLI -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``d2vlm-ray synth-data``: write a synthetic benchmark (``argv`` excludes the subcommand)."""
    parser = argparse.ArgumentParser(prog="d2vlm-ray synth-data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="benchmark root folder")
    parser.add_argument("--n-videos", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-render", action="store_true", help="write annotations only")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--fps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    args = parser.parse_args(argv)
    if args.n_videos < 1:
        parser.error("--n-videos must be at least 1")
    summary = generate_benchmark(
        args.out,
        args.n_videos,
        args.seed,
        fractions=args.fractions,
        tasks=args.tasks,
        render=not args.no_render,
        fps=args.fps,
        size=args.size,
        workers=args.workers,
    )
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
