"""The two-tier feature cache.

:class:`FeatureCache` looks an entry up in an in-process LRU bounded by bytes, then in the
shared store (:class:`~d2vlm_ray.cache.store.SharedStore`). "The features of a video"
(hash, look up, on a miss decode, encode and write) is :class:`d2vlm_ray.cache.source.FeatureSource`.

Both tiers hold features in the storage dtype (fp16 by default: a phi3-mini-sized ViT
gives 256 x 1408 x 2 B = 704 KiB per frame), so a value read from memory equals the same
value read from the shared store; readers always receive float32.

An entry also keeps what the decode lost: the decoder's warnings and the presentation
times of sampled frames it could not decode. They come back with every hit (memory or
shared tier), so a partial decode is never served as a clean one. Whether a partial
decode is acceptable is the caller's policy (``max_missing_frames_fraction``), checked
on a hit as on a miss, because one entry may be read under several policies.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from d2vlm_ray.cache.store import CorruptEntryError, EntryPayload, SharedStore, _np_dtype
from d2vlm_ray.types import FeatureKey, FrameEncoder

if TYPE_CHECKING:
    from d2vlm_ray.types import DecodedVideo

logger = logging.getLogger(__name__)


@dataclass
class CachedFeatures:
    """Frame-encoder output for one video at one sampling.

    Attributes:
        patches: Patch features ``[F, P, C]`` float32 (CLS dropped).
        timestamps_s: Presentation time of each frame, ``[F]`` float64 seconds.
        duration_s: Duration of the video.
        source_fps: Average frame rate of the source stream.
        warnings: The decoder's warnings (human-readable); empty for a clean decode.
        missing_timestamps_s: Presentation times of sampled frames that could not be
            decoded; they have no row in ``patches``.
    """

    patches: torch.Tensor
    timestamps_s: np.ndarray
    duration_s: float
    source_fps: float
    warnings: list[str] = field(default_factory=list)
    missing_timestamps_s: list[float] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        """Number of frames ``F``."""
        return int(self.patches.shape[0])

    @property
    def n_sampled(self) -> int:
        """Frames the sampling rule asked for: the encoded ones plus the missing ones."""
        return self.num_frames + len(self.missing_timestamps_s)

    @property
    def missing_fraction(self) -> float:
        """Share of the sampled frames that could not be decoded, in ``[0, 1]``."""
        return len(self.missing_timestamps_s) / self.n_sampled if self.n_sampled else 0.0


@dataclass
class _MemoryItem:
    patches: np.ndarray  # [F, P, C] storage dtype
    timestamps_s: np.ndarray
    duration_s: float
    source_fps: float
    warnings: tuple[str, ...] = ()
    missing_timestamps_s: tuple[float, ...] = ()

    @property
    def nbytes(self) -> int:
        return int(self.patches.nbytes + self.timestamps_s.nbytes)


def sidecar_n_sampled(sidecar: dict[str, Any]) -> int:
    """Sampled frames of a stored entry (encoded rows plus missing ones), from its sidecar alone."""
    return int((sidecar.get("shape") or [0])[0]) + len(sidecar.get("missing_timestamps_s") or [])


def feature_key(encoder: FrameEncoder, sha256: str, fps: float = 1.0, max_frames: int | None = None) -> FeatureKey:
    """The cache key of a video's features under ``encoder`` at ``fps`` / ``max_frames``."""
    return FeatureKey(
        video_sha256=sha256,
        fps=float(fps),
        transform_id=encoder.transform_id,
        encoder_id=encoder.encoder_id,
        max_frames=int(max_frames or 0),
    )


class FeatureCache:
    """In-process LRU (bounded by bytes) in front of a shared fsspec store.

    Safe to share between threads of one process; each process (Ray worker, Serve replica)
    builds its own instance on the same ``root``. Pickling keeps the settings and drops the
    memory tier and counters.

    Args:
        root: Path or fsspec URL of the shared tier (``s3://bucket/cache``, ``/mnt/nfs/cache``;
            ``memory://`` for single-process tests). Check it with
            :func:`~d2vlm_ray.cache.validate_shared_root` before using it across nodes.
        memory_bytes: Byte budget of the in-process tier (0 disables it). An entry larger
            than the budget is not held in memory.
        quota_bytes: Byte budget of the shared tier, or ``None`` for unbounded. Writers
            keep a running estimate of the store's size (one listing, then their own
            writes) and evict least-recently-used entries when it goes over; concurrent
            writers can overshoot until the next eviction pass, so job drivers also call
            :meth:`enforce_quota` at the end.
        storage_dtype: ``"float16"`` (default) or ``"float32"``.
        touch_interval_s: Minimum seconds between two access-time updates of one entry.

    Raises:
        ValueError: On a bad dtype or a negative budget.
    """

    def __init__(
        self,
        root: str,
        *,
        memory_bytes: int = 512 << 20,
        quota_bytes: int | None = None,
        storage_dtype: str = "float16",
        touch_interval_s: float = 300.0,
    ) -> None:
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
        if quota_bytes is not None and quota_bytes <= 0:
            raise ValueError(f"quota_bytes must be positive or None, got {quota_bytes}")
        self._np_dtype = _np_dtype(storage_dtype)
        self.root = str(root)
        self.memory_bytes = int(memory_bytes)
        self.quota_bytes = quota_bytes
        self.storage_dtype = storage_dtype
        self.touch_interval_s = touch_interval_s
        self.store = SharedStore(self.root, touch_interval_s=touch_interval_s)
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, _MemoryItem] = OrderedDict()
        self._memory_used = 0
        self._counters: Counter[str] = Counter()
        self._shared_used_estimate: int | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {
            "memory_bytes": self.memory_bytes,
            "quota_bytes": self.quota_bytes,
            "storage_dtype": self.storage_dtype,
            "touch_interval_s": self.touch_interval_s,
        }
        return (_rebuild, (self.root, kwargs))

    def __repr__(self) -> str:
        return f"FeatureCache(root={self.root!r}, storage_dtype={self.storage_dtype!r})"

    # --- tiers -------------------------------------------------------------------------

    def _remember(self, digest: str, item: _MemoryItem) -> None:
        if item.nbytes > self.memory_bytes:
            return
        with self._lock:
            old = self._memory.pop(digest, None)
            if old is not None:
                self._memory_used -= old.nbytes
            self._memory[digest] = item
            self._memory_used += item.nbytes
            while self._memory_used > self.memory_bytes:
                _, evicted = self._memory.popitem(last=False)
                self._memory_used -= evicted.nbytes
                self._counters["memory_evictions"] += 1

    def _count(self, **amounts: int) -> None:
        with self._lock:
            self._counters.update(amounts)

    @staticmethod
    def _to_features(item: _MemoryItem) -> CachedFeatures:
        return CachedFeatures(
            patches=torch.from_numpy(item.patches.astype(np.float32)),
            timestamps_s=item.timestamps_s.copy(),
            duration_s=item.duration_s,
            source_fps=item.source_fps,
            warnings=list(item.warnings),
            missing_timestamps_s=list(item.missing_timestamps_s),
        )

    def _to_item(self, feats: CachedFeatures) -> _MemoryItem:
        patches = feats.patches.detach().to("cpu", torch.float32).numpy()
        if patches.ndim != 3 or patches.shape[0] == 0:
            raise ValueError(f"patches must be a non-empty [F, P, C] tensor, got shape {tuple(patches.shape)}")
        timestamps_s = np.asarray(feats.timestamps_s, dtype=np.float64)
        if timestamps_s.shape != (patches.shape[0],):
            raise ValueError(f"timestamps_s must have shape ({patches.shape[0]},), got {timestamps_s.shape}")
        with np.errstate(over="ignore"):  # overflow is reported below, with a remedy
            stored = patches.astype(self._np_dtype)
        if not np.isfinite(stored).all():
            raise ValueError(
                f"patch features are not finite in {self.storage_dtype} (max |x| = {np.abs(patches).max():.3g}); "
                "use storage_dtype='float32'"
            )
        return _MemoryItem(
            stored,
            timestamps_s.copy(),
            float(feats.duration_s),
            float(feats.source_fps),
            tuple(str(w) for w in feats.warnings),
            tuple(float(t) for t in feats.missing_timestamps_s),
        )

    # --- public API --------------------------------------------------------------------

    def get(self, key: FeatureKey, *, count_miss: bool = True) -> CachedFeatures | None:
        """Features for ``key``, or ``None`` on a miss.

        A sidecar-less entry (``misses_unsealed``) and one that fails its checksum or does
        not parse (``misses_corrupt``) are misses; callers recompute and :meth:`put`.
        ``count_miss=False`` leaves an absent entry out of the miss counters (a probe of
        one of several keys the caller will try); corrupt entries are always counted.
        """
        digest = key.digest()
        with self._lock:
            item = self._memory.get(digest)
            if item is not None:
                self._memory.move_to_end(digest)
                self._counters["hits_memory"] += 1
        if item is not None:
            # A replica serving a hot video from memory must keep its shared entry "recent".
            self.store.touch(digest)
            return self._to_features(item)
        try:
            found = self.store.read(digest)
        except CorruptEntryError as exc:
            logger.warning("feature cache: treating entry %s as a miss: %s", digest, exc)
            self._count(misses=1, misses_corrupt=1)
            return None
        if found is None:
            if not count_miss:
                return None
            unsealed = self.store.has_unsealed_data(digest)
            self._count(misses=1, misses_unsealed=int(unsealed), misses_absent=int(not unsealed))
            return None
        payload, nbytes = found
        item = _MemoryItem(
            payload.patches,
            payload.timestamps_s,
            payload.duration_s,
            payload.source_fps,
            payload.warnings,
            payload.missing_timestamps_s,
        )
        self._count(hits_shared=1, bytes_read=nbytes)
        self.store.touch(digest)
        self._remember(digest, item)
        return self._to_features(item)

    def sampled_frames(self, key: FeatureKey) -> int | None:
        """Sampled frames (encoded plus missing) of the entry at ``key`` without reading its data.

        From the memory tier, else from the sidecar; ``None`` when there is no sealed entry
        (a malformed sidecar included: the next :meth:`get` counts and recomputes it).
        """
        digest = key.digest()
        with self._lock:
            item = self._memory.get(digest)
        if item is not None:
            return int(len(item.timestamps_s)) + len(item.missing_timestamps_s)
        try:
            sidecar = self.store.read_sidecar(digest)
        except CorruptEntryError:
            return None
        return None if sidecar is None else sidecar_n_sampled(sidecar)

    def contains(self, key: FeatureKey) -> bool:
        """Whether a sealed entry exists (sidecar plus a data file of the recorded size).

        Cheaper than :meth:`get` (no data download, no checksum); a bit-flipped entry still
        passes here and is caught, counted and recomputed by the next :meth:`get`.
        """
        digest = key.digest()
        with self._lock:
            if digest in self._memory:
                return True
        return self.store.contains(digest)

    def put(self, key: FeatureKey, feats: CachedFeatures) -> CachedFeatures:
        """Store features under ``key`` in both tiers.

        Returns:
            The features as a later :meth:`get` returns them (rounded to the storage dtype).

        Raises:
            ValueError: On malformed features or values that overflow the storage dtype.
        """
        digest = key.digest()
        item = self._to_item(feats)
        payload = EntryPayload(
            item.patches, item.timestamps_s, item.duration_s, item.source_fps, item.warnings, item.missing_timestamps_s
        )
        nbytes = self.store.write(key, payload)
        self._count(puts=1, bytes_written=nbytes)
        self._remember(digest, item)
        if self.quota_bytes is not None:
            self._after_write(digest, nbytes)
        return self._to_features(item)

    def _after_write(self, digest: str, nbytes: int) -> None:
        with self._lock:
            estimate = self._shared_used_estimate
        if estimate is None:
            estimate = self.store.used_bytes()
        else:
            estimate += nbytes
        if self.quota_bytes is not None and estimate > self.quota_bytes:
            evicted, estimate = self.store.enforce_quota(self.quota_bytes, protect=[digest])
            self._drop_from_memory(evicted)
            self._count(shared_evictions=len(evicted))
        with self._lock:
            self._shared_used_estimate = estimate

    def _drop_from_memory(self, digests: list[str]) -> None:
        with self._lock:
            for digest in digests:
                item = self._memory.pop(digest, None)
                if item is not None:
                    self._memory_used -= item.nbytes

    def enforce_quota(self) -> list[str]:
        """Evict least-recently-used shared entries until the store fits ``quota_bytes``.

        Returns:
            Digests of the evicted entries (empty without a quota).
        """
        if self.quota_bytes is None:
            return []
        evicted, used = self.store.enforce_quota(self.quota_bytes)
        self._drop_from_memory(evicted)
        self._count(shared_evictions=len(evicted))
        with self._lock:
            self._shared_used_estimate = used
        return evicted

    def compact_index(self) -> dict[str, Any]:
        """Rebuild the shared tier's index file (job drivers only); see :meth:`SharedStore.compact_index`."""
        return self.store.compact_index()

    def stats(self) -> dict[str, int]:
        """Counters of this process's cache use.

        Returns:
            ``hits`` (memory + shared), ``hits_memory``, ``hits_shared``, ``misses`` with its
            causes ``misses_absent`` / ``misses_unsealed`` / ``misses_corrupt``, ``puts``,
            ``bytes_read`` / ``bytes_written`` (shared tier), ``memory_bytes_used``,
            ``memory_entries``, ``memory_evictions``, ``shared_evictions``.
        """
        with self._lock:
            counters = Counter(self._counters)
            memory_used, memory_entries = self._memory_used, len(self._memory)
        names = ("hits_memory", "hits_shared", "misses", "misses_absent", "misses_unsealed", "misses_corrupt",
                 "puts", "bytes_read", "bytes_written", "memory_evictions", "shared_evictions")
        out = {name: int(counters[name]) for name in names}
        out["hits"] = out["hits_memory"] + out["hits_shared"]
        out["memory_bytes_used"] = memory_used
        out["memory_entries"] = memory_entries
        return out


def _rebuild(root: str, kwargs: dict[str, Any]) -> FeatureCache:
    return FeatureCache(root, **kwargs)


def check_missing_fraction(feats: CachedFeatures, max_missing_frames_fraction: float, source: str) -> CachedFeatures:
    """Apply the partial-decode policy to features (fresh or read from the cache).

    The rule of :func:`d2vlm_ray.data.video.check_missing_share`, for features
    whose frames are gone: an entry written under a looser policy (e.g. by a cache build
    with ``max_missing_frames_fraction: 1``) is refused by a stricter reader.

    Args:
        feats: The features; ``missing_timestamps_s`` lists the lost samples.
        max_missing_frames_fraction: Largest share of sampled frames that may be missing.
        source: The path or URL, for the error.

    Returns:
        ``feats`` unchanged when within the limit (its warnings still say what was lost).

    Raises:
        VideoDecodeError: ``partial_decode`` when more than the allowed share is missing.
        ValueError: If the limit is outside ``[0, 1]``.
    """
    from d2vlm_ray.data.video import check_missing_share

    check_missing_share(feats.missing_timestamps_s, feats.n_sampled, max_missing_frames_fraction, source)
    return feats


def scrub_source(warnings: Sequence[str], source: str) -> list[str]:
    """``warnings`` with the video's path or URL written ``<video>``.

    An entry is keyed by the video's content, so its warnings must not name the path of
    whichever process decoded it first; and Serve responses must not show server paths
    (an upload's temporary file, the media roots).
    """
    return [str(w).replace(source, "<video>") if source else str(w) for w in warnings]


def encode_video(encoder: FrameEncoder, decoded: DecodedVideo, source: str) -> CachedFeatures:
    """Encode a decoded video's frames; its warnings (scrubbed of ``source``) and missing frame times come along."""
    feats = encode_decoded(encoder, decoded.frames, decoded.timestamps_s, decoded.duration_s, decoded.source_fps)
    feats.warnings = scrub_source(decoded.warnings, source)
    feats.missing_timestamps_s = [float(t) for t in decoded.missing_timestamps_s]
    return feats


def encode_decoded(
    encoder: FrameEncoder,
    frames: np.ndarray,
    timestamps_s: np.ndarray,
    duration_s: float,
    source_fps: float,
    *,
    warnings: list[str] | None = None,
    missing_timestamps_s: list[float] | None = None,
) -> CachedFeatures:
    """Run the frame encoder on decoded frames ``[F, H, W, 3]`` uint8 and wrap the result.

    ``warnings`` and ``missing_timestamps_s`` are the decode's, carried into the entry.
    """
    patches = encoder.encode(frames)  # [F, P, C]
    return CachedFeatures(
        patches=patches.detach().to("cpu", torch.float32),
        timestamps_s=np.asarray(timestamps_s, dtype=np.float64),
        duration_s=float(duration_s),
        source_fps=float(source_fps),
        warnings=[str(w) for w in warnings or []],
        missing_timestamps_s=[float(t) for t in missing_timestamps_s or []],
    )
