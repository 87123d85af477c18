"""Evaluations run during and after training (no Ray).

- :func:`grounding_eval`: greedy ``generate`` on a few validation samples; the first
  generated span of each is scored against its first ground-truth span (mIoU, R@0.3/0.5/0.7).
- :func:`preference_stats` / :func:`preference_accuracy`: on held-out preference pairs,
  the fraction whose chosen response the model scores higher than the rejected one
  (``log π(y_w) > log π(y_l)``, the full FPO log-likelihood: text plus grounding), and the
  mean of that margin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from d2vlm_ray.cache import CachedFeatures
from d2vlm_ray.config.schema import DecodeSettings
from d2vlm_ray.eval import recall_at_iou
from d2vlm_ray.model.builders import Tokenizers
from d2vlm_ray.model.d2vlm import D2VLM
from d2vlm_ray.model.generation import generate
from d2vlm_ray.model.inputs import build_batch
from d2vlm_ray.model.preference import build_pair_batch, pair_forward
from d2vlm_ray.train.data import mapping_features
from d2vlm_ray.types import PreferencePair, VideoRecord

FeatureFn = Callable[[str], CachedFeatures]


def _as_feature_fn(features: FeatureFn | Mapping[str, CachedFeatures]) -> FeatureFn:
    return mapping_features(features) if isinstance(features, Mapping) else features


def select_eval_records(records: Sequence[VideoRecord], tasks: Sequence[str], num_samples: int) -> list[VideoRecord]:
    """The first ``num_samples`` records (by sample id) that have spans and one of ``tasks`` (all if empty)."""
    usable = [r for r in records if r.spans_s and (not tasks or r.task in tasks)]
    usable.sort(key=lambda r: (r.sample_id, r.video))
    return usable[:num_samples]


@torch.no_grad()
def grounding_eval(
    model: D2VLM,
    tokenizers: Tokenizers,
    records: Sequence[VideoRecord],
    features: FeatureFn | Mapping[str, CachedFeatures],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 4,
    max_text_tokens: int = 256,
) -> dict[str, float]:
    """Greedy-decode each record's question and score the first predicted span.

    A sample whose generation holds no ``<evi>`` counts as a miss (IoU 0).

    Returns:
        ``{"mIoU", "R@0.3", "R@0.5", "R@0.7", "n", "no_span"}`` (fractions in ``[0, 1]``).
    """
    feature_fn = _as_feature_fn(features)
    settings = DecodeSettings(max_new_tokens=max_new_tokens, do_sample=False)
    was_training = model.training
    model.eval()
    preds: list[tuple[float, float] | None] = []
    gts: list[tuple[float, float]] = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = list(records[start : start + batch_size])
            feats = [feature_fn(r.video) for r in chunk]
            batch = build_batch(
                tokenizers.llm,
                tokenizers.qformer,
                [r.query for r in chunk],
                [f.patches for f in feats],
                [f.timestamps_s for f in feats],
                [f.duration_s for f in feats],
                src_spans_s=[list(r.src_spans_s) for r in chunk],
                max_text_tokens=max_text_tokens,
            )
            for rec, out in zip(chunk, generate(model, tokenizers.llm, batch, settings)):
                preds.append(out.spans_s[0] if out.spans_s else None)
                gts.append(rec.spans_s[0])
    finally:
        model.train(was_training)
    metrics = recall_at_iou(preds, gts, thresholds=(0.3, 0.5, 0.7)) if gts else {"mIoU": 0.0, "R@0.5": 0.0}
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["n"] = float(len(gts))
    metrics["no_span"] = float(sum(p is None for p in preds))
    return metrics


@torch.no_grad()
def preference_stats(
    model: D2VLM,
    tokenizers: Tokenizers,
    pairs: Sequence[PreferencePair],
    features: FeatureFn | Mapping[str, CachedFeatures],
    *,
    batch_size: int = 4,
    max_text_tokens: int = 256,
) -> dict[str, float]:
    """Held-out preference accuracy and mean margin ``log π(y_w) − log π(y_l)``.

    The grounding term scores against the model's own soft-target base (``model.alpha``).

    Returns:
        ``{"pref_accuracy", "pref_margin", "pref_n"}``.

    Raises:
        ValueError: If ``pairs`` is empty.
    """
    if not pairs:
        raise ValueError("pairs: no held-out preference pairs")
    feature_fn = _as_feature_fn(features)
    was_training = model.training
    model.eval()
    margins: list[torch.Tensor] = []
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = list(pairs[start : start + batch_size])
            feats = [feature_fn(p.video) for p in chunk]
            batch = build_pair_batch(
                tokenizers,
                chunk,
                [f.patches for f in feats],
                [f.timestamps_s for f in feats],
                [f.duration_s for f in feats],
                max_text_tokens=max_text_tokens,
            )
            out = pair_forward(model, batch)
            margins.append((out.chosen_logp - out.rejected_logp).float().cpu())
    finally:
        model.train(was_training)
    margin = torch.cat(margins)
    return {
        "pref_accuracy": float((margin > 0).float().mean()),
        "pref_margin": float(margin.mean()),
        "pref_n": float(margin.numel()),
    }


def preference_accuracy(
    ckpt_dir: str | Path,
    pairs: Sequence[PreferencePair],
    features: FeatureFn | Mapping[str, CachedFeatures],
    *,
    batch_size: int = 4,
    device: str = "cpu",
) -> dict[str, float]:
    """Held-out preference accuracy of a trained checkpoint (no Ray).

    Args:
        ckpt_dir: A model directory (merged or adapter format, e.g. ``<checkpoint>/model``
            as returned by ``train_fpo``).
        pairs: Held-out preference pairs.
        features: ``video -> CachedFeatures`` (e.g. a
            :class:`d2vlm_ray.train.data.FeatureSource` over the feature cache) or a mapping.
        batch_size: Pairs per forward.
        device: Where to run the model.

    Returns:
        ``{"pref_accuracy", "pref_margin", "pref_n"}``: the fraction of pairs with
        ``log π(chosen) > log π(rejected)``, the mean margin, and the pair count.
    """
    from d2vlm_ray.train.checkpointing import load_trained_model

    model, tokenizers, cfg = load_trained_model(ckpt_dir, device=device)
    return preference_stats(model, tokenizers, pairs, features, batch_size=batch_size)
