"""Tests of the ``train`` and ``gpu`` benchmarks (correctness of reports and helpers, not speed).

The ``train`` run is shrunk to the tiny preset, 2 videos, a few steps and 2 repeats; its Ray
Train runs (1 and 2 workers) fit on the session cluster. The ``gpu`` benchmark is skipped on
this CPU machine; its FLOP and MFU helpers are checked with hand-computed numbers.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from d2vlm_ray import bench
from d2vlm_ray.bench import gpu
from d2vlm_ray.config import ConfigError, from_dict
from jobs import bench as bench_job

TINY_TRAIN = [
    "model.preset=tiny",
    "min_plain_step_s=0",
    "n_videos=2",
    "video_size=48",
    "max_frames=6",
    "steps=4",
    "repeats=2",
    "median_from_step=2",
    "scaled_workers=2",
    "scaled_steps=2",
]


@pytest.fixture(scope="module")
def skip_shm_op() -> None:
    """The DeepSpeed shm-op no-op of stack-notes (the driver never JIT-builds it)."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


@pytest.fixture(scope="module")
def train_run(ray_cluster: None, skip_shm_op: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bench_train")
    rc = bench_job.main(["train", "--out-dir", str(root / "out"), *TINY_TRAIN, f"work_dir={root / 'work'}"])
    (path,) = list((root / "out").glob("train-*/train.json"))
    return {"rc": rc, "root": root, "report": json.loads(path.read_text())}


def test_registry_has_train_and_gpu() -> None:
    assert {"train", "gpu"} <= set(bench.implemented())
    for name in ("train", "gpu"):
        module = bench.load_benchmark(name)
        assert callable(module.run) and callable(module.markdown)


@pytest.mark.timeout(240)
def test_train_report(train_run: dict) -> None:
    assert train_run["rc"] == 0
    result = train_run["report"]["result"]
    assert set(result["paths"]) == {"plain", "ray", "ray_scaled"}
    runs = [*result["paths"]["plain"]["repeats"], *result["paths"]["ray"]["repeats"]]
    assert len(runs) == 4
    for p, steps in [(r, 4) for r in runs] + [(result["paths"]["ray_scaled"], 2)]:
        assert p["steps"] == steps == len(p["step_s"]) == len(p["loss"])
        assert p["median_step_s"] > 0 and p["samples_per_s"] > 0
    for name in ("plain", "ray"):
        path = result["paths"][name]
        assert path["median_step_s"] == pytest.approx(statistics.median(r["median_step_s"] for r in path["repeats"]), abs=1e-6)
    assert result["paths"]["ray_scaled"]["samples_per_step"] == 2
    assert result["checks"] == {
        "steps_complete": True,
        "same_samples_per_step": True,
        "first_step_loss_match": True,
        "losses_match": True,
        "plain_step_long_enough": True,  # min_plain_step_s=0 for the tiny preset
    }
    s = result["summary"]
    plain_runs, ray_runs = result["paths"]["plain"]["repeats"], result["paths"]["ray"]["repeats"]
    ratios = [r["median_step_s"] / p["median_step_s"] for p, r in zip(plain_runs, ray_runs)]
    assert s["overhead_ratios"] == pytest.approx(ratios, rel=1e-3) and s["repeats"] == 2
    assert s["overhead_ratio"] == pytest.approx(statistics.median(ratios), rel=1e-3)
    assert isinstance(s["target_met"], bool) and s["threads"] == 1
    assert result["model"]["llm_hidden_size"] == 64 and result["model"]["parameters"]["trainable"] > 0
    line = train_run["report"]["markdown"]
    assert "\n" not in line and "**train**" in line and "same samples and losses" in line
    assert f"**{s['overhead_ratio']:.2f}x**" in line and "2 workers" in line
    # The training directories are removed after the run (keep_runs=false); inputs stay for reuse.
    assert not any((train_run["root"] / "work" / "runs").glob("*/*"))


def test_train_config_errors() -> None:
    from d2vlm_ray.bench import train

    with pytest.raises(ConfigError, match="median_from_step"):
        from_dict(train.Config, {"steps": 5, "median_from_step": 6})
    with pytest.raises(ConfigError, match="repeats"):
        from_dict(train.Config, {"repeats": 0})
    with pytest.raises(ConfigError, match="threads"):
        from_dict(train.Config, {"threads": 0})
    with pytest.raises(ConfigError, match="min_plain_step_s"):
        from_dict(train.Config, {"min_plain_step_s": -1})
    assert bench_job.main(["train", "no_such_key=1"]) == 2


def test_train_step_stats() -> None:
    from d2vlm_ray.bench.train import step_stats

    rows = [{"step": i, "step_s": s, "loss": 1.0} for i, s in enumerate([9.0, 0.5, 0.2, 0.4], start=1)]
    stats = step_stats(rows, from_step=2, samples_per_step=2)
    assert stats["median_step_s"] == pytest.approx(0.4) and stats["samples_per_s"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no step >= 5"):
        step_stats(rows, from_step=5, samples_per_step=1)


def test_gpu_skips_cleanly_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the skip path does not apply")
    md = tmp_path / "B.md"
    assert bench_job.main(["gpu", "--out-dir", str(tmp_path / "out"), "--benchmarks-md", str(md), "--append"]) == 0
    report = json.loads(next((tmp_path / "out").glob("gpu-*/gpu.json")).read_text())
    assert report["result"]["skipped"] is True and report["result"]["checks"] == {}
    assert "no CUDA device" in report["result"]["reason"] and "skipped: no CUDA device" in report["markdown"]
    assert md.read_text().splitlines()[-1] == report["markdown"]


def test_gpu_module_does_not_import_ray() -> None:
    import subprocess

    code = "import sys, d2vlm_ray.bench.gpu; print('ray' in sys.modules or 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_gpu_flops_and_mfu_by_hand() -> None:
    # 6 · 3.7e9 · 320 = 7.104e12 for the LLM; 2 · 1.0e9 · 120 · 257 = 6.168e13 for the encoder.
    assert gpu.step_flops(3_700_000_000, 320) == pytest.approx(7.104e12)
    assert gpu.step_flops(3_700_000_000, 320, 1_000_000_000, 120, 257) == pytest.approx(7.104e12 + 6.168e13)
    # 6.8784e13 FLOPs in 0.5 s on a 989-TFLOPS part: 137.568 / 989 = 0.139098...
    assert gpu.mfu(6.8784e13, 0.5, 989.0) == pytest.approx(0.1390980, rel=1e-6)
    assert gpu.mfu(1e12, 1.0, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive"):
        gpu.mfu(1e12, 0.0, 989.0)
    with pytest.raises(ValueError, match="non-negative"):
        gpu.step_flops(-1, 10)


def test_gpu_device_peaks() -> None:
    assert gpu.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gpu.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_bf16_tflops("Some Unknown Accelerator") is None
