"""Shared pytest fixtures.

One Ray cluster per pytest session (starting Ray costs 5-9 s here); tests that need it
take the ``ray_cluster`` fixture, the rest never import Ray.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Quiet, loopback-only, CPU-only defaults for every Ray and DeepSpeed use in tests.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Export custom metrics every second instead of every 10 s, so metric tests finish quickly.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


METRICS_PORT = _free_port()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local 2-CPU Ray cluster shared by every test of the session.

    Its Prometheus metrics are exported on ``METRICS_PORT`` (see ``ray_metrics_port``).
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
            _metrics_export_port=METRICS_PORT,
        )
    yield
    ray.shutdown()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (make test does)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``slow`` unless ``--runslow`` is given: a plain ``pytest`` stays quick."""
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test passes it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_metrics_port(ray_cluster: None) -> int:
    """Port of the session cluster's Prometheus endpoint (``/metrics`` on 127.0.0.1)."""
    return METRICS_PORT


@pytest.fixture(scope="session")
def real_media_dir() -> Path:
    """The real-world media corpus folder, from ``D2VLM_REAL_MEDIA_DIR``; skips when absent.

    The corpus (public repositories' test media) is not part of the project; ``.ci/run``
    points the variable at ``../shared/media/real`` when that folder exists.
    """
    value = os.environ.get("D2VLM_REAL_MEDIA_DIR", "")
    if not value:
        pytest.skip("D2VLM_REAL_MEDIA_DIR is not set: no real-world media corpus to test against")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"D2VLM_REAL_MEDIA_DIR={value} is not a folder: no real-world media corpus to test against")
    return path
