"""The ``serve`` benchmark: the Serve app over loopback HTTP, cold vs cached and batched vs unbatched.

One app (the four deployments of :mod:`d2vlm_ray.serving.app`, one replica each with
``replica_num_cpus`` CPUs) is deployed on a tiny random checkpoint
(:func:`d2vlm_ray.model.checkpoint.init_checkpoint`) and synthetic videos
(:func:`d2vlm_ray.data.synthetic.generate_benchmark`), and is driven over HTTP on
``127.0.0.1`` only. Every request loop is bounded in count and in time
(``phase_budget_s``); every request has a timeout.

Two comparisons, each in the same run:

* **cold vs cache hit**, for ``/v1/ground`` and ``/v1/answer`` (separate videos, one
  request at a time): the first request for a video decodes and encodes it; the
  following ones find its features cached. The response's ``timings_ms`` isolate the
  FrameEncoder's part (``features.*``: hash, cache read and, on a miss, decode, encode,
  cache write); the target is that part being ``target_cache_speedup`` (5x) faster on a
  hit (medians). Client-side latency p50/p95 of both kinds are reported too.
* **batching**: ``/v1/answer`` requests/s with ``concurrency`` clients in flight on
  cached videos, with the Grounder's and Answerer's ``max_batch_size`` set to
  ``max_batch_size`` vs 1 (switched at runtime with their ``reconfigure``; rounds
  alternate). The target is ``target_batch_speedup`` (3x) the requests/s.

Ray is started (``num_cpus=cores``) only if none is running, and then shut down at the
end; the app is always deleted.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ENDPOINTS = ("ground", "answer")
"""The endpoints timed cold and cached."""

QUESTIONS = (
    "when does the red circle move ?",
    "what happens in the video ?",
    "where is the blue square ?",
    "when does the object appear ?",
)
"""Questions the requests cycle through."""


@dataclass
class Config:
    """Config of the ``serve`` benchmark.

    Attributes:
        n_cold: Videos per endpoint: each gets one cold request, then ``n_hit`` cached ones.
        n_hit: Cached requests per video.
        seed: Seed of the synthetic videos and the tiny checkpoint.
        video_fps: Frame rate of the rendered videos.
        video_size: Frame side of the rendered videos in pixels.
        sample_fps: Frames sampled per second (server ``fps``).
        max_frames: Frame cap per video (server ``max_frames``).
        max_grounding_tokens: Grounding token bound of every request.
        max_new_tokens: Answer token bound of every ``/v1/answer`` request. The random
            tiny model never stops early, so every answer has this many tokens. 64 lies
            between the synthetic dense-captioning answers (median 23, at most 44 tokens
            after ``</evi>``) and the official data's 200-word answer limit. Batching amortises the per-step model
            cost, not the per-request HTTP and handle hops (batched, 2 cores level off at
            17-19 req/s whatever the length), so its gain grows with the answer: 2.5x at
            32 tokens, 3.5x at 64 (measured on 2 cores; see ``BENCHMARKS.md``).
        concurrency: Clients in flight during the throughput phase.
        n_throughput_requests: Requests per throughput round.
        throughput_rounds: Rounds per batching mode (modes alternate).
        max_batch_size: The batched mode's ``max_batch_size`` (the other mode uses 1).
        batch_wait_timeout_s: How long the Grounder and Answerer wait to fill a batch.
            With ``concurrency`` equal to ``max_batch_size`` and two batched stages, a
            short wait (0.05 s) splits the clients into two cohorts that alternate between
            the stages (mean batch 3-5); 0.2 s lets the returning cohort join (mean batch
            8). A lone request waits this long, so single-request latency grows by it.
        replica_num_cpus: CPUs of every replica.
        cores: ``num_cpus`` of the Ray instance the benchmark starts when none is running.
        http_timeout_s: Timeout of every HTTP request.
        phase_budget_s: No new request starts in a phase after this many seconds.
        data_dir: Where the synthetic videos are rendered once and reused.
        work_dir: Parent of the run's temporary folder (checkpoint, feature cache).
        target_cache_speedup: Required cold / cached FrameEncoder time.
        target_batch_speedup: Required batched / unbatched requests/s.
    """

    n_cold: int = 6
    n_hit: int = 3
    seed: int = 0
    video_fps: int = 4
    video_size: int = 128
    sample_fps: float = 1.0
    max_frames: int = 16
    max_grounding_tokens: int = 4
    max_new_tokens: int = 64
    concurrency: int = 8
    n_throughput_requests: int = 96
    throughput_rounds: int = 2
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.2
    replica_num_cpus: float = 0.25
    cores: int = 2
    http_timeout_s: float = 60.0
    phase_budget_s: float = 180.0
    data_dir: str = "runs/bench/serve_videos"
    work_dir: str = "runs/bench"
    target_cache_speedup: float = 5.0
    target_batch_speedup: float = 3.0

    def validate(self) -> None:
        """Reject values that cannot be benchmarked (raised as ConfigError by the loader)."""
        for name in (
            "n_cold", "n_hit", "video_fps", "video_size", "max_frames", "max_grounding_tokens", "max_new_tokens",
            "concurrency", "n_throughput_requests", "throughput_rounds", "max_batch_size", "cores",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("sample_fps", "replica_num_cpus", "http_timeout_s", "phase_budget_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be non-negative, got {self.batch_wait_timeout_s}")


# --- helpers ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_videos(cfg: Config) -> list[str]:
    """``2 * n_cold`` synthetic videos in ``cfg.data_dir`` (rendered once), as names relative to ``videos/``."""
    import json

    from d2vlm_ray.data.synthetic import generate_benchmark

    n = 2 * cfg.n_cold
    root = Path(cfg.data_dir).resolve()
    wanted = {"n_videos": n, "seed": cfg.seed, "fps": cfg.video_fps, "size": cfg.video_size}
    stamp = root / "bench_params.json"
    videos = sorted((root / "videos").glob("*.mp4")) if (root / "videos").is_dir() else []
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted and len(videos) == n):
        if root.exists():
            shutil.rmtree(root)
        generate_benchmark(root, n, cfg.seed, fps=cfg.video_fps, size=cfg.video_size, workers=1)
        stamp.write_text(json.dumps(wanted) + "\n")
        videos = sorted((root / "videos").glob("*.mp4"))
    if len(videos) != n:
        raise RuntimeError(f"expected {n} rendered videos under {root}, found {len(videos)}")
    return [v.name for v in videos]


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(arr, 50)), 3), "p95": round(float(np.percentile(arr, 95)), 3),
            "n": len(values)}


def _features_ms(timings: dict[str, float]) -> float:
    """The FrameEncoder's own time: the sum of its ``features.*`` timings."""
    return float(sum(v for k, v in timings.items() if k.startswith("features.")))


class _Client:
    """Loopback HTTP client: one ``requests`` session per thread, every outcome recorded."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._local = threading.local()

    def post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        start = time.perf_counter()
        try:
            response = session.post(f"{self.url}/v1/{endpoint}", json=body, timeout=self.timeout_s)
            status, payload = response.status_code, (response.json() if response.content else {})
        except (requests.RequestException, ValueError) as exc:
            status, payload = 0, {"error": type(exc).__name__}
        latency_ms = (time.perf_counter() - start) * 1000.0
        ok = status == 200
        timings = payload.get("timings_ms", {}) if ok else {}
        cache = (payload.get("cache") if endpoint == "ground" else payload.get("grounding", {}).get("cache")) if ok \
            else None
        return {"status": status, "latency_ms": round(latency_ms, 3), "timings_ms": timings, "cache": cache,
                "error": None if ok else str(payload.get("detail", payload.get("error", "")))[:200]}


def _body(endpoint: str, video: str, idx: int, cfg: Config) -> dict[str, Any]:
    question = QUESTIONS[idx % len(QUESTIONS)]
    options: dict[str, Any] = {"max_grounding_tokens": cfg.max_grounding_tokens}
    if endpoint == "ground":
        return {"video": video, "query": question, "options": options}
    options["max_new_tokens"] = cfg.max_new_tokens
    return {"video": video, "question": question, "options": options}


def _cold_and_hit(client: _Client, endpoint: str, videos: list[str], cfg: Config) -> dict[str, Any]:
    """One cold request per video, then ``n_hit`` rounds over the same videos; sequential."""
    deadline = time.perf_counter() + cfg.phase_budget_s
    cold = [client.post(endpoint, _body(endpoint, v, i, cfg)) for i, v in enumerate(videos)]
    hit: list[dict[str, Any]] = []
    for round_idx in range(cfg.n_hit):
        for i, video in enumerate(videos):
            if time.perf_counter() > deadline:
                break
            hit.append(client.post(endpoint, _body(endpoint, video, i + round_idx + 1, cfg)))

    def stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
        good = [r for r in rows if r["status"] == 200]
        feats = [_features_ms(r["timings_ms"]) for r in good]
        decode_encode = [r["timings_ms"].get("features.decode", 0.0) + r["timings_ms"].get("features.encode", 0.0)
                         for r in good]
        return {
            "latency_ms": _percentiles([r["latency_ms"] for r in good]),
            "features_service_ms": _percentiles(feats),
            "features_roundtrip_ms": _percentiles([r["timings_ms"].get("features", 0.0) for r in good]),
            "decode_encode_ms": _percentiles(decode_encode),
            "requests": rows,
        }

    out = {"cold": stats(cold), "hit": stats(hit)}
    cold_ms, hit_ms = out["cold"]["features_service_ms"]["p50"], out["hit"]["features_service_ms"]["p50"]
    out["features_speedup_p50"] = round(cold_ms / max(hit_ms, 1e-6), 3) if cold_ms and hit_ms else None
    cold_lat, hit_lat = out["cold"]["latency_ms"]["p50"], out["hit"]["latency_ms"]["p50"]
    out["latency_speedup_p50"] = round(cold_lat / hit_lat, 3) if cold_lat and hit_lat else None
    out["cold_all_miss"] = bool(cold) and all(r["cache"] == "miss" for r in cold)
    out["hit_all_hit"] = bool(hit) and all(r["cache"] == "hit" for r in hit)
    out["errors"] = sum(r["status"] != 200 for r in cold + hit)
    return out


def _burst(client: _Client, videos: list[str], cfg: Config) -> dict[str, Any]:
    """``n_throughput_requests`` ``/v1/answer`` requests with ``concurrency`` in flight."""
    deadline = time.perf_counter() + cfg.phase_budget_s

    def one(idx: int) -> dict[str, Any] | None:
        if time.perf_counter() > deadline:
            return None
        return client.post("answer", _body("answer", videos[idx % len(videos)], idx, cfg))

    start = time.perf_counter()
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        rows = [r for r in pool.map(one, range(cfg.n_throughput_requests)) if r is not None]
    wall_s = time.perf_counter() - start
    ok = sum(r["status"] == 200 for r in rows)
    return {
        "wall_s": round(wall_s, 6),
        "requests": len(rows),
        "ok": ok,
        "requests_per_s": round(ok / wall_s, 3),
        "latency_ms": _percentiles([r["latency_ms"] for r in rows if r["status"] == 200]),
        "errors": [r["error"] for r in rows if r["status"] != 200][:5],
    }


# --- run -------------------------------------------------------------------------------


def run(cfg: Config) -> dict[str, Any]:
    """Deploy the app, run the cold/cached and batching phases, delete the app.

    Returns:
        ``{"endpoints": {ground, answer: {cold, hit, ...}}, "throughput": {...}, "summary", "checks"}``
        with every request's latency and server timings.
    """
    import ray
    from ray import serve

    from d2vlm_ray.config import ModelConfig, from_dict
    from d2vlm_ray.model.checkpoint import init_checkpoint
    from d2vlm_ray.pipelines.runtime import ensure_ray
    from d2vlm_ray.serving.app import start_app, stop_app

    names = ensure_videos(cfg)
    videos_dir = str((Path(cfg.data_dir) / "videos").resolve())
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve-", dir=cfg.work_dir)).resolve()
    app_name = f"d2vlm-bench-{work.name}"
    started_ray = deployed = False
    try:
        started_ray = ensure_ray(cfg.cores, log_to_driver=False, dashboard=False)
        ckpt = init_checkpoint(from_dict(ModelConfig, {"preset": "tiny"}), work / "checkpoint", seed=cfg.seed)
        args = {
            "checkpoint_dir": str(ckpt),
            "preset": "tiny",
            "features": {"cache_root": str(work / "feature_cache"), "fps": cfg.sample_fps, "max_frames": cfg.max_frames},
            "media_roots": [videos_dir],
            "allowed_url_schemes": ["file"],
            "max_video_duration_s": 600.0,
            "dtype": "float32",
            "encoder_dtype": "float32",
            "device": "cpu",
            "default_max_new_tokens": cfg.max_new_tokens,
            "max_new_tokens": max(cfg.max_new_tokens, 8),
            "default_max_grounding_tokens": cfg.max_grounding_tokens,
            "max_grounding_tokens": max(cfg.max_grounding_tokens, 4),
            "default_deadline_s": cfg.http_timeout_s,
            "max_deadline_s": max(cfg.http_timeout_s, 120.0),
            "max_inflight_requests": max(32, 2 * cfg.concurrency),
            "max_batch_size": cfg.max_batch_size,
            "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        }
        ongoing = max(16, 2 * cfg.concurrency)
        options = {
            name: {"num_replicas": 1, "max_ongoing_requests": ongoing, "max_queued_requests": 4 * ongoing,
                   "ray_actor_options": {"num_cpus": cfg.replica_num_cpus}}
            for name in ("Ingress", "FrameEncoder", "Grounder", "Answerer")
        }
        url = start_app(args, port=_free_port(), host="127.0.0.1", name=app_name, deployment_options=options)
        deployed = True
        client = _Client(url, cfg.http_timeout_s)
        split = {"ground": names[: cfg.n_cold], "answer": names[cfg.n_cold :]}
        endpoints = {ep: _cold_and_hit(client, ep, split[ep], cfg) for ep in ENDPOINTS}

        handles = {n: serve.get_deployment_handle(n, app_name=app_name) for n in ("Grounder", "Answerer")}
        timeout_s = cfg.http_timeout_s

        def set_batch(size: int) -> None:
            for handle in handles.values():
                handle.reconfigure.remote({"max_batch_size": size}).result(timeout_s=timeout_s)

        def counters() -> dict[str, dict[str, int]]:
            return {n: h.counters.remote().result(timeout_s=timeout_s) for n, h in handles.items()}

        modes = {"batched": cfg.max_batch_size, "unbatched": 1}
        rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        order = list(modes)
        for round_idx in range(cfg.throughput_rounds):
            for mode in order[round_idx % 2:] + order[: round_idx % 2]:
                set_batch(modes[mode])
                before = counters()
                result = _burst(client, names, cfg)
                after = counters()
                for n in handles:
                    reqs = after[n].get("requests", 0) - before[n].get("requests", 0)
                    batches = after[n].get("batches", 0) - before[n].get("batches", 0)
                    result[f"{n.lower()}_mean_batch_size"] = round(reqs / batches, 3) if batches else None
                rounds[mode].append(result)
        set_batch(cfg.max_batch_size)
        final_counters = counters()
    finally:
        if deployed:
            stop_app(app_name)
        if started_ray:
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    rps = {m: float(np.median([r["requests_per_s"] for r in rounds[m]])) for m in modes}
    batch_speedup = rps["batched"] / rps["unbatched"] if rps["unbatched"] else 0.0
    throughput = {
        "concurrency": cfg.concurrency,
        "rounds": rounds,
        "median_requests_per_s": {m: round(v, 3) for m, v in rps.items()},
        "batch_speedup": round(batch_speedup, 3),
        "counters_end": final_counters,
    }
    cache_speedups = {ep: endpoints[ep]["features_speedup_p50"] for ep in ENDPOINTS}
    errors = sum(endpoints[ep]["errors"] for ep in ENDPOINTS) + sum(
        r["requests"] - r["ok"] for m in modes for r in rounds[m]
    )
    summary: dict[str, Any] = {
        **{f"{ep}_features_speedup": cache_speedups[ep] for ep in ENDPOINTS},
        **{f"{ep}_latency_p50_cold_ms": endpoints[ep]["cold"]["latency_ms"]["p50"] for ep in ENDPOINTS},
        **{f"{ep}_latency_p50_hit_ms": endpoints[ep]["hit"]["latency_ms"]["p50"] for ep in ENDPOINTS},
        "batched_requests_per_s": round(rps["batched"], 3),
        "unbatched_requests_per_s": round(rps["unbatched"], 3),
        "batch_speedup": round(batch_speedup, 3),
        "target_cache_speedup": cfg.target_cache_speedup,
        "target_batch_speedup": cfg.target_batch_speedup,
    }
    checks = {
        "all_requests_ok": errors == 0,
        "cold_requests_missed_cache": all(endpoints[ep]["cold_all_miss"] for ep in ENDPOINTS),
        "repeated_requests_hit_cache": all(endpoints[ep]["hit_all_hit"] for ep in ENDPOINTS),
        **{
            f"{ep}_cache_speedup_target": bool(cache_speedups[ep] and cache_speedups[ep] >= cfg.target_cache_speedup)
            for ep in ENDPOINTS
        },
        "batching_speedup_target": batch_speedup >= cfg.target_batch_speedup,
    }
    return {
        "videos": {"ground": split["ground"], "answer": split["answer"]},
        "ray_started_by_benchmark": started_ray,
        "endpoints": endpoints,
        "throughput": throughput,
        "summary": summary,
        "checks": checks,
    }


def _mean_batch(rounds: list[dict[str, Any]]) -> str:
    """The Answerer's mean batch size over ``rounds``, as text."""
    sizes = [r["answerer_mean_batch_size"] for r in rounds if r.get("answerer_mean_batch_size")]
    return f"{np.mean(sizes):.1f}" if sizes else "n/a"


def markdown(result: dict[str, Any], cfg: Config) -> str:
    """One Markdown fragment: cold vs cached per endpoint, batched vs unbatched requests/s."""
    parts = [
        f"tiny model, {cfg.max_frames}-frame cap, {cfg.replica_num_cpus:g} CPU per replica, loopback HTTP"
    ]
    for ep in ENDPOINTS:
        e = result["endpoints"][ep]
        parts.append(
            f"/v1/{ep} cold p50/p95 {e['cold']['latency_ms']['p50']}/{e['cold']['latency_ms']['p95']} ms vs cached "
            f"{e['hit']['latency_ms']['p50']}/{e['hit']['latency_ms']['p95']} ms; FrameEncoder part "
            f"{e['cold']['features_service_ms']['p50']} vs {e['hit']['features_service_ms']['p50']} ms = "
            f"**{e['features_speedup_p50']}x**"
        )
    t = result["throughput"]
    parts.append(
        f"/v1/answer ({cfg.max_new_tokens} answer tokens) at concurrency {t['concurrency']}: "
        f"max_batch_size {cfg.max_batch_size} (wait {cfg.batch_wait_timeout_s:g} s, mean batch "
        f"{_mean_batch(t['rounds']['batched'])}) "
        f"{t['median_requests_per_s']['batched']:.2f} req/s vs 1 {t['median_requests_per_s']['unbatched']:.2f} req/s "
        f"= **{t['batch_speedup']:.2f}x** (medians of {cfg.throughput_rounds} rounds of {cfg.n_throughput_requests})"
    )
    c = result["checks"]
    cache_met = c["ground_cache_speedup_target"] and c["answer_cache_speedup_target"]
    targets = (
        f" Targets: cache hit ≥{cfg.target_cache_speedup:g}x {'met' if cache_met else 'NOT met'}, "
        f"batching ≥{cfg.target_batch_speedup:g}x {'met' if c['batching_speedup_target'] else 'NOT met'}."
    )
    bad = [name for name in ("all_requests_ok", "cold_requests_missed_cache", "repeated_requests_hit_cache")
           if not c[name]]
    return "; ".join(parts) + "." + targets + (f" FAILED: {', '.join(bad)}." if bad else "")
