"""Ray Data job body: factorized perturbation synthesis into Parquet preference pairs.

The driver reads the chosen samples (``evi.json`` files) and builds the caption pool once;
Ray Data then runs :func:`d2vlm_ray.data.perturb.synthesize_sample` over blocks of samples
on every node (``TaskPoolStrategy``), and writes the pairs as Parquet
(:data:`d2vlm_ray.data.fpo_annotations.PAIR_SCHEMA`), split into ``train/`` and ``val/`` by a
stable hash of the sample id. Each pair is a pure function of ``(seed, sample)``, so the
pair table, sorted by ``(sample_id, family, variant_idx)``, is the same for any number of
workers or blocks.

Per family the report counts the pairs made (``applied``) and how often the family was
drawn for a sample it could not apply to (``skipped``).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import ray

from d2vlm_ray.config.load import from_dict, to_dict
from d2vlm_ray.data.annotations import read_evi_json
from d2vlm_ray.data.fpo_annotations import (
    PAIR_COLUMNS,
    PAIR_SCHEMA,
    is_validation,
    split_pairs,
    write_pairs,
)
from d2vlm_ray.data.perturb import FAMILIES, PerturbConfig, build_caption_pool, synthesize_sample
from d2vlm_ray.types import VideoRecord

__all__ = ["SynthPairsConfig", "split_pairs", "synthesize_pairs"]

# Extra columns of the UDF's output: what each row is, and which side of the split.
_KIND = "row_kind"
_IS_VAL = "is_val"
_DETAIL = "detail"
_OUT_SCHEMA = PAIR_SCHEMA.append(pa.field(_KIND, pa.string())).append(pa.field(_IS_VAL, pa.bool_())).append(
    pa.field(_DETAIL, pa.string())
)


@dataclass
class SynthPairsConfig:
    """Settings of the pair-synthesis job.

    Attributes:
        annotations: ``evi.json`` files of chosen samples (local paths or URLs).
        video_root: Prefix joined to relative video paths (``None`` keeps them as written).
        out_dir: Run folder; pairs go to ``out_dir/train`` and ``out_dir/val``.
        perturb: Perturbation settings (seed, families and their weights, IoU bound ...).
        val_fraction: Fraction of samples whose pairs are held out in ``val/``.
        split_by: Hash key of the split: ``sample_id`` or ``video``.
        num_workers: Ray Data tasks running at once.
        num_blocks: Blocks the samples are cut into (0: two per worker).
        batch_size: Samples per UDF call.
        caption_pool_size: Captions kept per source for ``textual_replace``.
        on_error: Policy for malformed annotation records (``fail``, ``skip``, ``collect``).
        num_cpus: CPUs of a locally started Ray (ignored when connecting to a cluster).
    """

    annotations: list[str] = field(default_factory=list)
    video_root: str | None = None
    out_dir: str = "runs/synth_pairs"
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    val_fraction: float = 0.0
    split_by: Literal["sample_id", "video"] = "sample_id"
    num_workers: int = 2
    num_blocks: int = 0
    batch_size: int = 64
    caption_pool_size: int = 5000
    on_error: Literal["fail", "skip", "collect"] = "skip"
    num_cpus: int = 2

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not self.annotations:
            raise ValueError("annotations: give at least one evi.json file")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must lie in [0, 1), got {self.val_fraction}")
        if self.num_workers < 1 or self.batch_size < 1 or self.num_blocks < 0 or self.caption_pool_size < 0:
            raise ValueError("num_workers and batch_size must be >= 1; num_blocks, caption_pool_size >= 0")
        self.perturb.validate()


def load_records(cfg: SynthPairsConfig) -> tuple[list[VideoRecord], dict[str, int]]:
    """Read every annotation file; sample ids must be unique across them.

    Raises:
        ValueError: On duplicate sample ids (pairs are keyed by them).
    """
    records: list[VideoRecord] = []
    counters: Counter[str] = Counter()
    for path in cfg.annotations:
        result = read_evi_json(path, video_root=cfg.video_root, on_error=cfg.on_error)
        records += result.records
        counters.update(result.counters)
    seen: Counter[str] = Counter(r.sample_id for r in records)
    duplicates = sorted(k for k, v in seen.items() if v > 1)
    if duplicates:
        raise ValueError(f"annotations: duplicate sample ids across the input files, e.g. {duplicates[:5]}")
    return records, dict(counters)


def _synthesize_batch(
    batch: pa.Table, perturb: dict[str, Any], pool_ref: Any, val_fraction: float, split_by: str
) -> pa.Table:
    """UDF: chosen records (JSON strings) → pair rows, plus one row per skip or bad sample."""
    cfg = from_dict(PerturbConfig, perturb)
    pool = ray.get(pool_ref)
    pair_rows: list[dict[str, Any]] = []
    for text in batch.column("record").to_pylist():
        record = VideoRecord.from_dict(json.loads(text))
        result = synthesize_sample(record, cfg, pool)
        is_val = is_validation(getattr(record, split_by), val_fraction, cfg.seed)
        for pair in result.pairs:
            pair_rows.append({**pair.to_dict(), _KIND: "pair", _IS_VAL: is_val, _DETAIL: ""})
        for family, count in sorted(result.skipped.items()):
            pair_rows += [_marker(record, "skip", family, "") for _ in range(count)]
        if result.error is not None:
            pair_rows.append(_marker(record, "sample_error", result.error.split(":", 1)[0], result.error))
    return pa.Table.from_pylist(pair_rows, schema=_OUT_SCHEMA)


def _marker(record: VideoRecord, kind: str, family: str, detail: str) -> dict[str, Any]:
    return {
        "sample_id": record.sample_id, "family": family, "variant_idx": 0, "video": record.video,
        "duration_s": record.duration_s, "task": record.task, "prompt": "", "chosen_text": "",
        "chosen_spans_s": [], "rejected_text": "", "rejected_spans_s": [], "src_spans_s": [],
        _KIND: kind, _IS_VAL: False, _DETAIL: detail,
    }


def _select_pairs(batch: pa.Table, is_val: bool) -> pa.Table:
    """UDF: keep one side's pair rows, with exactly the pair columns."""
    keep = pc.and_(pc.equal(batch.column(_KIND), "pair"), pc.equal(batch.column(_IS_VAL), is_val))
    return batch.filter(keep).select(list(PAIR_COLUMNS))


def _reset_dir(path: str) -> None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.exists(fs_path):
        fs.rm(fs_path, recursive=True)
    fs.makedirs(fs_path, exist_ok=True)


def _ensure_nonempty(path: str) -> None:
    """A side with no pairs still gets one (empty) file, so readers find the schema."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not any(f.endswith(".parquet") for f in fs.find(fs_path)):
        write_pairs([], f"{path.rstrip('/')}/empty.parquet")


def synthesize_pairs(cfg: SynthPairsConfig | dict[str, Any]) -> dict[str, Any]:
    """Run pair synthesis on the connected Ray cluster (the caller initialises Ray).

    Args:
        cfg: A :class:`SynthPairsConfig` or a plain dict of its fields.

    Returns:
        A report: ``path`` (train pairs), ``val_path``, ``n_samples``, ``n_pairs``,
        ``n_train_pairs``, ``n_val_pairs``, ``families`` (``{family: {applied, skipped}}``),
        ``sample_errors``, ``annotation_counters``, ``seconds`` and the resolved ``config``. It is also written to
        ``out_dir/report.json``.
    """
    if isinstance(cfg, dict):
        cfg = from_dict(SynthPairsConfig, cfg)
    else:
        cfg.validate()
    if not ray.is_initialized():
        raise RuntimeError(
            "synthesize_pairs: Ray is not initialised; start it first (pipelines.runtime.ensure_ray, "
            "or use jobs.synth_pairs)"
        )
    start = time.perf_counter()
    records, annotation_counters = load_records(cfg)
    if not records:
        raise ValueError(f"annotations: no usable records in {cfg.annotations}")
    pool = build_caption_pool(records, cfg.caption_pool_size, cfg.perturb.seed)
    pool_ref = ray.put(pool)
    num_blocks = cfg.num_blocks or 2 * cfg.num_workers
    items = [{"record": json.dumps(r.to_dict())} for r in records]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(num_blocks, len(items))))
    out = ds.map_batches(
        _synthesize_batch,
        fn_kwargs={
            "perturb": to_dict(cfg.perturb),
            "pool_ref": pool_ref,
            "val_fraction": cfg.val_fraction,
            "split_by": cfg.split_by,
        },
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        compute=ray.data.TaskPoolStrategy(size=cfg.num_workers),
    ).materialize()

    summary = pa.concat_tables(
        ray.get(out.select_columns([_KIND, "family", _IS_VAL]).to_arrow_refs()),
        promote_options="default",
    )
    kinds = summary.column(_KIND).to_pylist()
    families = summary.column("family").to_pylist()
    sides = summary.column(_IS_VAL).to_pylist()
    applied = Counter(f for k, f in zip(kinds, families) if k == "pair")
    skipped = Counter(f for k, f in zip(kinds, families) if k == "skip")
    errors = Counter(f for k, f in zip(kinds, families) if k == "sample_error")
    n_val = sum(1 for k, v in zip(kinds, sides) if k == "pair" and v)

    root = cfg.out_dir.rstrip("/")
    paths = {"train": f"{root}/train", "val": f"{root}/val"}
    for side, is_val in (("train", False), ("val", True)):
        _reset_dir(paths[side])
        if is_val and cfg.val_fraction == 0.0:
            _ensure_nonempty(paths[side])
            continue
        out.map_batches(_select_pairs, fn_kwargs={"is_val": is_val}, batch_format="pyarrow").write_parquet(
            paths[side]
        )
        _ensure_nonempty(paths[side])

    report = {
        "path": paths["train"],
        "val_path": paths["val"],
        "n_samples": len(records),
        "n_pairs": sum(applied.values()),
        "n_train_pairs": sum(applied.values()) - n_val,
        "n_val_pairs": n_val,
        "families": {f: {"applied": applied.get(f, 0), "skipped": skipped.get(f, 0)} for f in FAMILIES},
        "sample_errors": dict(sorted(errors.items())),
        "annotation_counters": annotation_counters,
        "seconds": round(time.perf_counter() - start, 3),
        "config": to_dict(cfg),
    }
    fs, fs_path = fsspec.core.url_to_fs(f"{root}/report.json")
    with fs.open(fs_path, "w") as handle:
        handle.write(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report
