"""Resume and merge: prediction shards on disk, the settings fingerprint, the merged predictions.

Predictions live in ``<output_dir>/shards/part-NNNNNN.jsonl``; a shard is written to a
temporary name and renamed, so a killed run leaves only whole shards. The settings that
change predictions are stored once; a rerun under other settings is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from d2vlm_ray.config import to_dict
from d2vlm_ray.pipelines.inference.config import SETTINGS_FILE, SHARD_DIR, EvaluateConfig
from d2vlm_ray.pipelines.inference.samples import sort_by_sample_id

logger = logging.getLogger(__name__)


class ShardStore:
    """Prediction shards under ``<output_dir>/shards``: whole files only, read in order.

    Args:
        output_dir: The run folder.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.dir = Path(output_dir) / SHARD_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    def shard_paths(self) -> list[Path]:
        """Finished shards in write order."""
        return sorted(self.dir.glob("part-*.jsonl"))

    def clear(self) -> None:
        """Delete every shard."""
        shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)

    def read_all(self) -> dict[str, dict[str, Any]]:
        """``{sample_id: prediction}`` over all shards; a later shard wins for a repeated id.

        Raises:
            ValueError: If a shard holds a line that is not a prediction record.
        """
        out: dict[str, dict[str, Any]] = {}
        for path in self.shard_paths():
            for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"shard {path}:{line_no}: not JSON ({exc})") from None
                if not isinstance(record, dict) or "sample_id" not in record:
                    raise ValueError(f"shard {path}:{line_no}: a prediction needs 'sample_id'")
                out[str(record["sample_id"])] = record
        return out

    def done_ids(self, include_failed: bool = True) -> set[str]:
        """Ids already predicted (failed ones too unless ``include_failed`` is False)."""
        return {sid for sid, r in self.read_all().items() if include_failed or r.get("status") == "ok"}

    def write(self, predictions: Sequence[dict[str, Any]]) -> Path | None:
        """Write one shard atomically (temporary name, then rename); ``None`` if empty."""
        if not predictions:
            return None
        existing = self.shard_paths()
        seq = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        path = self.dir / f"part-{seq:06d}.jsonl"
        tmp = self.dir / f".tmp-{path.name}"
        body = "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in predictions)
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, path)
        return path


def inference_fingerprint(cfg: EvaluateConfig) -> dict[str, Any]:
    """The settings that change predictions; resuming under different ones is refused."""
    return {
        "checkpoint_dir": str(Path(cfg.checkpoint_dir).resolve()),
        "annotations": str(Path(cfg.annotations).resolve()),
        "format": cfg.format,
        "video_root": cfg.video_root,
        "fps": cfg.features.fps,
        "max_frames": cfg.features.max_frames,
        "max_duration_s": cfg.max_duration_s,
        "max_missing_frames_fraction": cfg.features.max_missing_frames_fraction,
        "max_input_tokens": cfg.max_input_tokens,
        "blank_frames": cfg.blank_frames,
        "dtype": cfg.compute.dtype,
        "decoding": to_dict(cfg.decoding),
    }


FINGERPRINT_DEFAULTS: dict[str, Any] = {"max_missing_frames_fraction": 1.0}
"""Fingerprint entries added later, with the value that older runs effectively used.

Before the partial-decode policy existed every partial decode was predicted, silently
(a limit of 1): resuming such a run under another limit is refused like any other
changed setting, rather than mixing predictions made under two policies.
"""


def check_resume(cfg: EvaluateConfig, out_dir: Path, store: ShardStore) -> None:
    path = out_dir / SETTINGS_FILE
    current = inference_fingerprint(cfg)
    if path.is_file() and store.shard_paths():
        previous = json.loads(path.read_text(encoding="utf-8"))
        # Runs from before a setting existed ran under its default: compare with that.
        previous = {k: FINGERPRINT_DEFAULTS[k] for k in FINGERPRINT_DEFAULTS if k not in previous} | previous
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            raise ValueError(
                f"output_dir {str(out_dir)!r} holds predictions made with other settings ({', '.join(changed)}); "
                "use a new output_dir or set overwrite=true"
            )
    path.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def merge_predictions(store: ShardStore, sample_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The selected samples' predictions, sorted by sample id (deterministic)."""
    wanted = set(sample_ids)
    return sort_by_sample_id(p for sid, p in store.read_all().items() if sid in wanted)


def write_predictions(predictions: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write predictions as an E.T. Bench json list, one record per line."""
    path = Path(path)
    body = ",\n".join(json.dumps(p, ensure_ascii=False, sort_keys=True) for p in predictions)
    path.write_text(f"[\n{body}\n]\n" if predictions else "[]\n", encoding="utf-8")
    return path
