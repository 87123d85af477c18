"""The framework-agnostic training loop (no Ray, no DeepSpeed imports).

The loop drives an *engine* with DeepSpeed's calling convention (``engine(batch)``,
``engine.backward(loss)``, ``engine.step()`` once per micro-batch, the optimizer stepping
at gradient-accumulation boundaries). A DeepSpeed engine is used as it is inside Ray Train
workers; :class:`TorchEngine` gives a plain PyTorch model + optimizer the same surface, so
the very same loop runs in one process (unit tests, debugging, the "plain PyTorch"
baseline of benchmarks).

**Data order.** Training consumes an endless *sample stream*: epoch ``e`` is the
permutation ``rng(seed, e)`` of the training items, and epochs follow each other. Global
micro-batch ``m`` is the stream slice ``[m·W·b, (m+1)·W·b)`` (``W`` workers, ``b`` micro
batch), of which rank ``r`` takes ``[m·W·b + r·b, m·W·b + (r+1)·b)``. The order is thus a
function of ``(seed, epoch)`` only, and a checkpoint that records how many samples were
consumed pins the exact resume point: no sample is trained twice or skipped.

Metrics, sample ids and checkpoints go through a :class:`Reporter`; Ray Train and the
local runner each implement it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Batch = Any


class InjectedFault(RuntimeError):
    """Raised by the loop at ``LoopPlan.fail_at_step`` to test failure recovery."""


class Engine(Protocol):
    """DeepSpeed's engine surface, as the loop uses it."""

    module: nn.Module

    def __call__(self, batch: Batch) -> Mapping[str, torch.Tensor]:
        """Forward; returns ``{"loss": scalar with grad, <term>: detached scalars...}``."""
        ...

    def backward(self, loss: torch.Tensor) -> Any:
        """Backward of one micro-batch's loss (scaled by 1 / grad_accum inside)."""
        ...

    def step(self) -> None:
        """Called after every micro-batch; updates weights at accumulation boundaries."""
        ...

    def get_lr(self) -> list[float]:
        """Current learning rate of each parameter group."""
        ...

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None) -> Any:
        """Write the engine state (weights, optimizer, scheduler) under ``save_dir/tag``."""
        ...

    def load_checkpoint(self, load_dir: str, tag: str | None = None) -> Any:
        """Restore what :meth:`save_checkpoint` wrote."""
        ...


class Reporter(Protocol):
    """Where the loop sends metrics, sample ids and checkpoints.

    Every rank calls every method (``save`` is collective: engines write their shards).
    """

    def log_step(self, step: int, metrics: Mapping[str, float], sample_ids: Sequence[str]) -> None:
        """One optimizer step's metrics (already averaged over ranks) and this rank's sample ids."""
        ...

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """One evaluation's metrics (computed on rank 0; other ranks get ``{}``)."""
        ...

    def save(self, step: int, metrics: Mapping[str, float], write: Callable[[Path], None]) -> None:
        """Persist a checkpoint: call ``write(dir)`` to fill a directory, then store it."""
        ...


@dataclass
class LoopPlan:
    """What the loop runs; everything that fixes the data order is here.

    Attributes:
        total_steps: Optimizer steps of the whole run.
        micro_batch_size: Items per rank per forward (``b``).
        grad_accum: Micro-batches per optimizer step (``g``).
        world_size: Data-parallel ranks (``W``).
        rank: This rank.
        seed: Seed of the per-epoch permutations.
        start_step: Optimizer steps already done (from a checkpoint).
        checkpoint_every: Save every N steps (0 = only the final step).
        eval_every: Evaluate every N steps (0 = never during training).
        eval_at_end: Evaluate after the final step.
        log_every: Log a line every N steps.
        fail_at_step: Raise :class:`InjectedFault` after this step in a run that did not
            resume (0 = off).
    """

    total_steps: int
    micro_batch_size: int = 1
    grad_accum: int = 1
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    start_step: int = 0
    checkpoint_every: int = 0
    eval_every: int = 0
    eval_at_end: bool = False
    log_every: int = 1
    fail_at_step: int = 0

    @property
    def samples_per_step(self) -> int:
        """Items consumed by all ranks per optimizer step (``W·b·g``)."""
        return self.world_size * self.micro_batch_size * self.grad_accum


def steps_for_epochs(num_items: int, epochs: int, samples_per_step: int) -> int:
    """Optimizer steps that cover ``epochs`` passes over ``num_items`` (at least 1)."""
    if num_items <= 0:
        raise ValueError("data.train: no training items")
    return max(1, (num_items * epochs) // samples_per_step)


def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: a permutation of ``range(num_items)`` seeded by ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_items)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of optimizer step ``step`` on ``rank`` (dropout masks and any sampling).

    Re-seeding every step makes a step's randomness independent of what ran before it, so
    a run resumed from a checkpoint draws the same dropout masks as an uninterrupted one
    without checkpointing RNG states.
    """
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def stream_indices(num_items: int, seed: int, start: int, count: int) -> list[int]:
    """Item indices at sample-stream positions ``[start, start + count)``.

    Args:
        num_items: Training items per epoch.
        seed: Data-order seed.
        start: First stream position (consumed samples so far).
        count: How many positions.
    """
    if num_items <= 0:
        raise ValueError("stream_indices: no items")
    out: list[int] = []
    perms: dict[int, np.ndarray] = {}
    for pos in range(start, start + count):
        epoch = pos // num_items
        if epoch not in perms:
            perms[epoch] = epoch_permutation(num_items, seed, epoch)
        out.append(int(perms[epoch][pos % num_items]))
    return out


def micro_batch_indices(plan: LoopPlan, num_items: int, micro_step: int) -> list[int]:
    """This rank's item indices for global micro-batch ``micro_step`` (0-based since the run began)."""
    b = plan.micro_batch_size
    start = micro_step * plan.world_size * b + plan.rank * b
    return stream_indices(num_items, plan.seed, start, b)


@dataclass
class TrainerState:
    """What a checkpoint records besides the engine state.

    Attributes:
        step: Optimizer steps done.
        consumed_samples: Stream positions consumed by all ranks (``step · W·b·g``).
        world_size: Ranks of the run that wrote it (the ZeRO shards depend on it).
        seed: Data-order seed.
        num_items: Training items per epoch (a changed dataset changes the order).
    """

    step: int
    consumed_samples: int
    world_size: int
    seed: int
    num_items: int

    def check_compatible(self, plan: LoopPlan, num_items: int) -> None:
        """Raise ``ValueError`` if resuming under ``plan`` would change the data order or shards."""
        problems = []
        if self.world_size != plan.world_size:
            problems.append(f"scaling.num_workers {plan.world_size} != {self.world_size} of the checkpoint")
        if self.seed != plan.seed:
            problems.append(f"seed {plan.seed} != {self.seed} of the checkpoint")
        if self.num_items != num_items:
            problems.append(f"{num_items} training items != {self.num_items} of the checkpoint")
        if self.consumed_samples != self.step * plan.samples_per_step:
            problems.append("micro_batch_size x grad_accum differs from the checkpoint's")
        if problems:
            raise ValueError("cannot resume: " + "; ".join(problems))


class TorchEngine:
    """A plain PyTorch model + optimizer + scheduler behind DeepSpeed's engine surface.

    Args:
        module: The objective module (``forward(batch) -> {"loss", ...}``).
        optimizer: Optimizer over its trainable parameters.
        scheduler: Per-optimizer-step learning-rate scheduler, or ``None``.
        grad_accum: Micro-batches per optimizer step.
        max_grad_norm: Clip the global gradient norm to this (0 = off).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        grad_accum: int = 1,
        max_grad_norm: float = 0.0,
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.lr_scheduler = scheduler
        self.grad_accum = grad_accum
        self.max_grad_norm = max_grad_norm
        self.micro_steps = 0
        self.global_steps = 0

    def __call__(self, batch: Batch) -> Mapping[str, torch.Tensor]:
        return self.module(batch)

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        scaled = loss / self.grad_accum
        scaled.backward()
        return scaled

    def is_gradient_accumulation_boundary(self) -> bool:
        """True when the next :meth:`step` updates the weights."""
        return (self.micro_steps + 1) % self.grad_accum == 0

    def step(self) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        if self.max_grad_norm > 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.module.named_parameters() if p.requires_grad}

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None) -> None:
        path = Path(save_dir) / (tag or "state")
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "trainable": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "micro_steps": self.micro_steps,
            "global_steps": self.global_steps,
        }
        torch.save(state, path / "engine_state.pt")

    def load_checkpoint(self, load_dir: str, tag: str | None = None) -> None:
        path = Path(load_dir) / (tag or "state") / "engine_state.pt"
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = self.module.load_state_dict(state["trainable"], strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"{path}: unexpected parameters {missing.unexpected_keys[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = int(state["micro_steps"])
        self.global_steps = int(state["global_steps"])


@dataclass
class LoopResult:
    """What :func:`run_loop` returns on this rank.

    Attributes:
        final_step: Optimizer steps done at the end.
        last_metrics: Metrics of the last step.
        last_eval: Metrics of the last evaluation (rank 0), or ``{}``.
        step_times_s: Wall time of every step this attempt ran.
    """

    final_step: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    step_times_s: list[float] = field(default_factory=list)


def _mean_over_ranks(sums: dict[str, float], count: int, world_size: int) -> dict[str, float]:
    """Average per-micro-batch sums over micro-batches and (when distributed) ranks."""
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    total = max(values[-1].item(), 1.0)
    return {k: values[i].item() / total for i, k in enumerate(keys)}


def _sum_over_ranks(values: Mapping[str, float], world_size: int) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if world_size > 1 and keys and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return {k: t[i].item() for i, k in enumerate(keys)}


class Loop(Generic[Item]):
    """One rank's training loop.

    Args:
        engine: DeepSpeed engine or :class:`TorchEngine` over an objective module.
        items: All training items, in a fixed order (every rank holds the same list).
        collate: Turns a list of items into one model batch.
        reporter: Metrics/checkpoint sink.
        plan: Steps, batch geometry, rank, seed, cadences.
        item_id: Id of an item for the sample log.
        save_fn: ``save_fn(dir, state)`` writes a checkpoint into ``dir`` (collective).
        eval_fn: Returns evaluation metrics; called on rank 0 only.
        stats_fn: Counters summed over ranks into each step's metrics (e.g. cache misses).
    """

    def __init__(
        self,
        engine: Engine,
        items: Sequence[Item],
        collate: Callable[[list[Item]], Batch],
        reporter: Reporter,
        plan: LoopPlan,
        *,
        item_id: Callable[[Item], str] = str,
        save_fn: Callable[[Path, TrainerState], None] | None = None,
        eval_fn: Callable[[], dict[str, float]] | None = None,
        stats_fn: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        if not items:
            raise ValueError("data.train: no training items")
        if plan.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {plan.total_steps}")
        self.engine = engine
        self.items = items
        self.collate = collate
        self.reporter = reporter
        self.plan = plan
        self.item_id = item_id
        self.save_fn = save_fn
        self.eval_fn = eval_fn
        self.stats_fn = stats_fn

    def state_at(self, step: int) -> TrainerState:
        """The :class:`TrainerState` after ``step`` optimizer steps."""
        p = self.plan
        return TrainerState(step, step * p.samples_per_step, p.world_size, p.seed, len(self.items))

    def _micro_step(self, micro_step: int) -> tuple[dict[str, float], list[str]]:
        idx = micro_batch_indices(self.plan, len(self.items), micro_step)
        chosen = [self.items[i] for i in idx]
        batch = self.collate(chosen)
        out = self.engine(batch)
        loss = out["loss"]
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"non-finite loss {loss.item()} at micro-step {micro_step}")
        self.engine.backward(loss)
        self.engine.step()
        terms = {k: float(v.detach().float().mean()) for k, v in out.items()}
        return terms, [self.item_id(item) for item in chosen]

    def _evaluate(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.eval_fn is not None and self.plan.rank == 0:
            start = time.perf_counter()
            metrics = dict(self.eval_fn())
            metrics["eval_s"] = time.perf_counter() - start
        self.reporter.log_eval(step, metrics)
        return metrics

    def run(self) -> LoopResult:
        """Train from ``plan.start_step`` to ``plan.total_steps``."""
        p = self.plan
        result = LoopResult(final_step=p.start_step)
        self.engine.module.train()
        for step_idx in range(p.start_step, p.total_steps):
            start = time.perf_counter()
            torch.manual_seed(step_seed(p.seed, step_idx, p.rank))
            sums: dict[str, float] = {}
            ids: list[str] = []
            for a in range(p.grad_accum):
                terms, micro_ids = self._micro_step(step_idx * p.grad_accum + a)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                ids += micro_ids
            step = step_idx + 1
            metrics = _mean_over_ranks(sums, p.grad_accum, p.world_size)
            if self.stats_fn is not None:
                metrics.update(_sum_over_ranks(self.stats_fn(), p.world_size))
            elapsed_s = time.perf_counter() - start
            lrs = self.engine.get_lr()
            metrics.update(
                step=float(step),
                lr=float(lrs[-1]) if lrs else 0.0,
                lora_lr=float(lrs[0]) if lrs else 0.0,
                consumed_samples=float(step * p.samples_per_step),
                epoch=step * p.samples_per_step / len(self.items),
                step_s=elapsed_s,
                samples_per_s=p.samples_per_step / max(elapsed_s, 1e-9),
            )
            result.step_times_s.append(elapsed_s)
            result.last_metrics = metrics
            result.final_step = step
            self.reporter.log_step(step, metrics, ids)
            if p.fail_at_step and step == p.fail_at_step and p.start_step == 0:
                raise InjectedFault(f"fault injected after step {step} (fault.fail_at_step)")
            last = step == p.total_steps
            if (p.eval_every and step % p.eval_every == 0) or (last and p.eval_at_end):
                result.last_eval = self._evaluate(step) or result.last_eval
                self.engine.module.train()
            if (p.checkpoint_every and step % p.checkpoint_every == 0) or last:
                self._save(step, metrics)
        return result

    def _save(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.save_fn is None:
            return
        state = self.state_at(step)
        save_fn = self.save_fn
        self.reporter.save(step, metrics, lambda path: save_fn(path, state))


def plan_total_steps(num_items: int, *, epochs: int, max_steps: int, samples_per_step: int) -> int:
    """``max_steps`` when set, else the steps covering ``epochs`` passes."""
    if max_steps > 0:
        return max_steps
    return steps_for_epochs(num_items, epochs, samples_per_step)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length as HF computes it: ``ceil(ratio · total)``."""
    return int(math.ceil(warmup_ratio * total_steps))
