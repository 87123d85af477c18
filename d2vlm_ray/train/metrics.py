"""Metric sinks of a training run: log lines, JSONL, CSV and TensorBoard event files.

A run directory holds, next to Ray Train's checkpoints:

- ``train_metrics.jsonl`` / ``train_metrics.csv``: one row per optimizer step;
- ``eval_metrics.jsonl`` / ``eval_metrics.csv``: one row per evaluation;
- ``tensorboard/``: the same scalars as event files (``train/<name>``, ``eval/<name>``);
- ``samples/rank<r>.jsonl``: the sample ids each rank trained at each step (the record
  that resume tests compare).

After a restart the files are appended to, so a step that ran twice (once before a
failure, once after resuming) appears twice; readers keep the last row of each step.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("d2vlm_ray.train")

_SHOWN = ("loss", "lm", "grounding", "consistency", "preference", "margin", "lr", "lora_lr", "samples_per_s")


def format_metrics(prefix: str, step: int, metrics: Mapping[str, float]) -> str:
    """A one-line human summary, the most useful terms first."""
    extra = sorted(k for k in metrics if k.startswith(("eval", "R@", "mIoU", "pref")))
    shown = [k for k in _SHOWN if k in metrics] + extra
    parts = [f"{k}={metrics[k]:.4g}" for k in dict.fromkeys(shown)]
    return f"{prefix} step {step}: " + " ".join(parts)


class MetricsWriter:
    """Appends metric rows to JSONL + CSV files and TensorBoard (rank 0 only).

    Args:
        run_dir: The run directory (created if missing).
        tensorboard: Also write TensorBoard event files.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._tb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _append(self, name: str, row: Mapping[str, Any]) -> None:
        with open(self.run_dir / f"{name}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(dict(row), sort_keys=True) + "\n")
        csv_path = self.run_dir / f"{name}.csv"
        new = not csv_path.exists() or csv_path.stat().st_size == 0
        if new:
            fields = list(row)
        else:
            with open(csv_path, encoding="utf-8") as fh:
                fields = next(csv.reader(fh))
        with open(csv_path, "a", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(dict(row))

    def write(self, kind: str, step: int, metrics: Mapping[str, float]) -> None:
        """Append one row of ``kind`` (``train`` or ``eval``) at ``step``."""
        row = {"step": step, **{k: v for k, v in metrics.items() if k != "step"}}
        self._append(f"{kind}_metrics", row)
        if self._tb is not None:
            for key, value in metrics.items():
                if key != "step":
                    self._tb.add_scalar(f"{kind}/{key}", float(value), step)

    def flush(self) -> None:
        """Push TensorBoard events to disk."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def append_samples(run_dir: str | Path, rank: int, step: int, sample_ids: Sequence[str]) -> None:
    """Record the sample ids ``rank`` trained at ``step`` (``samples/rank<r>.jsonl``)."""
    path = Path(run_dir) / "samples" / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": step, "sample_ids": list(sample_ids)}) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file (``[]`` if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def samples_by_step(run_dir: str | Path, rank: int) -> dict[int, list[str]]:
    """The sample ids of each step on ``rank``; a step that ran twice keeps its last record."""
    out: dict[int, list[str]] = {}
    for row in read_jsonl(Path(run_dir) / "samples" / f"rank{rank}.jsonl"):
        out[int(row["step"])] = list(row["sample_ids"])
    return out


class LocalReporter:
    """A :class:`d2vlm_ray.train.loop.Reporter` for single-process runs.

    Checkpoints go to ``run_dir/checkpoints/step_<N>`` (older ones are removed beyond
    ``num_to_keep``).

    Args:
        run_dir: The run directory.
        rank: This process's rank (only rank 0 writes metrics).
        tensorboard: Write TensorBoard event files.
        num_to_keep: Checkpoints kept.
        log_every: Log a line every N steps.
    """

    def __init__(
        self, run_dir: str | Path, *, rank: int = 0, tensorboard: bool = True, num_to_keep: int = 1, log_every: int = 1
    ) -> None:
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.writer = MetricsWriter(self.run_dir, tensorboard=tensorboard) if rank == 0 else None
        self.num_to_keep = num_to_keep
        self.log_every = log_every
        self.checkpoints: list[Path] = []

    def log_step(self, step: int, metrics: Mapping[str, float], sample_ids: Sequence[str]) -> None:
        append_samples(self.run_dir, self.rank, step, sample_ids)
        if self.writer is not None:
            self.writer.write("train", step, metrics)
            if step % self.log_every == 0:
                logger.info(format_metrics("train", step, metrics))

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.writer is not None and metrics:
            self.writer.write("eval", step, metrics)
            logger.info(format_metrics("eval", step, metrics))

    def save(self, step: int, metrics: Mapping[str, float], write: Callable[[Path], None]) -> None:
        path = self.run_dir / "checkpoints" / f"step_{step:06d}"
        write(path)
        self.checkpoints.append(path)
        while len(self.checkpoints) > self.num_to_keep:
            shutil.rmtree(self.checkpoints.pop(0), ignore_errors=True)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Close the metric files."""
        if self.writer is not None:
            self.writer.close()
