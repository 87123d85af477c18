"""The ``decode`` benchmark: sampling frames at 1 fps, the project's decoder vs the official one.

Three paths decode the same sampled frames of the same clips, in the same run:

* ``project``: :func:`d2vlm_ray.data.video.decode_video` (default backend), end to end
  (index pass included). Decoded frames are counted by the decoder loop itself.
* ``official``: the official recipe's reader, decord ``VideoReader(path, ctx=cpu(0))``
  (default threads) and ``get_batch`` on ``round(arange(0, N, avg_fps / fps))`` clipped to
  ``N - 1``. decord does not report what it decodes; the count is **inferred from its
  access pattern**: ``get_batch`` visits the indices in order; a target in the same GOP
  as the current position and ahead of it is reached by decoding every frame in between,
  any other target by seeking to its keyframe and decoding from there (decord's
  ``SeekAccurate``). Every frame on the way is fully decoded (no frame is skipped
  inside the decoder).
* ``pyav_all``: PyAV decodes every frame (frame threads) and keeps the sampled ones.
  Decoded frames are counted.

Cases:

* ``long_gop`` (targeted): one long-GOP H.264 clip with B-frames
  (:func:`d2vlm_ray.data.testclips.write_long_gop_clip`, 120 s, 30 fps, 640x360, GOP 250
  by default). The project's path must reach ``target_ratio`` (2x) the official path's
  frames/s.
* ``short_gop`` (reported): short clips like the official recipe's pre-compressed inputs
  (3 fps, 224-px short side; GOP 30 frames = 10 s by default, adaptive B-frames).
* ``real_files`` (reported, only when listed in ``cases``): real-world files from a
  folder (``real_files.media_dir`` or ``D2VLM_REAL_MEDIA_DIR``, e.g. the conformance
  corpus), file by file: frames/s and decoded frames per sampled frame of the project's
  path and decord's, frames compared pixel for pixel (no barcodes). Skipped, saying so,
  when the folder is absent.

All clips are barcoded, so besides checking that the three paths return identical
arrays, the benchmark checks that the frames are the ones the official rule picks.
Clips are written once into ``cache_dir`` (named by their parameters) and reused.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2vlm_ray.bench.common import time_paths
from d2vlm_ray.data.testclips import read_barcode, write_barcode_clip, write_long_gop_clip
from d2vlm_ray.data.video import decode_video_counted, probe_video, sample_frame_indices

PATHS = ("project", "official", "pyav_all")
"""The compared paths, in report order."""

CASES = ("long_gop", "short_gop", "real_files")
"""The clip families the benchmark knows (``real_files`` runs only when asked for)."""

REAL_MEDIA_ENV = "D2VLM_REAL_MEDIA_DIR"
"""Environment variable naming the real-world media folder when ``real_files.media_dir`` is empty."""


@dataclass
class LongGopClip:
    """The long-GOP clip (see :func:`d2vlm_ray.data.testclips.write_long_gop_clip`).

    Attributes:
        duration_s: Clip length.
        fps: Frame rate.
        width: Width in pixels (even).
        height: Height in pixels (even).
        gop_size: Keyframe interval in frames.
        b_frames: B-frames between reference frames (fixed, with x264's B-pyramid).
    """

    duration_s: float = 120.0
    fps: float = 30.0
    width: int = 640
    height: int = 360
    gop_size: int = 250
    b_frames: int = 3


@dataclass
class ShortGopClips:
    """Short clips shaped like the official recipe's pre-compressed videos (3 fps, 224 px).

    Attributes:
        n_clips: How many clips one run decodes.
        duration_s: Length of each clip.
        fps: Frame rate.
        width: Width in pixels (even); 398x224 is 16:9 with a 224-px short side.
        height: Height in pixels (even).
        gop_size: Keyframe interval in frames.
        b_frames: Maximum consecutive B-frames (x264 picks how many, as ffmpeg does).
    """

    n_clips: int = 4
    duration_s: float = 30.0
    fps: float = 3.0
    width: int = 398
    height: int = 224
    gop_size: int = 30
    b_frames: int = 3


@dataclass
class RealFiles:
    """Real-world files (e.g. the conformance corpus) decoded by the project and by decord.

    Attributes:
        media_dir: Folder holding the files; empty: the ``D2VLM_REAL_MEDIA_DIR`` variable.
        names: File names in that folder (files decord reads, so both paths can be timed).
    """

    media_dir: str = ""
    names: list[str] = field(
        default_factory=lambda: [
            "videollava_sample_demo_22_portrait.mp4",
            "scenedetect_issue195_sar16x11.mp4",
            "videollama_birthday.mp4",
            "moviepy_big_buck_bunny_0_30.webm",
            "imageio_cockatoo_yuv444.mp4",
            "mmaction2_test_xvid.avi",
        ]
    )


@dataclass
class Config:
    """Settings of the ``decode`` benchmark.

    Attributes:
        sample_fps: Frames sampled per second of video.
        repeats: Timed runs of every path (medians are reported).
        warmup: Untimed runs of every path first.
        cases: Which of :data:`CASES` to run.
        cache_dir: Where the benchmark clips are written once and reused.
        target_ratio: Required ``project / official`` frames/s on ``long_gop``.
        long_gop: The long-GOP clip.
        short_gop: The short-GOP clips.
        real_files: The real-world files of the ``real_files`` case.
    """

    sample_fps: float = 1.0
    repeats: int = 5
    warmup: int = 1
    cases: list[str] = field(default_factory=lambda: ["long_gop", "short_gop"])
    cache_dir: str = "runs/bench/clips"
    target_ratio: float = 2.0
    long_gop: LongGopClip = field(default_factory=LongGopClip)
    short_gop: ShortGopClips = field(default_factory=ShortGopClips)
    real_files: RealFiles = field(default_factory=RealFiles)

    def validate(self) -> None:
        """Reject values that cannot be benchmarked (raised as ConfigError by the loader)."""
        if self.sample_fps <= 0:
            raise ValueError(f"sample_fps must be positive, got {self.sample_fps}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be non-negative, got {self.warmup}")
        unknown = [c for c in self.cases if c not in CASES]
        if unknown or not self.cases:
            raise ValueError(f"cases must be a non-empty subset of {list(CASES)}, got {self.cases}")
        if self.short_gop.n_clips < 1:
            raise ValueError(f"short_gop.n_clips must be at least 1, got {self.short_gop.n_clips}")


def _clip_name(prefix: str, params: Any, extra: str = "") -> str:
    values = "_".join(f"{v:g}" if isinstance(v, float) else str(v) for v in dataclasses.astuple(params))
    return f"{prefix}_{values}{extra}.mp4"


def _ensure_clip(path: Path, write: Any) -> str:
    """Write a clip once: to a temporary name first, so an interrupted write is never reused."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial" + path.suffix)
        write(tmp)
        tmp.replace(path)
    return str(path)


def long_gop_clips(cfg: Config) -> list[str]:
    """The long-GOP clip's path, written on first use."""
    c = cfg.long_gop
    path = Path(cfg.cache_dir) / _clip_name("long_gop", c)
    return [
        _ensure_clip(
            path,
            lambda p: write_long_gop_clip(
                p,
                duration_s=c.duration_s,
                fps=c.fps,
                width=c.width,
                height=c.height,
                gop_size=c.gop_size,
                b_frames=c.b_frames,
            ),
        )
    ]


def short_gop_clips(cfg: Config) -> list[str]:
    """The short-GOP clips' paths, written on first use (``n_clips`` files with the same content)."""
    c = cfg.short_gop
    paths = []
    for clip_idx in range(c.n_clips):
        path = Path(cfg.cache_dir) / _clip_name("short_gop", dataclasses.replace(c, n_clips=1), f"_{clip_idx}")
        paths.append(
            _ensure_clip(
                path,
                lambda p: write_barcode_clip(
                    p,
                    fps=c.fps,
                    duration_s=c.duration_s,
                    width=c.width,
                    height=c.height,
                    gop_size=c.gop_size,
                    b_frames=c.b_frames,
                    texture=True,
                    crf=23,
                    preset="veryfast",
                ),
            )
        )
    return paths


def official_indices(n_frames: int, avg_fps: float, sample_fps: float) -> np.ndarray:
    """The official sampling rule: ``round(arange(0, N, avg_fps / fps))`` clipped to ``N - 1``."""
    return np.round(np.arange(0, n_frames, avg_fps / sample_fps)).astype(np.int64).clip(0, n_frames - 1)


def decord_decoded_frames(frame_idx: np.ndarray, key_idx: np.ndarray, n_frames: int) -> int:
    """Frames decord's ``get_batch(frame_idx)`` decodes, inferred from its access pattern.

    Model of decord 0.6 (``VideoReader::GetBatch`` / ``SeekAccurate``): the reader starts
    at frame 0; each new index ``t`` (repeats are copied, not decoded) is reached from
    the current position ``c`` by decoding frames ``c .. t`` when ``t`` is ahead of ``c``
    in the same GOP, otherwise by seeking to ``t``'s keyframe ``k`` and decoding
    ``k .. t``; the position is then ``t + 1``.

    Args:
        frame_idx: Indices passed to ``get_batch`` (presentation order).
        key_idx: Keyframe indices (``VideoReader.get_key_indices()``), ascending.
        n_frames: Frames in the video.

    Returns:
        The inferred number of decoded frames.
    """
    keys = np.asarray(key_idx, dtype=np.int64)
    if len(keys) == 0:
        keys = np.zeros(1, dtype=np.int64)

    def keyframe_of(pos: int) -> int:
        if pos <= keys[0]:
            return 0
        return int(keys[np.searchsorted(keys, min(pos, n_frames - 1), side="right") - 1])

    decoded = 0
    current = 0
    seen: set[int] = set()
    for target in (int(t) for t in frame_idx):
        if target in seen:
            continue
        seen.add(target)
        if target >= current and keyframe_of(target) == keyframe_of(current):
            decoded += target - current + 1
        else:
            decoded += target - keyframe_of(target) + 1
        current = target + 1
    return decoded


def _official(path: str, sample_fps: float) -> tuple[np.ndarray, int]:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0))
    n_frames = len(reader)
    frame_idx = official_indices(n_frames, reader.get_avg_fps(), sample_fps)
    frames = reader.get_batch(frame_idx.tolist()).asnumpy()
    return frames, decord_decoded_frames(frame_idx, np.asarray(reader.get_key_indices()), n_frames)


def _pyav_all(path: str, sample_fps: float) -> tuple[np.ndarray, int]:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        n_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        container.seek(0)
        avg_fps = float(stream.average_rate or stream.guessed_rate)
        keep = set(official_indices(n_frames, avg_fps, sample_fps).tolist())
        stream.thread_type = "AUTO"
        kept: dict[int, np.ndarray] = {}
        n_decoded = 0
        for frame in container.decode(stream):
            if n_decoded in keep:
                kept[n_decoded] = frame.to_ndarray(format="rgb24")
            n_decoded += 1
    frames = np.stack([kept[i] for i in official_indices(n_frames, avg_fps, sample_fps).tolist()])
    return frames, n_decoded


def _project(path: str, sample_fps: float) -> tuple[np.ndarray, int]:
    video, n_decoded = decode_video_counted(path, sample_fps)
    # The default (PyAV) backend always counts; 0 would only show up for the decord backend.
    return video.frames, n_decoded or 0


_PATH_FUNCS = {"project": _project, "official": _official, "pyav_all": _pyav_all}


def run_case(clips: list[str], cfg: Config) -> dict[str, Any]:
    """Time the three paths on ``clips`` (each run decodes every clip) and compare their frames."""
    # Imported before timing so that the first official run does not pay for the import.
    import decord

    def path_fn(name: str) -> Any:
        func = _PATH_FUNCS[name]
        return lambda: [func(clip, cfg.sample_fps) for clip in clips]

    timings = time_paths({name: path_fn(name) for name in PATHS}, repeats=cfg.repeats, warmup=cfg.warmup)
    outputs = {name: timings[name].output for name in PATHS}
    n_sampled = sum(len(frames) for frames, _ in outputs["official"])

    identical = {
        name: all(
            a.shape == b.shape and np.array_equal(a, b)
            for (a, _), (b, _) in zip(outputs[name], outputs["official"])
        )
        for name in ("project", "pyav_all")
    }
    # The barcodes say which source frame each path returned; all must be the official rule's.
    expected_codes, project_codes = [], []
    for clip in clips:
        reader = decord.VideoReader(clip, ctx=decord.cpu(0))
        expected_codes.extend(official_indices(len(reader), reader.get_avg_fps(), cfg.sample_fps).tolist())
    for frames, _ in outputs["project"]:
        project_codes.extend(read_barcode(frame) for frame in frames)

    paths: dict[str, Any] = {}
    for name in PATHS:
        decoded = sum(count for _, count in outputs[name])
        timing = timings[name]
        paths[name] = {
            **timing.to_dict(),
            "frames_per_s": round(n_sampled / timing.median_wall_s, 3),
            "frames_per_cpu_s": round(n_sampled / max(timing.median_cpu_s, 1e-9), 3),
            "decoded_frames": int(decoded),
            "decoded_per_sampled": round(decoded / n_sampled, 3),
            "decoded_count": "inferred from decord's access pattern" if name == "official" else "counted",
        }
    ratio = paths["project"]["frames_per_s"] / paths["official"]["frames_per_s"]
    cpu_ratio = paths["project"]["frames_per_cpu_s"] / paths["official"]["frames_per_cpu_s"]
    return {
        "clips": clips,
        "n_sampled": n_sampled,
        "paths": paths,
        "identical_frames": {"project_vs_official": identical["project"], "pyav_all_vs_official": identical["pyav_all"]},
        "official_rule_frames": project_codes == expected_codes,
        "ratio_project_vs_official": round(ratio, 3),
        "cpu_ratio_project_vs_official": round(cpu_ratio, 3),
        "ratio_pyav_all_vs_official": round(paths["pyav_all"]["frames_per_s"] / paths["official"]["frames_per_s"], 3),
    }


def real_media_dir(cfg: Config) -> Path | None:
    """The folder of the ``real_files`` case, or ``None`` when it is not configured or absent."""
    folder = cfg.real_files.media_dir or os.environ.get(REAL_MEDIA_ENV, "")
    return Path(folder) if folder and Path(folder).is_dir() else None


def run_real_files(cfg: Config) -> dict[str, Any]:
    """Time the project's path against decord's official path on real-world files, file by file.

    Real files carry no barcodes, so the project's frames are compared pixel for pixel with
    what decord decodes at the same frame indices (``decode_video(backend="decord")``,
    untimed). The timed official path samples with the official rule
    (``round(arange(0, N, avg_fps / fps))``), which picks the same frames as the project's
    presentation-time rule only on constant-frame-rate files starting at 0; how many
    sampled indices differ is reported as ``indices_differ_from_official_rule``.

    Returns:
        ``{"media_dir", "files": {name: {...}}, "n_sampled", "paths": {...}, "identical_frames"}``
        or ``{"skipped": reason}`` when the folder is absent.
    """
    folder = real_media_dir(cfg)
    if folder is None:
        return {"skipped": f"no real-media folder (set real_files.media_dir or {REAL_MEDIA_ENV})"}
    import decord  # imported before timing, as in run_case
    files: dict[str, Any] = {}
    for name in cfg.real_files.names:
        path = str(folder / name)
        if not Path(path).is_file():
            files[name] = {"skipped": "not in the folder"}
            continue
        timings = time_paths(
            {
                "project": lambda p=path: _project(p, cfg.sample_fps),
                "official": lambda p=path: _official(p, cfg.sample_fps),
            },
            repeats=cfg.repeats,
            warmup=cfg.warmup,
        )
        ours, theirs = timings["project"].output[0], timings["official"].output[0]
        same_indices = decode_video_counted(path, cfg.sample_fps, backend="decord")[0].frames
        index = probe_video(path)
        project_idx = sample_frame_indices(index.times_s, index.duration_s, cfg.sample_fps)
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
        official_idx = official_indices(len(reader), reader.get_avg_fps(), cfg.sample_fps)
        n_common = min(len(project_idx), len(official_idx))
        entry: dict[str, Any] = {
            "n_sampled": len(ours),
            "identical_frames": ours.shape == same_indices.shape and bool(np.array_equal(ours, same_indices)),
            "identical_to_official_path": ours.shape == theirs.shape and bool(np.array_equal(ours, theirs)),
            "indices_differ_from_official_rule": int((project_idx[:n_common] != official_idx[:n_common]).sum())
            + abs(len(project_idx) - len(official_idx)),
        }
        for label in ("project", "official"):
            timing = timings[label]
            entry[label] = {
                **timing.to_dict(),
                "frames_per_s": round(len(ours) / timing.median_wall_s, 3),
                "decoded_per_sampled": round(timing.output[1] / max(len(ours), 1), 3),
            }
        ratio = entry["project"]["frames_per_s"] / entry["official"]["frames_per_s"]
        entry["ratio_project_vs_official"] = round(ratio, 3)
        files[name] = entry
    timed = [f for f in files.values() if "skipped" not in f]
    if not timed:
        return {"skipped": "none of the real files is in the folder", "files": files}
    n_sampled = sum(f["n_sampled"] for f in timed)
    wall = {label: sum(f[label]["median_wall_s"] for f in timed) for label in ("project", "official")}
    return {
        "media_dir": str(folder),
        "files": files,
        "n_sampled": n_sampled,
        "frames_per_s": {label: round(n_sampled / wall[label], 3) for label in wall},
        "ratio_project_vs_official": round(wall["official"] / wall["project"], 3),
        "identical_frames": all(f["identical_frames"] for f in timed),
    }


def run(cfg: Config) -> dict[str, Any]:
    """Run the configured cases; see the module docstring.

    Returns:
        ``{"cases": {case: ...}, "summary": {...}, "checks": {...}}`` with raw timings of
        every repeat, medians, frames/s, decoded frames per sampled frame and ratios.
    """
    writers = {"long_gop": long_gop_clips, "short_gop": short_gop_clips}
    cases = {case: run_case(writers[case](cfg), cfg) for case in cfg.cases if case != "real_files"}
    summary: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    real = run_real_files(cfg) if "real_files" in cfg.cases else None
    for case, res in cases.items():
        summary[f"{case}_ratio"] = res["ratio_project_vs_official"]
        summary[f"{case}_cpu_ratio"] = res["cpu_ratio_project_vs_official"]
        checks[f"{case}_identical_frames"] = all(res["identical_frames"].values())
        checks[f"{case}_official_rule_frames"] = res["official_rule_frames"]
    if real is not None:
        cases["real_files"] = real
        if "skipped" not in real:
            summary["real_files_ratio"] = real["ratio_project_vs_official"]
            checks["real_files_identical_frames"] = real["identical_frames"]
    if "long_gop" in cases:
        summary["target_ratio"] = cfg.target_ratio
        summary["target_met"] = cases["long_gop"]["ratio_project_vs_official"] >= cfg.target_ratio
    return {"cases": cases, "summary": summary, "checks": checks}


def _rule_note(entry: dict[str, Any]) -> str:
    n_differ = entry["indices_differ_from_official_rule"]
    return f", {n_differ} sampled indices differ from the official rule" if n_differ else ""


def _real_files_text(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return f"real files: skipped ({res['skipped']})"
    rows = []
    for name, f in res["files"].items():
        if "skipped" in f:
            continue
        rows.append(
            f"{name} {f['project']['frames_per_s']:.1f} vs {f['official']['frames_per_s']:.1f} fr/s "
            f"(decoded/sampled {f['project']['decoded_per_sampled']:.1f} vs "
            f"{f['official']['decoded_per_sampled']:.1f}"
            f"{'' if f['identical_frames'] else ', FRAMES DIFFER'}{_rule_note(f)})"
        )
    same = "identical frames" if res["identical_frames"] else "FRAMES DIFFER"
    return (
        f"real files ({res['n_sampled']} sampled): decode_video {res['frames_per_s']['project']:.1f} fr/s vs decord "
        f"official {res['frames_per_s']['official']:.1f} fr/s = **{res['ratio_project_vs_official']:.2f}x**, {same} "
        f"[{'; '.join(rows)}]"
    )


def _case_text(case: str, res: dict[str, Any], cfg: Config) -> str:
    if case == "real_files":
        return _real_files_text(res)
    p = res["paths"]
    if case == "long_gop":
        c = cfg.long_gop
        what = f"long-GOP {c.duration_s:g} s {c.width}x{c.height} {c.fps:g} fps GOP {c.gop_size}"
    else:
        c2 = cfg.short_gop
        what = f"short-GOP {c2.n_clips}x{c2.duration_s:g} s {c2.width}x{c2.height} {c2.fps:g} fps GOP {c2.gop_size}"
    same = "identical frames" if all(res["identical_frames"].values()) else "FRAMES DIFFER"
    return (
        f"{what}: decode_video {p['project']['frames_per_s']:.1f} fr/s vs decord official "
        f"{p['official']['frames_per_s']:.1f} fr/s = **{res['ratio_project_vs_official']:.2f}x** "
        f"(CPU {res['cpu_ratio_project_vs_official']:.2f}x), PyAV decode-all {p['pyav_all']['frames_per_s']:.1f} fr/s; "
        f"decoded/sampled {p['project']['decoded_per_sampled']:.1f} vs {p['official']['decoded_per_sampled']:.1f} "
        f"(inferred) vs {p['pyav_all']['decoded_per_sampled']:.1f}; {same}"
    )


def markdown(result: dict[str, Any], cfg: Config) -> str:
    """One Markdown fragment: per case, frames/s of the three paths, the ratio, decoded per sampled frame."""
    parts = [_case_text(case, res, cfg) for case, res in result["cases"].items()]
    summary = result["summary"]
    target = ""
    if "target_met" in summary:
        target = f" Target ≥{summary['target_ratio']:g}x on long-GOP: {'met' if summary['target_met'] else 'NOT met'}."
    return f"medians of {cfg.repeats} runs; " + "; ".join(parts) + "." + target
