"""SFT on Ray Train with DeepSpeed ZeRO-2 on 2 CPU workers, with a worker failure and resume.

One fit (~25 s on an idle 2-core machine, plus ~25 s for the restarted worker group): four
steps, checkpoints at steps 2 and 4, and a fault injected after step 3 on every worker, so
Ray Train restarts the workers and they resume from the step-2 checkpoint. The sample ids
trained are compared with the data order of an uninterrupted run (``micro_batch_indices``;
``test_train_loop.py`` checks that an uninterrupted run trains exactly that order and ends
with the same weights as a resumed one).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from d2vlm_ray.cache import FeatureCache, features_for_video
from d2vlm_ray.config import ModelConfig, from_dict
from d2vlm_ray.data.annotations import read_evi_json
from d2vlm_ray.data.synthetic import generate_benchmark
from d2vlm_ray.model.checkpoint import init_checkpoint, load_frame_encoder
from d2vlm_ray.model.lora import parameter_group
from d2vlm_ray.train.config import SFTJobConfig
from d2vlm_ray.train.data import load_sft_records, record_rows, records_from_rows
from d2vlm_ray.train.loop import LoopPlan, micro_batch_indices
from d2vlm_ray.train.metrics import read_jsonl, samples_by_step

pytestmark = pytest.mark.ray
MAX_FRAMES = 6


@pytest.fixture(scope="module", autouse=True)
def skip_shm_op() -> None:
    """The driver never builds DeepSpeed's shm op either (workers apply the same no-op themselves)."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """3 synthetic videos, a tiny initial checkpoint, and the feature cache of the training videos."""
    root = tmp_path_factory.mktemp("train_ray")
    generate_benchmark(root / "synth", n_videos=3, seed=0, fractions=(1.0, 0.0, 0.0), size=64)
    init_dir = init_checkpoint(from_dict(ModelConfig, {"preset": "tiny"}), root / "init", seed=0)
    encoder = load_frame_encoder(init_dir)
    cache = FeatureCache(str(root / "cache"))
    records = read_evi_json(root / "synth" / "annotations" / "train.json", video_root=str(root / "synth")).records
    for video in sorted({r.video for r in records}):
        features_for_video(cache, encoder, video, fps=1.0, max_frames=MAX_FRAMES)
    return {"root": root, "init_dir": init_dir, "encoder_id": encoder.encoder_id, "n_records": len(records)}


def _config(bench: dict[str, Any], name: str, **sections: dict[str, Any]) -> SFTJobConfig:
    root = bench["root"]
    data: dict[str, Any] = {
        "name": name,
        "output_dir": str(root / "runs"),
        "init_from": str(bench["init_dir"]),
        "seed": 0,
        "data": {
            "train": str(root / "synth" / "annotations" / "train.json"),
            "val": str(root / "synth" / "annotations" / "train.json"),
            "video_root": str(root / "synth"),
            "max_text_tokens": 64,
        },
        "features": {"cache_root": str(root / "cache"), "max_frames": MAX_FRAMES},
        "optim": {"lr": 2e-3, "lora_lr": 5e-3, "max_steps": 4, "grad_accum": 1},
        "scaling": {"num_workers": 2, "zero_stage": 2, "cpus_per_worker": 1.0},
        "checkpoint": {"every_n_steps": 2, "save_mode": "merged", "num_to_keep": 2},
        "eval": {"every_n_steps": 0, "at_end": True, "num_samples": 2, "max_new_tokens": 8},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return from_dict(SFTJobConfig, data)


@pytest.fixture(scope="module")
def faulty_run(ray_cluster: None, bench: dict[str, Any]) -> dict[str, Any]:
    from d2vlm_ray.train.trainer import train_sft

    cfg = _config(
        bench,
        "sft_faulty",
        fault={"max_failures": 1, "fail_at_step": 3},
        head_warmup={"steps": 20, "lr": 1e-2, "max_samples": 4},
    )
    return train_sft(cfg)


def _groups_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, bool]:
    changed: dict[str, bool] = {}
    for name, tensor in before.items():
        group = "llm_attention" if name.endswith(("qkv_proj.weight", "o_proj.weight")) else parameter_group(name)
        changed[group] = changed.get(group, False) or not torch.equal(tensor, after[name])
    return changed


@pytest.mark.timeout(600)
def test_sft_two_workers_zero2_trains_lora_heads_and_compressor(
    faulty_run: dict[str, Any], bench: dict[str, Any]
) -> None:
    run_dir, ckpt = Path(faulty_run["run_dir"]), Path(faulty_run["checkpoint_dir"])
    assert faulty_run["steps"] == 4 and ckpt.name == "checkpoint_000004"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state == {"step": 4, "consumed_samples": 8, "world_size": 2, "seed": 0, "num_items": bench["n_records"]}
    assert sorted(p.name for p in (ckpt / "engine" / "state").glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ], "each ZeRO-2 rank wrote its optimizer shard into the one checkpoint"

    # LoRA (merged into qkv_proj / o_proj), heads, embeddings and Q-Former attention trained;
    # the frame encoder, the Q-Former FFNs and the LLM's other weights did not move.
    changed = _groups_changed(
        load_file(str(bench["init_dir"] / "model.safetensors")), load_file(str(ckpt / "model" / "model.safetensors"))
    )
    for group in ("llm_attention", "frm_head", "evi_head", "qformer", "embed", "lm_head"):
        assert changed[group], f"{group} did not change"
    for group in ("vision", "qformer_frozen", "llm"):
        assert not changed[group], f"{group} changed but is frozen"
    # The saved frame encoder is the one that keyed the feature cache.
    assert load_frame_encoder(ckpt / "model").encoder_id == bench["encoder_id"]

    rows = read_jsonl(run_dir / "train_metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4]
    assert {"loss", "lm", "grounding", "consistency", "lr", "lora_lr", "samples_per_s"} <= set(rows[-1])
    assert all(r["feature_misses"] == 0 and r["feature_hits"] > 0 for r in rows), "no video was decoded in training"
    assert rows[0]["lora_lr"] == pytest.approx(2.5 * rows[0]["lr"])
    assert (run_dir / "train_metrics.csv").exists() and list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    evals = read_jsonl(run_dir / "eval_metrics.jsonl")
    assert evals and {"mIoU", "R@0.5"} <= set(evals[-1])
    # The heads were warmed up before the first step: rank 0 collected its half of the 4
    # drawn samples and made every one of the 20 updates, in step with rank 1.
    warmup = faulty_run["head_warmup"]
    assert warmup == json.loads((run_dir / "head_warmup.json").read_text())
    assert (warmup["examples"], warmup["steps"]) == (2, 20)
    assert warmup["loss_after"] < warmup["loss_before"]
    assert faulty_run["metrics"]["step"] == 4.0 and "eval_mIoU" in faulty_run["metrics"]


@pytest.mark.timeout(600)
def test_resume_after_worker_failure_trains_the_samples_of_an_uninterrupted_run(
    faulty_run: dict[str, Any], bench: dict[str, Any]
) -> None:
    run_dir = Path(faulty_run["run_dir"])
    root = bench["root"]
    records = load_sft_records(str(root / "synth" / "annotations" / "train.json"), video_root=str(root / "synth"))
    items = records_from_rows(record_rows(records))
    for rank in (0, 1):
        logged = [row["step"] for row in read_jsonl(run_dir / "samples" / f"rank{rank}.jsonl")]
        assert logged == [1, 2, 3, 3, 4], "step 3 ran, the workers failed, and Ray resumed from the step-2 checkpoint"
        plan = LoopPlan(total_steps=4, world_size=2, rank=rank, seed=0)
        uninterrupted = {
            step: [items[i].sample_id for i in micro_batch_indices(plan, len(items), step - 1)] for step in range(1, 5)
        }
        assert samples_by_step(run_dir, rank) == uninterrupted
    all_ids = [i for rank in (0, 1) for ids in samples_by_step(run_dir, rank).values() for i in ids]
    assert len(all_ids) == 8 == len(set(all_ids)), "within the first epoch no sample was trained twice or skipped"
