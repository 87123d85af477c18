"""Charades-STA temporal grounding: R@1 at IoU 0.3/0.5/0.7 and mIoU.

Accepted prediction items (see ``load_items``), all in seconds:

* E.T. Bench-style records ``{"a": text, "tgt": [s, e], "duration": ...}``;
* E.T. Chat records ``{"vid", "query", "response", "span": [s, e], "pred": [s, e]}``
  (``pred`` is used as is, ``span`` is the GT);
* TimeChat / D2VLM prediction dicts ``{qid: {"timestamp": [[s, e]] | [s, e] | []}}``
  together with a GT file in TimeIT COCO form
  ``{"annotations": [{"image_id", "caption", "timestamp": [s, e], "id"}]}``; the
  ``qid`` is the annotation's ``id`` (or its index) as a string.

Conventions (``CONVENTIONS``):

* ``standard`` (this project's): IoU = plain IoU; R@θ (≥) and mIoU over ALL
  queries, failed parses count as misses with IoU 0. Text is read with the
  official parser; with a ``</evi>`` delimiter the answer part's first interval is
  used, else the first (sorted) evidence interval. Fractions, unrounded.
* ``etchat``: E.T. Chat's evaluator: ``pred`` must hold exactly 2 values (text
  records: the first parsed interval); nncore IoU on the unsorted pair, a
  non-finite IoU counts 0; R1@θ (≥) and mIoU over all queries, rounded to 3
  decimals (fractions).
* ``timechat``: TimeChat's ``format_tvg.extract_time`` + ``eval_tvg``: raw text
  is parsed whole (no ``</evi>`` split) with the official stages minus the
  ``a to b`` stage, which ``extract_time`` lacks; first interval; IoU = overlap / hull;
  R@θ = 100·hits/#GT (θ = 0.3/0.5/0.7), no mIoU. Documented readings where it
  crashes: a zero-width hull gives IoU 0 (official: ZeroDivisionError); missing
  predictions count 0 (official: assertion unless ``--sample``).
* ``d2vlm``: D2VLM's converter + evaluator: split on ``</evi>``; the answer's
  first interval, else the first evidence interval (unsorted); TimeChat IoU;
  R@{0, 0.3, 0.5, 0.7} ×100 and mIoU as a fraction, over the predictions that
  have a timestamp only. Documented reading where it crashes (no interval at all:
  KeyError): the query is left out, which is what its denominator implies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2vlm_ray.eval.parsers import EVIDENCE_DELIMITER, parse_evidence_spans, parse_spans, split_evidence
from d2vlm_ray.eval.spans import CHARADES_THRESHOLDS, nncore_iou, recall_at_iou

CONVENTIONS = ("standard", "etchat", "timechat", "d2vlm")


@dataclass(frozen=True)
class GroundingItem:
    """One query: the GT span, and either raw text or an already structured prediction.

    Attributes:
        gt_s: Ground-truth ``(start_s, end_s)``.
        text: Raw model text, or ``None``.
        pred_s: Structured prediction values (any length, unsorted), or ``None``.
    """

    gt_s: tuple[float, float]
    text: str | None = None
    pred_s: tuple[float, ...] | None = None


def timechat_iou(pred: tuple[float, ...] | list[float], gt: tuple[float, float]) -> float:
    """TimeChat's IoU: overlap / hull on the raw (unsorted) values; a zero hull gives 0."""
    overlap = max(min(pred[1], gt[1]) - max(pred[0], gt[0]), 0.0)
    hull = max(pred[1], gt[1]) - min(pred[0], gt[0])
    if hull == 0:
        return 0.0
    return overlap / hull


def _flat_timestamp(value: Any) -> tuple[float, ...] | None:
    """``[[s, e], ...]`` or ``[s, e]`` or ``[]`` -> the first pair (or None)."""
    if not value:
        return None
    first = value[0] if isinstance(value[0], (list, tuple)) else value
    return tuple(float(v) for v in first)


def _text_span(text: str, evidence_fallback: bool) -> tuple[float, ...] | None:
    """First answer interval (after ``</evi>`` when present), optionally the evidence's."""
    parts = split_evidence(text, EVIDENCE_DELIMITER)
    if parts is None:
        spans = parse_spans(text)
        return tuple(spans[0]) if spans else None
    evidence, answer = parts
    spans = parse_spans(answer)
    if spans:
        return tuple(spans[0])
    if evidence_fallback:
        evidence_spans = parse_evidence_spans(evidence)
        if evidence_spans:
            return tuple(evidence_spans[0])
    return None


def load_items(preds: Any, gt: Any | None = None) -> list[GroundingItem]:
    """Normalise any accepted prediction layout (module docstring) to items.

    Args:
        preds: A list of records, or a TimeChat/D2VLM ``{qid: {...}}`` dict.
        gt: The COCO-form GT (required with a dict of predictions).

    Returns:
        One item per query (for a dict: one per GT annotation).

    Raises:
        ValueError: On a layout that matches none of the accepted forms.
    """
    items: list[GroundingItem] = []
    if isinstance(preds, dict):
        if gt is None or not isinstance(gt, dict) or "annotations" not in gt:
            raise ValueError("TimeChat-format Charades predictions need --gt with an 'annotations' list")
        for index, ann in enumerate(gt["annotations"]):
            qid = str(ann.get("id", index))
            entry = preds.get(qid)
            raw = _flat_timestamp(entry.get("timestamp")) if isinstance(entry, dict) else None
            items.append(GroundingItem(gt_s=(float(ann["timestamp"][0]), float(ann["timestamp"][1])), pred_s=raw))
        return items
    if not isinstance(preds, list):
        raise ValueError("Charades predictions must be a list of records or a {qid: {...}} dict")
    for record in preds:
        if not isinstance(record, dict):
            raise ValueError("each Charades prediction record must be an object")
        if "pred" in record and "span" in record:
            raw = record["pred"]
            pred_s = tuple(float(v) for v in raw) if isinstance(raw, (list, tuple)) else None
            span = record["span"]
            items.append(GroundingItem(gt_s=(float(min(span)), float(max(span))), pred_s=pred_s,
                                       text=record.get("response")))
        elif "a" in record and "tgt" in record:
            tgt = record["tgt"]
            if tgt and isinstance(tgt[0], (list, tuple)):
                tgt = tgt[0]
            items.append(GroundingItem(gt_s=(float(tgt[0]), float(tgt[1])), text=str(record["a"])))
        else:
            raise ValueError("a Charades record needs 'a' and 'tgt' (or E.T. Chat's 'pred' and 'span')")
    return items


def evaluate_charades(items: list[GroundingItem], convention: str = "standard") -> dict[str, Any]:
    """Score Charades-STA items under one evaluator convention.

    Args:
        items: Queries from ``load_items``.
        convention: ``standard``, ``etchat``, ``timechat`` or ``d2vlm``.

    Returns:
        The convention's metric dict (keys and scale in the module docstring),
        with ``Total`` and ``Failed`` counts.

    Raises:
        ValueError: For an unknown convention or no items.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown Charades convention {convention!r}; choose from {CONVENTIONS}")
    if not items:
        raise ValueError("no Charades predictions to score")
    total = len(items)

    if convention == "standard":
        preds: list[tuple[float, float] | None] = []
        for item in items:
            raw = item.pred_s if item.pred_s is not None else (
                _text_span(item.text, evidence_fallback=True) if item.text is not None else None)
            preds.append((min(raw[:2]), max(raw[:2])) if raw is not None and len(raw) == 2 else None)
        out = recall_at_iou(preds, [item.gt_s for item in items], CHARADES_THRESHOLDS)
        return {"Total": total, "Failed": sum(p is None for p in preds)} | out

    if convention == "etchat":
        ious, failed = [], 0
        for item in items:
            raw = item.pred_s
            if raw is None and item.text is not None:
                raw = _text_span(item.text, evidence_fallback=False)
            if raw is None or len(raw) != 2:
                failed += 1
                ious.append(0.0)
                continue
            iou = nncore_iou(item.gt_s, raw)
            ious.append(iou if math.isfinite(iou) else 0.0)
        ious_arr = np.asarray(ious)
        out = {f"R1@{thr}": round(float(np.sum(ious_arr >= thr)) / total, 3) for thr in CHARADES_THRESHOLDS}
        return {"Total": total, "Failed": failed} | out | {"mIoU": round(float(np.sum(ious_arr)) / total, 3)}

    scored: list[float] = []
    failed = 0
    for item in items:
        raw = item.pred_s
        if raw is None and item.text is not None:
            if convention == "timechat":
                spans = parse_spans(item.text, to_stage=False)
                raw = tuple(spans[0]) if spans else None
            else:
                raw = _text_span(item.text, evidence_fallback=True)
        if raw is None or len(raw) < 2:
            failed += 1
            if convention == "timechat":
                scored.append(0.0)
            continue
        scored.append(timechat_iou(raw, item.gt_s))
    ious_arr = np.asarray(scored, dtype=np.float64)
    if convention == "timechat":
        out = {f"R@{thr}": 100.0 * float(np.sum(ious_arr >= thr)) / total for thr in CHARADES_THRESHOLDS}
        return {"Total": total, "Failed": failed} | out
    denominator = max(len(scored), 1)
    out = {f"R@{thr}": 100.0 * float(np.sum(ious_arr >= thr)) / denominator for thr in (0.0, *CHARADES_THRESHOLDS)}
    return {"Total": total, "Failed": failed, "Scored": len(scored)} | out | {
        "mIoU": float(np.sum(ious_arr)) / denominator}
