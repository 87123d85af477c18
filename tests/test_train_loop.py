"""The framework-agnostic training loop in one process (no Ray, no DeepSpeed).

Covers the data order, the optimizer policy, exact resume after an injected failure,
FPO raising the chosen-minus-rejected margin on held-out pairs, both checkpoint formats,
and the job configs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from d2vlm_ray.cache import CachedFeatures
from d2vlm_ray.config import ConfigError, ModelConfig, from_dict, load_config
from d2vlm_ray.model.checkpoint import init_checkpoint, load_frame_encoder
from d2vlm_ray.train.checkpointing import (
    load_trained_model,
    read_trainer_state,
    restore_training_checkpoint,
    save_model_dir,
    save_training_checkpoint,
)
from d2vlm_ray.train.config import FPOJobConfig, LossSettings, OptimSettings, SFTJobConfig
from d2vlm_ray.train.data import PairCollate, SFTCollate, mapping_features, pair_id, record_id
from d2vlm_ray.train.evaluation import preference_accuracy, preference_stats
from d2vlm_ray.train.loop import (
    InjectedFault,
    Loop,
    LoopPlan,
    TorchEngine,
    epoch_permutation,
    micro_batch_indices,
    stream_indices,
)
from d2vlm_ray.train.metrics import LocalReporter, read_jsonl, samples_by_step
from d2vlm_ray.train.objectives import (
    FPOObjective,
    SFTObjective,
    build_optimizer,
    build_scheduler,
    load_model,
    param_groups,
)
from d2vlm_ray.types import PreferencePair, VideoRecord

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
FRAMES = 8
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "cross"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine run ~30x faster on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_checkpoint(from_dict(ModelConfig, {"preset": "tiny"}), tmp_path_factory.mktemp("init"), seed=0)


@pytest.fixture(scope="module")
def features() -> dict[str, CachedFeatures]:
    """Random frame-encoder features for 6 fake videos of 8 frames at 1 fps (tiny: P=16, C=48)."""
    gen = torch.Generator().manual_seed(0)
    return {
        f"video_{v}.mp4": CachedFeatures(
            patches=torch.randn(FRAMES, 16, 48, generator=gen),
            timestamps_s=np.arange(FRAMES, dtype=np.float64),
            duration_s=float(FRAMES),
            source_fps=4.0,
        )
        for v in range(6)
    }


def _question(i: int) -> str:
    event = f"the {COLOURS[i % 4]} {SHAPES[i // 4 % 4]} grows"
    return f"Find the visual event described by the sentence: {event}. When does it happen?"


def _records(n: int) -> list[VideoRecord]:
    return [
        VideoRecord(
            video=f"video_{i % 6}.mp4",
            duration_s=float(FRAMES),
            query=_question(i),
            task="tvg",
            spans_s=[(float(i % 4), float(i % 4 + 2))],
            answer="<evi></evi>The event happens in <evi>.",
            sample_id=f"s{i:02d}",
        )
        for i in range(n)
    ]


def _pairs(indices: range) -> list[PreferencePair]:
    """Chosen: the right caption at the right time; rejected: a generic answer 4 frames off."""
    out = []
    for i in indices:
        start = float(i % 3)
        out.append(
            PreferencePair(
                sample_id=f"p{i:02d}",
                family="combined",
                variant_idx=0,
                video=f"video_{i % 6}.mp4",
                duration_s=float(FRAMES),
                task="tvg",
                prompt=_question(i),
                chosen_text=f"<evi></evi>At <evi>, the {COLOURS[i % 4]} {SHAPES[i // 4 % 4]} grows.",
                chosen_spans_s=[(start, start + 2.0)],
                rejected_text="<evi></evi>The event happens in <evi>.",
                rejected_spans_s=[(start + 4.0, start + 6.0)],
            )
        )
    return out


def _engine(objective: torch.nn.Module, optim: OptimSettings, total_steps: int) -> TorchEngine:
    optimizer = build_optimizer(objective, optim)
    scheduler = build_scheduler(optimizer, total_steps, warmup=1)
    return TorchEngine(objective, optimizer, scheduler, grad_accum=optim.grad_accum, max_grad_norm=optim.max_grad_norm)


def test_data_order_is_a_function_of_seed_and_epoch() -> None:
    n = 7
    stream = stream_indices(n, seed=3, start=0, count=3 * n)
    for epoch in range(3):
        block = stream[epoch * n : (epoch + 1) * n]
        assert sorted(block) == list(range(n)), "every epoch visits every item exactly once"
        assert block == list(epoch_permutation(n, 3, epoch))
    assert stream[:n] != stream[n : 2 * n], "epochs are reshuffled"
    assert stream_indices(n, 3, 10, 5) == stream[10:15], "resuming at a stream position continues the same order"
    assert stream_indices(n, 4, 0, n) != stream[:n]
    # Two ranks with micro-batch 2 split each global micro-batch without overlap.
    plans = [LoopPlan(total_steps=1, micro_batch_size=2, world_size=2, rank=r, seed=3) for r in (0, 1)]
    seen = [i for m in range(3) for p in plans for i in micro_batch_indices(p, n, m)]
    assert seen == stream[:12]


def test_optimizer_has_two_learning_rates_and_no_frame_encoder(init_dir: Path) -> None:
    model, _, cfg = load_model(init_dir, from_dict(ModelConfig, {"preset": "tiny"}).lora)
    objective = SFTObjective(model, LossSettings())
    groups = param_groups(objective, OptimSettings(lr=1e-3, lora_lr=3e-3))
    assert [(g["name"], g["lr"]) for g in groups] == [("lora", 3e-3), ("other", 1e-3)]
    names = {id(p): n for n, p in objective.named_parameters()}
    grouped = {names[id(p)] for g in groups for p in g["params"]}
    assert all("lora_" in names[id(p)] for p in groups[0]["params"])
    assert not any(n.startswith("model.vision.") for n in grouped), "the frame encoder must be in no group"
    assert any(n.startswith("model.frm_head.") for n in grouped)
    assert any(n.startswith("model.compressor.") for n in grouped)
    assert any("embed_tokens" in n for n in grouped) and any("lm_head" in n for n in grouped)
    model.vision.embeddings.patch_embedding.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frame encoder"):
        param_groups(objective, OptimSettings())


def _tiny_groups(init_dir: Path, **optim: float) -> tuple[SFTObjective, list[dict], dict[int, str]]:
    """The tiny SFT objective, its AdamW groups under ``OptimSettings(**optim)`` and parameter names by id."""
    model, _, _ = load_model(init_dir, from_dict(ModelConfig, {"preset": "tiny"}).lora)
    objective = SFTObjective(model, LossSettings())
    names = {id(p): n for n, p in objective.named_parameters()}
    return objective, param_groups(objective, OptimSettings(**optim)), names


def test_embedding_lr_puts_the_vocabulary_in_its_own_group(init_dir: Path) -> None:
    _, groups, names = _tiny_groups(init_dir, lr=1e-3, lora_lr=3e-3, embedding_lr=2e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("lora", 3e-3), ("embedding", 2e-5), ("other", 1e-3)]
    vocab = {names[id(p)] for p in groups[1]["params"]}
    assert vocab and all("embed_tokens" in n or "lm_head" in n for n in vocab)
    assert not any("embed_tokens" in names[id(p)] or "lm_head" in names[id(p)] for p in groups[2]["params"])


def test_compressor_lr_puts_the_q_former_in_its_own_group(init_dir: Path) -> None:
    objective, groups, names = _tiny_groups(init_dir, lr=1e-3, lora_lr=3e-3, compressor_lr=1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("lora", 3e-3), ("compressor", 1e-4), ("other", 1e-3)]
    compressor = {names[id(p)] for p in groups[1]["params"]}
    assert compressor and all(n.startswith("model.compressor.") for n in compressor)
    trained = {n for n, p in objective.named_parameters() if p.requires_grad and n.startswith("model.compressor.")}
    assert compressor == trained, "every trained compressor weight, and only those"
    assert any(names[id(p)].startswith("model.frm_head.") for p in groups[2]["params"])


def _sft_loop(init_dir: Path, run_dir: Path, features: dict, *, fail_at_step: int = 0) -> tuple[Loop, TorchEngine]:
    lora = from_dict(ModelConfig, {"preset": "tiny"}).lora
    model, tokenizers, model_cfg = load_model(init_dir, lora)
    objective = SFTObjective(model, LossSettings())
    optim = OptimSettings(lr=2e-3, lora_lr=5e-3, grad_accum=2, max_grad_norm=1.0)
    engine = _engine(objective, optim, total_steps=3)
    reporter = LocalReporter(run_dir, tensorboard=False, num_to_keep=2)
    start_step = 0
    existing = sorted((run_dir / "checkpoints").glob("step_*"))
    if existing:
        start_step = restore_training_checkpoint(existing[-1], engine).step
        reporter.checkpoints = existing

    def save(path: Path, state) -> None:
        save_training_checkpoint(
            path, engine, state, rank=0, write_model=lambda p: save_model_dir(model, model_cfg, tokenizers, p)
        )

    plan = LoopPlan(
        total_steps=3, grad_accum=2, seed=1, start_step=start_step, checkpoint_every=1, fail_at_step=fail_at_step
    )
    loop = Loop(
        engine,
        _records(5),
        SFTCollate(tokenizers, mapping_features(features)),
        reporter,
        plan,
        item_id=record_id,
        save_fn=save,
    )
    return loop, engine


def test_resume_after_injected_failure_matches_an_uninterrupted_run(
    init_dir: Path, features: dict, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    straight, straight_engine = _sft_loop(init_dir, tmp_path / "straight", features)
    straight.run()

    torch.manual_seed(0)
    failing, _ = _sft_loop(init_dir, tmp_path / "faulty", features, fail_at_step=2)
    with pytest.raises(InjectedFault):
        failing.run()
    assert read_trainer_state(tmp_path / "faulty" / "checkpoints" / "step_000001").consumed_samples == 2
    assert not (tmp_path / "faulty" / "checkpoints" / "step_000002").exists()
    resumed, resumed_engine = _sft_loop(init_dir, tmp_path / "faulty", features, fail_at_step=2)
    assert resumed.plan.start_step == 1
    resumed.run()

    # Same sample ids at every step (steps 2-3 from the resumed attempt), 2 micro-batches per step.
    expected = samples_by_step(tmp_path / "straight", 0)
    assert samples_by_step(tmp_path / "faulty", 0) == expected
    assert [len(ids) for ids in expected.values()] == [2, 2, 2]
    steps_logged = [row["step"] for row in read_jsonl(tmp_path / "faulty" / "samples" / "rank0.jsonl")]
    assert steps_logged == [1, 2, 2, 3], "step 2 ran before the failure and again after resuming from step 1"
    # Same weights as if nothing had happened.
    a = dict(straight_engine.module.named_parameters())
    for name, p in resumed_engine.module.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, a[name], msg=name)
    assert read_trainer_state(tmp_path / "faulty" / "checkpoints" / "step_000003").step == 3


def test_fpo_raises_the_margin_on_held_out_pairs(init_dir: Path, features: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    lora = from_dict(ModelConfig, {"preset": "tiny"}).lora
    model, tokenizers, model_cfg = load_model(init_dir, lora)
    train_pairs, held_out = _pairs(range(0, 12)), _pairs(range(12, 18))
    feats = mapping_features(features)
    before = preference_stats(model, tokenizers, held_out, feats)

    objective = FPOObjective(model, LossSettings(beta=0.1))
    optim = OptimSettings(lr=2e-3, lora_lr=5e-3, micro_batch_size=2)
    steps = 40
    engine = _engine(objective, optim, total_steps=steps)
    reporter = LocalReporter(tmp_path / "fpo", tensorboard=True)
    plan = LoopPlan(total_steps=steps, micro_batch_size=2, seed=0)
    result = Loop(engine, train_pairs, PairCollate(tokenizers, feats), reporter, plan, item_id=pair_id).run()
    reporter.close()
    after = preference_stats(model, tokenizers, held_out, feats)

    assert before["pref_accuracy"] < 0.5, "the untrained model prefers the shorter, generic rejected answer"
    assert after["pref_margin"] > before["pref_margin"] + 10.0, (before, after)
    assert after["pref_accuracy"] == 1.0 and after["pref_n"] == 6
    assert result.last_metrics["margin"] > 0 and "preference" in result.last_metrics
    rows = read_jsonl(tmp_path / "fpo" / "train_metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert {"loss", "preference", "lm", "grounding", "consistency", "lr", "lora_lr", "samples_per_s"} <= set(rows[0])
    assert (tmp_path / "fpo" / "train_metrics.csv").read_text().startswith("step,")
    assert list((tmp_path / "fpo" / "tensorboard").glob("events.out.tfevents.*"))

    # Both checkpoint formats reload to the same model; held-out accuracy is computed from disk.
    merged = save_model_dir(model, model_cfg, tokenizers, tmp_path / "merged", mode="merged")
    adapter = save_model_dir(model, model_cfg, tokenizers, tmp_path / "adapter", mode="adapter", base_dir=init_dir)
    from_merged = preference_accuracy(merged, held_out, features)
    from_adapter = preference_accuracy(adapter, held_out, features)
    assert from_merged["pref_accuracy"] == from_adapter["pref_accuracy"] == after["pref_accuracy"]
    assert from_merged["pref_margin"] == pytest.approx(after["pref_margin"], rel=1e-4, abs=1e-3)
    assert from_adapter["pref_margin"] == pytest.approx(after["pref_margin"], rel=1e-4, abs=1e-3)
    assert load_frame_encoder(merged).encoder_id == load_frame_encoder(init_dir).encoder_id
    loaded, _, _ = load_trained_model(adapter)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("name", ["sft_tiny", "fpo_tiny", "sft_phi3_mini", "fpo_phi3_mini"])
def test_job_configs_load(name: str) -> None:
    cls = SFTJobConfig if name.startswith("sft") else FPOJobConfig
    cfg = load_config(cls, CONFIGS / f"{name}.yaml")
    assert cfg.scaling.zero_stage == 2
    if "phi3" in name:
        # Official hyper-parameters (spec §4.2).
        assert (cfg.optim.lr, cfg.optim.lora_lr, cfg.optim.warmup_ratio) == (2e-5, 5e-5, 0.03)
        assert cfg.optim.grad_accum == (1 if name.startswith("sft") else 8)
        assert cfg.optim.max_grad_norm == 0.0 and cfg.optim.weight_decay == 0.0
        assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (128, 256, 0.05)
        assert cfg.scaling.use_gpu and cfg.loss.beta == 0.1
    else:
        assert cfg.init_from == "tiny" or name.startswith("fpo")
        assert not cfg.scaling.use_gpu


def test_deepspeed_config_and_bad_configs() -> None:
    from d2vlm_ray.train.trainer import deepspeed_config

    gpu = load_config(SFTJobConfig, CONFIGS / "sft_phi3_mini.yaml")
    ds = deepspeed_config(gpu, world_size=4)
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == 4 and ds["gradient_clipping"] == 0.0
    cpu = load_config(SFTJobConfig, CONFIGS / "sft_tiny.yaml", ["scaling.zero_stage=1", "optim.grad_accum=3"])
    ds = deepspeed_config(cpu, world_size=2)
    assert ds["bf16"] == {"enabled": False} and ds["zero_optimization"]["stage"] == 1
    assert ds["train_batch_size"] == 2 * 3 * cpu.optim.micro_batch_size
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(SFTJobConfig, CONFIGS / "sft_tiny.yaml", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="init_from"):
        load_config(SFTJobConfig, CONFIGS / "sft_tiny.yaml", ["model.preset=phi3-mini"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(SFTJobConfig, CONFIGS / "sft_tiny.yaml", ["scaling.zero_stage=3"])
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(SFTJobConfig, CONFIGS / "sft_tiny.yaml", ["optim.micro_batch_size=0"])
    with pytest.raises(ConfigError, match="data.train"):
        from_dict(SFTJobConfig, {})


def test_task_repeats_oversample_sft_records_and_are_validated(tmp_path: Path) -> None:
    from d2vlm_ray.data import synthetic as S
    from d2vlm_ray.data.annotations import write_evi_json
    from d2vlm_ray.train.data import load_sft_records

    records = [r for scene in S.plan_benchmark(6, seed=0) for r in S.scene_records(scene, tasks=("tvg", "gqa"))]
    path = tmp_path / "train.json"
    write_evi_json(records, path)
    loaded = load_sft_records(str(path), task_repeats={"gqa": 3})
    n_gqa = sum(r.task == "gqa" for r in records)
    assert n_gqa and len(loaded) == len(records) + 2 * n_gqa
    assert [r.sample_id for r in loaded if r.task == "tvg"] == [r.sample_id for r in records if r.task == "tvg"]
    with pytest.raises(ValueError, match=r"data.task_repeats: no training record has task \['gqq'\]"):
        load_sft_records(str(path), task_repeats={"gqq": 3})
    with pytest.raises(ConfigError, match="data.task_repeats.gqa"):
        load_config(SFTJobConfig, CONFIGS / "sft_tiny.yaml", ["data.task_repeats.gqa=0"])
    with pytest.raises(ConfigError, match="task_repeats"):
        load_config(FPOJobConfig, CONFIGS / "fpo_tiny.yaml", ["data.task_repeats.gqa=2"])
