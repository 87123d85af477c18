"""The ``pipeline`` benchmark: the Ray Data cache builder vs the best single-process loop on 2 cores.

Every path turns the same synthetic videos into feature-cache entries (hash, look up,
decode at ``sample_fps``, encode with a random frozen frame encoder, write), starting
from a fresh, empty cache root on every run, and is timed end to end (loading the encoder and
starting workers included: that is what a user waits for):

* ``ray``: :func:`d2vlm_ray.pipelines.build_cache.build_cache` on a running Ray
  instance. By default it looks up and decodes inside two 1-CPU encoder actors
  (``decode_in_encoder``), the layout for CPU-only machines; ``decode_in_encoder=false``
  measures the split layout instead (``decode_tasks`` decode tasks of
  ``decode_num_cpus`` each feeding the encoder actors).
* ``loop``: one process, a plain loop over
  :func:`d2vlm_ray.cache.features_for_video` with torch using ``cores`` threads.
* ``pool``: a ``multiprocessing`` pool (spawn) of ``cores`` processes, one torch thread
  each, every process loading the encoder once.

The baseline is the faster of ``loop`` and ``pool``; the target is Ray keeping at least
``target_ratio`` (0.9) of its videos/s. After the timed runs, ``build_cache`` runs again
on the last Ray cache root: its summary must show that it decoded nothing (every video a
hit); its time is reported.

The videos come from :func:`d2vlm_ray.data.synthetic.generate_benchmark`, rendered once
into ``data_dir`` (reused while ``meta.json`` says the same videos); checkpoint and
caches go to a temporary folder under ``work_dir`` that is removed at the end.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2vlm_ray.bench.common import time_paths

ENCODERS: dict[str, dict[str, Any]] = {
    # The quickstart's encoder: one 48-wide token per 56 px frame. Encoding costs almost
    # nothing, so the figure is dominated by Ray's fixed costs (worker and actor start).
    "tiny": {},
    # A ViT-S/16 (22 M parameters, 196 patches of 224 px frames): per-frame work of the
    # order a real frame encoder costs on CPU.
    "vit-s16": {
        "image_size": 224,
        "patch_size": 16,
        "hidden_size": 384,
        "num_layers": 12,
        "num_heads": 6,
        "intermediate_size": 1536,
    },
}
"""Frame encoders the benchmark can use (overrides of the tiny preset's ``vision``)."""

PATHS = ("ray", "loop", "pool")
"""The compared paths, in report order."""

BASELINES = ("loop", "pool")
"""The single-process-style paths the best of which Ray is compared with."""


@dataclass
class Config:
    """Config of the ``pipeline`` benchmark.

    Attributes:
        n_videos: Synthetic videos to process per run.
        seed: Seed of the synthetic benchmark (and of the tiny checkpoint).
        video_fps: Frame rate of the rendered videos.
        video_size: Frame side of the rendered videos in pixels.
        sample_fps: Frames sampled per second of video.
        max_frames: Frame cap per video (0 = none).
        cores: CPU cores every path may use (Ray's ``num_cpus`` when the benchmark starts Ray,
            torch threads of ``loop``, processes of ``pool``).
        repeats: Timed runs of every path (medians are reported).
        warmup: Untimed runs of every path first (0 by default: the first Ray run's worker
            start-up is part of what a job pays).
        data_dir: Where the synthetic videos are rendered once and reused.
        work_dir: Parent of the run's temporary folder (checkpoint, cache roots).
        decode_in_encoder: Look up and decode inside the Ray encoder actors (one stage).
        decode_tasks: Ray decode tasks (split layout only).
        decode_num_cpus: CPUs per Ray decode task (split layout only).
        encode_actors: Ray encoder actors.
        encode_num_cpus: CPUs per Ray encoder actor.
        target_ratio: Required Ray videos/s over the best baseline's.
        encoder: Frame encoder, a key of :data:`ENCODERS`. ``vit-s16`` by default: with
            ``tiny`` the 40 videos take a few seconds in any path, so the ratio measures
            Ray's start-up (worker and actor start, imports) rather than throughput.
    """

    n_videos: int = 40
    seed: int = 0
    video_fps: int = 4
    video_size: int = 128
    sample_fps: float = 1.0
    max_frames: int = 0
    cores: int = 2
    repeats: int = 2
    warmup: int = 0
    data_dir: str = "runs/bench/pipeline_videos"
    work_dir: str = "runs/bench"
    decode_in_encoder: bool = True
    decode_tasks: int = 1
    decode_num_cpus: float = 0.5
    encode_actors: int = 2
    encode_num_cpus: float = 1.0
    target_ratio: float = 0.9
    encoder: str = "vit-s16"

    def validate(self) -> None:
        """Reject values that cannot be benchmarked (raised as ConfigError by the loader)."""
        for name in ("n_videos", "cores", "repeats", "decode_tasks", "encode_actors", "video_fps", "video_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "max_frames", "decode_num_cpus", "encode_num_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.sample_fps <= 0:
            raise ValueError(f"sample_fps must be positive, got {self.sample_fps}")
        if self.target_ratio <= 0:
            raise ValueError(f"target_ratio must be positive, got {self.target_ratio}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {self.encoder!r}")


# --- inputs ----------------------------------------------------------------------------


def ensure_videos(cfg: Config) -> list[str]:
    """Render the synthetic videos into ``cfg.data_dir`` unless the same ones are there; absolute paths."""
    from d2vlm_ray.data.synthetic import generate_benchmark

    root = Path(cfg.data_dir).resolve()
    wanted = {"n_videos": cfg.n_videos, "seed": cfg.seed, "fps": cfg.video_fps, "size": cfg.video_size}
    stamp = root / "bench_params.json"
    videos = sorted((root / "videos").glob("*.mp4")) if (root / "videos").is_dir() else []
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted and len(videos) == cfg.n_videos):
        if root.exists():
            shutil.rmtree(root)
        generate_benchmark(root, cfg.n_videos, cfg.seed, fps=cfg.video_fps, size=cfg.video_size, workers=1)
        stamp.write_text(json.dumps(wanted) + "\n")
        videos = sorted((root / "videos").glob("*.mp4"))
    if len(videos) != cfg.n_videos:
        raise RuntimeError(f"expected {cfg.n_videos} rendered videos under {root}, found {len(videos)}")
    return [str(v) for v in videos]


# --- single-process paths --------------------------------------------------------------


def _loop(videos: list[str], ckpt: str, cache_root: str, cfg: Config) -> dict[str, int]:
    """Encoder loaded here, then decode + encode + write one video after the other."""
    import torch

    from d2vlm_ray.cache import FeatureCache, features_for_video
    from d2vlm_ray.model.checkpoint import load_frame_encoder

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cores)
    try:
        encoder = load_frame_encoder(ckpt)
        cache = FeatureCache(cache_root, memory_bytes=0)
        frames = hits = 0
        for source in videos:
            feats, hit = features_for_video(
                cache, encoder, source, fps=cfg.sample_fps, max_frames=cfg.max_frames or None
            )
            frames += feats.num_frames
            hits += int(hit)
    finally:
        torch.set_num_threads(threads)
    return {"videos": len(videos), "frames": frames, "hits": hits}


_WORKER: dict[str, Any] = {}


def _pool_init(ckpt: str, cache_root: str) -> None:
    import torch

    from d2vlm_ray.cache import FeatureCache
    from d2vlm_ray.model.checkpoint import load_frame_encoder

    # One thread per process: the processes, not the threads, use the cores.
    torch.set_num_threads(1)
    _WORKER["encoder"] = load_frame_encoder(ckpt)
    _WORKER["cache"] = FeatureCache(cache_root, memory_bytes=0)


def _pool_video(source: str, sample_fps: float, max_frames: int) -> tuple[int, bool]:
    from d2vlm_ray.cache import features_for_video

    feats, hit = features_for_video(
        _WORKER["cache"], _WORKER["encoder"], source, fps=sample_fps, max_frames=max_frames or None
    )
    return feats.num_frames, hit


def _pool(videos: list[str], ckpt: str, cache_root: str, cfg: Config) -> dict[str, int]:
    """A spawned pool of ``cfg.cores`` processes (their start and encoder load are timed too)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(cfg.cores, initializer=_pool_init, initargs=(ckpt, cache_root)) as pool:
        out = pool.starmap(_pool_video, [(v, cfg.sample_fps, cfg.max_frames) for v in videos], chunksize=1)
    return {"videos": len(videos), "frames": sum(n for n, _ in out), "hits": sum(int(h) for _, h in out)}


# --- Ray path --------------------------------------------------------------------------


def _build_cfg(manifest: Path, ckpt: str, cache_root: str, run_dir: Path, cfg: Config) -> Any:
    from d2vlm_ray.cache import FeatureSpec
    from d2vlm_ray.pipelines.build_cache import BuildCacheConfig

    return BuildCacheConfig(
        manifest=str(manifest),
        manifest_format="list",
        checkpoint=ckpt,
        run_dir=str(run_dir),
        features=FeatureSpec(fps=cfg.sample_fps, max_frames=cfg.max_frames, cache_root=cache_root),
        num_cpus=cfg.cores,
        decode_tasks=cfg.decode_tasks,
        decode_num_cpus=cfg.decode_num_cpus,
        encode_actors=cfg.encode_actors,
        encode_num_cpus=cfg.encode_num_cpus,
        decode_in_encoder=cfg.decode_in_encoder,
        seed=cfg.seed,
    )


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def run(cfg: Config) -> dict[str, Any]:
    """Time the three paths, then the cache-hit rerun; see the module docstring.

    Starts Ray (``num_cpus=cfg.cores``) only if none is running, and shuts it down at the
    end only then.

    Returns:
        ``{"videos", "frames", "paths", "baseline", "ratio_ray_vs_best", "rerun", "summary", "checks", ...}``
        with the wall and CPU seconds of every repeat.
    """
    import ray

    from d2vlm_ray.config import ModelConfig, from_dict
    from d2vlm_ray.model.checkpoint import init_checkpoint
    from d2vlm_ray.pipelines.build_cache import build_cache
    from d2vlm_ray.pipelines.runtime import ensure_ray

    videos = ensure_videos(cfg)
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pipeline-", dir=cfg.work_dir)).resolve()
    started_ray = False
    try:
        started_ray = ensure_ray(cfg.cores, log_to_driver=False, dashboard=False)
        model_cfg = from_dict(ModelConfig, {"preset": "tiny", "vision": ENCODERS[cfg.encoder]})
        ckpt = str(init_checkpoint(model_cfg, work / "checkpoint", seed=cfg.seed))
        manifest = work / "videos.txt"
        manifest.write_text("\n".join(videos) + "\n")
        counter = {"n": 0}
        ray_summaries: list[dict[str, Any]] = []
        last: dict[str, Any] = {}

        def fresh(name: str) -> str:
            counter["n"] += 1
            return str(work / f"cache_{name}_{counter['n']}")

        def ray_path() -> dict[str, Any]:
            root = fresh("ray")
            summary = build_cache(_build_cfg(manifest, ckpt, root, work / f"run_{counter['n']}", cfg))
            ray_summaries.append(summary)
            last.update(root=root, run_dir=str(work / f"run_{counter['n']}"))
            return {"videos": summary["videos"], "frames": summary["frames"], "hits": summary["hits"],
                    "decoded": summary["decoded"], "failed": summary["failed"]}

        timings = time_paths(
            {
                "ray": ray_path,
                "loop": lambda: _loop(videos, ckpt, fresh("loop"), cfg),
                "pool": lambda: _pool(videos, ckpt, fresh("pool"), cfg),
            },
            repeats=cfg.repeats,
            warmup=cfg.warmup,
        )

        rerun_start = time.perf_counter()
        rerun = build_cache(_build_cfg(manifest, ckpt, last["root"], Path(last["run_dir"] + "_rerun"), cfg))
        rerun_wall_s = time.perf_counter() - rerun_start
    finally:
        if started_ray:
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    n_videos = len(videos)
    frames = timings["loop"].output["frames"]
    paths: dict[str, Any] = {}
    for name in PATHS:
        t = timings[name]
        paths[name] = {
            **t.to_dict(),
            "videos_per_s": round(n_videos / t.median_wall_s, 3),
            "frames_per_s": round(t.output["frames"] / t.median_wall_s, 3),
            "output": t.output,
        }
    # Ray's own stage times (driver CPU time above excludes its workers).
    timed_summaries = ray_summaries[cfg.warmup:]
    paths["ray"]["stage_seconds"] = [s["stage_seconds"] for s in timed_summaries]
    paths["ray"]["worker_decode_s"] = [s["decode_s"] for s in timed_summaries]
    paths["ray"]["worker_encode_s"] = [s["encode_s"] for s in timed_summaries]
    paths["ray"]["median_build_cache_s"] = round(_median([s["seconds"] for s in timed_summaries]), 6)
    # Same videos on every path: the videos/s ratio is the inverse ratio of the median wall times.
    baseline = min(BASELINES, key=lambda name: timings[name].median_wall_s)
    ratio = timings[baseline].median_wall_s / timings["ray"].median_wall_s
    same_output = all(
        timings[name].output["frames"] == frames and timings[name].output["hits"] == 0 for name in PATHS
    ) and timings["ray"].output["failed"] == 0
    rerun_no_decode = rerun["decoded"] == 0 and rerun["computed"] == 0 and rerun["hits"] == n_videos
    rerun_info = {
        "wall_s": round(rerun_wall_s, 6),
        "summary_seconds": rerun["seconds"],
        "stage_seconds": rerun["stage_seconds"],
        "hits": rerun["hits"],
        "decoded": rerun["decoded"],
        "computed": rerun["computed"],
        "failed": rerun["failed"],
        "speedup_vs_cold_ray": round(paths["ray"]["median_wall_s"] / max(rerun_wall_s, 1e-9), 3),
    }
    summary = {
        "ray_videos_per_s": paths["ray"]["videos_per_s"],
        "ray_frames_per_s": paths["ray"]["frames_per_s"],
        "baseline": baseline,
        "baseline_videos_per_s": paths[baseline]["videos_per_s"],
        "baseline_frames_per_s": paths[baseline]["frames_per_s"],
        "ratio_ray_vs_best": round(ratio, 3),
        "rerun_wall_s": rerun_info["wall_s"],
        "target_ratio": cfg.target_ratio,
        "target_met": ratio >= cfg.target_ratio,
    }
    checks = {
        "same_frames_all_paths": bool(same_output),
        "rerun_decodes_nothing": bool(rerun_no_decode),
        "ray_throughput_target": bool(ratio >= cfg.target_ratio),
    }
    return {
        "videos": n_videos,
        "frames": frames,
        "cores": cfg.cores,
        "ray_started_by_benchmark": started_ray,
        "cpu_count": os.cpu_count(),
        "paths": paths,
        "baseline": baseline,
        "ratio_ray_vs_best": round(ratio, 3),
        "ratio_ray_vs_loop": round(timings["loop"].median_wall_s / timings["ray"].median_wall_s, 3),
        "ratio_ray_vs_pool": round(timings["pool"].median_wall_s / timings["ray"].median_wall_s, 3),
        "rerun": rerun_info,
        "summary": summary,
        "checks": checks,
    }


def markdown(result: dict[str, Any], cfg: Config) -> str:
    """One Markdown fragment: videos/s and frames/s of every path, the ratio, the rerun."""
    p = result["paths"]
    s = result["summary"]
    rerun = result["rerun"]
    encode = f"{cfg.encode_actors}x{cfg.encode_num_cpus:g}-CPU encode"
    ray_cfg = (
        f"look-up + decode in {encode} actors" if cfg.decode_in_encoder
        else f"{cfg.decode_tasks}x{cfg.decode_num_cpus:g}-CPU decode, {encode}"
    )
    parts = [
        f"medians of {cfg.repeats} runs, {result['videos']} synthetic videos ({result['frames']} frames at "
        f"{cfg.sample_fps:g} fps, {cfg.encoder} encoder), {cfg.cores} cores",
        f"Ray Data build_cache ({ray_cfg}) {p['ray']['videos_per_s']:.2f} videos/s "
        f"({p['ray']['frames_per_s']:.1f} fr/s)",
        f"loop ({cfg.cores} torch threads) {p['loop']['videos_per_s']:.2f} videos/s "
        f"({p['loop']['frames_per_s']:.1f} fr/s)",
        f"{cfg.cores}-process pool {p['pool']['videos_per_s']:.2f} videos/s ({p['pool']['frames_per_s']:.1f} fr/s)",
        f"Ray / best ({s['baseline']}) = **{s['ratio_ray_vs_best']:.2f}x**",
        f"cache-hit rerun {rerun['wall_s']:.2f} s, decoded {rerun['decoded']} "
        f"({'no decoding' if result['checks']['rerun_decodes_nothing'] else 'DECODED AGAIN'})",
    ]
    target = f" Target ≥{s['target_ratio']:g}x of the best single-process throughput: " + (
        "met." if s["target_met"] else "NOT met."
    )
    same = "" if result["checks"]["same_frames_all_paths"] else " FRAME COUNTS DIFFER."
    return "; ".join(parts) + "." + target + same
