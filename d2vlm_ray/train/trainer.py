"""SFT and FPO on Ray Train: a ``TorchTrainer`` whose workers run a DeepSpeed engine.

Driver side (:func:`train_sft`, :func:`train_fpo`, with Ray already initialised):

1. make paths absolute, create the initial checkpoint (``init_from: tiny``), write the
   resolved config into the run directory ``output_dir/name``;
2. put the training rows into Ray Data (SFT: annotation records; FPO: the Parquet pairs);
3. fit a :class:`ray.train.torch.TorchTrainer` (``ScalingConfig`` from ``scaling``,
   ``RunConfig(name, storage_path=output_dir)``, ``FailureConfig(max_failures)``).

Worker side (:func:`train_loop_per_worker`): rehydrate the config, build the model,
LoRA, objective and feature-cache collator (:func:`d2vlm_ray.train.session.build_session`),
wrap them in ``deepspeed.initialize`` (client AdamW with two parameter groups, cosine
schedule, ZeRO stage from config), restore the last checkpoint if Ray hands one over,
and run :class:`d2vlm_ray.train.loop.Loop`.

**Data order and sharding.** Ray Data's ``streaming_split`` assigns blocks to workers
dynamically, so which worker sees which sample may change between attempts, and exact
resume would be impossible. The training rows are small (annotation text, no frames), so
the dataset is *not* split (``DataConfig(datasets_to_split=[])``): each worker reads all
rows, orders them canonically, and takes its slice of the ``(seed, epoch)``-permuted
sample stream (:mod:`d2vlm_ray.train.loop`). Frames never travel through Ray Data: each
worker joins rows to the shared feature cache.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from d2vlm_ray import telemetry
from d2vlm_ray.config.load import dump_config, to_dict
from d2vlm_ray.train.checkpointing import MODEL_DIR, restore_training_checkpoint
from d2vlm_ray.train.config import TrainJobConfig, config_from_dict
from d2vlm_ray.train.loop import Loop
from d2vlm_ray.train.metrics import MetricsWriter, append_samples, format_metrics, read_jsonl
from d2vlm_ray.train.objectives import check_fpo_family
from d2vlm_ray.train.session import build_session, local_rows, prepare_init, resolve_paths, run_dir_of

logger = logging.getLogger("d2vlm_ray.train")


def deepspeed_config(cfg: TrainJobConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict (official ``zero2_bf16.json`` shape, spec §4.2).

    bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and the tiny runs need no memory
    savings). The optimizer and scheduler are client objects, so the dict names neither;
    ``zero_allow_untested_optimizer`` admits torch's AdamW under ZeRO.
    """
    o, s = cfg.optim, cfg.scaling
    zero: dict[str, Any] = {"stage": s.zero_stage, "contiguous_gradients": True, "overlap_comm": s.use_gpu}
    if s.zero_stage >= 2:
        zero.update(allgather_bucket_size=int(2e8), reduce_bucket_size=int(2e8))
    if s.zero_stage == 3:
        zero["sub_group_size"] = int(1e9)
    return {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": o.micro_batch_size * o.grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": s.use_gpu},
        "fp16": {"enabled": False},
        "gradient_clipping": o.max_grad_norm,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def import_deepspeed(use_gpu: bool) -> Any:
    """Import DeepSpeed for this worker; on CPU pin its accelerator and skip the shm comm op.

    On a CPU machine ``deepspeed.comm``'s torch backend JIT-compiles a shared-memory
    all-reduce kernel with g++ the first time a process group is set up (~50 s on every
    fresh machine, cached per user afterwards). Replacing ``build_shm_op`` with a no-op
    makes collectives fall back to torch.distributed over gloo, which is what these CPU
    runs use anyway. The replacement must go on the module object in ``sys.modules``:
    ``import deepspeed.comm.torch as m`` binds the *torch* package (a name clash).
    """
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (loads the module the patch goes on)

    if not use_gpu:
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def _configure_worker_logging() -> None:
    """Worker processes start with Python's default (WARNING) logging; show our INFO lines."""
    train_logger = logging.getLogger("d2vlm_ray.train")
    train_logger.setLevel(logging.INFO)
    if not train_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        train_logger.addHandler(handler)
        train_logger.propagate = False


class RayReporter:
    """:class:`d2vlm_ray.train.loop.Reporter` inside Ray Train workers.

    Rank 0 writes the metric files (JSONL, CSV, TensorBoard) into the run directory and
    logs a line per step (visible in the job's logs); every rank records its sample ids.
    Checkpoints: each rank writes its part into a local temporary directory and calls
    ``ray.train.report``, which merges all ranks' files into one checkpoint directory in
    storage (``checkpoint_<step>``).

    Args:
        run_dir: The run directory (on storage every worker can reach).
        rank: This worker's rank.
        log_every: Log a line every N steps.
    """

    def __init__(self, run_dir: str | Path, rank: int, log_every: int = 1, phase: str = "train") -> None:
        self.phase = phase
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.log_every = log_every
        self.writer = MetricsWriter(self.run_dir) if rank == 0 else None
        self.last_eval: dict[str, float] = {}

    def log_step(self, step: int, metrics: Mapping[str, float], sample_ids: Sequence[str]) -> None:
        append_samples(self.run_dir, self.rank, step, sample_ids)
        telemetry.train_step(metrics.get("samples_per_s", 0.0), metrics.get("loss", 0.0), self.phase)
        if self.writer is not None:
            self.writer.write("train", step, metrics)
            if step % self.log_every == 0:
                logger.info(format_metrics("train", step, metrics))

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.writer is not None and metrics:
            self.writer.write("eval", step, metrics)
            logger.info(format_metrics("eval", step, metrics))
            self.last_eval = {k if k.startswith("eval") else f"eval_{k}": float(v) for k, v in metrics.items()}

    def save(self, step: int, metrics: Mapping[str, float], write: Callable[[Path], None]) -> None:
        import ray.train

        report = {**{k: float(v) for k, v in metrics.items()}, **self.last_eval}
        with tempfile.TemporaryDirectory(prefix="d2vlm-ckpt-") as tmp:
            write(Path(tmp))
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{step:06d}",
            )
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Close the metric files."""
        if self.writer is not None:
            self.writer.close()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function: DeepSpeed engine + :class:`Loop` over this worker's stream slice.

    Args:
        config: ``{"stage": "sft"|"fpo", "cfg": <job config as a dict>, "run_dir": str}``.
    """
    cfg = config_from_dict(config["stage"], config["cfg"])
    stage, run_dir = config["stage"], Path(config["run_dir"])
    import ray.train

    _configure_worker_logging()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    deepspeed = import_deepspeed(cfg.scaling.use_gpu)
    from d2vlm_ray.train.objectives import build_optimizer, build_scheduler

    rows = list(ray.train.get_dataset_shard("train").iter_rows())
    session = build_session(cfg, stage, rows, init_dir=cfg.init_from, low_precision=cfg.scaling.use_gpu)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        session.warm_up_heads(run_dir, rank)
    optimizer = build_optimizer(session.objective, cfg.optim)
    scheduler = build_scheduler(optimizer, session.total_steps(world_size), session.warmup(world_size))
    engine, _, _, _ = deepspeed.initialize(
        model=session.objective,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size),
        dist_init_required=False,
    )
    start_step = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = restore_training_checkpoint(ckpt_dir, engine)
        state.check_compatible(session.plan(world_size, rank), len(session.items))
        start_step = state.step
        if rank == 0:
            logger.info(
                "resumed from %s at step %d (%d samples consumed)", checkpoint.path, state.step, state.consumed_samples
            )
    reporter = RayReporter(run_dir, rank, cfg.log_every, phase=stage)
    loop = Loop(
        engine,
        session.items,
        session.collate,
        reporter,
        session.plan(world_size, rank, start_step),
        item_id=session.item_id,
        save_fn=session.save_fn(engine, rank),
        eval_fn=session.evaluate,
        stats_fn=session.features.stats,
    )
    try:
        loop.run()
    finally:
        reporter.close()


def _dataset(cfg: TrainJobConfig, stage: str) -> Any:
    """The training rows as a Ray Dataset (materialised: workers then start no read tasks)."""
    import ray.data

    if stage == "sft":
        return ray.data.from_items(local_rows(cfg, stage)).materialize()
    return ray.data.read_parquet(cfg.data.train).materialize()


def build_trainer(cfg: TrainJobConfig, stage: str, dataset: Any, run_dir: Path) -> Any:
    """The ``TorchTrainer`` of a resolved job config (``init_from`` a directory)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage": stage, "cfg": to_dict(cfg), "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker={"CPU": s.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=cfg.output_dir,
            failure_config=ray.train.FailureConfig(max_failures=cfg.fault.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        ),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def _train(cfg: TrainJobConfig, stage: str) -> dict[str, Any]:
    cfg = resolve_paths(cfg)
    run_dir = run_dir_of(cfg)
    init_dir = prepare_init(cfg, run_dir)
    if stage == "fpo":
        check_fpo_family(init_dir)
    cfg = replace(cfg, init_from=str(init_dir))
    dump_config(cfg, run_dir)
    trainer = build_trainer(cfg, stage, _dataset(cfg, stage), run_dir)
    start = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - start
    if result.checkpoint is None:
        raise RuntimeError(f"{stage} run {cfg.name!r} finished without a checkpoint")
    ckpt_dir = Path(result.checkpoint.path)
    steps = {int(row["step"]): row for row in read_jsonl(run_dir / "train_metrics.jsonl")}
    step_s = [row["step_s"] for row in steps.values()]
    evals = read_jsonl(run_dir / "eval_metrics.jsonl")
    summary = {
        "stage": stage,
        "run_dir": str(run_dir),
        "checkpoint_dir": str(ckpt_dir),
        "model_dir": str(ckpt_dir / MODEL_DIR),
        "init_dir": str(init_dir),
        "metrics": dict(result.metrics or {}),
        "eval": evals[-1] if evals else {},
        "steps": max(steps) if steps else 0,
        "fit_s": fit_s,
        "step_s": sum(step_s) / len(step_s) if step_s else 0.0,
    }
    warmup_report = run_dir / "head_warmup.json"
    if warmup_report.exists():
        summary["head_warmup"] = json.loads(warmup_report.read_text())
    # Workers set live gauges while they train; Ray drops a finished worker's metrics, so the
    # driver records the run's history for the dashboard.
    rows = [steps[k] for k in sorted(steps)]
    consumed = int(rows[-1].get("consumed_samples", 0)) if rows else 0
    telemetry.train_history(consumed, [float(r["loss"]) for r in rows if "loss" in r], stage)
    logger.info("%s finished in %.1f s: %s", stage, fit_s, format_metrics(stage, summary["steps"], summary["metrics"]))
    return summary


def train_sft(cfg: TrainJobConfig) -> dict[str, Any]:
    """Run SFT on Ray Train (Ray must be initialised).

    Returns:
        ``{"run_dir", "checkpoint_dir", "model_dir", "init_dir", "metrics", "eval", "steps",
        "fit_s", "step_s"}``; ``model_dir`` is the loadable final model (FPO's ``init_from``).
    """
    return _train(cfg, "sft")


def train_fpo(cfg: TrainJobConfig) -> dict[str, Any]:
    """Run FPO on Ray Train (Ray must be initialised); same return value as :func:`train_sft`."""
    return _train(cfg, "fpo")
