"""Ray Data pipeline that fills the shared feature cache: look up → decode → encode → write.

Stages (one row per video):

1. **Look up** (CPU tasks): hash each video's bytes, build its
   :class:`~d2vlm_ray.types.FeatureKey` and drop videos whose entry is already sealed in
   the cache. A rerun therefore decodes nothing.
2. **Decode** (CPU tasks): sample frames at ``fps`` with
   :func:`~d2vlm_ray.data.video.decode_video`.
3. **Encode + write** (an actor pool, GPUs when configured): the frozen frame encoder from
   a checkpoint turns frames into patch features, and the actor writes the entry (data
   file, then sidecar). Writing in the actor keeps the features (the largest objects of
   the pipeline, ~250 MB for a 350 s video at phi3-mini size) out of the object store.

Decoding stays a stage of CPU tasks (``decode_memory_bytes`` makes its resource request
differ from the actors', so Ray Data does not fuse it into them); with ``num_gpus > 0``
the stages differ anyway. Frames then travel through the object store once, which lets
decoding of the next videos overlap encoding.

With ``decode_in_encoder`` the three stages run as one, in the encoder actors
(:class:`LookupDecodeEncode`): on CPU-only machines every core then runs one process that
does all the work for its video, as a process pool would.

Every video ends as ``cached`` (a hit), ``computed`` (a clean decode), ``partial``
(computed, but the decoder reported warnings: frames it could not decode, suspect
metadata) or ``failed`` with a typed reason (:attr:`VideoDecodeError.reason`, or
``not_found``). A decode that lost more than ``max_missing_frames_fraction`` of its
sampled frames fails with ``partial_decode`` and is not cached. Failed and partial videos
(partial cache hits included) are rows of ``failures.parquet`` / ``failures.json`` in the
run directory, with their ``status``, reason and ``warnings``; the run still finishes and
writes ``summary.json``.

The per-row bodies (:func:`lookup_video`, :func:`decode_row`, :func:`encode_row`) are
plain functions, testable without Ray; the ``_*_batch`` wrappers and
:class:`EncodeFrames` only adapt them to Ray Data's batch dicts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from d2vlm_ray import telemetry
from d2vlm_ray.cache import (
    DEFAULT_MAX_MISSING_FRAMES_FRACTION,
    FeatureCache,
    SharedRootError,
    entry_nbytes,
    FeatureSpec,
    VideoManifest,
    lookup_keys,
    manifest_root,
    storage_key,
    validate_shared_root,
)
from d2vlm_ray.cache.source import find_entry, find_sealed
from d2vlm_ray.cache.features import encode_decoded, scrub_source
from d2vlm_ray.config import ModelConfig, dump_config, from_dict
from d2vlm_ray.data.video import VideoDecodeError, check_missing_share
from d2vlm_ray.types import FrameEncoder

logger = logging.getLogger(__name__)

MANIFEST_FORMATS = ("auto", "evi", "list")
CHECKPOINT_SUBDIR = "checkpoint"
_FAILURE_COLUMNS = ("source", "status", "stage", "reason", "message", "warnings")


@dataclass
class BuildCacheConfig:
    """Config of the cache-building job (``jobs/build_cache.py``).

    Attributes:
        manifest: Videos to process: an ``evi.json`` annotation file, a ``.txt`` list (one
            path or URL per line, ``#`` comments) or a JSON list of paths.
        manifest_format: ``auto`` (by extension and content), ``evi`` or ``list``.
        video_root: Folder or URL that relative video paths are joined to; empty means
            the manifest's folder.
        checkpoint: d2vlm_ray checkpoint dir whose frame encoder is used; empty means a
            random ``tiny`` preset model is initialised into ``<run_dir>/checkpoint``.
        run_dir: Output folder: resolved config, summary, failures table, tiny checkpoint.
        features: Sampling, partial-decode policy and cache (the spec every job and Serve
            share). A video that lost more than ``features.max_missing_frames_fraction``
            of its sampled frames fails with ``partial_decode``; within it it is ``partial``.
        verify_existing: Fully checksum existing entries during the look-up instead of
            checking sidecar and size (downloads every entry).
        num_cpus: CPUs of the Ray instance started when none is running (0 = all).
        lookup_batch_size: Videos per look-up task.
        decode_tasks: Concurrent decode tasks.
        decode_num_cpus: CPUs reserved per decode task.
        decode_memory_bytes: Memory reserved per decode task (decoded frames of a long
            video are large: 350 s of 720p RGB is ~1 GB). A non-zero value also keeps
            decoding a separate CPU-task stage: Ray Data fuses map stages with identical
            resource requests, which would move decoding into the encoder actors.
        encode_actors: Encoder actors in the pool.
        encode_num_cpus: CPUs reserved per encoder actor.
        num_gpus: GPUs per encoder actor (0 = encode on CPU).
        decode_in_encoder: Look up and decode inside the encoder actors: one stage, one
            actor per core, like a process pool. On CPU-only machines this removes the
            decode processes that compete with the encoders for the same cores, the
            look-up pass and the frame copies between stages. With GPU encoders leave it
            off, so the GPU actors do not wait on decoding. ``decode_*`` and
            ``lookup_batch_size`` do not apply when it is on.
        seed: Seed of the tiny checkpoint when one is initialised.
    """

    manifest: str = ""
    manifest_format: str = "auto"
    video_root: str = ""
    checkpoint: str = ""
    run_dir: str = "runs/build_cache"
    features: FeatureSpec = field(default_factory=lambda: FeatureSpec(cache_root="runs/feature_cache"))
    verify_existing: bool = False
    num_cpus: int = 0
    lookup_batch_size: int = 16
    decode_tasks: int = 2
    decode_num_cpus: float = 1.0
    decode_memory_bytes: int = 512 << 20
    encode_actors: int = 1
    encode_num_cpus: float = 1.0
    num_gpus: float = 0.0
    decode_in_encoder: bool = False
    seed: int = 0

    def validate(self) -> None:
        """Cross-field checks (called by the config loader)."""
        if not self.manifest:
            raise ValueError("manifest: required (an evi.json, a .txt list or a JSON list of video paths)")
        if self.manifest_format not in MANIFEST_FORMATS:
            raise ValueError(f"manifest_format: expected one of {list(MANIFEST_FORMATS)}, got {self.manifest_format!r}")
        if not math.isfinite(self.features.fps):
            raise ValueError(f"features.fps: must be a finite number, got {self.features.fps}")
        self.features.validate()
        if not self.features.cache_root:
            raise ValueError("features.cache_root: required (the cache this job fills)")
        for name in ("num_cpus", "seed", "decode_memory_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("lookup_batch_size", "decode_tasks", "encode_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_gpus < 0 or self.decode_num_cpus < 0 or self.encode_num_cpus < 0:
            raise ValueError("num_gpus, decode_num_cpus and encode_num_cpus must be >= 0")


# --- inputs ----------------------------------------------------------------------------


def _join(root: str, path: str) -> str:
    if "://" in path or os.path.isabs(path) or not root:
        return path
    return f"{root.rstrip('/')}/{path}" if "://" in root else os.path.join(root, path)


def _dedupe(sources: list[str], malformed: int) -> tuple[list[str], int]:
    return list(dict.fromkeys(sources)), malformed


def _evi_videos(manifest: Path, root: str) -> tuple[list[str], int]:
    from d2vlm_ray.data.annotations import read_evi_json

    result = read_evi_json(manifest, video_root=root, on_error="skip")
    return [record.video for record in result.records], len(result.errors)


def read_manifest(path: str, fmt: str = "auto", video_root: str = "") -> tuple[list[str], int]:
    """Read the videos to process, deduplicated in first-seen order.

    Args:
        path: An ``evi.json`` file, a ``.txt`` list, or a JSON list of paths.
        fmt: ``auto``, ``evi`` or ``list``.
        video_root: Prefix for relative paths (empty: the manifest's folder).

    Returns:
        ``(sources, malformed_records)``; malformed annotation records are skipped.

    Raises:
        FileNotFoundError: If the manifest does not exist.
        ValueError: If it is not a list of paths or an evi.json file.
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest: no such file {path!r}")
    root = video_root or str(manifest.parent)
    if fmt not in MANIFEST_FORMATS:
        raise ValueError(f"manifest_format: expected one of {list(MANIFEST_FORMATS)}, got {fmt!r}")
    suffix = manifest.suffix.lower()
    if fmt == "evi":
        return _dedupe(*_evi_videos(manifest, root))
    if suffix != ".json":
        if fmt == "auto" and suffix not in (".txt", ".lst", ".list"):
            raise ValueError(f"manifest {path!r}: unknown extension {suffix!r}; set manifest_format to list or evi")
        lines = manifest.read_text(encoding="utf-8").splitlines()
        paths = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        return _dedupe([_join(root, p) for p in paths], 0)
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"manifest {path!r}: invalid JSON ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"manifest {path!r}: expected a JSON list, got {type(data).__name__}")
    if all(isinstance(item, str) for item in data):
        return _dedupe([_join(root, p) for p in data], 0)
    if fmt == "list":
        raise ValueError(f"manifest {path!r}: a list manifest must hold only path strings")
    # evi.json joins relative video paths to the root itself.
    return _dedupe(*_evi_videos(manifest, root))


# --- per-row bodies (Ray-free) ---------------------------------------------------------


def _failure(source: str, stage: str, reason: str, message: str) -> dict[str, Any]:
    return {"source": source, "status": "failed", "stage": stage, "reason": reason, "message": message}


def _warning_fields(warnings: Sequence[str], missing_timestamps_s: Sequence[float]) -> dict[str, str]:
    """A row's decode warnings as JSON text: Ray Data columns cannot hold ragged lists of strings."""
    return {
        "warnings_json": json.dumps([str(w) for w in warnings]),
        "missing_timestamps_json": json.dumps([float(t) for t in missing_timestamps_s]),
    }


def row_warnings(row: dict[str, Any]) -> list[str]:
    """The decode warnings a pipeline row carries (empty for a clean decode)."""
    return list(json.loads(row.get("warnings_json") or "[]"))


def row_missing_timestamps_s(row: dict[str, Any]) -> list[float]:
    """Presentation times of the sampled frames a pipeline row's decode lost."""
    return [float(t) for t in json.loads(row.get("missing_timestamps_json") or "[]")]


def lookup_video(
    source: str,
    cache: FeatureCache,
    *,
    fps: float,
    max_frames: int,
    transform_id: str,
    encoder_id: str,
    verify: bool = False,
    max_missing_frames_fraction: float = DEFAULT_MAX_MISSING_FRAMES_FRACTION,
) -> dict[str, Any]:
    """Hash one video and check whether its entry is already in the cache.

    A cached entry's decode warnings come from its sidecar (no data download), so a
    partial entry written by an earlier run is still reported as partial; one that lost
    more frames than ``max_missing_frames_fraction`` allows (written under a looser
    policy) is a ``partial_decode`` failure, as a fresh decode would be. It stays in
    the cache for readers that accept it.

    Returns:
        A row: ``source``, ``status`` (``cached`` / ``todo`` / ``failed``), ``sha256``,
        ``digest``, ``stage``, ``reason``, ``message``, ``hash_s``, ``warnings_json``,
        ``missing_timestamps_json``.
    """
    start = time.perf_counter()
    no_warnings = _warning_fields([], [])
    spec = FeatureSpec(fps=fps, max_frames=int(max_frames), max_missing_frames_fraction=max_missing_frames_fraction)
    try:
        # Ingestion: the hash lands in the manifest that training, evaluation and Serve read.
        sha = VideoManifest(manifest_root(cache.root)).sha256(source)
    except FileNotFoundError as exc:
        failed = _failure(source, "lookup", "not_found", str(exc))
        return {**failed, "sha256": "", "digest": "", "hash_s": 0.0, **no_warnings}
    except OSError as exc:
        failed = _failure(source, "lookup", "unreadable", str(exc))
        return {**failed, "sha256": "", "digest": "", "hash_s": 0.0, **no_warnings}
    warnings = no_warnings
    n_encoded = 0
    key = lookup_keys(sha, spec, transform_id, encoder_id)[-1]
    if verify:
        found = find_entry(cache, sha, spec, transform_id, encoder_id)
        cached = found is not None
        if found is not None:
            key = found[0]
            warnings = _warning_fields(found[1].warnings, found[1].missing_timestamps_s)
            n_encoded = found[1].num_frames
    else:
        sealed = find_sealed(cache, sha, spec, transform_id, encoder_id)
        cached = sealed is not None
        if sealed is not None:
            key, sidecar = sealed
            warnings = _warning_fields(sidecar.get("warnings") or [], sidecar.get("missing_timestamps_s") or [])
            n_encoded = int((sidecar.get("shape") or [0])[0])
    if cached:
        # The rule a fresh decode meets, so a hit and a decode get the same verdict.
        missing_s = json.loads(warnings["missing_timestamps_json"])
        try:
            check_missing_share(missing_s, n_encoded + len(missing_s), max_missing_frames_fraction, source)
        except VideoDecodeError as exc:
            failed = _failure(source, "lookup", exc.reason, f"the cached entry: {exc.message}")
            return {**failed, "sha256": sha, "digest": key.digest(), "hash_s": time.perf_counter() - start, **warnings}
    return {
        "source": source,
        "status": "cached" if cached else "todo",
        "sha256": sha,
        "digest": key.digest(),
        "stage": "lookup",
        "reason": "",
        "message": "",
        "hash_s": time.perf_counter() - start,
        **warnings,
    }


def decode_row(
    row: dict[str, Any],
    *,
    fps: float,
    max_frames: int,
    max_missing_frames_fraction: float = DEFAULT_MAX_MISSING_FRAMES_FRACTION,
) -> dict[str, Any]:
    """Decode one video; a :class:`VideoDecodeError` becomes a ``failed`` row.

    A decode that lost more than ``max_missing_frames_fraction`` of its sampled frames
    fails with ``partial_decode``.

    Returns:
        The input row plus ``frames`` (uint8 ``[F, H, W, 3]``; ``[0, 0, 0, 3]`` on failure),
        ``timestamps_s``, ``duration_s``, ``source_fps``, ``decode_s``, ``status`` and the
        decode's ``warnings_json`` / ``missing_timestamps_json``.
    """
    from d2vlm_ray.data.video import check_missing_frames, decode_video

    start = time.perf_counter()
    out = dict(row)
    out.update(_warning_fields([], []))
    try:
        decoded = decode_video(row["source"], fps, max_frames=max_frames or None)
        out.update(_warning_fields(scrub_source(decoded.warnings, row["source"]), decoded.missing_timestamps_s))
        check_missing_frames(decoded, max_missing_frames_fraction, row["source"])
    except VideoDecodeError as exc:
        out.update(_failure(row["source"], "decode", exc.reason, exc.message))
        out.update(frames=np.zeros((0, 0, 0, 3), np.uint8), timestamps_s=np.zeros(0), duration_s=0.0,
                   source_fps=0.0, decode_s=time.perf_counter() - start)
        return out
    out.update(
        status="decoded",
        frames=decoded.frames,
        timestamps_s=np.asarray(decoded.timestamps_s, dtype=np.float64),
        duration_s=float(decoded.duration_s),
        source_fps=float(decoded.source_fps),
        decode_s=time.perf_counter() - start,
    )
    logger.info("decoded %s: %d frames in %.2f s", row["source"], len(decoded.frames), out["decode_s"])
    if decoded.warnings:
        logger.warning("decoding %s: %s", row["source"], "; ".join(scrub_source(decoded.warnings, row["source"])))
    return out


def _result_row(row: dict[str, Any]) -> dict[str, Any]:
    """The small result row of a video that is not (or not yet) encoded: no frames, no bytes."""
    names = ("source", "status", "stage", "reason", "message", "digest")
    out = {name: row.get(name, "") for name in names}
    out.update(n_frames=0, bytes=0, decode_s=float(row.get("decode_s", 0.0)), encode_s=0.0)
    out.update(_warning_fields(row_warnings(row), row_missing_timestamps_s(row)))
    return out


def encode_row(
    row: dict[str, Any], encoder: FrameEncoder, cache: FeatureCache, *, fps: float, max_frames: int
) -> dict[str, Any]:
    """Encode one decoded video and write its cache entry; failed rows pass through.

    Returns:
        A small result row (no frames): ``source``, ``status`` (``computed``, ``partial``
        when the decode reported warnings, or ``failed``), ``stage``, ``reason``,
        ``message``, ``digest``, ``n_frames``, ``bytes``, ``decode_s``, ``encode_s``,
        ``warnings_json``, ``missing_timestamps_json``.
    """
    out = _result_row(row)
    if row.get("status") == "failed":
        return out
    start = time.perf_counter()
    warnings, missing_timestamps_s = row_warnings(row), row_missing_timestamps_s(row)
    spec = FeatureSpec(fps=fps, max_frames=int(max_frames))
    n_sampled = len(row["frames"]) + len(missing_timestamps_s)
    key = storage_key(row["sha256"], n_sampled, spec, encoder.transform_id, encoder.encoder_id)
    try:
        feats = encode_decoded(
            encoder, row["frames"], row["timestamps_s"], row["duration_s"], row["source_fps"],
            warnings=warnings, missing_timestamps_s=missing_timestamps_s,
        )
        before = cache.stats()["bytes_written"]
        cache.put(key, feats)
        written = cache.stats()["bytes_written"] - before
    except ValueError as exc:
        out.update(_failure(row["source"], "encode", "encode_error", str(exc)))
        return out
    status = "partial" if warnings or missing_timestamps_s else "computed"
    out.update(status=status, stage="encode", digest=key.digest(), n_frames=feats.num_frames, bytes=written,
               encode_s=time.perf_counter() - start)
    logger.info("encoded %s: %d frames, %d B in %.2f s", row["source"], feats.num_frames, written, out["encode_s"])
    return out


# --- Ray Data adapters -----------------------------------------------------------------


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    n = len(next(iter(batch.values())))
    return [{name: values[i] for name, values in batch.items()} for i in range(n)]


def _columns(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    names = list(rows[0])
    out: dict[str, Any] = {}
    for name in names:
        values = [row[name] for row in rows]
        if isinstance(values[0], np.ndarray):
            if len({v.shape for v in values}) == 1:
                out[name] = np.stack(values)
            else:
                ragged = np.empty(len(values), dtype=object)
                ragged[:] = values
                out[name] = ragged
        else:
            out[name] = np.asarray(values)
    return out


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars from Ray batches back to Python values."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}


def _absolute(path: str) -> str:
    """Absolute form of a local path; URLs unchanged."""
    return path if "://" in path else os.path.abspath(path)


def _cache_kwargs(spec: FeatureSpec) -> dict[str, Any]:
    return {
        "root": spec.cache_root,
        "memory_bytes": 0,  # workers see each video once; the memory tier would only hold RAM
        "quota_bytes": spec.cache_quota_bytes or None,
        "storage_dtype": spec.cache_storage_dtype,
    }


def _record_lookup(row: dict[str, Any]) -> None:
    if row["status"] == "failed":
        telemetry.decode_failure(row["reason"], "build_cache")
    else:
        telemetry.cache_lookup(row["status"] == "cached", 0, "build_cache")


def _record_decode(row: dict[str, Any]) -> None:
    if row["status"] == "failed":
        telemetry.decode_failure(row["reason"], "build_cache")
    else:
        telemetry.frames_decoded(len(row["frames"]), "build_cache")


def _record_encode(row: dict[str, Any]) -> None:
    # The miss was counted by the look-up; only the bytes written are added here.
    if row["status"] in ("computed", "partial"):
        telemetry.latency_ms("encode", 1000.0 * float(row["encode_s"]))
        telemetry.cache_written(int(row["bytes"]), "build_cache")


def _lookup_batch(batch: dict[str, np.ndarray], *, cache_kwargs: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    cache = FeatureCache(cache_kwargs["root"], **{k: v for k, v in cache_kwargs.items() if k != "root"})
    rows = [lookup_video(str(s), cache, **kwargs) for s in batch["source"]]
    for row in rows:
        _record_lookup(row)
    return _columns(rows)


def _decode_batch(
    batch: dict[str, np.ndarray], *, fps: float, max_frames: int, max_missing_frames_fraction: float
) -> dict[str, Any]:
    rows = [
        decode_row(_plain(row), fps=fps, max_frames=max_frames, max_missing_frames_fraction=max_missing_frames_fraction)
        for row in _rows(batch)
    ]
    for row in rows:
        _record_decode(row)
    return _columns(rows)


class EncodeFrames:
    """Ray Data actor UDF: load the frame encoder once, then encode and write per video.

    Args:
        checkpoint: Checkpoint dir (must be readable from every node).
        cache_kwargs: ``FeatureCache`` arguments (``root`` plus keywords).
        fps: Sampling rate (key field).
        max_frames: Frame cap (key field).
        use_gpu: Put the encoder on ``cuda`` when one is visible.
        max_missing_frames_fraction: The partial-decode policy (used where this actor decodes).
    """

    def __init__(
        self,
        checkpoint: str,
        cache_kwargs: dict[str, Any],
        fps: float,
        max_frames: int,
        use_gpu: bool = False,
        max_missing_frames_fraction: float = DEFAULT_MAX_MISSING_FRAMES_FRACTION,
    ) -> None:
        import torch

        from d2vlm_ray.model.checkpoint import load_frame_encoder

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.encoder = load_frame_encoder(checkpoint, device=device)
        self.cache = FeatureCache(cache_kwargs["root"], **{k: v for k, v in cache_kwargs.items() if k != "root"})
        self.fps = fps
        self.max_frames = max_frames
        self.max_missing_frames_fraction = max_missing_frames_fraction

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = [
            encode_row(_plain(row), self.encoder, self.cache, fps=self.fps, max_frames=self.max_frames)
            for row in _rows(batch)
        ]
        for row in rows:
            _record_encode(row)
        return _columns(rows)


class LookupDecodeEncode(EncodeFrames):
    """Ray Data actor UDF for ``decode_in_encoder``: look up, decode, encode and write per video.

    Args: as :class:`EncodeFrames`, plus ``verify`` (read cached entries back instead of
    trusting their sidecar, as ``verify_existing``).
    """

    def __init__(
        self,
        checkpoint: str,
        cache_kwargs: dict[str, Any],
        fps: float,
        max_frames: int,
        use_gpu: bool = False,
        max_missing_frames_fraction: float = DEFAULT_MAX_MISSING_FRAMES_FRACTION,
        verify: bool = False,
    ) -> None:
        super().__init__(checkpoint, cache_kwargs, fps, max_frames, use_gpu, max_missing_frames_fraction)
        self.verify = verify

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = []
        for source in batch["source"]:
            looked = lookup_video(
                str(source), self.cache, fps=self.fps, max_frames=self.max_frames,
                transform_id=self.encoder.transform_id, encoder_id=self.encoder.encoder_id, verify=self.verify,
                max_missing_frames_fraction=self.max_missing_frames_fraction,
            )
            _record_lookup(looked)
            if looked["status"] != "todo":
                rows.append(_result_row(looked))
                continue
            decoded = decode_row(
                looked, fps=self.fps, max_frames=self.max_frames,
                max_missing_frames_fraction=self.max_missing_frames_fraction,
            )
            _record_decode(decoded)
            row = encode_row(decoded, self.encoder, self.cache, fps=self.fps, max_frames=self.max_frames)
            _record_encode(row)
            rows.append(row)
        return _columns(rows)


# --- driver ----------------------------------------------------------------------------


def resolve_checkpoint(cfg: BuildCacheConfig) -> Path:
    """The checkpoint to encode with; initialises the tiny preset when none is configured."""
    if cfg.checkpoint:
        ckpt = Path(cfg.checkpoint)
        if not (ckpt / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint: {cfg.checkpoint!r} is not a checkpoint dir (no config.json)")
        return ckpt
    ckpt = Path(cfg.run_dir) / CHECKPOINT_SUBDIR
    if (ckpt / "config.json").is_file():
        logger.info("no checkpoint configured: reusing the tiny-preset checkpoint at %s", ckpt)
        return ckpt
    from d2vlm_ray.model.checkpoint import init_checkpoint

    logger.warning("no checkpoint configured: initialising a random 'tiny' preset model at %s", ckpt)
    return init_checkpoint(from_dict(ModelConfig, {"preset": "tiny"}), ckpt, seed=cfg.seed)


def _vision_shape(ckpt: Path) -> tuple[int, int]:
    """``(P, C)`` of the checkpoint's frame encoder, from its config (weights not loaded)."""
    meta = json.loads((ckpt / "config.json").read_text())
    vision = from_dict(ModelConfig, meta["model"]).vision
    return (vision.image_size // vision.patch_size) ** 2, vision.hidden_size


def _count_frames(source: str, fps: float, max_frames: int) -> int:
    from d2vlm_ray.data.video import probe_video, sample_frame_indices

    index = probe_video(source)
    return len(sample_frame_indices(index.times_s, index.duration_s, fps, max_frames or None))


def project_cache_bytes(cfg: BuildCacheConfig, *, workers: int = 4) -> dict[str, Any]:
    """Projected shared-cache bytes for every video of the manifest (``--dry-run``).

    Reads only container indexes (no frame is decoded, nothing is encoded, no Ray) and
    assumes nothing is cached yet, so it is an upper bound for the run.

    Returns:
        ``videos``, ``frames``, ``projected_bytes``, ``bytes_per_frame``, ``unreadable``
        (by reason), ``quota_bytes`` and ``fits_quota``.
    """
    sources, malformed = read_manifest(cfg.manifest, cfg.manifest_format, cfg.video_root)
    if cfg.checkpoint:
        num_patches, patch_dim = _vision_shape(resolve_checkpoint(cfg))
    else:
        vision = from_dict(ModelConfig, {"preset": "tiny"}).vision
        num_patches, patch_dim = (vision.image_size // vision.patch_size) ** 2, vision.hidden_size

    def frames_or_reason(source: str) -> int | str:
        try:
            return _count_frames(source, cfg.features.fps, cfg.features.max_frames)
        except VideoDecodeError as exc:
            return exc.reason

    with ThreadPoolExecutor(max_workers=workers) as pool:
        counted = list(pool.map(frames_or_reason, sources))
    frames = sum(c for c in counted if isinstance(c, int))
    dtype = cfg.features.cache_storage_dtype
    projected = sum(entry_nbytes(c, num_patches, patch_dim, dtype) for c in counted if isinstance(c, int))
    quota = cfg.features.cache_quota_bytes or None
    return {
        "videos": len(sources),
        "malformed_records": malformed,
        "frames": frames,
        "num_patches": num_patches,
        "patch_dim": patch_dim,
        "storage_dtype": cfg.features.cache_storage_dtype,
        "bytes_per_frame": entry_nbytes(1, num_patches, patch_dim, cfg.features.cache_storage_dtype),
        "projected_bytes": projected,
        "unreadable": dict(Counter(c for c in counted if isinstance(c, str))),
        "quota_bytes": quota,
        "fits_quota": quota is None or projected <= quota,
    }


def failure_table_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the failures table: every ``failed`` video, and every ``partial`` one with its warnings.

    A cached entry whose decode had warnings (written by an earlier run) is listed as
    ``partial`` too, so that a rerun still shows every video whose features lack frames.

    Returns:
        One dict per listed video with :data:`_FAILURE_COLUMNS` (``warnings`` is a list).
    """
    out = []
    for row in rows:
        warnings = row_warnings(row)
        if row["status"] == "failed":
            status = "failed"
        elif row["status"] in ("partial", "cached") and (warnings or row_missing_timestamps_s(row)):
            status = "partial"
        else:
            continue
        out.append({
            "source": str(row["source"]),
            "status": status,
            "stage": str(row.get("stage", "")),
            "reason": str(row.get("reason", "")) if status == "failed" else "partial",
            "message": str(row.get("message", "")) if status == "failed" else "; ".join(warnings),
            "warnings": warnings,
        })
    return out


def _write_failures(rows: list[dict[str, Any]], run_dir: Path) -> Path:
    columns: dict[str, Any] = {name: [str(r[name]) for r in rows] for name in _FAILURE_COLUMNS if name != "warnings"}
    columns["warnings"] = pa.array([list(r["warnings"]) for r in rows], type=pa.list_(pa.string()))
    table = pa.table({name: columns[name] for name in _FAILURE_COLUMNS})
    path = run_dir / "failures.parquet"
    pq.write_table(table, path)
    (run_dir / "failures.json").write_text(json.dumps(table.to_pylist(), indent=1) + "\n", encoding="utf-8")
    return path


def build_cache(cfg: BuildCacheConfig) -> dict[str, Any]:
    """Fill the shared feature cache for every video of ``cfg.manifest`` (Ray must be initialised).

    Returns:
        The run summary (also written to ``<run_dir>/summary.json``): ``videos``, ``hits``
        (already cached; ``hits_partial`` of them hold a partial decode), ``computed``
        (clean decodes), ``partial`` (computed with decode warnings), ``decoded`` (videos
        sent to the decoder), ``failed`` with ``failed_by_reason``, ``bytes_written``,
        ``seconds`` and per-stage seconds, plus the cache root, checkpoint and encoder id.

    Raises:
        SharedRootError: If the cache root cannot be shared across the cluster's nodes.
        FileNotFoundError / ValueError: On a missing manifest or checkpoint, bad config.
    """
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from d2vlm_ray.model.checkpoint import load_frame_encoder

    start = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir)
    num_nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    validate_shared_root(cfg.features.cache_root, num_nodes, shared_filesystem=cfg.features.shared_filesystem)
    if cfg.features.cache_root.startswith("memory://"):
        # Ray Data workers are separate processes, so even one node cannot share memory://.
        raise SharedRootError(f"features.cache_root={cfg.features.cache_root!r}: memory:// is private to one process; Ray workers "
                              "would each write their own. Use a path or an object store URL")
    sources, malformed = read_manifest(cfg.manifest, cfg.manifest_format, cfg.video_root)
    # Ray workers do not share the driver's working directory: hand them absolute paths.
    sources = [_absolute(s) for s in sources]
    ckpt = resolve_checkpoint(cfg).resolve()
    encoder = load_frame_encoder(ckpt)
    ids = {"transform_id": encoder.transform_id, "encoder_id": encoder.encoder_id}
    del encoder
    cache_kwargs = {**_cache_kwargs(cfg.features), "root": _absolute(cfg.features.cache_root)}
    logger.info("build_cache: %d videos from %s; cache %s; encoder %s", len(sources), cfg.manifest,
                cfg.features.cache_root, ids["encoder_id"])
    stage_s: dict[str, float] = {}

    actor_kwargs = {"checkpoint": str(ckpt), "cache_kwargs": cache_kwargs, "fps": cfg.features.fps,
                    "max_frames": cfg.features.max_frames, "use_gpu": cfg.num_gpus > 0,
                    "max_missing_frames_fraction": cfg.features.max_missing_frames_fraction}
    if cfg.decode_in_encoder:
        t0 = time.perf_counter()
        rows = [_plain(r) for r in ray.data.from_items([{"source": s} for s in sources]).map_batches(
            LookupDecodeEncode,
            batch_size=1,
            compute=ActorPoolStrategy(size=cfg.encode_actors),
            num_cpus=cfg.encode_num_cpus,
            num_gpus=cfg.num_gpus or None,
            fn_constructor_kwargs={**actor_kwargs, "verify": cfg.verify_existing},
        ).take_all()] if sources else []
        stage_s["lookup_decode_encode_write"] = time.perf_counter() - t0
        hit_rows = [r for r in rows if r["status"] == "cached"]
        failed_rows = [r for r in rows if r["status"] == "failed" and r["stage"] == "lookup"]
        # Rows that got past the look-up (computed, or failed while decoding or encoding).
        results = [r for r in rows if r["status"] != "cached" and r["stage"] != "lookup"]
        n_decoded = len(results)
    else:
        t0 = time.perf_counter()
        looked = [_plain(r) for r in ray.data.from_items([{"source": s} for s in sources]).map_batches(
            _lookup_batch,
            batch_size=cfg.lookup_batch_size,
            compute=TaskPoolStrategy(size=cfg.decode_tasks),
            num_cpus=cfg.decode_num_cpus,
            fn_kwargs={"cache_kwargs": cache_kwargs, "fps": cfg.features.fps, "max_frames": cfg.features.max_frames,
                       "verify": cfg.verify_existing,
                       "max_missing_frames_fraction": cfg.features.max_missing_frames_fraction, **ids},
        ).take_all()] if sources else []
        stage_s["lookup"] = time.perf_counter() - t0
        todo = [r for r in looked if r["status"] == "todo"]
        hit_rows = [r for r in looked if r["status"] == "cached"]
        failed_rows = [r for r in looked if r["status"] == "failed"]
        n_decoded = len(todo)
        logger.info("lookup: %d cached, %d to compute, %d failed (%.1f s)", len(hit_rows), len(todo), len(failed_rows),
                    stage_s["lookup"])

        t0 = time.perf_counter()
        results = []
        if todo:
            fields = ("source", "sha256", "digest", "status", "stage", "reason", "message", "warnings_json",
                      "missing_timestamps_json")
            items = [{k: r[k] for k in fields} for r in todo]
            decoded = ray.data.from_items(items).map_batches(
                _decode_batch,
                batch_size=1,
                compute=TaskPoolStrategy(size=cfg.decode_tasks),
                num_cpus=cfg.decode_num_cpus,
                memory=cfg.decode_memory_bytes or None,
                fn_kwargs={"fps": cfg.features.fps, "max_frames": cfg.features.max_frames,
                           "max_missing_frames_fraction": cfg.features.max_missing_frames_fraction},
            )
            encoded = decoded.map_batches(
                EncodeFrames,
                batch_size=1,
                compute=ActorPoolStrategy(size=cfg.encode_actors),
                num_cpus=cfg.encode_num_cpus,
                num_gpus=cfg.num_gpus or None,
                fn_constructor_kwargs=actor_kwargs,
            )
            results = [_plain(r) for r in encoded.take_all()]
        stage_s["decode_encode_write"] = time.perf_counter() - t0
    written = [r for r in results if r["status"] in ("computed", "partial")]
    partial = [r for r in written if r["status"] == "partial"]
    failed_rows += [r for r in results if r["status"] == "failed"]
    logger.info("decode+encode: %d computed, %d partial, %d failed (%.1f s)", len(written) - len(partial),
                len(partial), sum(r["status"] == "failed" for r in results), time.perf_counter() - t0)

    t0 = time.perf_counter()
    driver_cache = FeatureCache(cfg.features.cache_root, memory_bytes=0, quota_bytes=cfg.features.cache_quota_bytes or None,
                                storage_dtype=cfg.features.cache_storage_dtype)
    evicted = driver_cache.enforce_quota()
    index = driver_cache.compact_index()
    stage_s["index"] = time.perf_counter() - t0
    listed = failure_table_rows([*failed_rows, *partial, *hit_rows])
    failures_path = _write_failures(listed, run_dir)
    for row in listed:
        if row["status"] == "partial":
            logger.warning("partial decode of %s: %s", row["source"], row["message"])
    summary = {
        "videos": len(sources),
        "malformed_records": malformed,
        "hits": len(hit_rows),
        "hits_partial": sum(r["status"] == "partial" and r["stage"] == "lookup" for r in listed),
        "computed": len(written) - len(partial),
        "partial": len(partial),
        "decoded": n_decoded,
        "failed": len(failed_rows),
        "failed_by_reason": dict(Counter(r["reason"] for r in failed_rows)),
        "frames": sum(int(r["n_frames"]) for r in written),
        "bytes_written": sum(int(r["bytes"]) for r in written),
        "decode_s": round(sum(float(r["decode_s"]) for r in results), 3),
        "encode_s": round(sum(float(r["encode_s"]) for r in written), 3),
        "stage_seconds": {k: round(v, 3) for k, v in stage_s.items()},
        "seconds": round(time.perf_counter() - start, 3),
        "evicted": len(evicted),
        "cache_entries": index["entries"],
        "cache_bytes": index["bytes"],
        "cache_root": cfg.features.cache_root,
        "checkpoint": str(ckpt),
        "encoder_id": ids["encoder_id"],
        "failures": str(failures_path),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    headline = ("videos", "hits", "computed", "partial", "failed", "bytes_written", "seconds")
    logger.info("build_cache done: %s", json.dumps({k: summary[k] for k in headline}))
    return summary
