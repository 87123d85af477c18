"""Drivers start or join Ray in one place, so ``ray job submit`` works for every job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


class _FakeRay:
    """Stands in for the ``ray`` module: records ``init`` calls, never starts anything."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def is_initialized(self) -> bool:
        return bool(self.calls)

    def init(self, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(kwargs)
        return SimpleNamespace(dashboard_url="" if kwargs.get("include_dashboard") is False else "127.0.0.1:8265")


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> _FakeRay:
    import ray

    fake = _FakeRay()
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(ray, "init", fake.init)
    return fake


def test_only_runtime_calls_ray_init() -> None:
    """A driver that calls ``ray.init`` itself fails under ``ray job submit`` once it passes resources."""
    pattern = re.compile(r"\bray\.init\(")
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("d2vlm_ray", "jobs")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "runtime.py" and pattern.search(path.read_text())
    ]
    assert offenders == []


def test_ensure_ray_joins_a_submitted_cluster_without_resources(
    fake_ray: _FakeRay, monkeypatch: pytest.MonkeyPatch
) -> None:
    from d2vlm_ray.pipelines.runtime import ensure_ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert ensure_ray(2, env={"RAY_AUTH_MODE": "disabled"}) is True
    assert fake_ray.calls == [{"log_to_driver": True}]
    assert ensure_ray(2) is False  # already initialised: nothing more


def test_ensure_ray_starts_locally_with_cpus_and_env_defaults(
    fake_ray: _FakeRay, monkeypatch: pytest.MonkeyPatch
) -> None:
    from d2vlm_ray.pipelines.runtime import ensure_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("D2VLM_TEST_ONLY", raising=False)
    monkeypatch.setenv("D2VLM_TEST_SET", "kept")
    ensure_ray(3, log_to_driver=False, env={"D2VLM_TEST_ONLY": "1", "D2VLM_TEST_SET": "overridden"})
    assert fake_ray.calls == [
        {"num_cpus": 3, "include_dashboard": None, "dashboard_host": "127.0.0.1", "log_to_driver": False}
    ]
    assert os.environ["D2VLM_TEST_ONLY"] == "1"
    assert os.environ["D2VLM_TEST_SET"] == "kept"


def test_synth_pairs_job_under_ray_job_submit(
    fake_ray: _FakeRay, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``jobs.synth_pairs`` used to pass ``num_cpus`` to a cluster it joined, which Ray refuses."""
    import jobs.synth_pairs as job

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setattr(job, "synthesize_pairs", lambda cfg: {"pairs": 0})
    config = ROOT / "jobs" / "configs" / "synth_pairs_tiny.yaml"
    assert job.main(["--config", str(config), f"out_dir={tmp_path / 'pairs'}"]) == 0
    assert fake_ray.calls == [{"log_to_driver": True}]


_STATE_PROBE = """
import sys
import ray
from d2vlm_ray.pipelines.runtime import ensure_ray

ensure_ray(1, dashboard=sys.argv[1] == "on")


@ray.remote(num_cpus=0)
class Probe:
    def state_of(self, actor_id):
        # What Ray Train's placement-group cleaner asks, from inside the cluster, every second.
        from ray.util.state import get_actor

        import time

        # The GCS may publish the actor's state a moment after it is ready on a loaded machine.
        deadline = time.time() + 30
        while True:
            try:
                state = get_actor(actor_id, address=ray.get_runtime_context().gcs_address, timeout=20).state
            except Exception as exc:
                return type(exc).__name__
            if state == "ALIVE" or time.time() > deadline:
                return state
            time.sleep(0.5)


first, second = Probe.remote(), Probe.remote()
ray.get(first.__ray_ready__.remote())  # alive before it is asked about, not still being created
print("STATE", ray.get(second.state_of.remote(first._actor_id.hex())))
"""


@pytest.mark.parametrize(("dashboard", "answer"), [("on", "ALIVE"), ("off", "ServerUnavailable")])
def test_a_local_ray_serves_the_state_api_ray_train_polls(dashboard: str, answer: str, tmp_path: Path) -> None:
    """Without the dashboard the state API is down: Ray Train's cleaner then warned once a second."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, "-c", _STATE_PROBE, dashboard],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert f"STATE {answer}" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_a_dashboard_that_did_not_start_is_a_warning_not_a_failure(
    fake_ray: _FakeRay, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from d2vlm_ray.pipelines.runtime import ensure_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # What ray.init returns when its dashboard failed to start under include_dashboard=None.
    import ray

    monkeypatch.setattr(ray, "init", lambda **kw: fake_ray.calls.append(kw) or SimpleNamespace(dashboard_url=""))
    with caplog.at_level("WARNING", logger="d2vlm_ray.pipelines.runtime"):
        assert ensure_ray(2) is True
    assert "the Ray dashboard did not start" in caplog.text
    caplog.clear()
    fake_ray.calls.clear()
    with caplog.at_level("WARNING", logger="d2vlm_ray.pipelines.runtime"):
        ensure_ray(2, dashboard=False)
    assert caplog.text == "", "a dashboard that was not asked for is no warning"
