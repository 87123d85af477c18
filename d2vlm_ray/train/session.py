"""Everything one training process needs, built from a job config (no Ray, no DeepSpeed).

:func:`build_session` turns a rehydrated job config plus the training rows into the
model, its objective, the collator over the feature cache, the evaluation function and
the save function. The Ray Train worker (``trainer.py``) wraps the objective in a
DeepSpeed engine; :func:`run_local` wraps it in a :class:`~d2vlm_ray.train.loop.TorchEngine`
and runs the same loop in this process (tests, debugging, the plain-PyTorch baseline).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from d2vlm_ray.cache import FeatureSource
from d2vlm_ray.config.schema import ModelConfig
from d2vlm_ray.model.builders import Tokenizers
from d2vlm_ray.model.d2vlm import D2VLM
from d2vlm_ray.train.checkpointing import (
    frame_encoder_dir,
    load_trained_model,
    save_model_dir,
    save_training_checkpoint,
)
from d2vlm_ray.train.config import TrainJobConfig
from d2vlm_ray.train.data import (
    LazyFrameEncoder,
    PairCollate,
    SFTCollate,
    load_pairs,
    load_sft_records,
    pair_id,
    pairs_from_rows,
    record_id,
    records_from_rows,
    TrainingFeatures,
)
from d2vlm_ray.train.head_warmup import warm_up_heads
from d2vlm_ray.train.evaluation import grounding_eval, preference_stats, select_eval_records
from d2vlm_ray.train.loop import Engine, LoopPlan, TrainerState, plan_total_steps, warmup_steps
from d2vlm_ray.train.objectives import FPOObjective, SFTObjective, load_model

logger = logging.getLogger("d2vlm_ray.train")


def _is_local(path: str) -> bool:
    return bool(path) and "://" not in path


def resolve_paths(cfg: TrainJobConfig) -> TrainJobConfig:
    """Make local paths absolute, so Ray workers (whose working directory differs) find them."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if _is_local(path) else path

    data = replace(
        cfg.data,
        train=absolute(cfg.data.train),
        val=absolute(cfg.data.val),
        val_pairs=absolute(cfg.data.val_pairs),
        video_root=absolute(cfg.data.video_root),
    )
    features = replace(cfg.features, cache_root=absolute(cfg.features.cache_root))
    init_from = cfg.init_from if cfg.init_from == "tiny" else absolute(cfg.init_from)
    return replace(cfg, data=data, features=features, init_from=init_from, output_dir=absolute(cfg.output_dir))


def run_dir_of(cfg: TrainJobConfig) -> Path:
    """``output_dir/name``: checkpoints, metrics, TensorBoard and the resolved config."""
    return Path(cfg.output_dir) / cfg.name


def prepare_init(cfg: TrainJobConfig, run_dir: Path) -> Path:
    """The model directory the run starts from.

    ``init_from: tiny`` creates a seeded random checkpoint once under ``run_dir/init``;
    otherwise ``init_from`` may be a model directory, a checkpoint, or a run directory
    (its newest checkpoint is used, e.g. the SFT run for FPO).

    Raises:
        FileNotFoundError: If ``init_from`` holds nothing loadable.
    """
    from d2vlm_ray.model.checkpoint import CONFIG_NAME, init_checkpoint
    from d2vlm_ray.train.checkpointing import resolve_model_dir

    if cfg.init_from == "tiny":
        init_dir = run_dir / "init"
        if not (init_dir / CONFIG_NAME).is_file():
            init_checkpoint(cfg.model, init_dir, seed=cfg.seed)
        return init_dir
    try:
        return resolve_model_dir(cfg.init_from)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"init_from: {exc}") from None


def training_items(cfg: TrainJobConfig, stage: str, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Rows (as shipped by Ray Data or read locally) → the ordered list of training items."""
    if stage == "sft":
        return records_from_rows(rows)
    return pairs_from_rows(rows, video_root=cfg.data.video_root, max_samples=cfg.data.max_samples)


def local_rows(cfg: TrainJobConfig, stage: str) -> list[dict[str, Any]]:
    """Training rows read in this process (what the Ray driver ships through Ray Data)."""
    from d2vlm_ray.train.data import record_rows

    if stage == "sft":
        records = load_sft_records(
            cfg.data.train,
            video_root=cfg.data.video_root,
            tasks=cfg.data.tasks,
            max_samples=cfg.data.max_samples,
            task_repeats=cfg.data.task_repeats,
            captions_only=cfg.data.captions_only,
        )
        return record_rows(records)
    return [p.to_dict() for p in load_pairs(cfg.data.train, video_root=cfg.data.video_root)]


@dataclass
class Session:
    """One process's training set-up.

    Attributes:
        cfg: The job config (paths absolute, ``init_from`` a directory).
        stage: ``sft`` or ``fpo``.
        init_dir: The checkpoint training started from.
        model: The D2VLM being trained (LoRA applied).
        model_cfg: Its config (``lora`` = the settings used).
        tokenizers: Its tokenizers.
        objective: The module an engine wraps.
        items: Training items in their canonical order.
        collate: Items → model batch.
        item_id: Item → id for the sample log.
        features: The cache-backed feature source.
        val_records: Validation samples for the grounding eval.
        val_pairs: Held-out pairs for preference accuracy (FPO).
        vision_state: float32 frame-encoder weights kept for saving (set on bf16 runs).
    """

    cfg: TrainJobConfig
    stage: str
    init_dir: Path
    model: D2VLM
    model_cfg: ModelConfig
    tokenizers: Tokenizers
    objective: torch.nn.Module
    items: list[Any]
    collate: Callable[[list[Any]], Any]
    item_id: Callable[[Any], str]
    features: TrainingFeatures
    val_records: list[Any] = field(default_factory=list)
    val_pairs: list[Any] = field(default_factory=list)
    vision_state: dict[str, torch.Tensor] | None = None

    def total_steps(self, world_size: int) -> int:
        """Optimizer steps of the run for ``world_size`` workers."""
        o = self.cfg.optim
        per_step = world_size * o.micro_batch_size * o.grad_accum
        return plan_total_steps(len(self.items), epochs=o.epochs, max_steps=o.max_steps, samples_per_step=per_step)

    def plan(self, world_size: int, rank: int, start_step: int = 0) -> LoopPlan:
        """The loop plan of this rank."""
        cfg = self.cfg
        return LoopPlan(
            total_steps=self.total_steps(world_size),
            micro_batch_size=cfg.optim.micro_batch_size,
            grad_accum=cfg.optim.grad_accum,
            world_size=world_size,
            rank=rank,
            seed=cfg.seed,
            start_step=start_step,
            checkpoint_every=cfg.checkpoint.every_n_steps,
            eval_every=cfg.eval.every_n_steps,
            eval_at_end=cfg.eval.at_end,
            log_every=cfg.log_every,
            fail_at_step=cfg.fault.fail_at_step,
        )

    def warmup(self, world_size: int) -> int:
        """Warmup steps (``ceil(warmup_ratio · total)``)."""
        return warmup_steps(self.total_steps(world_size), self.cfg.optim.warmup_ratio)

    def evaluate(self) -> dict[str, float]:
        """Grounding mIoU / R@k on validation samples and, for FPO, held-out preference accuracy."""
        metrics: dict[str, float] = {}
        e = self.cfg.eval
        if self.val_records:
            metrics.update(
                grounding_eval(
                    self.model,
                    self.tokenizers,
                    self.val_records,
                    self.features,
                    max_new_tokens=e.max_new_tokens,
                    max_text_tokens=self.cfg.data.max_text_tokens,
                )
            )
        if self.val_pairs:
            metrics.update(
                preference_stats(
                    self.model,
                    self.tokenizers,
                    self.val_pairs,
                    self.features,
                    max_text_tokens=self.cfg.data.max_text_tokens,
                )
            )
        return metrics

    def write_model(self, path: Path) -> None:
        """Save the model directory in the configured format."""
        save_model_dir(
            self.model,
            self.model_cfg,
            self.tokenizers,
            path,
            mode=self.cfg.checkpoint.save_mode,
            base_dir=self.init_dir,
            vision_state=self.vision_state,
        )

    def warm_up_heads(self, run_dir: Path, rank: int) -> dict[str, Any] | None:
        """The SFT config's head-only fit (:mod:`~d2vlm_ray.train.head_warmup`) on this rank's items.

        Call it before the engine exists and only on a fresh run: a resumed run's heads come
        from its checkpoint. Rank 0 writes the report to ``<run dir>/head_warmup.json``.

        Returns:
            The report as a dict, or None when the config asks for no warm-up.
        """
        if rank == 0:
            # A fresh run owns the report's name: one left by an earlier attempt in this
            # directory would otherwise be read back as this run's warm-up.
            (run_dir / "head_warmup.json").unlink(missing_ok=True)
        w = getattr(self.cfg, "head_warmup", None)
        if self.stage != "sft" or w is None or w.steps == 0:
            return None
        report = warm_up_heads(
            self.model, self.collate, self.items, steps=w.steps, lr=w.lr, max_samples=w.max_samples, seed=self.cfg.seed
        )
        if rank == 0:
            (run_dir / "head_warmup.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        return report.to_dict()

    def save_fn(self, engine: Engine, rank: int) -> Callable[[Path, TrainerState], None]:
        """The loop's checkpoint writer for ``engine`` on ``rank``."""

        def save(path: Path, state: TrainerState) -> None:
            save_training_checkpoint(path, engine, state, rank=rank, write_model=self.write_model)

        return save


def build_session(
    cfg: TrainJobConfig,
    stage: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    init_dir: str | Path,
    low_precision: bool = False,
    reference: bool = True,
) -> Session:
    """Load the model, apply LoRA, and wire data, features, evaluation and saving.

    Args:
        cfg: Job config with absolute paths.
        stage: ``sft`` or ``fpo``.
        rows: Training rows (Ray Data rows or :func:`local_rows`).
        init_dir: Checkpoint to start from.
        low_precision: The engine will cast the model (bf16): keep the float32 frame-encoder
            weights so checkpoints store them unchanged.
        reference: Load the frozen reference model when ``loss.variant`` is ``dpo``.
    """
    init_dir = Path(init_dir)
    model, tokenizers, model_cfg = load_model(init_dir, cfg.model.lora)
    encoder = LazyFrameEncoder.from_model(model, frame_encoder_dir(init_dir), model_cfg.vision.image_size)
    features = TrainingFeatures(FeatureSource(encoder, cfg.features), decode_on_miss=cfg.data.decode_on_miss)
    items = training_items(cfg, stage, rows)
    val_records: list[Any] = []
    val_pairs: list[Any] = []
    if cfg.data.val and (cfg.eval.every_n_steps or cfg.eval.at_end):
        records = load_sft_records(cfg.data.val, video_root=cfg.data.video_root)
        val_records = select_eval_records(records, cfg.eval.tasks, cfg.eval.num_samples)
    if stage == "sft":
        objective: torch.nn.Module = SFTObjective(model, cfg.loss)
        collate: Callable[[list[Any]], Any] = SFTCollate(tokenizers, features, cfg.data.max_text_tokens)
        item_id: Callable[[Any], str] = record_id
    else:
        ref_model = None
        if cfg.loss.variant == "dpo" and reference:
            ref_model, _, _ = load_trained_model(init_dir)
        objective = FPOObjective(model, cfg.loss, ref_model)
        collate = PairCollate(tokenizers, features, cfg.data.max_text_tokens)
        item_id = pair_id
        if cfg.data.val_pairs and (cfg.eval.every_n_steps or cfg.eval.at_end):
            val_pairs = load_pairs(cfg.data.val_pairs, video_root=cfg.data.video_root, max_samples=cfg.eval.num_samples)
    vision_state = None
    if low_precision:
        vision_state = {k: v.detach().clone() for k, v in model.vision.state_dict().items()}
    return Session(
        cfg=cfg,
        stage=stage,
        init_dir=init_dir,
        model=model,
        model_cfg=model_cfg,
        tokenizers=tokenizers,
        objective=objective,
        items=items,
        collate=collate,
        item_id=item_id,
        features=features,
        val_records=val_records,
        val_pairs=val_pairs,
        vision_state=vision_state,
    )


def run_local(cfg: TrainJobConfig, stage: str) -> dict[str, Any]:
    """Train in this process with plain PyTorch (no Ray, no DeepSpeed): the baseline runner.

    Checkpoints go to ``<run dir>/checkpoints/step_<N>`` in the same layout as Ray runs;
    a run directory that already holds a checkpoint resumes from the newest one.

    Returns:
        ``{"run_dir", "checkpoint_dir", "model_dir", "metrics", "eval", "steps", "step_s"}``.
    """
    from d2vlm_ray.config.load import dump_config
    from d2vlm_ray.train.checkpointing import restore_training_checkpoint
    from d2vlm_ray.train.loop import Loop, TorchEngine
    from d2vlm_ray.train.metrics import LocalReporter
    from d2vlm_ray.train.objectives import build_optimizer, build_scheduler

    cfg = resolve_paths(cfg)
    run_dir = run_dir_of(cfg)
    init_dir = prepare_init(cfg, run_dir)
    cfg = replace(cfg, init_from=str(init_dir))
    dump_config(cfg, run_dir)
    session = build_session(cfg, stage, local_rows(cfg, stage), init_dir=init_dir)
    existing = sorted((run_dir / "checkpoints").glob("step_*"))
    if not existing:
        session.warm_up_heads(run_dir, rank=0)
    optimizer = build_optimizer(session.objective, cfg.optim)
    scheduler = build_scheduler(optimizer, session.total_steps(1), session.warmup(1))
    engine = TorchEngine(
        session.objective, optimizer, scheduler, grad_accum=cfg.optim.grad_accum, max_grad_norm=cfg.optim.max_grad_norm
    )
    start_step = 0
    reporter = LocalReporter(run_dir, num_to_keep=cfg.checkpoint.num_to_keep, log_every=cfg.log_every)
    if existing:
        state = restore_training_checkpoint(existing[-1], engine)
        state.check_compatible(session.plan(1, 0), len(session.items))
        start_step = state.step
        reporter.checkpoints = list(existing)
    loop = Loop(
        engine,
        session.items,
        session.collate,
        reporter,
        session.plan(1, 0, start_step),
        item_id=session.item_id,
        save_fn=session.save_fn(engine, 0),
        eval_fn=session.evaluate,
        stats_fn=session.features.stats,
    )
    try:
        result = loop.run()
    finally:
        reporter.close()
    last = reporter.checkpoints[-1] if reporter.checkpoints else None
    return {
        "run_dir": str(run_dir),
        "checkpoint_dir": str(last) if last else None,
        "model_dir": str(last / "model") if last else None,
        "metrics": result.last_metrics,
        "eval": result.last_eval,
        "steps": result.final_step,
        "step_s": sum(result.step_times_s) / max(len(result.step_times_s), 1),
    }
