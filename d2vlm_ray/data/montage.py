"""A grounding benchmark from real footage: montages of described clips.

The user brings a folder of clips and a descriptions file that says, in one line of
plain words, what each clip shows. Clips are matched to descriptions by the sha256 of
the file's bytes, so a renamed file still matches and an edited one does not::

    {"format": "d2vlm_ray.clip_descriptions/1",
     "clips": [{"sha256": "<hex>", "name": "pancake.mkv",
                "description": "a woman flips a pancake in a kitchen", "start_s": 0.0, "end_s": 6.0}]}

``name`` is informational; ``start_s`` / ``end_s`` (optional, seconds from the clip's
first frame, as the project's decoder times it) bound the part of the clip the
description is true for. A montage shows a random stretch of ``min_clip_s`` to
``max_clip_s`` of that part, so a description must hold for every such stretch
("a man cuts bread", not "a man cuts bread, then leaves").

:func:`build_montage_benchmark` decodes every described clip once with
:func:`d2vlm_ray.data.video.decode_video` (so rotation, sample aspect ratio and variable
frame rate are handled as everywhere else), fits its frames into a small square, and
concatenates segments of 3-6 clips into constant-rate H.264 montages. The boundaries
of every segment are read back from the written file's frame times. Per montage it
writes, in the project's ``evi.json`` format (:func:`~d2vlm_ray.data.annotations.write_evi_json`):

- ``tvg``: one query per clip, the clip's description; its span is the clip's segment.
- ``dvc``: every clip in time order, its description as caption.
- ``gqa``: "What happens right after <description of clip k>?", a multiple choice whose
  answer is the description of clip k+1 and whose evidence span is clip k+1.

Splits: some clips are held out entirely (``unseen``); train and val montages use only
the other (``seen``) clips, test montages mix both, and no test montage repeats a train
montage's clip sequence. ``annotations/test_groups.json`` maps each test sample to the
group of its target clip, so evaluation can report seen and unseen clips apart.

Descriptions are checked so that the benchmark's scorers read them unambiguously: no
digits (span parsers read numbers in answers as times), no ``<``/``>`` (evidence
tokens), and they start and end with a letter (option matching works on word
boundaries). Descriptions that equal or contain one another (case-insensitive, on
word boundaries) never meet in one montage or one option list, so ``option_hit`` cannot
take one for the other.

This module never imports Ray; everything is a function of the inputs and the seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2vlm_ray.data.synthetic import EVI, SPLITS, grounding_baselines, grounding_response, write_h264_mp4
from d2vlm_ray.files import file_sha256
from d2vlm_ray.types import SpanS, VideoRecord

DESCRIPTIONS_FORMAT = "d2vlm_ray.clip_descriptions/1"
PACKAGED_DESCRIPTIONS = Path(__file__).resolve().parent / "clip_descriptions" / "shared_media_real.json"
"""Our descriptions of the team's real-media corpus (the files are not distributed; matched by sha256)."""
SOURCE = "montage"
TASKS: tuple[str, ...] = ("tvg", "dvc", "gqa")
FITS: tuple[str, ...] = ("letterbox", "crop")
TEST_GROUPS_FILE = "test_groups.json"
SUMMARY_FILE = "summary.json"
# No clip fills more than this share of its montage, so predicting the whole video never
# reaches IoU 0.5 with one clip (the whole-video baseline scores 0 at R@0.5).
MAX_CLIP_SHARE = 0.45
N_OPTIONS = 4
# Bumped whenever the frames written for the same plan change, so stale montages are redone.
_WRITER_VERSION = 1
_ENTRY_KEYS = frozenset({"sha256", "name", "description", "start_s", "end_s"})
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Files in a clips folder that are never clips: a README or the descriptions file itself
# would otherwise be listed as "files without a description".
_TEXT_SUFFIXES = frozenset({".md", ".txt", ".json", ".yaml", ".yml", ".csv"})
_TIME_EPS_S = 1e-6
_TEST_ATTEMPTS = 200


class DescriptionsError(ValueError):
    """The descriptions file is malformed (the message names the file and the entry)."""


class MontageError(ValueError):
    """The clips cannot make the requested benchmark (too few usable clips, bad arguments)."""


@dataclass(frozen=True)
class ClipDescription:
    """What one clip shows, keyed by the sha256 of the clip file's bytes.

    Attributes:
        sha256: Lower-case hex digest of the file's bytes.
        description: One line of plain words, normalised (see :func:`normalise_description`).
        name: Informational file name.
        start_s: Start of the part the description is true for (``None``: the clip's start).
        end_s: End of that part (``None``: the clip's end).
    """

    sha256: str
    description: str
    name: str = ""
    start_s: float | None = None
    end_s: float | None = None


def normalise_description(text: str) -> str:
    """Collapse whitespace and drop one trailing full stop (the records add their own)."""
    text = " ".join(text.split())
    return text[:-1].rstrip() if text.endswith(".") else text


def _description_problem(text: str) -> str | None:
    """Why ``text`` (normalised) cannot be a description, or ``None`` when it can."""
    if not text:
        return "is empty"
    if re.search(r"\d", text):
        return "contains a digit (span parsers read numbers in an answer as times); spell numbers out"
    if "<" in text or ">" in text:
        return "contains '<' or '>' (reserved for evidence tokens)"
    if not (text[0].isalpha() and text[-1].isalpha()):
        return "must start and end with a letter (answers are matched on word boundaries)"
    return None


def descriptions_overlap(a: str, b: str) -> bool:
    """Whether two descriptions are equal or one contains the other, ignoring case.

    Containment is on word boundaries, the way :func:`d2vlm_ray.eval.report.option_hit`
    looks for an option in an answer: an answer naming ``b`` also names ``a`` when ``a``
    lies inside ``b``, so the two must never be options of one question.
    """
    a, b = a.lower(), b.lower()
    if a == b:
        return True
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    return re.search(rf"\b{re.escape(short)}\b", long) is not None


def _time_field(entry: Mapping[str, Any], key: str, where: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DescriptionsError(f"{where}: {key} must be a finite number of seconds, got {value!r}")
    if value < 0:
        raise DescriptionsError(f"{where}: {key} must not be negative, got {value!r}")
    return float(value)


def parse_descriptions(data: Any, source: str = "<descriptions>") -> list[ClipDescription]:
    """Validate a parsed descriptions document (see the module docstring).

    Args:
        data: The parsed JSON.
        source: Name of the file, for error messages.

    Returns:
        The descriptions, in file order.

    Raises:
        DescriptionsError: For a wrong format tag, a malformed entry, an unknown key, an
            empty or unusable description, a bad time range or a repeated sha256.
    """
    if not isinstance(data, dict):
        raise DescriptionsError(f"{source}: expected a JSON object with 'format' and 'clips'")
    if data.get("format") != DESCRIPTIONS_FORMAT:
        raise DescriptionsError(f"{source}: format must be {DESCRIPTIONS_FORMAT!r}, got {data.get('format')!r}")
    clips = data.get("clips")
    if not isinstance(clips, list):
        raise DescriptionsError(f"{source}: 'clips' must be a list")
    out: list[ClipDescription] = []
    first_entry: dict[str, int] = {}
    for i, entry in enumerate(clips):
        where = f"{source}: clips[{i}]"
        if not isinstance(entry, dict):
            raise DescriptionsError(f"{where}: each clip must be an object")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise DescriptionsError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_ENTRY_KEYS)}")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not _SHA256_RE.match(sha.lower()):
            raise DescriptionsError(f"{where}: sha256 must be 64 hex digits, got {sha!r}")
        sha = sha.lower()
        if sha in first_entry:
            raise DescriptionsError(f"{where}: sha256 {sha} is already described by clips[{first_entry[sha]}]")
        first_entry[sha] = i
        raw = entry.get("description")
        if not isinstance(raw, str):
            raise DescriptionsError(f"{where}: description must be a string, got {raw!r}")
        description = normalise_description(raw)
        problem = _description_problem(description)
        if problem:
            raise DescriptionsError(f"{where}: description {raw!r} {problem}")
        name = entry.get("name", "")
        if not isinstance(name, str):
            raise DescriptionsError(f"{where}: name must be a string, got {name!r}")
        start_s = _time_field(entry, "start_s", where)
        end_s = _time_field(entry, "end_s", where)
        if end_s is not None and end_s <= (start_s or 0.0):
            raise DescriptionsError(f"{where}: end_s {end_s} must be after start_s {start_s or 0.0}")
        out.append(ClipDescription(sha, description, name, start_s, end_s))
    return out


def load_descriptions(path: str | os.PathLike[str]) -> list[ClipDescription]:
    """Read and validate a descriptions file.

    Raises:
        DescriptionsError: If the file cannot be read, is not JSON, or is malformed
            (see :func:`parse_descriptions`).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DescriptionsError(f"{path}: cannot read the descriptions file: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DescriptionsError(f"{path}: not valid JSON: {exc}") from exc
    return parse_descriptions(data, str(path))


@dataclass
class ClipMatch:
    """Clips of a folder matched to their descriptions.

    Attributes:
        clips: ``(path, description)`` of every matched file, ordered by sha256 (so the
            plan does not depend on file names).
        files_without_description: Names of files in the folder that no entry describes.
        descriptions_without_file: ``name`` (or sha256 when unnamed) of entries that no file matches.
        duplicate_files: Names of files with the same bytes as a matched file (not used twice).
    """

    clips: list[tuple[str, ClipDescription]]
    files_without_description: list[str] = field(default_factory=list)
    descriptions_without_file: list[str] = field(default_factory=list)
    duplicate_files: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """The unmatched and duplicate names, for summaries and the CLI."""
        return {
            "n_matched": len(self.clips),
            "files_without_description": list(self.files_without_description),
            "descriptions_without_file": list(self.descriptions_without_file),
            "duplicate_files": list(self.duplicate_files),
        }


def match_clips(clips_dir: str | os.PathLike[str], descriptions: Sequence[ClipDescription]) -> ClipMatch:
    """Match the files directly in ``clips_dir`` to ``descriptions`` by content hash.

    Hidden files and text files (``.md``, ``.json``, ...) are not considered clips.

    Raises:
        MontageError: If ``clips_dir`` is not a folder.
    """
    root = Path(clips_dir)
    if not root.is_dir():
        raise MontageError(f"clips folder {root} does not exist or is not a folder")
    by_sha = {d.sha256: d for d in descriptions}
    matched: dict[str, tuple[str, ClipDescription]] = {}
    unmatched: list[str] = []
    duplicates: list[str] = []
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() in _TEXT_SUFFIXES:
            continue
        sha = file_sha256(path)
        if sha not in by_sha:
            unmatched.append(path.name)
        elif sha in matched:
            duplicates.append(f"{path.name} (same bytes as {Path(matched[sha][0]).name})")
        else:
            matched[sha] = (str(path), by_sha[sha])
    missing = [d.name or d.sha256 for d in descriptions if d.sha256 not in matched]
    clips = [matched[sha] for sha in sorted(matched)]
    return ClipMatch(clips, unmatched, missing, duplicates)


# --- decoding --------------------------------------------------------------------------


@dataclass
class _Clip:
    """A usable clip: its frames inside the described range, fitted to the montage size."""

    path: str
    name: str
    sha256: str
    description: str
    frames: np.ndarray  # [F, size, size, 3] uint8, one per 1/fps from the range's start
    range_s: SpanS  # the described range actually covered, in the clip's own time
    warnings: list[str]


class _Skip(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def fit_square(frames: np.ndarray, size: int, fit: str = "letterbox", pixel_aspect: float = 1.0) -> np.ndarray:
    """Resize frames into a ``size`` square, keeping their displayed aspect ratio.

    Args:
        frames: uint8 RGB ``[F, H, W, 3]``.
        size: Side of the output square in pixels.
        fit: ``letterbox`` scales the long side to ``size`` and pads with black;
            ``crop`` scales the short side to ``size`` and keeps the centre.
        pixel_aspect: Displayed width over height of one stored pixel (a stream's sample
            aspect ratio; its inverse for frames rotated by 90 or 270 degrees). Handled
            here, a chunk at a time, rather than by stretching every decoded frame first.

    Returns:
        uint8 ``[F, size, size, 3]`` with square pixels.
    """
    import torch
    import torch.nn.functional as F

    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if not (pixel_aspect > 0 and math.isfinite(pixel_aspect)):
        raise ValueError(f"pixel_aspect must be a positive number, got {pixel_aspect!r}")
    n_frames, height, width = frames.shape[:3]
    shown_w = width * pixel_aspect
    scale = size / (max(height, shown_w) if fit == "letterbox" else min(height, shown_w))
    new_h, new_w = max(1, round(height * scale)), max(1, round(shown_w * scale))
    out = np.zeros((n_frames, size, size, 3), dtype=np.uint8)
    for start in range(0, n_frames, 32):  # 32 frames at a time bounds the float copy
        chunk = torch.from_numpy(np.ascontiguousarray(frames[start : start + 32])).permute(0, 3, 1, 2).float()
        if (new_h, new_w) != (height, width):
            chunk = F.interpolate(chunk, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        resized = chunk.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [f, new_h, new_w, 3]
        if fit == "letterbox":
            top, left = (size - new_h) // 2, (size - new_w) // 2
            out[start : start + 32, top : top + new_h, left : left + new_w] = resized
        else:
            top, left = (new_h - size) // 2, (new_w - size) // 2
            out[start : start + 32] = resized[:, top : top + size, left : left + size]
    return out


def _prepare_clip(
    path: str,
    desc: ClipDescription,
    *,
    fps: int,
    size: int,
    fit: str,
    min_frames: int,
    max_source_s: float,
    max_decode_bytes: int,
) -> _Clip:
    """Decode one clip at ``fps`` and keep its described range; raises :class:`_Skip`."""
    from d2vlm_ray.data.video import VideoDecodeError, decode_video, probe_video

    try:
        index = probe_video(path)
        # The decoder holds every sampled frame at its stored size before shrinking them,
        # so a long high-resolution clip is refused here rather than exhausting memory.
        n_sampled = math.ceil(index.duration_s * fps)
        held_bytes = n_sampled * index.width * index.height * 3
        if held_bytes > max_decode_bytes:
            raise _Skip(
                "too_large",
                f"decoding holds {n_sampled} frames of {index.width}x{index.height} "
                f"({held_bytes / 2**30:.1f} GiB) at once, over max_decode_bytes ({max_decode_bytes / 2**30:.1f} GiB): "
                "trim the clip or raise the limit",
            )
        # max_side bounds memory before the final fit (4x leaves the crop of a 4:1 clip
        # enough pixels); the sample aspect ratio is applied by fit_square.
        video = decode_video(path, fps=fps, max_side=4 * size, max_duration_s=max_source_s)
    except VideoDecodeError as exc:
        raise _Skip(exc.reason, exc.message) from exc
    sar = float(index.sample_aspect_ratio)
    pixel_aspect = 1.0 / sar if index.rotation_deg in (90, 270) else sar
    if video.missing_timestamps_s:
        raise _Skip(
            "partial_decode",
            f"{len(video.missing_timestamps_s)} of {video.n_sampled} sampled frames could not be decoded: "
            + "; ".join(video.warnings[-2:]),
        )
    warnings = list(video.warnings)
    start_s = desc.start_s or 0.0
    end_s = video.duration_s if desc.end_s is None else desc.end_s
    if desc.end_s is not None and desc.end_s > video.duration_s + 1.0 / fps:
        warnings.append(f"end_s {desc.end_s} is after the clip's end ({video.duration_s:.3f} s); the clip's end is used")
        end_s = video.duration_s
    if start_s >= video.duration_s:
        raise _Skip("range_outside_clip", f"start_s {start_s} is not before the clip's end ({video.duration_s:.3f} s)")
    times_s = video.timestamps_s
    keep = (times_s >= start_s - _TIME_EPS_S) & (times_s < end_s - _TIME_EPS_S)
    n_kept = int(keep.sum())
    if n_kept < min_frames:
        raise _Skip(
            "too_short",
            f"{n_kept} frames at {fps} fps in the described range [{start_s:.3f}, {end_s:.3f}] s, "
            f"fewer than the {min_frames} a segment needs",
        )
    frames = fit_square(video.frames[keep], size, fit, pixel_aspect)
    kept_s = times_s[keep]
    return _Clip(
        path=path,
        name=Path(path).name,
        sha256=desc.sha256,
        description=desc.description,
        frames=frames,
        range_s=(float(kept_s[0]), min(float(kept_s[-1]) + 1.0 / fps, end_s)),
        warnings=warnings,
    )


# --- planning --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    clip_idx: int  # index into the usable clips
    first_idx: int  # first frame taken, index into the clip's range frames
    n_frames: int


@dataclass(frozen=True)
class _Montage:
    video_id: str
    split: str
    segments: tuple[_Segment, ...]

    @property
    def video_path(self) -> str:
        return f"videos/{self.video_id}.mp4"


def _rng(seed: int, purpose: str) -> random.Random:
    # str seeds hash through sha512: streams are stable across processes and runs.
    return random.Random(f"d2vlm-montage:{purpose}:{seed}")


def _pick_clips(
    rng: random.Random, pool: Sequence[int], k: int, clips: Sequence[_Clip], usage: list[int], chosen: list[int]
) -> list[int]:
    """Add up to ``k`` clips of ``pool`` to ``chosen``: least used first, no overlapping descriptions."""
    order = sorted(pool, key=lambda i: (usage[i], rng.random()))
    picked: list[int] = []
    for i in order:
        if len(picked) == k:
            break
        if i in chosen or any(descriptions_overlap(clips[i].description, clips[j].description) for j in chosen + picked):
            continue
        picked.append(i)
    return picked


def _segments(
    rng: random.Random, clip_idx: Sequence[int], clips: Sequence[_Clip], min_frames: int, max_frames: int
) -> tuple[_Segment, ...]:
    """Random lengths and offsets, shortened until no segment exceeds :data:`MAX_CLIP_SHARE`."""
    n_avail = [len(clips[i].frames) for i in clip_idx]
    lengths = [rng.randint(min_frames, min(max_frames, n)) for n in n_avail]
    # Shrinking the longest segment one frame at a time ends: with >= 3 segments of equal
    # length each holds at most a third.
    while max(lengths) > MAX_CLIP_SHARE * sum(lengths):
        lengths[lengths.index(max(lengths))] -= 1
    return tuple(
        _Segment(i, rng.randint(0, n - length), length) for i, n, length in zip(clip_idx, n_avail, lengths)
    )


def _choose_held_out(
    clips: Sequence[_Clip], seed: int, fraction: float, names: Sequence[str] | None, skipped: Mapping[str, str]
) -> set[int]:
    """Indices of the clips held out of train and val.

    Clips whose descriptions are equal (ignoring case) are held out together, so the
    description of an unseen clip never appears in training either.
    """
    same_text: dict[str, list[int]] = {}
    for i, clip in enumerate(clips):
        same_text.setdefault(clip.description.lower(), []).append(i)
    if names is not None:
        by_name = {c.name: i for i, c in enumerate(clips)}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            why = [f"{n} ({'skipped: ' + skipped[n] if n in skipped else 'no such described clip'})" for n in unknown]
            raise MontageError(f"held-out clips are not usable clips: {', '.join(why)}")
        return {j for n in names for j in same_text[clips[by_name[n]].description.lower()]}
    if not 0.0 <= fraction < 1.0:
        raise MontageError(f"held_out_fraction must be in [0, 1), got {fraction}")
    n_held = round(fraction * len(clips))
    if fraction > 0 and n_held == 0 and len(clips) > 1:
        n_held = 1
    groups = list(same_text.values())
    _rng(seed, "held_out").shuffle(groups)
    held: set[int] = set()
    for group in groups:
        if len(held) >= n_held:
            break
        held.update(group)
    return held


def _plan(
    clips: Sequence[_Clip],
    held_out: set[int],
    *,
    seed: int,
    counts: Mapping[str, int],
    clips_per_montage: tuple[int, int],
    min_frames: int,
    max_frames: int,
) -> list[_Montage]:
    lo, hi = clips_per_montage
    seen = [i for i in range(len(clips)) if i not in held_out]
    unseen = sorted(held_out)
    usage = [0] * len(clips)
    montages: list[_Montage] = []
    train_sequences: set[tuple[str, ...]] = set()
    for split in ("train", "val"):
        rng = _rng(seed, f"plan:{split}")
        for idx in range(counts[split]):
            picked = _pick_clips(rng, seen, rng.randint(lo, hi), clips, usage, [])
            if len(picked) < lo:
                raise MontageError(
                    f"only {len(picked)} seen clips with distinct descriptions, a montage needs {lo}: "
                    "describe more clips, hold out fewer, or lower clips_per_montage"
                )
            rng.shuffle(picked)
            for i in picked:
                usage[i] += 1
            segments = _segments(rng, picked, clips, min_frames, max_frames)
            montages.append(_Montage(f"montage_{seed}_{split}_{idx:04d}", split, segments))
            if split == "train":
                train_sequences.add(tuple(clips[i].sha256 for i in picked))
    rng = _rng(seed, "plan:test")
    for idx in range(counts["test"]):
        for _ in range(_TEST_ATTEMPTS):
            k = rng.randint(lo, hi)
            picked = []
            if unseen:
                # At least one clip of each group (train guarantees seen clips exist), so
                # every test montage mixes them.
                picked = _pick_clips(rng, unseen, rng.randint(1, k - 1), clips, usage, [])
            picked += _pick_clips(rng, seen, k - len(picked), clips, usage, picked)
            rng.shuffle(picked)
            if len(picked) >= lo and tuple(clips[i].sha256 for i in picked) not in train_sequences:
                break
        else:
            raise MontageError(
                f"could not plan test montage {idx} in {_TEST_ATTEMPTS} tries: too few clips with distinct "
                "descriptions for new test sequences"
            )
        for i in picked:
            usage[i] += 1
        montages.append(
            _Montage(f"montage_{seed}_test_{idx:04d}", "test", _segments(rng, picked, clips, min_frames, max_frames))
        )
    return montages


def _plan_hash(montage: _Montage, clips: Sequence[_Clip], fps: int, size: int, fit: str) -> str:
    plan = {
        "writer": _WRITER_VERSION,
        "fps": fps,
        "size": size,
        "fit": fit,
        "segments": [
            [clips[s.clip_idx].sha256, list(clips[s.clip_idx].range_s), s.first_idx, s.n_frames]
            for s in montage.segments
        ],
    }
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode("utf-8")).hexdigest()


def _write_montage(montage: _Montage, clips: Sequence[_Clip], root: Path, fps: int, size: int, plan_hash: str) -> bool:
    """Encode one montage unless an identical one exists; True when it was encoded."""
    path = root / montage.video_path
    sidecar = path.with_suffix(".plan")
    if path.exists() and sidecar.exists() and sidecar.read_text(encoding="utf-8").strip() == plan_hash:
        return False
    frames = (
        clips[s.clip_idx].frames[s.first_idx + j] for s in montage.segments for j in range(s.n_frames)
    )
    tmp = path.with_name(f".{path.name}.tmp")
    write_h264_mp4(tmp, frames, fps, size, size)
    os.replace(tmp, path)
    # The sidecar is written last: a montage interrupted mid-write is redone next time.
    sidecar.write_text(plan_hash + "\n", encoding="utf-8")
    return True


def _written_boundaries(montage: _Montage, root: Path) -> tuple[list[SpanS], float]:
    """Segment spans from the written file's frame times (not from the plan's arithmetic)."""
    from d2vlm_ray.data.video import probe_video

    index = probe_video(str(root / montage.video_path))
    times_s = index.times_s
    n_planned = sum(s.n_frames for s in montage.segments)
    if len(times_s) != n_planned:
        raise MontageError(f"{montage.video_path}: {len(times_s)} frames written, {n_planned} planned")
    firsts = np.cumsum([0] + [s.n_frames for s in montage.segments])  # [S + 1]
    ends = [float(times_s[f]) for f in firsts[1:-1]] + [index.duration_s]
    spans = [(round(float(times_s[f]), 6), round(e, 6)) for f, e in zip(firsts[:-1], ends)]
    return spans, round(index.duration_s, 6)


# --- records ---------------------------------------------------------------------------


def _options(
    rng: random.Random, correct: str, montage_texts: Sequence[str], pool_texts: Sequence[str]
) -> tuple[tuple[str, ...], int]:
    """The correct description and up to three distractors, none overlapping another.

    Distractors come from the same montage first (they are on screen too), then the pool.
    """
    near = [t for t in montage_texts if t != correct]
    far = list(pool_texts)
    rng.shuffle(near)
    rng.shuffle(far)
    options = [correct]
    for text in near + far:
        if len(options) == N_OPTIONS:
            break
        if not any(descriptions_overlap(text, o) for o in options):
            options.append(text)
    rng.shuffle(options)
    return tuple(options), options.index(correct)


def _montage_records(
    montage: _Montage,
    clips: Sequence[_Clip],
    spans: Sequence[SpanS],
    duration_s: float,
    pool_texts: Sequence[str],
    seed: int,
    held_out: set[int],
    max_tvg: int | None,
    max_gqa: int | None,
) -> tuple[list[VideoRecord], dict[str, str]]:
    """Records of one montage and the group (``seen``/``unseen``) of each one's target clip."""
    rng = _rng(seed, f"records:{montage.video_id}")
    texts = [clips[s.clip_idx].description for s in montage.segments]
    groups = ["unseen" if s.clip_idx in held_out else "seen" for s in montage.segments]

    def record(task: str, k: int, query: str, answer: str, spans_s: Sequence[SpanS], **extra: Any) -> VideoRecord:
        return VideoRecord(
            video=montage.video_path,
            duration_s=duration_s,
            query=query,
            task=task,
            source=SOURCE,
            spans_s=tuple(spans_s),
            answer=answer,
            sample_id=f"{montage.video_id}_{task}_{k}",
            split=montage.split,
            **extra,
        )

    records: list[VideoRecord] = []
    group_of: dict[str, str] = {}
    n = len(texts)
    tvg_idx = sorted(rng.sample(range(n), n if max_tvg is None else min(max_tvg, n)))
    for k, j in enumerate(tvg_idx):
        query = (
            f"Find the visual event described by the sentence: {texts[j]}. "
            "When does it happen? Answer with its start and end time."
        )
        answer = grounding_response(1, ["The event happens in ", EVI, "."])
        records.append(record("tvg", k, query, answer, [spans[j]]))
        group_of[records[-1].sample_id] = groups[j]
    answer = grounding_response(n, " ".join(f"{EVI}, {t}." for t in texts))
    records.append(record("dvc", 0, "Describe all the events in the video, each with its start and end time.",
                          answer, spans, captions=tuple(texts)))
    group_of[records[-1].sample_id] = "unseen" if "unseen" in groups else "seen"
    gqa_idx = sorted(rng.sample(range(n - 1), n - 1 if max_gqa is None else min(max_gqa, n - 1)))
    for k, j in enumerate(gqa_idx):
        options, answer_idx = _options(rng, texts[j + 1], texts, pool_texts)
        query = f"What happens right after {texts[j]}? Answer with the time of the evidence."
        answer = grounding_response(1, ["At ", EVI, f", {texts[j + 1]}."])
        records.append(record("gqa", k, query, answer, [spans[j + 1]], options=options, answer_idx=answer_idx))
        group_of[records[-1].sample_id] = groups[j + 1]
    return records, group_of


# --- baselines -------------------------------------------------------------------------


def montage_baselines(
    train_records: Sequence[VideoRecord],
    test_records: Sequence[VideoRecord],
    test_groups: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Trivial baselines of the montage benchmark.

    - ``tvg``: :func:`~d2vlm_ray.data.synthetic.grounding_baselines` (whole video,
      training-mean span) on the ``tvg`` records, and per test group when
      ``test_groups`` is given.
    - ``gqa_chance_acc``: mean of ``1 / len(options)`` over the test ``gqa`` records,
      the accuracy of a uniform guess.

    Args:
        train_records: Records the mean span is taken from.
        test_records: Records scored.
        test_groups: ``{sample_id: "seen" | "unseen"}`` of the test records.

    Returns:
        ``{"tvg": {...}, "tvg_by_group": {group: {...}}, "gqa_chance_acc": float | None}``.
    """
    out: dict[str, Any] = {"tvg": grounding_baselines(train_records, test_records, task="tvg")}
    by_group: dict[str, Any] = {}
    for group in ("seen", "unseen"):
        subset = [r for r in test_records if (test_groups or {}).get(r.sample_id) == group and r.task == "tvg"]
        if subset:
            by_group[group] = grounding_baselines(train_records, subset, task="tvg")
    out["tvg_by_group"] = by_group
    gqa = [r for r in test_records if r.task == "gqa" and r.options]
    out["gqa_chance_acc"] = float(np.mean([1.0 / len(r.options) for r in gqa])) if gqa else None
    return out


# --- the benchmark ---------------------------------------------------------------------


def _stats_s(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "min": round(min(values), 3), "mean": round(float(np.mean(values)), 3),
            "max": round(max(values), 3)}


def build_montage_benchmark(
    clips_dir: str | os.PathLike[str],
    descriptions: str | os.PathLike[str] | Sequence[ClipDescription],
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_train: int = 60,
    n_val: int = 6,
    n_test: int = 20,
    clips_per_montage: tuple[int, int] = (3, 6),
    min_clip_s: float = 2.0,
    max_clip_s: float = 5.0,
    fps: int = 4,
    size: int = 160,
    fit: str = "letterbox",
    held_out_fraction: float = 0.2,
    held_out_names: Sequence[str] | None = None,
    max_tvg_per_montage: int | None = None,
    max_gqa_per_montage: int | None = None,
    max_source_s: float = 600.0,
    max_decode_bytes: int = 2 << 30,
) -> dict[str, Any]:
    """Write a montage benchmark: ``videos/*.mp4``, ``annotations/*.json``, ``summary.json``.

    Args:
        clips_dir: Folder of clips (files directly inside it).
        descriptions: Path of a descriptions file, or parsed descriptions.
        out_dir: Benchmark root; annotation video paths are relative to it.
        seed: Everything (held-out clips, montages, segments, records) is a function of it.
        n_train: Train montages.
        n_val: Validation montages.
        n_test: Test montages.
        clips_per_montage: Smallest and largest number of clips per montage (at least 3,
            so no clip can fill half a montage).
        min_clip_s: Shortest segment taken from a clip; shorter clips are skipped.
        max_clip_s: Longest segment taken from a clip.
        fps: Frame rate the clips are sampled at and the montages written at.
        size: Side of the square montage frame in pixels (even).
        fit: How a clip fills the square: ``letterbox`` or ``crop`` (see :func:`fit_square`).
        held_out_fraction: Share of the usable clips held out of train and val (chosen by
            the seed; at least one when positive). Clips with the same description
            (ignoring case) are held out together.
        held_out_names: File names of the clips to hold out instead (with the clips of the
            same description).
        max_tvg_per_montage: Most ``tvg`` queries per montage (``None``: one per clip).
        max_gqa_per_montage: Most ``gqa`` questions per montage (``None``: one per clip after the first).
        max_source_s: Clips longer than this are skipped (``too_long``) rather than decoded.
        max_decode_bytes: Clips whose sampled frames at their stored size would take more
            than this many bytes are skipped (``too_large``): the decoder holds them all.

    Returns:
        The summary also written to ``summary.json``: counts per split and task, the
        match report, used clips (with decoder warnings) and skipped clips with reasons,
        seen and unseen clip names, montage durations, baselines, timings, and
        ``test_gqa_pairs``: how many test ``gqa`` items ask about a clip pair that was
        adjacent, in the same order, in a train montage (answerable from training order).

    Raises:
        DescriptionsError: For a malformed descriptions file.
        MontageError: For bad arguments or too few usable clips.
    """
    lo, hi = clips_per_montage
    if not 3 <= lo <= hi:
        raise MontageError(f"clips_per_montage must be (lo, hi) with 3 <= lo <= hi, got {clips_per_montage}")
    if size < 2 or size % 2:
        raise MontageError(f"size must be an even number of pixels, got {size}")
    if fps < 1:
        raise MontageError(f"fps must be a positive integer, got {fps}")
    if not 0 < min_clip_s <= max_clip_s:
        raise MontageError(f"need 0 < min_clip_s <= max_clip_s, got {min_clip_s} and {max_clip_s}")
    if fit not in FITS:
        raise MontageError(f"fit must be one of {FITS}, got {fit!r}")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if min(counts.values()) < 0 or n_train < 1 or n_test < 1:
        raise MontageError(f"need at least one train and one test montage, got {counts}")
    min_frames = max(1, round(min_clip_s * fps))
    max_frames = max(min_frames, round(max_clip_s * fps))

    if isinstance(descriptions, (str, os.PathLike)):
        descriptions = load_descriptions(descriptions)
    match = match_clips(clips_dir, descriptions)

    start = time.perf_counter()
    clips: list[_Clip] = []
    skipped: list[dict[str, str]] = []
    for path, desc in match.clips:
        try:
            clips.append(_prepare_clip(path, desc, fps=fps, size=size, fit=fit, min_frames=min_frames,
                                       max_source_s=max_source_s, max_decode_bytes=max_decode_bytes))
        except _Skip as skip:
            skipped.append({"name": Path(path).name, "sha256": desc.sha256, "reason": skip.reason,
                            "message": skip.message})
    decode_s = time.perf_counter() - start
    held_out = _choose_held_out(clips, seed, held_out_fraction, held_out_names,
                                {s["name"]: s["reason"] for s in skipped})
    montages = _plan(clips, held_out, seed=seed, counts=counts, clips_per_montage=(lo, hi),
                     min_frames=min_frames, max_frames=max_frames)

    root = Path(out_dir)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    seen_texts = [c.description for i, c in enumerate(clips) if i not in held_out]
    all_texts = [c.description for c in clips]
    by_split: dict[str, list[VideoRecord]] = {s: [] for s in SPLITS}
    test_groups: dict[str, str] = {}
    durations: dict[str, list[float]] = {s: [] for s in SPLITS}
    # A test gqa item whose question clip was followed by its answer clip in a train
    # montage can be answered from the training order alone; the summary counts them.
    train_pairs = {(a.clip_idx, b.clip_idx) for m in montages if m.split == "train"
                   for a, b in zip(m.segments, m.segments[1:])}
    gqa_pairs = {"n": 0, "adjacent_in_train": 0}
    n_encoded = 0
    start = time.perf_counter()
    for montage in montages:
        n_encoded += _write_montage(montage, clips, root, fps, size, _plan_hash(montage, clips, fps, size, fit))
        spans, duration_s = _written_boundaries(montage, root)
        # Train and val distractors come from seen clips only, so unseen descriptions
        # first appear at test time.
        pool = all_texts if montage.split == "test" else seen_texts
        records, groups = _montage_records(montage, clips, spans, duration_s, pool, seed, held_out,
                                           max_tvg_per_montage, max_gqa_per_montage)
        by_split[montage.split] += records
        durations[montage.split].append(duration_s)
        if montage.split == "test":
            test_groups |= groups
            for r in records:
                if r.task == "gqa":
                    j = spans.index(r.spans_s[0])
                    gqa_pairs["n"] += 1
                    gqa_pairs["adjacent_in_train"] += (
                        montage.segments[j - 1].clip_idx, montage.segments[j].clip_idx) in train_pairs
    encode_s = time.perf_counter() - start

    from d2vlm_ray.data.annotations import write_evi_json

    annotations: dict[str, str] = {}
    for split, records in by_split.items():
        path = root / "annotations" / f"{split}.json"
        write_evi_json(records, path)
        annotations[split] = str(path)
    groups_path = root / "annotations" / TEST_GROUPS_FILE
    groups_path.write_text(json.dumps(test_groups, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    summary: dict[str, Any] = {
        "out_dir": str(root),
        "seed": seed,
        "params": {"n_train": n_train, "n_val": n_val, "n_test": n_test, "clips_per_montage": [lo, hi],
                   "min_clip_s": min_clip_s, "max_clip_s": max_clip_s, "fps": fps, "size": size, "fit": fit,
                   "held_out_fraction": held_out_fraction if held_out_names is None else None,
                   "held_out_names": list(held_out_names) if held_out_names is not None else None},
        "montages": {s: len(durations[s]) for s in SPLITS},
        "records": {s: {t: sum(r.task == t for r in by_split[s]) for t in TASKS} for s in SPLITS},
        "test_groups": {g: sum(v == g for v in test_groups.values()) for g in ("seen", "unseen")},
        "test_gqa_pairs": gqa_pairs,
        "match": match.report(),
        "clips": {
            "used": [{"name": c.name, "sha256": c.sha256, "description": c.description,
                      "group": "unseen" if i in held_out else "seen",
                      "range_s": [round(c.range_s[0], 3), round(c.range_s[1], 3)], "warnings": c.warnings}
                     for i, c in enumerate(clips)],
            "skipped": skipped,
        },
        "seen_clips": sorted(c.name for i, c in enumerate(clips) if i not in held_out),
        "unseen_clips": sorted(c.name for i, c in enumerate(clips) if i in held_out),
        "durations_s": {s: _stats_s(durations[s]) for s in SPLITS},
        "baselines": montage_baselines(by_split["train"], by_split["test"], test_groups),
        "annotations": annotations,
        "test_groups_file": str(groups_path),
        "n_encoded": n_encoded,
        "n_reused": len(montages) - n_encoded,
        "decode_s": round(decode_s, 3),
        "encode_s": round(encode_s, 3),
    }
    (root / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


# --- CLI -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``d2vlm-ray montage``: build the montage benchmark (``argv`` excludes the subcommand)."""
    parser = argparse.ArgumentParser(prog="d2vlm-ray montage", description=__doc__.splitlines()[0])
    parser.add_argument("--clips", required=True, help="folder of clips")
    parser.add_argument("--descriptions", required=True, help=f"descriptions file ({DESCRIPTIONS_FORMAT})")
    parser.add_argument("--out", required=True, help="benchmark root folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-val", type=int, default=6)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--clips-per-montage", type=int, nargs=2, default=(3, 6), metavar=("MIN", "MAX"))
    parser.add_argument("--min-clip-s", type=float, default=2.0)
    parser.add_argument("--max-clip-s", type=float, default=5.0)
    parser.add_argument("--fps", type=int, default=4)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--fit", choices=FITS, default="letterbox")
    held = parser.add_mutually_exclusive_group()
    held.add_argument("--held-out-fraction", type=float, default=0.2)
    held.add_argument("--held-out", nargs="+", metavar="NAME", help="file names of the clips to hold out")
    parser.add_argument("--max-decode-gib", type=float, default=2.0,
                        help="skip clips whose sampled frames at stored size need more memory than this")
    args = parser.parse_args(argv)
    try:
        summary = build_montage_benchmark(
            args.clips,
            args.descriptions,
            args.out,
            seed=args.seed,
            n_train=args.n_train,
            n_val=args.n_val,
            n_test=args.n_test,
            clips_per_montage=tuple(args.clips_per_montage),
            min_clip_s=args.min_clip_s,
            max_clip_s=args.max_clip_s,
            fps=args.fps,
            size=args.size,
            fit=args.fit,
            held_out_fraction=args.held_out_fraction,
            held_out_names=args.held_out,
            max_decode_bytes=int(args.max_decode_gib * 2**30),
        )
    except (DescriptionsError, MontageError) as exc:
        print(f"d2vlm-ray montage: {exc}", file=sys.stderr)
        return 2
    match = summary["match"]
    for key, label in (("files_without_description", "files without a description"),
                       ("descriptions_without_file", "descriptions without a file"),
                       ("duplicate_files", "duplicate files (used once)")):
        if match[key]:
            print(f"{label} ({len(match[key])}): {', '.join(match[key])}", file=sys.stderr)
    for skip in summary["clips"]["skipped"]:
        print(f"skipped {skip['name']}: {skip['reason']}: {skip['message']}", file=sys.stderr)
    for clip in summary["clips"]["used"]:
        for warning in clip["warnings"]:
            print(f"warning {clip['name']}: {warning}", file=sys.stderr)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
