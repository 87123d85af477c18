"""The shared tier of the feature cache: one Parquet file per entry on an fsspec root.

Layout under ``root`` (``d`` is :meth:`FeatureKey.digest`, ``c`` the sha256 of the data file):

```
entries/<d[:2]>/<d>/<c[:16]>.parquet   the features (one row per frame), written once, never modified
entries/<d[:2]>/<d>.json               the sidecar: data file name, checksum, size, created time, key,
                                       decode warnings and missing frame times
access/<d[:2]>/<d>                     last-access marker: unix seconds as text
index/index.parquet                    a compacted listing, written only by a job driver
```

Why this shape. Object stores have no atomic rename and several processes (Ray Data
workers, Serve replicas) may compute the same entry at once, so:

* A writer puts its data file at a name derived from the data's own checksum, then writes
  the sidecar (one small object, replaced atomically by the store) *last*. A reader trusts
  an entry only through its sidecar and re-checks size and sha256 of the bytes it read.
  Two writers of one key therefore never mix: whichever sidecar lands last names a data
  file that its writer finished before writing it. The loser's data file becomes an
  orphan that :meth:`SharedStore.compact_index` deletes after a grace period.
* A data file without a sidecar (a writer died in between) is a miss; so is a sidecar
  whose data fails the checksum (bit rot, a truncated upload). Both are counted and the
  caller recomputes, which writes a fresh sidecar.
* No reader or writer updates a global manifest. ``index/index.parquet`` is rebuilt from
  the sidecars by the job driver (the single writer) and is informational only.

Access times for quota eviction (LRU by last access) are one small marker object per
entry. A reader rewrites its entry's marker after a hit, at most once per
``touch_interval_s`` per process, so hot entries cost one tiny PUT per interval rather
than one per read; a lost update between two replicas only makes a time slightly older.
Eviction lists the markers (an entry without one counts as its sidecar's creation time)
and deletes the least recently used entries, sidecar first so that readers see a clean
miss, then the data, then the marker.

Local filesystems get the same protocol with write-to-temp + ``os.replace`` per object,
because a plain ``open(path, "wb")`` by two processes can interleave bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from d2vlm_ray.types import FeatureKey

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
"""Accepted ``storage_dtype`` values and their numpy types."""

_META_KEY = b"d2vlm_ray.cache"
_ORPHAN_GRACE_S = 3600.0
_SIDECAR_FIELDS = ("data", "sha256", "size_bytes", "created_s")


class CorruptEntryError(ValueError):
    """An entry's bytes do not match its sidecar, or do not parse."""


def entry_nbytes(n_frames: int, num_patches: int, patch_dim: int, storage_dtype: str = "float16") -> int:
    """Projected size of one entry's data file (the feature payload; Parquet overhead excluded).

    Args:
        n_frames: Frames ``F`` sampled from the video.
        num_patches: Patches per frame ``P`` (CLS dropped).
        patch_dim: Width ``C`` of a patch feature.
        storage_dtype: One of :data:`STORAGE_DTYPES`.

    Returns:
        ``F * P * C * itemsize + 8 * F`` bytes (features plus float64 timestamps).
    """
    itemsize = np.dtype(_np_dtype(storage_dtype)).itemsize
    return int(n_frames) * (int(num_patches) * int(patch_dim) * itemsize + 8)


def _np_dtype(storage_dtype: str) -> Any:
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
    return STORAGE_DTYPES[storage_dtype]


def key_dict(key: FeatureKey) -> dict[str, Any]:
    """The key's fields as a JSON-friendly dict (stored in sidecars and the index)."""
    return {
        "video_sha256": key.video_sha256,
        "fps": float(key.fps),
        "transform_id": key.transform_id,
        "encoder_id": key.encoder_id,
        "max_frames": int(key.max_frames),
    }


@dataclass(frozen=True)
class EntryPayload:
    """Decoded contents of one data file.

    Attributes:
        patches: ``[F, P, C]`` in the storage dtype.
        timestamps_s: ``[F]`` float64 presentation times.
        duration_s: Video duration.
        source_fps: Average frame rate of the source.
        warnings: The decoder's warnings for this video (frames lost, suspect metadata);
            empty for a clean decode and for entries written before warnings were stored.
        missing_timestamps_s: Presentation times of the sampled frames the decoder lost
            (absent from ``patches``).
    """

    patches: np.ndarray
    timestamps_s: np.ndarray
    duration_s: float
    source_fps: float
    warnings: tuple[str, ...] = ()
    missing_timestamps_s: tuple[float, ...] = ()


def encode_entry(key: FeatureKey, payload: EntryPayload) -> bytes:
    """Serialise one entry as a Parquet file (one row per frame).

    The patch column is a fixed-size list of the storage dtype (``halffloat`` for fp16),
    so the file is readable by any Arrow/Parquet tool; shape and source facts ride in the
    schema metadata. No compression: patch features are close to incompressible noise.
    """
    patches = np.ascontiguousarray(payload.patches)
    n_frames, num_patches, patch_dim = patches.shape
    flat = pa.array(patches.reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, num_patches * patch_dim)
    meta = {
        "format": FORMAT_VERSION,
        "shape": [n_frames, num_patches, patch_dim],
        "dtype": str(patches.dtype),
        "duration_s": float(payload.duration_s),
        "source_fps": float(payload.source_fps),
        "key": key_dict(key),
        "warnings": [str(w) for w in payload.warnings],
        "missing_timestamps_s": [float(t) for t in payload.missing_timestamps_s],
    }
    table = pa.table(
        {"timestamp_s": pa.array(np.asarray(payload.timestamps_s, dtype=np.float64)), "patches": column}
    ).replace_schema_metadata({_META_KEY: json.dumps(meta).encode("utf-8")})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="none")
    return sink.getvalue()


def decode_entry(data: bytes) -> EntryPayload:
    """Inverse of :func:`encode_entry`.

    Raises:
        CorruptEntryError: If the bytes are not a valid entry.
    """
    try:
        table = pq.read_table(pa.BufferReader(data))
        meta = json.loads((table.schema.metadata or {})[_META_KEY])
        n_frames, num_patches, patch_dim = (int(v) for v in meta["shape"])
        values = table.column("patches").combine_chunks().values.to_numpy(zero_copy_only=False)
        patches = values.astype(_np_dtype(meta["dtype"]), copy=False).reshape(n_frames, num_patches, patch_dim)
        timestamps_s = table.column("timestamp_s").to_numpy().astype(np.float64)
        # Entries written before warnings were stored have neither field: a clean decode.
        warnings = tuple(str(w) for w in meta.get("warnings", []))
        missing_timestamps_s = tuple(float(t) for t in meta.get("missing_timestamps_s", []))
    except (pa.ArrowException, KeyError, ValueError, TypeError, OSError) as exc:
        raise CorruptEntryError(f"unreadable entry: {exc}") from None
    if timestamps_s.shape != (n_frames,):
        raise CorruptEntryError(f"entry has {timestamps_s.shape[0]} timestamps for {n_frames} frames")
    return EntryPayload(
        patches, timestamps_s, float(meta["duration_s"]), float(meta["source_fps"]), warnings, missing_timestamps_s
    )


def _modified_s(info: dict[str, Any], default: float) -> float:
    """Modification time in unix seconds from an fsspec ``info`` dict (keys differ per filesystem)."""
    for name in ("mtime", "created", "LastModified", "updated", "last_modified"):
        value = info.get(name)
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        if isinstance(value, str):
            try:
                from datetime import datetime

                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return default


class SharedStore:
    """Entries on an fsspec root, following the write-once / sidecar-last protocol above.

    Args:
        root: Path or fsspec URL of the cache root.
        touch_interval_s: Minimum seconds between two access-marker updates of one entry
            by this process.
    """

    def __init__(self, root: str, *, touch_interval_s: float = 300.0) -> None:
        self.root = str(root)
        self.fs, base = fsspec.core.url_to_fs(self.root)
        self.base = base.rstrip("/")
        self.touch_interval_s = float(touch_interval_s)
        self._touched: dict[str, float] = {}
        self._local = isinstance(self.fs, LocalFileSystem)

    # --- paths -------------------------------------------------------------------------

    def sidecar_path(self, digest: str) -> str:
        """Path of an entry's sidecar."""
        return f"{self.base}/entries/{digest[:2]}/{digest}.json"

    def data_dir(self, digest: str) -> str:
        """Folder holding an entry's data file(s)."""
        return f"{self.base}/entries/{digest[:2]}/{digest}"

    def access_path(self, digest: str) -> str:
        """Path of an entry's last-access marker."""
        return f"{self.base}/access/{digest[:2]}/{digest}"

    @property
    def index_path(self) -> str:
        """Path of the compacted index."""
        return f"{self.base}/index/index.parquet"

    # --- low-level I/O -----------------------------------------------------------------

    def _write(self, path: str, data: bytes) -> None:
        """Write one object so that readers see the old or the new bytes, never a mix."""
        parent = path.rsplit("/", 1)[0]
        if self._local:
            os.makedirs(parent, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        else:
            # One PUT: object stores replace whole objects atomically.
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.pipe_file(path, data)

    def _read(self, path: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(path))
        except (FileNotFoundError, IsADirectoryError):
            return None

    def _rm(self, path: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    # --- entries -----------------------------------------------------------------------

    def read_sidecar(self, digest: str) -> dict[str, Any] | None:
        """The parsed sidecar, or ``None`` when there is none.

        Raises:
            CorruptEntryError: If the sidecar exists but is malformed.
        """
        raw = self._read(self.sidecar_path(digest))
        if raw is None:
            return None
        try:
            sidecar = json.loads(raw)
        except ValueError as exc:
            raise CorruptEntryError(f"malformed sidecar of {digest}: {exc}") from None
        if not isinstance(sidecar, dict) or any(f not in sidecar for f in _SIDECAR_FIELDS):
            raise CorruptEntryError(f"malformed sidecar of {digest}: needs fields {_SIDECAR_FIELDS}")
        return sidecar

    def has_unsealed_data(self, digest: str) -> bool:
        """Whether data files exist for an entry (used to classify a sidecar-less miss)."""
        try:
            return bool(self.fs.ls(self.data_dir(digest), detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return False

    def read(self, digest: str) -> tuple[EntryPayload, int] | None:
        """Read and verify one entry.

        Returns:
            ``(payload, data_bytes)``, or ``None`` when the entry has no sidecar.

        Raises:
            CorruptEntryError: On a malformed sidecar, a missing data file, or a size or
                checksum mismatch.
        """
        sidecar = self.read_sidecar(digest)
        if sidecar is None:
            return None
        data = self._read(f"{self.data_dir(digest)}/{sidecar['data']}")
        if data is None:
            raise CorruptEntryError(f"sidecar of {digest} names a missing data file {sidecar['data']!r}")
        if len(data) != int(sidecar["size_bytes"]):
            raise CorruptEntryError(f"entry {digest}: {len(data)} bytes, sidecar says {sidecar['size_bytes']}")
        if hashlib.sha256(data).hexdigest() != sidecar["sha256"]:
            raise CorruptEntryError(f"entry {digest}: checksum mismatch")
        return decode_entry(data), len(data)

    def contains(self, digest: str) -> bool:
        """Cheap validity check: a well-formed sidecar whose data file has the recorded size.

        The full checksum is verified on every :meth:`read`; this check lets a cache build
        skip finished entries without downloading them.
        """
        try:
            sidecar = self.read_sidecar(digest)
        except CorruptEntryError:
            return False
        if sidecar is None:
            return False
        try:
            size = self.fs.size(f"{self.data_dir(digest)}/{sidecar['data']}")
        except FileNotFoundError:
            return False
        return int(size) == int(sidecar["size_bytes"])

    def write(self, key: FeatureKey, payload: EntryPayload) -> int:
        """Write one entry: data file first, sidecar last, then the access marker.

        Returns:
            Bytes of the data file.
        """
        digest = key.digest()
        data = encode_entry(key, payload)
        checksum = hashlib.sha256(data).hexdigest()
        name = f"{checksum[:16]}.parquet"
        self._write(f"{self.data_dir(digest)}/{name}", data)
        now = time.time()
        sidecar = {
            "format": FORMAT_VERSION,
            "digest": digest,
            "data": name,
            "sha256": checksum,
            "size_bytes": len(data),
            "created_s": now,
            "shape": list(payload.patches.shape),
            "dtype": str(payload.patches.dtype),
            "key": key_dict(key),
            # Also in the data file; repeated here so that a look-up that trusts the sidecar
            # (build_cache skipping finished entries) still sees what the decode lost.
            "warnings": [str(w) for w in payload.warnings],
            "missing_timestamps_s": [float(t) for t in payload.missing_timestamps_s],
        }
        self._write(self.sidecar_path(digest), json.dumps(sidecar, sort_keys=True).encode("utf-8"))
        self.touch(digest, force=True, now=now)
        return len(data)

    def touch(self, digest: str, *, force: bool = False, now: float | None = None) -> bool:
        """Record an access, at most once per ``touch_interval_s`` per entry in this process.

        Returns:
            Whether a marker was written.
        """
        now = time.time() if now is None else now
        if not force and now - self._touched.get(digest, float("-inf")) < self.touch_interval_s:
            return False
        self._touched[digest] = now
        try:
            self._write(self.access_path(digest), repr(now).encode("ascii"))
        except OSError as exc:
            # An access time is a hint for eviction; a failed update must not fail a read.
            logger.warning("could not update the access marker of %s: %s", digest, exc)
            return False
        return True

    def delete(self, digest: str) -> None:
        """Remove an entry: sidecar first (readers then miss cleanly), data, marker."""
        self._rm(self.sidecar_path(digest))
        self._rm(self.data_dir(digest), recursive=True)
        self._rm(self.access_path(digest))
        self._touched.pop(digest, None)

    # --- listing, quota, index ---------------------------------------------------------

    def _find(self, sub: str) -> dict[str, dict[str, Any]]:
        try:
            found = self.fs.find(f"{self.base}/{sub}", detail=True)
        except FileNotFoundError:
            return {}
        return dict(found) if isinstance(found, dict) else {}

    def _last_access(self, digests: Iterable[str]) -> dict[str, float]:
        paths = {self.access_path(d): d for d in digests}
        present = {p for p in self._find("access") if p in paths}
        out: dict[str, float] = {}
        if present:
            raw = self.fs.cat(sorted(present), on_error="omit")
            for path, value in raw.items():
                try:
                    out[paths[path]] = float(value)
                except (ValueError, KeyError):
                    continue
        return out

    def _digest_of(self, path: str) -> str:
        """The entry digest a file under ``entries/`` belongs to (sidecar, data or temp file)."""
        rel = path[len(self.base) + len("/entries/") :].split("/")
        return rel[1].split(".json")[0] if len(rel) > 1 else ""

    def used_bytes(self) -> int:
        """Bytes under ``entries/`` (one listing, no reads)."""
        return sum(int(info.get("size", 0) or 0) for info in self._find("entries").values())

    def scan(self) -> tuple[list[dict[str, Any]], int]:
        """List every sealed entry with its size and last access, plus total bytes used.

        Returns:
            ``(entries, used_bytes)``; each entry dict holds the sidecar fields plus
            ``digest``, ``bytes`` (everything stored for it, orphans included) and
            ``last_access_s``. ``used_bytes`` counts every file under ``entries/``
            (orphans and unsealed data included), since that is what the store bills.
        """
        files = self._find("entries")
        per_digest: Counter[str] = Counter()
        for path, info in files.items():
            per_digest[self._digest_of(path)] += int(info.get("size", 0) or 0)
        entries = []
        for path in files:
            if not path.endswith(".json"):
                continue
            digest = self._digest_of(path)
            try:
                sidecar = self.read_sidecar(digest)
            except CorruptEntryError:
                # Still listed, so that eviction can reclaim its bytes.
                sidecar = {"data": "", "sha256": "", "size_bytes": 0, "created_s": 0.0}
            if sidecar is not None:
                entries.append({**sidecar, "digest": digest, "bytes": per_digest[digest]})
        access = self._last_access(e["digest"] for e in entries)
        for entry in entries:
            entry["last_access_s"] = max(float(entry.get("created_s", 0.0)), access.get(entry["digest"], 0.0))
        return entries, sum(per_digest.values())

    def enforce_quota(self, quota_bytes: int, protect: Iterable[str] = ()) -> tuple[list[str], int]:
        """Evict least-recently-used entries until the store uses at most ``quota_bytes``.

        Args:
            quota_bytes: Byte budget of ``entries/``.
            protect: Digests that must stay (e.g. the entry just written).

        Returns:
            ``(evicted_digests, used_bytes_after)``.
        """
        entries, used = self.scan()
        keep = set(protect)
        evicted: list[str] = []
        for entry in sorted(entries, key=lambda e: e["last_access_s"]):
            if used <= quota_bytes:
                break
            if entry["digest"] in keep:
                continue
            self.delete(entry["digest"])
            used -= entry["bytes"]
            evicted.append(entry["digest"])
        if evicted:
            logger.info("cache quota %d B: evicted %d entries, %d B in use", quota_bytes, len(evicted), used)
        return evicted, used

    def compact_index(self, *, orphan_grace_s: float = _ORPHAN_GRACE_S) -> dict[str, Any]:
        """Rebuild ``index/index.parquet`` from the sidecars and delete stale orphan data.

        Meant for one process at a time (a job driver). A data file is an orphan when no
        sidecar names it; it is deleted only once older than ``orphan_grace_s``, because a
        writer may be between writing its data and its sidecar.

        Returns:
            ``{"entries", "bytes", "orphans_deleted", "index"}``.
        """
        entries, used = self.scan()
        named = {f"{self.data_dir(e['digest'])}/{e['data']}" for e in entries}
        now = time.time()
        orphans = 0
        for path, info in self._find("entries").items():
            if path.endswith(".json") or path in named:
                continue
            # Unknown times count as new: deleting a file a writer is about to seal would lose its entry.
            age_s = now - _modified_s(info, default=now)
            if age_s > orphan_grace_s:
                self._rm(path)
                orphans += 1
        columns: dict[str, list[Any]] = {
            name: []
            for name in ("digest", "data", "size_bytes", "created_s", "last_access_s", "video_sha256", "fps",
                         "transform_id", "encoder_id", "max_frames", "n_frames", "n_missing_frames", "warnings")
        }
        for entry in sorted(entries, key=lambda e: e["digest"]):
            key = entry.get("key", {})
            shape = entry.get("shape") or [0]
            row = {**key, **entry, "n_frames": int(shape[0]),
                   "n_missing_frames": len(entry.get("missing_timestamps_s") or []),
                   "warnings": [str(w) for w in entry.get("warnings") or []]}
            for name, values in columns.items():
                values.append(row.get(name))
        sink = io.BytesIO()
        pq.write_table(pa.table(columns), sink)
        self._write(self.index_path, sink.getvalue())
        return {"entries": len(entries), "bytes": used, "orphans_deleted": orphans, "index": self.index_path}
