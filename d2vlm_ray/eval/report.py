"""Metrics and the human-readable report of an evaluation run.

Input: prediction records as the batch-inference pipeline writes them (E.T. Bench
records plus ``a``, ``pred_spans_s``, ``grounding_spans_s``, ``truncated``, ``status``,
``error``; see :mod:`d2vlm_ray.pipelines.inference`). Output:

* ``metrics.json``: :func:`compute_metrics` (plus whatever the caller adds, e.g. ``run``);
* ``summary.md``: :func:`summary_markdown`, a table per task and a merged row;
* ``plots/timelines.png`` and ``plots/recall_iou.png`` (:mod:`d2vlm_ray.eval.plots`).

**Synthetic benchmark** (:func:`synthetic_metrics`; tasks of :mod:`d2vlm_ray.data.synthetic`).
Every task is scored in up to three ways of reading a prediction:

* ``text`` (the headline; what an E.T. Bench scorer would read): the spans parsed with
  the official ``parse_spans`` rule from the answer part of ``a``, i.e. the text after
  the last ``</evi>``; a response without ``</evi>`` is a failure (D2VLM's convention);
* ``structured``: ``pred_spans_s``, the spans of the answer part's ``<evi>`` tokens as the
  decoder produced them (no rounding to 0.1 s, no parsing);
* ``evidence``: ``grounding_spans_s``, the spans of the ``<evi>`` tokens before ``</evi>``.

Metrics per task; a failed sample (``status: failed``) or an unreadable prediction stays
in every denominator and scores 0:

* ``tvg``: R@1 at IoU 0.3/0.5/0.7 and mIoU of the FIRST predicted span
  (:func:`~d2vlm_ray.eval.spans.recall_at_iou`); headline ``R@0.5``.
* ``dvc``: E.T. Bench dense-captioning detection F1 over all predicted spans
  (:func:`~d2vlm_ray.eval.spans.dense_caption_f1`); headline ``F1``.
* ``tal``: E.T. Bench TAL F1 (:func:`tal_f1`: per sample, precision and recall of the
  G×P IoU matrix at each IoU 0.1/0.3/0.5/0.7, no one-to-one matching, mean over
  thresholds and samples); headline ``F1``.
* ``gqa``: ``Acc``, the share of answers that name the correct option (:func:`option_hit`),
  read from the answer part (the whole text when there is no ``</evi>``); the
  grounding of the evidence span is scored like ``tvg`` under ``structured`` and
  ``evidence``; headline ``Acc``.

``merged`` is the mean of the task headlines over the tasks present (text reading).
Other task codes are counted under ``unscored_tasks``.

**E.T. Bench** (``benchmark="etbench"``): :func:`d2vlm_ray.eval.etbench.evaluate_etbench`
with the chosen variant, under ``etbench``; the summary shows each (task, source) group,
the ``Overall`` row and the ``Merged`` averages. Records of other task codes are left out
and counted under ``unscored_tasks``.

Every benchmark also gets ``counts`` (total, ok, failed, truncated, failure reasons, per
task) and ``curves`` (R@1 at IoU 0.05..0.95 for single-span grounding tasks, per reading).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from d2vlm_ray.eval.parsers import EVIDENCE_DELIMITER, Span, parse_spans, split_evidence
from d2vlm_ray.eval.spans import (
    CHARADES_THRESHOLDS,
    ETBENCH_THRESHOLDS,
    dense_caption_f1,
    recall_at_iou,
    temporal_iou,
)

SYNTHETIC_TASKS = ("tvg", "dvc", "tal", "gqa")
HEADLINE = {"tvg": "R@0.5", "dvc": "F1", "tal": "F1", "gqa": "Acc"}
CURVE_TASKS = ("tvg", "epm", "gqa", "gvq")
CURVE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
READINGS = ("text", "structured", "evidence")
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"


# --- reading one prediction -------------------------------------------------------------


def gt_spans(record: Mapping[str, Any]) -> list[Span]:
    """The record's ``tgt`` as a list of ``[start_s, end_s]`` (flat ``[s, e]`` is wrapped).

    VHD's per-annotator nesting ``[[[s, e], ...], ...]`` is flattened.
    """
    raw = record.get("tgt")
    if not raw:
        return []
    if not isinstance(raw[0], (list, tuple)):
        return [[float(raw[0]), float(raw[1])]]
    if raw[0] and isinstance(raw[0][0], (list, tuple)):
        raw = [span for annotator in raw for span in annotator]
    return [[float(s[0]), float(s[1])] for s in raw]


def is_failed(record: Mapping[str, Any]) -> bool:
    """True for a sample the pipeline could not predict."""
    return record.get("status", "ok") != "ok"


def answer_part(record: Mapping[str, Any]) -> str | None:
    """Text after the last ``</evi>`` of ``a``; ``None`` when failed or without ``</evi>``."""
    if is_failed(record):
        return None
    parts = split_evidence(str(record.get("a", "")), EVIDENCE_DELIMITER)
    return parts[1] if parts else None


def predicted_spans(record: Mapping[str, Any], reading: str) -> list[Span] | None:
    """The predicted spans under one reading (``text``, ``structured`` or ``evidence``).

    Returns:
        The spans, or ``None`` for a failure (failed sample, nothing readable).

    Raises:
        ValueError: For an unknown reading.
    """
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    if is_failed(record):
        return None
    if reading == "text":
        part = answer_part(record)
        return parse_spans(part) if part is not None else None
    key = "pred_spans_s" if reading == "structured" else "grounding_spans_s"
    spans = [[float(s[0]), float(s[1])] for s in record.get(key) or []]
    return spans or None


def _first(spans: list[Span] | None) -> Span | None:
    return spans[0] if spans else None


# --- metrics -----------------------------------------------------------------------------


def tal_f1(
    preds: Sequence[Sequence[Span] | None],
    gts: Sequence[Sequence[Span]],
    thresholds: Sequence[float] = ETBENCH_THRESHOLDS,
) -> dict[str, float]:
    """E.T. Bench TAL F1 on structured spans.

    Per sample and threshold θ, with ``M`` the G×P IoU matrix: 0 if ``max M < θ``, else
    ``2PR/(P+R)`` with ``R`` the share of GT spans and ``P`` the share of predictions whose
    best IoU is ``>= θ`` (no one-to-one matching). ``F1@θ`` averages over ALL samples (a
    missing prediction scores 0); ``F1`` averages over thresholds.

    Args:
        preds: Per sample, the predicted spans (or ``None``).
        gts: Per sample, the ground-truth spans.
        thresholds: IoU thresholds.

    Returns:
        ``{"F1@θ": ..., "F1": ...}`` as unrounded fractions; zeros for an empty input.

    Raises:
        ValueError: If the two lists differ in length.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground truths")
    sums = np.zeros(len(thresholds), dtype=np.float64)
    for pred, gt in zip(preds, gts):
        if not pred or not gt:
            continue
        matrix = np.array([[temporal_iou(g, p) for p in pred] for g in gt], dtype=np.float64)  # [G, P]
        for i, thr in enumerate(thresholds):
            if matrix.max() < thr:
                continue
            recall = float(np.mean(matrix.max(axis=1) >= thr))
            precision = float(np.mean(matrix.max(axis=0) >= thr))
            sums[i] += 2 * precision * recall / (precision + recall)
    total = max(len(gts), 1)
    out = {f"F1@{thr}": float(s / total) for thr, s in zip(thresholds, sums)}
    out["F1"] = float(np.mean(sums / total)) if len(thresholds) else 0.0
    return out


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase.lower())}\b", text) is not None


def option_hit(answer: str, options: Sequence[str], answer_idx: int) -> bool:
    """Whether ``answer`` names the correct option and no other one.

    Matching is case-insensitive on word boundaries. Occurrences of the correct option are
    removed before the distractors are looked for, so a distractor contained in the
    correct option ("left" in "went out to the left") does not count against it.

    Args:
        answer: The answer text.
        options: The option texts.
        answer_idx: Index of the correct option.

    Returns:
        True for an unambiguous correct answer.
    """
    if not 0 <= answer_idx < len(options):
        return False
    text = answer.lower()
    correct = str(options[answer_idx]).lower()
    if not _mentions(text, correct):
        return False
    rest = re.sub(rf"\b{re.escape(correct)}\b", " ", text)
    return not any(_mentions(rest, str(o)) for i, o in enumerate(options) if i != answer_idx)


def _round(block: Mapping[str, float]) -> dict[str, float]:
    return {k: round(float(v), 5) for k, v in block.items()}


def _task_counts(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {
        "n": len(records),
        "failed": sum(is_failed(r) for r in records),
        "truncated": sum(bool(r.get("truncated")) for r in records),
    }


def _recall_readings(records: Sequence[Mapping[str, Any]], readings: Sequence[str]) -> dict[str, dict[str, float]]:
    gts = [_first(gt_spans(r)) or [0.0, 0.0] for r in records]
    out = {}
    for reading in readings:
        preds = [_first(predicted_spans(r, reading)) for r in records]
        out[reading] = _round(recall_at_iou(preds, gts, CHARADES_THRESHOLDS))
    return out


def _score_task(task: str, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = _task_counts(records)
    if task == "tvg":
        out |= _recall_readings(records, READINGS)
    elif task in ("dvc", "tal"):
        gts = [gt_spans(r) for r in records]
        for reading in READINGS:
            preds = [predicted_spans(r, reading) for r in records]
            block = dense_caption_f1(preds, gts) if task == "dvc" else tal_f1(preds, gts)
            out[reading] = _round(block)
    elif task == "gqa":
        hits = 0
        for r in records:
            if is_failed(r) or r.get("p") is None:
                continue
            part = answer_part(r)
            text = part if part is not None else str(r.get("a", ""))
            hits += option_hit(text, [str(o) for o in r.get("o") or []], int(r["p"]))
        out["text"] = {"Acc": round(hits / max(len(records), 1), 5), "correct": hits}
        out |= _recall_readings(records, ("structured", "evidence"))
    return out


def prediction_counts(predictions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Totals: ``total, ok, failed, truncated, mean_output_tokens``, ``failure_reasons``, ``per_task``."""
    reasons = Counter((r.get("error") or {}).get("reason", "unknown") for r in predictions if is_failed(r))
    per_task: dict[str, list[Mapping[str, Any]]] = {}
    for r in predictions:
        per_task.setdefault(str(r.get("task", "")), []).append(r)
    failed = sum(is_failed(r) for r in predictions)
    out_tokens = [int(r.get("n_output_tokens") or 0) for r in predictions if not is_failed(r)]
    return {
        "total": len(predictions),
        "ok": len(predictions) - failed,
        "failed": failed,
        "truncated": sum(bool(r.get("truncated")) for r in predictions),
        "mean_output_tokens": round(float(np.mean(out_tokens)), 2) if out_tokens else 0.0,
        "failure_reasons": dict(sorted(reasons.items())),
        "per_task": {task: _task_counts(rs) for task, rs in sorted(per_task.items())},
    }


def synthetic_metrics(predictions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-task metrics of the synthetic benchmark (see the module docstring).

    Returns:
        ``{"tasks": {task: {...}}, "merged": {...}, "unscored_tasks": {task: n}}``.
    """
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for r in predictions:
        by_task.setdefault(str(r.get("task", "")), []).append(r)
    tasks = {task: _score_task(task, by_task[task]) for task in SYNTHETIC_TASKS if task in by_task}
    headlines = {task: tasks[task]["text"][HEADLINE[task]] for task in tasks}
    merged: dict[str, Any] = {
        "score": round(float(np.mean(list(headlines.values()))), 5) if headlines else None,
        "headline": {task: f"{HEADLINE[task]} = {value}" for task, value in headlines.items()},
    }
    unscored = {task: len(rs) for task, rs in sorted(by_task.items()) if task not in SYNTHETIC_TASKS}
    return {"tasks": tasks, "merged": merged, "unscored_tasks": unscored}


def recall_curves(
    predictions: Sequence[Mapping[str, Any]], thresholds: Sequence[float] = CURVE_THRESHOLDS
) -> dict[str, dict[str, list[float]]]:
    """R@1 at each threshold for single-span grounding tasks, per reading.

    Returns:
        ``{task: {reading: [R@1 ...]}}`` for the tasks of :data:`CURVE_TASKS` present
        (``gqa``/``gvq`` without the ``text`` reading, whose answer is not a span).
    """
    out: dict[str, dict[str, list[float]]] = {}
    for task in CURVE_TASKS:
        records = [r for r in predictions if r.get("task") == task and gt_spans(r)]
        if not records:
            continue
        gts = [gt_spans(r)[0] for r in records]
        readings = READINGS if task in ("tvg", "epm") else ("structured", "evidence")
        out[task] = {}
        for reading in readings:
            preds = [_first(predicted_spans(r, reading)) for r in records]
            block = recall_at_iou(preds, gts, thresholds)
            out[task][reading] = [round(block[f"R@{thr}"], 5) for thr in thresholds]
    return out


def compute_metrics(
    predictions: Sequence[Mapping[str, Any]],
    benchmark: str,
    *,
    variant: str = "official",
    with_coco: bool = False,
) -> dict[str, Any]:
    """Score predictions for ``benchmark`` and add counts and recall curves.

    Args:
        predictions: Prediction records.
        benchmark: ``synthetic``, ``etbench`` or ``none`` (counts and curves only).
        variant: E.T. Bench scorer variant.
        with_coco: E.T. Bench captioning extras (pycocoevalcap + java).

    Returns:
        ``{"benchmark", "counts", "curves", ...}`` plus ``tasks``/``merged``/``unscored_tasks``
        (synthetic) or ``etbench`` (the :func:`evaluate_etbench` result).

    Raises:
        ValueError: For an unknown benchmark or records the scorer cannot read.
    """
    out: dict[str, Any] = {"benchmark": benchmark, "counts": prediction_counts(predictions)}
    if benchmark == "synthetic":
        out |= synthetic_metrics(predictions)
    elif benchmark == "etbench":
        from d2vlm_ray.eval.etbench import TASKS, evaluate_etbench

        records = [dict(p) for p in predictions if p.get("task") in TASKS]
        out["etbench"] = evaluate_etbench(records, variant=variant, with_coco=with_coco) if records else {}
        others = Counter(str(p.get("task", "")) for p in predictions if p.get("task") not in TASKS)
        out["unscored_tasks"] = dict(sorted(others.items()))
    elif benchmark != "none":
        raise ValueError(f"benchmark must be 'synthetic', 'etbench' or 'none', got {benchmark!r}")
    out["curves"] = {"thresholds": list(CURVE_THRESHOLDS), "R@1": recall_curves(predictions)}
    return out


# --- Markdown -----------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _synthetic_lines(metrics: Mapping[str, Any]) -> list[str]:
    lines = ["## Per task (synthetic benchmark)", ""]
    rows = []
    for task, block in metrics.get("tasks", {}).items():
        keys = list(block.get("text", {}))
        for reading in ("structured", "evidence"):
            keys += [k for k in block.get(reading, {}) if k not in keys]
        for key in keys:
            if key == "correct":
                continue
            if key.startswith(("Precision@", "Recall@")):
                continue
            rows.append([task, key] + [block.get(reading, {}).get(key) for reading in READINGS])
    lines += _table(["task", "metric", "text (headline)", "structured", "evidence"], rows)
    merged = metrics.get("merged", {})
    lines += ["", "## Merged", ""]
    lines += _table(
        ["score (mean of task headlines, text)", "headlines"],
        [[merged.get("score"), "; ".join(f"{t}: {h}" for t, h in merged.get("headline", {}).items())]],
    )
    return lines


def _etbench_lines(result: Mapping[str, Any]) -> list[str]:
    lines = [f"## E.T. Bench (variant `{result.get('variant', '?')}`)", ""]
    rows = []
    for task, sources in result.items():
        if task in ("Overall", "Merged", "variant", "notes") or not isinstance(sources, Mapping):
            continue
        for source, block in sources.items():
            shown = {k: v for k, v in block.items() if k in ("Acc", "F1", "mIoU", "mRec", "SentSim")}
            detail = ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items())
            rows.append([task, source, block.get("Total"), block.get("Failed"), detail])
    lines += _table(["task", "source", "total", "failed (parse)", "metrics"], rows)
    for name in ("Overall", "Merged"):
        row = result.get(name) or {}
        if row:
            lines += ["", f"### {name} (×100)", ""]
            lines += _table(list(row), [list(row.values())])
    if result.get("notes"):
        lines += ["", "Notes: " + "; ".join(result["notes"])]
    return lines


def summary_markdown(metrics: Mapping[str, Any]) -> str:
    """A Markdown summary: counts, per-task table, merged row, run settings.

    Args:
        metrics: The :func:`compute_metrics` result (optionally with a ``run`` entry).

    Returns:
        The Markdown text.
    """
    counts = metrics.get("counts", {})
    lines = [f"# Evaluation summary ({metrics.get('benchmark', '?')})", ""]
    run = metrics.get("run") or {}
    if run:
        decoding = run.get("decoding", {})
        lines += [
            f"- checkpoint: `{run.get('checkpoint_dir', '?')}`",
            f"- annotations: `{run.get('annotations', '?')}` ({run.get('format', '?')})",
            f"- decoding: preset `{decoding.get('preset', '?')}`, "
            f"max_new_tokens {decoding.get('max_new_tokens', '?')}, "
            f"seed {run.get('seed', '?')}, inject_evidence {run.get('inject_evidence', '?')}, "
            f"blank_frames {run.get('blank_frames', '?')}",
            f"- this run predicted {run.get('n_predicted', '?')} samples, resumed {run.get('n_resumed', '?')}",
            "",
        ]
    lines += ["## Samples", ""]
    per_task = counts.get("per_task", {})
    rows = [[t, c["n"], c["failed"], c["truncated"]] for t, c in per_task.items()]
    rows.append(["**all**", counts.get("total", 0), counts.get("failed", 0), counts.get("truncated", 0)])
    lines += _table(["task", "samples", "failed", "truncated"], rows)
    if counts.get("failure_reasons"):
        lines += ["", "Failure reasons: " + ", ".join(f"`{k}` × {v}" for k, v in counts["failure_reasons"].items())]
    lines.append("")
    if metrics.get("benchmark") == "synthetic":
        lines += _synthetic_lines(metrics)
        lines += [
            "",
            "Readings: *text* = spans parsed from the answer after `</evi>` (headline); "
            "*structured* = `pred_spans_s`; *evidence* = `grounding_spans_s`. Failed samples score 0.",
        ]
    elif metrics.get("benchmark") == "etbench":
        lines += _etbench_lines(metrics.get("etbench", {}))
    if metrics.get("unscored_tasks"):
        lines += ["", "Unscored tasks (samples): " + ", ".join(f"{t} {n}" for t, n in metrics["unscored_tasks"].items())]
    lines.append("")
    return "\n".join(lines)


# --- files ---------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def timeline_items(predictions: Sequence[Mapping[str, Any]], n_samples: int) -> list[Any]:
    """Up to ``n_samples`` records with GT spans, evenly spread over the (sorted) list."""
    from d2vlm_ray.eval.plots import TimelineItem

    candidates = [r for r in predictions if gt_spans(r)]
    if not candidates or n_samples <= 0:
        return []
    picks = sorted({int(i) for i in np.round(np.linspace(0, len(candidates) - 1, min(n_samples, len(candidates))))})
    items = []
    for idx in picks:
        r = candidates[idx]
        gts = gt_spans(r)
        pred = r.get("pred_spans_s") or []
        if is_failed(r):
            note = f"FAILED: {(r.get('error') or {}).get('reason', '?')}"
        else:
            if len(gts) == 1:
                note = f"IoU {temporal_iou(pred[0], gts[0]):.2f}" if pred else "no predicted span"
            else:
                note = f"{len(pred)} predicted spans for {len(gts)}"
            if r.get("truncated"):
                note += ", truncated"
        items.append(
            TimelineItem(
                label=f"{r.get('sample_id', r.get('idx', '?'))} [{r.get('task', '?')}]",
                duration_s=float(r.get("duration") or 0.0),
                gt_spans_s=gts,
                pred_spans_s=pred,
                evidence_spans_s=r.get("grounding_spans_s") or [],
                note=note,
            )
        )
    return items


def write_report(
    out_dir: str | Path,
    predictions: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    *,
    plots: bool = True,
    timeline_samples: int = 8,
) -> dict[str, Any]:
    """Write ``metrics.json``, ``summary.md`` and (optionally) the PNG plots into ``out_dir``.

    Args:
        out_dir: Run folder.
        predictions: The merged predictions.
        metrics: The :func:`compute_metrics` result (NaN is written as ``null``).
        plots: Draw ``plots/timelines.png`` and ``plots/recall_iou.png``.
        timeline_samples: Samples on the timeline plot.

    Returns:
        ``{"metrics": Path, "summary": Path, "plots": [Path, ...]}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS_FILE
    metrics_path.write_text(json.dumps(_json_safe(metrics), indent=1, sort_keys=False) + "\n", encoding="utf-8")
    summary_path = out_dir / SUMMARY_FILE
    summary_path.write_text(summary_markdown(metrics), encoding="utf-8")
    written: list[Path] = []
    if plots:
        from d2vlm_ray.eval.plots import plot_recall_curves, plot_timelines

        items = timeline_items(predictions, timeline_samples)
        written.append(plot_timelines(items, out_dir / "plots" / "timelines.png"))
        curves = metrics.get("curves") or {"thresholds": list(CURVE_THRESHOLDS), "R@1": recall_curves(predictions)}
        written.append(plot_recall_curves(curves["thresholds"], curves["R@1"], out_dir / "plots" / "recall_iou.png"))
    return {"metrics": metrics_path, "summary": summary_path, "plots": written}


__all__ = [
    "CURVE_THRESHOLDS",
    "HEADLINE",
    "SYNTHETIC_TASKS",
    "answer_part",
    "compute_metrics",
    "gt_spans",
    "is_failed",
    "option_hit",
    "predicted_spans",
    "prediction_counts",
    "recall_curves",
    "summary_markdown",
    "synthetic_metrics",
    "tal_f1",
    "timeline_items",
    "write_report",
]
