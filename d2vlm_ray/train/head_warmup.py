"""Fit the grounding heads alone on frozen states before SFT: linear probe, then fine-tune.

Why: SFT starts the two grounding heads from random weights, and every SFT update costs a
forward and backward pass through the whole LLM. A pretrained LLM on CPU fits only a few
hundred such samples into a laptop budget, and the real-small run showed the heads need
more: the grounding BCE stayed at the level of a constant prediction (~0.6) through 120
SFT steps, while heads fitted alone on the same model's frozen states ground after ~800
updates.

With everything except the heads frozen, the heads' inputs do not change. One pass per
sample without gradients therefore yields inputs for any number of head updates, and each
update costs two small MLPs. SFT then starts from heads that already ground, and LoRA and
the compressor fine-tune everything together from there. This is the LP-FT recipe of
Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features".

Plain PyTorch, so the model core needs no Ray. With several data-parallel ranks, each rank
collects its own slice of the drawn samples and the head gradients are averaged over
``torch.distributed``. The ranks make the same updates and end with identical heads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from d2vlm_ray.losses.sft import grounding_bce
from d2vlm_ray.model.d2vlm import HeadInputs

logger = logging.getLogger("d2vlm_ray.train")


@dataclass
class WarmupReport:
    """What a head warm-up did; figures are over this rank's examples.

    Attributes:
        examples: Samples with response evidence whose states this rank collected.
        evidence: ``<evi>`` tokens among them.
        steps: Head updates made.
        loss_before: Mean grounding BCE of the examples before the fit (NaN without examples).
        loss_after: The same after the fit.
        top_frame_in_span_before: Fraction of ``<evi>`` whose highest-scoring frame lies
            inside the target span, before the fit.
        top_frame_in_span_after: The same after the fit.
        collect_s: Seconds spent in the no-gradient passes.
        fit_s: Seconds spent in the head updates.
    """

    examples: int
    evidence: int
    steps: int
    loss_before: float
    loss_after: float
    top_frame_in_span_before: float
    top_frame_in_span_after: float
    collect_s: float
    fit_s: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON; the figures of a rank without examples are None."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def collect_head_inputs(
    model: Any, collate: Callable[[list[Any]], Any], items: Sequence[Any], max_samples: int, seed: int
) -> list[HeadInputs]:
    """This rank's share of up to ``max_samples`` distinct items that carry response evidence.

    Every rank sees every item (the SFT workers read all rows); each takes every
    ``world_size``-th of the drawn items. Items are drawn in a seeded random order, so a
    capped collection still covers the whole file (annotation files group the items of one
    video together); repeats of one item (``data.task_repeats``) count once. Each runs
    alone through the model in eval mode (no dropout, no gradients). An item whose
    response lost its ``<evi>`` tokens to the text limit gives nothing.

    Args:
        model: A :class:`~d2vlm_ray.model.d2vlm.D2VLM`.
        collate: Items → model batch (the SFT collator).
        items: Training records (:class:`~d2vlm_ray.types.VideoRecord`).
        max_samples: Most items to collect over all ranks.
        seed: The drawing order (the same on every rank).
    """
    seen: set[str] = set()
    chosen = []
    for i in np.random.default_rng(seed).permutation(len(items)).tolist():
        if len(chosen) >= max_samples:
            break
        item = items[i]
        if item.spans_s and item.sample_id not in seen:
            seen.add(item.sample_id)
            chosen.append(item)
    rank = dist.get_rank() if _world_size() > 1 else 0
    mine = chosen[rank :: _world_size()]
    was_training = model.training
    model.eval()
    try:
        examples = [model.head_inputs(collate([item]))[0] for item in mine]
    finally:
        model.train(was_training)
    return [ex for ex in examples if 0 < ex.query_states.shape[0] == ex.spans_idx.shape[0]]


def _logits(model: Any, example: HeadInputs) -> torch.Tensor:
    """Grounding logits ``[E, F]`` of one example through the model's own heads and scale."""
    dtype = model.frm_head[0].weight.dtype
    keys = model.frm_head(example.key_states.to(dtype))  # [F, D]
    return model.evidence_scores(example.query_states.to(dtype), keys)


def _evaluate(model: Any, examples: Sequence[HeadInputs]) -> tuple[float, float]:
    """Mean BCE and top-frame-in-span fraction over ``examples``."""
    if not examples:
        return float("nan"), float("nan")
    losses, hits, total = [], 0, 0
    with torch.no_grad():
        for ex in examples:
            logits = _logits(model, ex)  # [E, F]
            spans = ex.spans_idx.to(logits.device)
            losses.append(float(grounding_bce(logits, spans, model.alpha)))
            top = logits.argmax(dim=1)  # [E]
            hits += int(((spans[:, 0] <= top) & (top <= spans[:, 1])).sum())
            total += int(spans.shape[0])
    return float(np.mean(losses)), hits / max(total, 1)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def fit_heads(model: Any, examples: Sequence[HeadInputs], *, steps: int, lr: float, seed: int) -> tuple[int, float]:
    """Train ``model.evi_head`` and ``model.frm_head`` on collected inputs, one example per update.

    Examples are visited in a seeded random order, epoch after epoch. Under
    ``torch.distributed`` every rank must call this with the same ``steps``; a rank
    without examples contributes zero gradients.

    Args:
        model: The D2VLM whose heads are updated in place.
        examples: This rank's :func:`collect_head_inputs`.
        steps: Head updates.
        lr: AdamW learning rate (no weight decay).
        seed: Order of the examples.

    Returns:
        ``(updates, seconds)``.

    Raises:
        ValueError: When no rank has an example.
    """
    world = _world_size()
    device = model.frm_head[0].weight.device
    count = torch.tensor([len(examples)], dtype=torch.long, device=device)
    if world > 1:
        dist.all_reduce(count)
    if int(count.item()) == 0:
        raise ValueError(
            "head_warmup: no training sample carries response evidence (<evi> with a span); "
            "set head_warmup.steps to 0 or train on grounding tasks"
        )
    params = [p for head in (model.evi_head, model.frm_head) for p in head.parameters()]
    for p in params:
        # Zeros rather than None: a rank without examples still sends a gradient to average.
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=False)
        if examples:
            if not order:
                order = rng.permutation(len(examples)).tolist()
            ex = examples[order.pop()]
            loss = grounding_bce(_logits(model, ex), ex.spans_idx.to(device), model.alpha)
            loss.backward()
        if world > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        optimizer.step()
    return steps, time.perf_counter() - start


def warm_up_heads(
    model: Any,
    collate: Callable[[list[Any]], Any],
    items: Sequence[Any],
    *,
    steps: int,
    lr: float,
    max_samples: int,
    seed: int,
) -> WarmupReport:
    """Collect the heads' inputs from ``items`` and fit the heads on them (see the module doc).

    Args:
        model: A D2VLM (the grounding heads are updated in place; nothing else changes).
        collate: Items → model batch.
        items: This rank's SFT records.
        steps: Head updates (> 0).
        lr: Learning rate of the fit.
        max_samples: Most distinct items to collect over all ranks.
        seed: Order of the updates.

    Raises:
        ValueError: When the model has no grounding heads (another family) or no rank
            has a sample with response evidence.
    """
    if not hasattr(model, "head_inputs"):
        raise ValueError(
            f"head_warmup: the {getattr(model, 'family', type(model).__name__)} model has no grounding heads; "
            "set head_warmup.steps to 0"
        )
    start = time.perf_counter()
    examples = collect_head_inputs(model, collate, items, max_samples, seed)
    collect_s = time.perf_counter() - start
    loss_before, top_before = _evaluate(model, examples)
    updates, fit_s = fit_heads(model, examples, steps=steps, lr=lr, seed=seed)
    loss_after, top_after = _evaluate(model, examples)
    report = WarmupReport(
        examples=len(examples),
        evidence=sum(int(ex.spans_idx.shape[0]) for ex in examples),
        steps=updates,
        loss_before=loss_before,
        loss_after=loss_after,
        top_frame_in_span_before=top_before,
        top_frame_in_span_after=top_after,
        collect_s=collect_s,
        fit_s=fit_s,
    )
    logger.info(
        "head warm-up: %d samples (%d <evi>) collected in %.1f s; %d head updates in %.1f s; "
        "grounding BCE %.3f -> %.3f, top frame in span %.2f -> %.2f",
        report.examples,
        report.evidence,
        collect_s,
        updates,
        fit_s,
        loss_before,
        loss_after,
        top_before,
        top_after,
    )
    return report
