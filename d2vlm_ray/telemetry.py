"""Custom metrics for the Ray dashboard (metrics view / Prometheus export).

Pipelines, training workers and Serve replicas call these helpers after the plain-Python
work they wrap; the core packages never do (they do not import Ray). Outside a Ray
worker or driver the helpers are no-ops, so the same code runs in unit tests and offline.

Every metric name starts with ``d2vlm_``; Ray's exporter prefixes ``ray_`` and appends
``_total`` to counters, so ``frames_decoded`` is scraped as ``ray_d2vlm_frames_decoded_total``.
"""

from __future__ import annotations

import threading
from typing import Any

_LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
_SPAN_BOUNDARIES = [0.5, 1.5, 2.5, 3.5, 5.5, 8.5, 16.5]
_LOSS_BOUNDARIES = [0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32]
_lock = threading.Lock()
_metrics: dict[str, Any] = {}


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _get(kind: str, name: str, description: str, tag_keys: tuple[str, ...] = (), **kwargs: Any) -> Any | None:
    """Create a metric once per process (Ray metrics are process-local objects)."""
    if not _ray_ready():
        return None
    with _lock:
        metric = _metrics.get(name)
        if metric is None:
            from ray.util import metrics

            cls = {"counter": metrics.Counter, "gauge": metrics.Gauge, "histogram": metrics.Histogram}[kind]
            metric = cls(name, description=description, tag_keys=tag_keys, **kwargs)
            _metrics[name] = metric
        return metric


def frames_decoded(count: int, stage: str) -> None:
    """Count frames decoded from video files (not cache hits)."""
    metric = _get("counter", "d2vlm_frames_decoded", "Video frames decoded", ("stage",))
    if metric is not None and count > 0:
        metric.inc(count, tags={"stage": stage})


def decode_failure(reason: str, stage: str) -> None:
    """Count a video that failed to decode, by ``VideoDecodeError`` reason."""
    metric = _get("counter", "d2vlm_decode_failures", "Videos that failed to decode", ("reason", "stage"))
    if metric is not None:
        metric.inc(1, tags={"reason": reason, "stage": stage})


def cache_lookup(hit: bool, nbytes: int, stage: str) -> None:
    """Count a feature-cache lookup and the bytes it read (hit) or wrote (miss)."""
    lookups = _get("counter", "d2vlm_cache_lookups", "Feature-cache lookups", ("result", "stage"))
    volume = _get("counter", "d2vlm_cache_bytes", "Feature-cache bytes read or written", ("direction", "stage"))
    if lookups is None or volume is None:
        return
    lookups.inc(1, tags={"result": "hit" if hit else "miss", "stage": stage})
    if nbytes > 0:
        volume.inc(nbytes, tags={"direction": "read" if hit else "write", "stage": stage})


def cache_written(nbytes: int, stage: str) -> None:
    """Count the bytes of a cache entry written after a miss (the miss itself is a lookup)."""
    volume = _get("counter", "d2vlm_cache_bytes", "Feature-cache bytes read or written", ("direction", "stage"))
    if volume is not None and nbytes > 0:
        volume.inc(nbytes, tags={"direction": "write", "stage": stage})


def latency_ms(stage: str, value_ms: float) -> None:
    """Observe a latency (grounding, answering, decode+encode) in milliseconds."""
    metric = _get(
        "histogram", "d2vlm_latency_ms", "Stage latency in milliseconds", ("stage",), boundaries=_LATENCY_BOUNDARIES_MS
    )
    if metric is not None:
        metric.observe(float(value_ms), tags={"stage": stage})


def evidence_spans(count: int, stage: str) -> None:
    """Observe how many evidence spans one answer carried."""
    metric = _get(
        "histogram", "d2vlm_evidence_spans", "Evidence spans per answer", ("stage",), boundaries=_SPAN_BOUNDARIES
    )
    if metric is not None:
        metric.observe(float(count), tags={"stage": stage})


def train_step(samples_per_s: float, loss: float, phase: str) -> None:
    """Set the latest training throughput and loss gauges (live, while a worker trains).

    Ray exports a gauge only until its process exits, so :func:`train_history` keeps the
    record of a finished run.
    """
    rate = _get("gauge", "d2vlm_train_samples_per_s", "Training samples per second", ("phase",))
    loss_gauge = _get("gauge", "d2vlm_train_loss", "Training loss (last step)", ("phase",))
    if rate is None or loss_gauge is None:
        return
    rate.set(float(samples_per_s), tags={"phase": phase})
    loss_gauge.set(float(loss), tags={"phase": phase})


def train_history(samples: int, losses: list[float], phase: str) -> None:
    """Record a finished run from its driver: samples trained (counter) and per-step losses."""
    count = _get("counter", "d2vlm_train_samples", "Training samples consumed", ("phase",))
    hist = _get("histogram", "d2vlm_train_step_loss", "Training loss per step", ("phase",), boundaries=_LOSS_BOUNDARIES)
    if count is None or hist is None:
        return
    if samples > 0:
        count.inc(samples, tags={"phase": phase})
    for loss in losses:
        hist.observe(float(loss), tags={"phase": phase})
