"""Custom metrics reach the node's Prometheus endpoint (what the dashboard reads)."""

from __future__ import annotations

import time

import pytest

from d2vlm_ray import telemetry


def test_helpers_are_noops_without_ray(monkeypatch) -> None:
    monkeypatch.setattr(telemetry, "_ray_ready", lambda: False)
    monkeypatch.setattr(telemetry, "_metrics", {})
    telemetry.frames_decoded(3, "test")
    telemetry.latency_ms("test", 12.0)
    assert telemetry._get("counter", "d2vlm_frames_decoded", "x") is None
    assert telemetry._metrics == {}, "no Ray metric may be created outside Ray"


def _exported(text: str, name: str) -> bool:
    """Whether ``text`` has a sample of ``name`` tagged by this test's stage/phase."""
    return any(
        line.startswith(name + "{") and ('stage="unit"' in line or 'phase="unit"' in line) for line in text.splitlines()
    )


@pytest.mark.timeout(120)
def test_metrics_are_exported(ray_cluster: None, ray_metrics_port: int) -> None:
    import ray
    import requests

    @ray.remote(num_cpus=0.1)
    def work() -> None:
        telemetry.frames_decoded(7, "unit")
        telemetry.decode_failure("corrupt", "unit")
        telemetry.cache_lookup(True, 1024, "unit")
        telemetry.latency_ms("unit", 42.0)
        telemetry.evidence_spans(2, "unit")
        telemetry.train_step(3.5, 1.25, "unit")

    ray.get(work.remote())
    wanted = {
        "ray_d2vlm_frames_decoded_total",
        "ray_d2vlm_decode_failures_total",
        "ray_d2vlm_cache_lookups_total",
        "ray_d2vlm_cache_bytes_total",
        "ray_d2vlm_latency_ms_bucket",
        "ray_d2vlm_evidence_spans_bucket",
        "ray_d2vlm_train_samples_per_s",
        "ray_d2vlm_train_loss",
    }
    found: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and found != wanted:
        try:
            text = requests.get(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=5).text
        except requests.RequestException:
            text = ""
        found = {name for name in wanted if _exported(text, name)}
        time.sleep(1)
    assert found == wanted, sorted(wanted - found)
    frames = [line for line in text.splitlines() if line.startswith("ray_d2vlm_frames_decoded_total{") and 'stage="unit"' in line]
    assert frames and float(frames[0].rsplit(" ", 1)[1]) >= 7
