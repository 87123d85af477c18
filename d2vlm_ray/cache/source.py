"""The one source of "the features of a video", for jobs, training, evaluation and serving.

:class:`FeatureSource` takes a video reference and a :class:`~d2vlm_ray.cache.spec.FeatureSpec`
and returns the video's patch features with their decode warnings: from the cache when
an entry is there, else by decoding, encoding and writing the entry once. The cache
build (:mod:`d2vlm_ray.pipelines.build_cache`) runs the same steps as separate Ray Data
stages through the same methods (:meth:`FeatureSource.find_sealed`,
:meth:`FeatureSource.decode`, :meth:`FeatureSource.put`), so every path agrees on keys.

Which key. A key holds what determines the features: the content hash, the sampling
rate, the transform and encoder ids, and the frame cap *applied*. A cap that is not
exceeded changes nothing (the decoder keeps every sampled frame), so features written
under it go to the uncapped key (``max_frames`` 0): a job with no cap and a Serve replica
with a cap of 128 then share one entry for every video of at most 128 sampled frames.
A decode that returns exactly ``cap`` frames may or may not have been thinned, so it is
stored under the capped key. Look-ups try the uncapped key first and accept it when its
entry has no more sampled frames than the reader's cap, then the capped key. Entries
written before this rule (a capped key for a short video) are still found by the second
look-up, so existing caches need no migration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from d2vlm_ray.cache.features import (
    CachedFeatures,
    FeatureCache,
    check_missing_fraction,
    encode_video,
    sidecar_n_sampled,
)
from d2vlm_ray.cache.manifest import VideoManifest, manifest_root
from d2vlm_ray.cache.spec import FeatureSpec
from d2vlm_ray.types import FeatureKey, FrameEncoder

if TYPE_CHECKING:
    from d2vlm_ray.types import DecodedVideo

logger = logging.getLogger(__name__)


def _ms(start_s: float) -> float:
    return round((time.perf_counter() - start_s) * 1000.0, 3)


class FeatureMissingError(LookupError):
    """A video's features are not cached and decoding on a miss is switched off."""


def lookup_keys(sha256: str, spec: FeatureSpec, transform_id: str, encoder_id: str) -> list[FeatureKey]:
    """The keys a reader with ``spec`` may find a video's features under, in look-up order."""
    uncapped = FeatureKey(sha256, float(spec.fps), transform_id, encoder_id, 0)
    if not spec.max_frames:
        return [uncapped]
    return [uncapped, FeatureKey(sha256, float(spec.fps), transform_id, encoder_id, int(spec.max_frames))]


def storage_key(sha256: str, n_sampled: int, spec: FeatureSpec, transform_id: str, encoder_id: str) -> FeatureKey:
    """The key of features whose decode sampled ``n_sampled`` frames (encoded plus missing) under ``spec``."""
    applied_cap = int(spec.max_frames) if spec.max_frames and n_sampled >= spec.max_frames else 0
    return FeatureKey(sha256, float(spec.fps), transform_id, encoder_id, applied_cap)


def _serves(key: FeatureKey, n_sampled: int, spec: FeatureSpec) -> bool:
    """Whether an entry at ``key`` with ``n_sampled`` frames is what ``spec`` would decode."""
    if key.max_frames:
        return key.max_frames == spec.max_frames
    return not spec.max_frames or n_sampled <= spec.max_frames


def find_entry(
    cache: FeatureCache, sha256: str, spec: FeatureSpec, transform_id: str, encoder_id: str
) -> tuple[FeatureKey, CachedFeatures] | None:
    """The cached entry a reader with ``spec`` reads for a video, with its key, or ``None``."""
    keys = lookup_keys(sha256, spec, transform_id, encoder_id)
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if not last:
            # A capped reader's first probe is the uncapped entry, which may hold more frames
            # than its cap: decide from the frame count before downloading (and caching) it.
            n_sampled = cache.sampled_frames(key)
            if n_sampled is None or not _serves(key, n_sampled, spec):
                continue
        # Only the last probe's miss is a miss of this look-up.
        found = cache.get(key, count_miss=last)
        if found is not None and _serves(key, found.n_sampled, spec):
            return key, found
    return None


def find_sealed(
    cache: FeatureCache, sha256: str, spec: FeatureSpec, transform_id: str, encoder_id: str
) -> tuple[FeatureKey, dict[str, Any]] | None:
    """:func:`find_entry` from sidecars only (no data download, no checksum): ``(key, sidecar)`` or ``None``.

    A bit-flipped entry still passes here; the next full read catches, counts and recomputes it.
    """
    for key in lookup_keys(sha256, spec, transform_id, encoder_id):
        if not cache.contains(key):
            continue
        sidecar = cache.store.read_sidecar(key.digest()) or {}
        if _serves(key, sidecar_n_sampled(sidecar), spec):
            return key, sidecar
    return None


@dataclass
class SourceResult:
    """Features of one video and how they were obtained.

    Attributes:
        key: The cache key the features are (or would be) stored under.
        features: Patch features with frame times, warnings and missing frame times.
        cache_hit: True when nothing was decoded or encoded.
    """

    key: FeatureKey
    features: CachedFeatures
    cache_hit: bool


class FeatureSource:
    """Features of videos under one :class:`FeatureSpec`: cache first, else decode, encode, write once.

    Thread-safe; concurrent calls for one video in one process decode it once.

    Args:
        encoder: The frozen frame encoder (its ids enter the key; it only runs on a miss).
        spec: Sampling, partial-decode policy and cache settings.
        cache: The feature cache; by default the one ``spec.cache_root`` names (none when empty).
        manifest: Where content hashes are recorded; by default the manifest under the cache root.
        cache_memory_bytes: Overrides ``spec.cache_memory_bytes`` for the default cache
            (cache-building workers see each video once and keep no memory tier).
    """

    def __init__(
        self,
        encoder: FrameEncoder,
        spec: FeatureSpec,
        *,
        cache: FeatureCache | None | str = "spec",
        manifest: VideoManifest | None = None,
        cache_memory_bytes: int | None = None,
    ) -> None:
        spec.validate()
        self.encoder = encoder
        self.spec = spec
        if isinstance(cache, str):
            memory_bytes = spec.cache_memory_bytes if cache_memory_bytes is None else cache_memory_bytes
            cache = (
                FeatureCache(
                    spec.cache_root,
                    memory_bytes=memory_bytes,
                    quota_bytes=spec.cache_quota_bytes or None,
                    storage_dtype=spec.cache_storage_dtype,
                )
                if spec.cache_root
                else None
            )
        self.cache = cache
        self.manifest = manifest or VideoManifest(manifest_root(cache.root) if cache is not None else None)
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._counters: Counter[str] = Counter()

    # --- steps ---------------------------------------------------------------------------

    def sha256(self, source: str) -> str:
        """Content hash of a video through the manifest (streamed only once per object version).

        Raises:
            FileNotFoundError: If the video does not exist.
            OSError: If it cannot be read.
        """
        return self.manifest.sha256(source)

    def find(self, sha256: str) -> tuple[FeatureKey, CachedFeatures] | None:
        """The cached entry this spec reads for a video, with its key, or ``None``."""
        if self.cache is None:
            return None
        return find_entry(self.cache, sha256, self.spec, self.encoder.transform_id, self.encoder.encoder_id)

    def find_sealed(self, sha256: str) -> tuple[FeatureKey, dict[str, Any]] | None:
        """Like :meth:`find`, from sidecars only (no data download, no checksum): ``(key, sidecar)``."""
        if self.cache is None:
            return None
        return find_sealed(self.cache, sha256, self.spec, self.encoder.transform_id, self.encoder.encoder_id)

    def decode(self, source: str, *, max_duration_s: float | None = None) -> DecodedVideo:
        """Decode ``source`` under the spec's sampling and check its partial-decode policy.

        Raises:
            VideoDecodeError: If the video cannot be decoded, is longer than
                ``max_duration_s`` (``too_long``), or lost more than the allowed share of
                its sampled frames (``partial_decode``).
        """
        from d2vlm_ray.data.video import check_missing_frames, decode_video

        decoded = decode_video(source, self.spec.fps, max_frames=self.spec.frame_cap, max_duration_s=max_duration_s)
        self._count(decodes=1)
        return check_missing_frames(decoded, self.spec.max_missing_frames_fraction, source)

    def encode(self, decoded: DecodedVideo, source: str) -> CachedFeatures:
        """Encode a decoded video's frames; its warnings (naming it ``<video>``) come along."""
        feats = encode_video(self.encoder, decoded, source)
        self._count(encodes=1, frames_encoded=feats.num_frames)
        return feats

    def key_for(self, sha256: str, feats: CachedFeatures) -> FeatureKey:
        """The key features computed under this spec are stored under."""
        return storage_key(sha256, feats.n_sampled, self.spec, self.encoder.transform_id, self.encoder.encoder_id)

    def put(self, sha256: str, feats: CachedFeatures) -> tuple[FeatureKey, CachedFeatures]:
        """Write computed features (when there is a cache) and return them as a later hit would.

        Raises:
            ValueError: On malformed features or values that overflow the storage dtype.
        """
        key = self.key_for(sha256, feats)
        if self.cache is None:
            return key, feats
        return key, self.cache.put(key, feats)

    def check(self, feats: CachedFeatures, source: str) -> CachedFeatures:
        """Apply the spec's partial-decode policy to features read from the cache.

        Raises:
            VideoDecodeError: ``partial_decode`` when more than the allowed share is missing.
        """
        return check_missing_fraction(feats, self.spec.max_missing_frames_fraction, source)

    # --- the whole path --------------------------------------------------------------------

    def features(self, source: str, *, decode_on_miss: bool = True) -> SourceResult:
        """Features of ``source`` (local path or fsspec URL), from the cache when possible.

        On a miss the returned values are those a later hit returns (rounded to the
        storage dtype), so callers see the same numbers either way.

        Raises:
            FileNotFoundError: If the video does not exist.
            FeatureMissingError: On a miss with ``decode_on_miss=False``.
            VideoDecodeError: If it cannot be decoded, or ``partial_decode`` (on a hit too)
                when it lost more than the allowed share of frames.
        """
        return self.features_of(source, self.sha256(source), decode_on_miss=decode_on_miss)

    def features_of(
        self,
        source: str,
        sha256: str,
        *,
        decode_on_miss: bool = True,
        max_duration_s: float | None = None,
        timings_ms: dict[str, float] | None = None,
    ) -> SourceResult:
        """:meth:`features` for a video whose content hash the caller already has.

        Args:
            source: Local path or fsspec URL of the video.
            sha256: Its content hash (from :meth:`sha256`, or of an upload's bytes).
            decode_on_miss: Decode and encode on a miss; when false a miss raises.
            max_duration_s: Longer videos fail to decode with ``too_long`` (``None`` = no limit).
            timings_ms: Filled with ``cache_read`` and, on a miss, ``decode``, ``encode`` and
                ``cache_write`` in milliseconds.
        """
        timings_ms = {} if timings_ms is None else timings_ms
        with self._key_lock(sha256):
            start_s = time.perf_counter()
            found = self.find(sha256)
            timings_ms["cache_read"] = _ms(start_s)
            if found is not None:
                self._count(hits=1)
                key, feats = found
                return SourceResult(key, self.check(feats, source), True)
            self._count(misses=1)
            if not decode_on_miss:
                wanted = lookup_keys(sha256, self.spec, self.encoder.transform_id, self.encoder.encoder_id)[-1]
                raise FeatureMissingError(
                    f"no cached features for {source!r} (key {wanted.digest()[:12]}, encoder {wanted.encoder_id}); "
                    "build the feature cache first or let misses decode"
                )
            start_s = time.perf_counter()
            decoded = self.decode(source, max_duration_s=max_duration_s)
            timings_ms["decode"] = _ms(start_s)
            start_s = time.perf_counter()
            feats = self.encode(decoded, source)
            timings_ms["encode"] = _ms(start_s)
            start_s = time.perf_counter()
            key, feats = self.put(sha256, feats)
            if self.cache is not None:
                timings_ms["cache_write"] = _ms(start_s)
            return SourceResult(key, feats, False)

    def _key_lock(self, sha256: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(sha256, threading.Lock())

    def _count(self, **amounts: int) -> None:
        with self._lock:
            self._counters.update(amounts)

    def counters(self) -> dict[str, int]:
        """``hits``, ``misses``, ``decodes``, ``encodes`` and ``frames_encoded`` of this process."""
        with self._lock:
            return {name: int(self._counters[name]) for name in ("hits", "misses", "decodes", "encodes",
                                                                  "frames_encoded")}


def features_for_video(
    cache: FeatureCache | None,
    encoder: FrameEncoder,
    source: str,
    *,
    fps: float = 1.0,
    max_frames: int | None = None,
    max_missing_frames_fraction: float | None = None,
) -> tuple[CachedFeatures, bool]:
    """``(features, cache_hit)`` of one video through a one-off :class:`FeatureSource` (scripts, benchmarks)."""
    spec = FeatureSpec(fps=fps, max_frames=int(max_frames or 0))
    if max_missing_frames_fraction is not None:
        spec.max_missing_frames_fraction = max_missing_frames_fraction
    result = FeatureSource(encoder, spec, cache=cache).features(source)
    return result.features, result.cache_hit
