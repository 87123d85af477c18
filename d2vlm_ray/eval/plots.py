"""PNG plots of an evaluation run (matplotlib, Agg canvas; no display, no pyplot state).

* :func:`plot_timelines`: per sample, the ground-truth spans, the answer's spans and the
  evidence (grounding) spans on one time axis, so a person can see at a glance whether
  the model points at the right moments.
* :func:`plot_recall_curves`: R@1 against the IoU threshold, one panel per task and one
  line per way of reading the prediction (text, structured, evidence).

Figures are drawn on :class:`matplotlib.figure.Figure` with an explicit Agg canvas, so
calling these never changes the process-wide matplotlib backend. matplotlib is imported
inside the functions (it is an optional dependency, the ``eval`` extra).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SpanList = Sequence[Sequence[float]]

# Row order and colours of a timeline panel (colour-blind-safe Okabe-Ito hues).
_TIMELINE_ROWS = (("ground truth", "#009E73"), ("answer", "#E69F00"), ("evidence", "#0072B2"))
_MODE_STYLES = {"text": ("#E69F00", "o"), "structured": ("#D55E00", "s"), "evidence": ("#0072B2", "^")}
_MARKED_THRESHOLDS = (0.3, 0.5, 0.7)


@dataclass
class TimelineItem:
    """One sample drawn on a timeline.

    Attributes:
        label: Panel title (sample id and task).
        duration_s: Length of the time axis in seconds.
        gt_spans_s: Ground-truth spans.
        pred_spans_s: Spans of the answer part.
        evidence_spans_s: Spans of the grounding (evidence) part.
        note: Short text shown next to the title (IoU, failure reason, truncation).
    """

    label: str
    duration_s: float
    gt_spans_s: SpanList
    pred_spans_s: SpanList = field(default_factory=list)
    evidence_spans_s: SpanList = field(default_factory=list)
    note: str = ""


def _new_figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _bars(spans: SpanList) -> list[tuple[float, float]]:
    """``(start_s, width_s)`` pairs for ``broken_barh``; reversed spans are drawn ordered."""
    out = []
    for span in spans:
        start_s, end_s = sorted((float(span[0]), float(span[1])))
        # A zero-length span still gets a visible sliver.
        out.append((start_s, max(end_s - start_s, 0.15)))
    return out


def plot_timelines(items: Sequence[TimelineItem], path: str | Path, title: str = "Ground truth vs prediction") -> Path:
    """Draw one timeline panel per item into a PNG.

    Args:
        items: Samples to draw (an empty list gives a figure that says so).
        path: Output PNG path (its folder is created).
        title: Figure title.

    Returns:
        The PNG path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_panels = max(len(items), 1)
    fig = _new_figure(10.0, 1.0 + 1.25 * n_panels)
    fig.suptitle(title, fontsize=12)
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    if not items:
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, "no samples with ground-truth spans", ha="center", va="center")
    for ax, item in zip(axes, items):
        rows = (item.gt_spans_s, item.pred_spans_s, item.evidence_spans_s)
        for row_idx, ((_, colour), spans) in enumerate(zip(_TIMELINE_ROWS, rows)):
            y = len(_TIMELINE_ROWS) - 1 - row_idx
            ax.broken_barh(_bars(spans), (y - 0.35, 0.7), facecolors=colour, edgecolors="black", linewidth=0.5)
        ax.set_yticks(range(len(_TIMELINE_ROWS)), [name for name, _ in reversed(_TIMELINE_ROWS)], fontsize=8)
        ax.set_ylim(-0.6, len(_TIMELINE_ROWS) - 0.4)
        ends = [float(v) for spans in rows for span in spans for v in span]
        ax.set_xlim(0.0, max([float(item.duration_s), *ends, 1.0]))
        ax.grid(axis="x", linestyle=":", linewidth=0.6)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(f"{item.label}   {item.note}".strip(), fontsize=9, loc="left")
    axes[-1].set_xlabel("time (s)")
    fig.savefig(path, dpi=110)
    return path


def plot_recall_curves(
    thresholds: Sequence[float],
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    title: str = "R@1 vs IoU threshold",
) -> Path:
    """Draw recall-vs-IoU curves, one panel per task, one line per prediction mode.

    Args:
        thresholds: IoU thresholds (x axis).
        curves: ``{task: {mode: [R@1 at each threshold]}}``; modes ``text``,
            ``structured`` and ``evidence`` get fixed colours.
        path: Output PNG path.
        title: Figure title.

    Returns:
        The PNG path.

    Raises:
        ValueError: If a curve's length differs from the thresholds'.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = list(curves)
    n_panels = max(len(tasks), 1)
    fig = _new_figure(4.2 * n_panels, 3.6)
    fig.suptitle(title, fontsize=12)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    if not tasks:
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, "no single-span grounding tasks", ha="center", va="center")
    for ax, task in zip(axes, tasks):
        for mode, values in curves[task].items():
            if len(values) != len(thresholds):
                raise ValueError(f"curve {task}/{mode}: {len(values)} values for {len(thresholds)} thresholds")
            colour, marker = _MODE_STYLES.get(mode, ("#555555", "."))
            ax.plot(list(thresholds), list(values), marker=marker, markersize=3, color=colour, label=mode)
        for thr in _MARKED_THRESHOLDS:
            ax.axvline(thr, color="grey", linestyle=":", linewidth=0.7)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("IoU threshold")
        ax.set_ylabel("R@1")
        ax.set_title(task)
        ax.grid(linestyle=":", linewidth=0.5)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


__all__ = ["TimelineItem", "plot_recall_curves", "plot_timelines"]
