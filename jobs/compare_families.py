"""Head-to-head: D2VLM against Grounded-VideoLLM at one LLM size and one step budget.

    python -m jobs.compare_families                 # the comparison (2 CPU cores: under 30 min)
    python -m jobs.compare_families --preset smoke  # every stage in a few minutes

Both families get the same rendered synthetic benchmark, the same tiny LLM (``tiny`` and
``tiny-gvl`` share it), the same trainer (Ray Train + DeepSpeed), the same number of
optimizer steps at the same batch size and learning rates, the same feature cache (each
family under its own encoder id) and the same batch evaluation (Ray Data, E.T.-Bench-style
predictions, the project's metrics). Training differs only as each paper prescribes:

- D2VLM: SFT on grounding (tvg), dense captioning (dvc) and grounded QA (gqa). FPO is left
  out: it is D2VLM's own second stage and would double its step budget.
- Grounded-VideoLLM: its three stages within the same budget: (1) video-caption alignment
  (projectors only, on the dense captions without times), (2) grounded alignment with the
  temporal tokens (projectors, token embeddings and LoRA, on tvg and dvc), (3) mixed
  fine-tuning on tvg, dvc and gqa.

It prints one table (R@1 at IoU 0.3/0.5/0.7, mIoU, dense-captioning F1, grounded-QA
accuracy, training s/step, inference ms/sample), the two trivial grounding baselines, and the
temporal-token quantisation error of the test split's ground-truth spans at M = 50/100/300,
and writes ``summary.json`` and ``compare.png``.
No bar says which family should win: this job reports what it measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from d2vlm_ray.cache.spec import FeatureSpec
from d2vlm_ray.config.load import ConfigError, from_dict, merge_dicts
from d2vlm_ray.config.schema import ModelConfig
from jobs.quickstart import (
    QuickstartConfig,
    Stages,
    _evaluate,
    _prepare_benchmark,
    _task_metrics,
    _train_config,
    build_cache_settings,
)

FAMILIES = {"d2vlm": "tiny", "grounded_videollm": "tiny-gvl"}
QUANTISATION_BINS = (50, 100, 300)


@dataclass
class CompareConfig:
    """Settings of the comparison.

    Attributes:
        out_dir: Run directory.
        seed: Seed of the benchmark, both initial models and the data order.
        n_videos: Synthetic videos to render.
        split_fractions: Train / val / test fractions.
        num_cpus: CPUs of the in-process Ray cluster.
        features: Sampling and feature cache (``cache_root`` "" = ``<out_dir>/feature_cache``).
        steps: Optimizer steps per family (Grounded-VideoLLM splits them over its stages).
        gvl_stage_fractions: Share of ``steps`` of Grounded-VideoLLM's stages 1, 2, 3.
        batch_size: Samples per step per worker.
        lr: Learning rate of non-LoRA trainables (the quickstart's SFT rate).
        lora_lr: Learning rate of LoRA weights.
        task_repeats: Times each training record of a task appears per epoch (the quickstart's).
        train_workers: Ray Train workers.
        eval_tasks: Test-split tasks evaluated.
        eval_max_new_tokens: Generation bound in evaluation and timing (a Grounded-VideoLLM
            span costs two tokens, an ``<evi>`` one, so the bound leaves room for both).
        timing_samples: Test questions generated one at a time to time inference.
    """

    out_dir: str = "runs/compare_families"
    seed: int = 0
    n_videos: int = 600
    split_fractions: list[float] = field(default_factory=lambda: [0.75, 0.05, 0.2])
    num_cpus: int = 2
    features: FeatureSpec = field(default_factory=FeatureSpec)
    steps: int = 2200
    gvl_stage_fractions: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.6])
    batch_size: int = 4
    lr: float = 3e-3
    lora_lr: float = 2e-3
    task_repeats: dict[str, int] = field(default_factory=lambda: {"tvg": 2, "gqa": 2})
    train_workers: int = 2
    eval_tasks: list[str] = field(default_factory=lambda: ["tvg", "dvc", "gqa"])
    eval_max_new_tokens: int = 48
    timing_samples: int = 16

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field."""
        if self.steps < 3:
            raise ConfigError("steps: need at least 3 (one per Grounded-VideoLLM stage)")
        fractions = self.gvl_stage_fractions
        if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ConfigError(f"gvl_stage_fractions: need three positive shares summing to 1, got {fractions}")
        if self.timing_samples < 1:
            raise ConfigError("timing_samples: must be >= 1")


SMOKE: dict[str, Any] = {
    "n_videos": 12,
    "split_fractions": [0.5, 0.17, 0.33],
    "steps": 20,
    "batch_size": 1,
    "eval_max_new_tokens": 8,
    "timing_samples": 2,
}
PRESETS: dict[str, dict[str, Any]] = {"full": {}, "smoke": SMOKE}


def stage_steps(total: int, fractions: list[float]) -> list[int]:
    """Split ``total`` steps over stages by ``fractions`` (each at least 1, summing to ``total``)."""
    steps = [max(1, round(total * f)) for f in fractions[:-1]]
    return [*steps, total - sum(steps)]


def _quickstart_cfg(cfg: CompareConfig, preset: str, lora: dict[str, Any], steps: int) -> QuickstartConfig:
    """The quickstart settings the shared helpers read, for one family and stage."""
    model = from_dict(ModelConfig, merge_dicts(asdict(from_dict(ModelConfig, {"preset": preset})), {"lora": lora}))
    return QuickstartConfig(
        out_dir=cfg.out_dir,
        seed=cfg.seed,
        n_videos=cfg.n_videos,
        split_fractions=list(cfg.split_fractions),
        num_cpus=cfg.num_cpus,
        features=cfg.features,
        sft_steps=steps,
        sft_lr=cfg.lr,
        sft_lora_lr=cfg.lora_lr,
        sft_batch_size=cfg.batch_size,
        train_workers=cfg.train_workers,
        eval_tasks=list(cfg.eval_tasks),
        eval_max_new_tokens=cfg.eval_max_new_tokens,
        eval_batch_size=4,
        eval_actors=1,
        model=model,
    )


def _train_plan(cfg: CompareConfig, family: str, ann: dict[str, Path], root: Path) -> list[dict[str, Any]]:
    """The training stages of one family: name, steps, LoRA policy and data."""
    data = {"train": str(ann["train"]), "video_root": str(root), "task_repeats": dict(cfg.task_repeats)}
    all_tasks = {**data, "tasks": ["tvg", "dvc", "gqa"]}
    if family == "d2vlm":
        return [{"name": "sft", "steps": cfg.steps, "lora": {}, "data": all_tasks}]
    s1, s2, s3 = stage_steps(cfg.steps, cfg.gvl_stage_fractions)
    return [
        {"name": "stage1_align", "steps": s1, "lora": {"tuning_mode": "projectors"},
         "data": {"train": str(ann["train"]), "video_root": str(root), "captions_only": True}},
        {"name": "stage2_grounded", "steps": s2, "lora": {"tuning_mode": "attention"},
         "data": {**data, "tasks": ["tvg", "dvc"], "task_repeats": {"tvg": cfg.task_repeats.get("tvg", 1)}}},
        {"name": "stage3_mixed", "steps": s3, "lora": {"tuning_mode": "attention"}, "data": all_tasks},
    ]


def _inference_ms(ckpt: str, records: list[Any], root: Path, spec: FeatureSpec, max_new_tokens: int) -> float:
    """Median wall time of one greedy generation (one question at a time, features cached)."""
    import torch

    from d2vlm_ray.cache import FeatureSource
    from d2vlm_ray.config.schema import DecodeSettings
    from d2vlm_ray.model.checkpoint import from_pretrained, load_frame_encoder
    from d2vlm_ray.model.generation import generate
    from d2vlm_ray.model.inputs import build_batch

    model, tok, _ = from_pretrained(ckpt)
    source = FeatureSource(load_frame_encoder(ckpt), spec)
    settings = DecodeSettings(max_new_tokens=max_new_tokens)
    times_ms = []
    with torch.no_grad():
        for r in records:
            feats = source.features(str(root / r.video)).features
            start = time.perf_counter()
            batch = build_batch(
                tok.llm, tok.qformer, [r.query], [feats.patches], [feats.timestamps_s], [feats.duration_s],
                src_spans_s=[list(r.src_spans_s)],
            )
            generate(model, tok.llm, batch, settings)
            times_ms.append((time.perf_counter() - start) * 1000.0)
    return round(statistics.median(times_ms), 1)


def _quantisation(records: list[Any]) -> dict[str, dict[str, float]]:
    from d2vlm_ray.model.temporal_tokens import quantisation_error

    spans = [s for r in records for s in r.spans_s]
    durations = [r.duration_s for r in records for _ in r.spans_s]
    return {str(m): quantisation_error(spans, durations, m) for m in QUANTISATION_BINS}


def run(cfg: CompareConfig) -> dict[str, Any]:
    """Run both families; returns the summary also written to ``summary.json``."""
    import ray

    from d2vlm_ray.config.load import dump_config
    from d2vlm_ray.data.annotations import read_evi_json
    from d2vlm_ray.data.synthetic import grounding_baselines
    from d2vlm_ray.model.checkpoint import init_checkpoint
    from d2vlm_ray.pipelines.build_cache import BuildCacheConfig, build_cache
    from d2vlm_ray.pipelines.runtime import ensure_ray
    from d2vlm_ray.train.trainer import train_sft

    cfg.validate()
    out = Path(cfg.out_dir).resolve()
    cfg = replace(cfg, features=replace(cfg.features, cache_root=cfg.features.cache_root or str(out / "feature_cache")))
    dump_config(cfg, out)
    stages = Stages()
    started_s = time.perf_counter()
    started_ray = ensure_ray(cfg.num_cpus)
    results: dict[str, dict[str, Any]] = {}
    try:
        bench = _prepare_benchmark(_quickstart_cfg(cfg, "tiny", {}, cfg.steps), out, stages, None)
        root, ann = bench.root, bench.annotations
        manifest = out / "manifest.txt"
        manifest.write_text("\n".join(str(p) for p in bench.videos()) + "\n")
        test_records = read_evi_json(ann["test"]).records
        timing = [r for r in test_records if r.task == "tvg"][: cfg.timing_samples]
        for family, preset in FAMILIES.items():
            fam_out = out / family
            base = _quickstart_cfg(cfg, preset, {}, cfg.steps)
            ckpt = stages.run(
                f"{family}: initialise {preset}",
                lambda b=base, o=fam_out: init_checkpoint(b.model, o / "init", seed=cfg.seed),
            )
            stages.run(
                f"{family}: build feature cache (Ray Data)",
                lambda b=base, o=fam_out, c=ckpt: build_cache(
                    from_dict(BuildCacheConfig, build_cache_settings(b, o, manifest, c, root))
                ),
            )
            train_s, steps = 0.0, 0
            for stage in _train_plan(cfg, family, ann, root):
                qcfg = _quickstart_cfg(cfg, preset, stage["lora"], stage["steps"])
                summary = stages.run(
                    f"{family}: {stage['name']} ({stage['steps']} steps, Ray Train + DeepSpeed)",
                    lambda q=qcfg, s=stage, c=str(ckpt): train_sft(
                        _train_config(q, "sft", fam_out / s["name"], c, s["data"])
                    ),
                )
                ckpt = summary["model_dir"]
                train_s += summary["step_s"] * summary["steps"]
                steps += summary["steps"]
            evaluation = stages.run(
                f"{family}: evaluate (Ray Data)",
                lambda b=base, o=fam_out, c=str(ckpt): _evaluate(b, o, root, family, c, cfg.eval_tasks),
            )
            inference_ms = stages.run(
                f"{family}: time inference ({len(timing)} questions, one at a time)",
                lambda c=str(ckpt): _inference_ms(c, timing, root, cfg.features, cfg.eval_max_new_tokens),
            )
            results[family] = {
                **_task_metrics(evaluation),
                "train_s_per_step": round(train_s / max(steps, 1), 3),
                "steps": steps,
                "inference_ms_per_sample": inference_ms,
                "checkpoint": str(ckpt),
                "report": str(fam_out / "eval" / family / "summary.md"),
            }
    finally:
        if started_ray:
            ray.shutdown()
    trivial = grounding_baselines(read_evi_json(ann["train"]).records, test_records)
    summary = {
        "seed": cfg.seed,
        "steps": cfg.steps,
        "gvl_stage_steps": stage_steps(cfg.steps, cfg.gvl_stage_fractions),
        "families": results,
        "baselines_r1_iou_0_5": {"whole_video": trivial["whole_video_r1"], "training_mean_span": trivial["train_mean_r1"]},
        "quantisation": _quantisation(test_records),
        "stage_seconds": stages.seconds,
        "wall_seconds": round(time.perf_counter() - started_s, 1),
    }
    summary["plot"] = str(write_plot(summary, out / "compare.png"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


ROWS = [
    ("R@1 IoU 0.3", "R@0.3"),
    ("R@1 IoU 0.5", "R@0.5"),
    ("R@1 IoU 0.7", "R@0.7"),
    ("mIoU", "mIoU"),
    ("dense captioning F1", "dvc_F1"),
    ("grounded QA accuracy", "gqa_acc"),
    ("training s/step", "train_s_per_step"),
    ("inference ms/sample", "inference_ms_per_sample"),
]


def write_plot(summary: dict[str, Any], path: Path) -> Path:
    """Bar chart of the quality metrics (left) and the costs (right), one bar per family."""
    from matplotlib.figure import Figure

    fams = list(summary["families"])
    fig = Figure(figsize=(11, 4))
    quality, cost = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(len(fams), 1)
    for ax, rows in ((quality, ROWS[:6]), (cost, ROWS[6:])):
        for i, fam in enumerate(fams):
            values = [summary["families"][fam].get(key) or 0.0 for _, key in rows]
            ax.bar([x + i * width for x in range(len(rows))], values, width, label=fam)
        ax.set_xticks([x + width * (len(fams) - 1) / 2 for x in range(len(rows))])
        ax.set_xticklabels([label for label, _ in rows], rotation=30, ha="right", fontsize=8)
    quality.set_ylabel("score")
    cost.set_yscale("log")
    quality.legend()
    fig.suptitle(f"D2VLM vs Grounded-VideoLLM, tiny LLM, {summary['steps']} steps, seed {summary['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def print_summary(summary: dict[str, Any]) -> None:
    """The comparison table, the quantisation errors and the timings."""
    fams = list(summary["families"])
    print(f"\n| metric | {' | '.join(fams)} |")
    print(f"|---|{'---|' * len(fams)}")
    for label, key in ROWS:
        print(f"| {label} | {' | '.join(_fmt(summary['families'][f].get(key)) for f in fams)} |")
    base = summary["baselines_r1_iou_0_5"]
    print(f"\ntrivial baselines, R@1 IoU 0.5: whole video {base['whole_video']:.3f}, "
          f"training-mean span {base['training_mean_span']:.3f}")
    print("\ntemporal-token quantisation error of the test split's ground-truth spans:")
    for m, err in summary["quantisation"].items():
        print(f"  M={m}: mean {err['mean_abs_s']:.3f} s, max {err['max_abs_s']:.3f} s, mean/duration {err['mean_rel']:.4f}")
    print(f"\nseed {summary['seed']}, {summary['steps']} steps per family "
          f"(Grounded-VideoLLM stages {summary['gvl_stage_steps']}); wall clock {summary['wall_seconds']} s")
    print(f"plot: {summary['plot']}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0 on success, 2 on a configuration error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", default=None, help="run directory (default runs/compare_families)")
    args = parser.parse_args(argv)
    data = dict(PRESETS[args.preset])
    if args.seed is not None:
        data["seed"] = args.seed
    if args.out:
        data["out_dir"] = args.out
    try:
        cfg = from_dict(CompareConfig, data)
        cfg.validate()
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print_summary(run(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
