"""The video manifest: each video's content hash, computed once and shared.

The feature cache is keyed by a video's bytes, so a reader must know a video's sha256
before it can look anything up. Streaming a remote object (``s3://``, ``gs://``) through
sha256 downloads all of it, which a training step or a Serve request must not do for a
video whose features are already cached. The manifest keeps, per video reference, what
identifies the object's version without reading it (size plus mtime, ETag or
generation, from one ``info``/``stat`` call) next to the content hash computed for that
version. A reader whose reference has the recorded size and version takes the recorded
hash; any other reader (the object changed, or was never hashed) streams it once and
records the result for everyone after it.

Layout under the manifest root (normally ``<cache root>/videos``; ``h`` is the sha256 of
the normalised reference)::

    <h[:2]>/<h>.json   {"source", "size_bytes", "version", "sha256", "hashed_at_s"}

One small object per video, replaced whole by whichever process hashed last, so
concurrent writers never need a lock: they write the same content for the same version.
A filesystem that reports no version field for an object (neither mtime nor ETag nor
generation) cannot tell an edited object from the old one, so such videos are hashed on
every use, as before; that case is logged once per source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from d2vlm_ray.cache.keys import local_file_stat, stream_sha256

logger = logging.getLogger(__name__)

MANIFEST_SUBDIR = "videos"
"""Folder of the manifest under a feature-cache root."""

# Fields that change whenever an object's bytes change, in order of preference: object
# stores' ETag / generation, then modification times. ``created`` is memory://'s only one.
_VERSION_FIELDS = ("ETag", "etag", "generation", "VersionId", "version_id", "mtime", "LastModified", "updated",
                   "last_modified", "created")


@dataclass(frozen=True)
class ManifestRecord:
    """One video's identity and content hash.

    Attributes:
        source: The normalised reference (absolute local path or URL).
        size_bytes: Size of the object when it was hashed.
        version: Its mtime / ETag / generation then, as text ("" when the filesystem has none).
        sha256: Hex digest of its bytes.
        hashed_at_s: Unix time of the hash.
    """

    source: str
    size_bytes: int
    version: str
    sha256: str
    hashed_at_s: float


def normalise_source(source: str) -> str:
    """The manifest's name for a video: absolute path for local files (``file://`` too), else the URL."""
    source = str(source)
    if source.startswith("file://"):
        source = source[len("file://") :]
    if "://" not in source:
        return os.path.abspath(os.path.expanduser(source))
    return source


def object_identity(source: str) -> tuple[int, str]:
    """``(size_bytes, version)`` of a video without reading its bytes.

    Raises:
        FileNotFoundError: If the video does not exist or is a directory.
    """
    if "://" not in source:
        st = local_file_stat(source)
        return int(st.st_size), f"mtime_ns:{st.st_mtime_ns}"
    fs, path = fsspec.core.url_to_fs(source)
    try:
        info = fs.info(path)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"no such file {source!r}") from None
    if info.get("type") == "directory":
        raise FileNotFoundError(f"not a file {source!r}")
    for name in _VERSION_FIELDS:
        if info.get(name) not in (None, ""):
            return int(info.get("size") or 0), f"{name}:{info[name]}"
    return int(info.get("size") or 0), ""


class VideoManifest:
    """Content hashes of videos, computed once per object version.

    Thread-safe. Pickling keeps the root and drops the in-process memo.

    Args:
        root: Path or fsspec URL of the manifest folder (see :func:`manifest_root`), or
            ``None`` to keep records in this process only.
    """

    def __init__(self, root: str | None) -> None:
        self.root = str(root).rstrip("/") if root else None
        self._fs: Any = None
        self._base = ""
        if self.root is not None:
            self._fs, self._base = fsspec.core.url_to_fs(self.root)
        self._memo: dict[str, ManifestRecord] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def __reduce__(self) -> tuple[Any, ...]:
        return (VideoManifest, (self.root,))

    def __repr__(self) -> str:
        return f"VideoManifest(root={self.root!r})"

    def _record_path(self, source: str) -> str:
        name = hashlib.sha256(source.encode("utf-8")).hexdigest()
        return f"{self._base}/{name[:2]}/{name}.json"

    def _read(self, source: str) -> ManifestRecord | None:
        if self._fs is None:
            return None
        try:
            with self._fs.open(self._record_path(source), "rb") as handle:
                raw = json.loads(handle.read().decode("utf-8"))
            return ManifestRecord(**raw)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            # A damaged record only costs one more hash; it is rewritten below.
            logger.warning("video manifest: ignoring unreadable record of %s: %s", source, exc)
            return None

    def _write(self, record: ManifestRecord) -> None:
        if self._fs is None:
            return
        path = self._record_path(record.source)
        data = json.dumps(asdict(record), sort_keys=True).encode("utf-8")
        self._fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if isinstance(self._fs, LocalFileSystem):
            # Two local writers must not interleave bytes: write aside, then rename.
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
            return
        with self._fs.open(path, "wb") as handle:
            handle.write(data)

    def record(self, source: str) -> ManifestRecord:
        """The manifest record of ``source``, hashing it only if no record matches its current version.

        Raises:
            FileNotFoundError: If the video does not exist.
            OSError: If it cannot be read.
        """
        name = normalise_source(source)
        size_bytes, version = object_identity(name)
        with self._lock:
            known = self._memo.get(name)
        if known is None:
            known = self._read(name)
        if known is not None and version and (known.size_bytes, known.version) == (size_bytes, version):
            with self._lock:
                self._memo[name] = known
            return known
        if not version and name not in self._warned:
            self._warned.add(name)
            logger.warning("video manifest: %s reports no mtime/ETag; it is hashed on every use", name)
        record = ManifestRecord(name, size_bytes, version, stream_sha256(name), time.time())
        if version:
            self._write(record)
            with self._lock:
                self._memo[name] = record
        return record

    def sha256(self, source: str) -> str:
        """Content hash of ``source`` (see :meth:`record`)."""
        return self.record(source).sha256


def manifest_root(cache_root: str) -> str | None:
    """The manifest folder of a feature-cache root (``None`` when there is no cache)."""
    return f"{str(cache_root).rstrip('/')}/{MANIFEST_SUBDIR}" if cache_root else None
