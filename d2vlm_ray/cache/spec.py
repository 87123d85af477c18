"""``FeatureSpec``: the one config of how a video becomes features and where they are kept.

Every job config (``build_cache``, ``evaluate``, SFT/FPO training, the quickstart) and the
Serve args nest this spec under ``features:``, so a cache that one of them builds is the
cache the others read: they cannot disagree on the sampling rate, the frame cap or the
storage root by having their own copies of those settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from d2vlm_ray.cache.store import STORAGE_DTYPES

DEFAULT_MAX_MISSING_FRAMES_FRACTION = 0.1
"""Default share of sampled frames a decode may lose before it is a ``partial_decode`` error."""

SERVE_DEFAULT_MAX_FRAMES = 128
"""``features.max_frames`` of a Serve config that names none: a server bounds every request's frames."""

LEGACY_KEYS: dict[str, str] = {
    "fps": "features.fps",
    "max_frames": "features.max_frames",
    "max_missing_frames_fraction": "features.max_missing_frames_fraction",
    "cache": "features (cache.root -> features.cache_root, cache.quota_bytes -> features.cache_quota_bytes, "
    "cache.storage_dtype -> features.cache_storage_dtype, cache.memory_mb -> features.cache_memory_bytes; "
    "build_cache's cache.verify_existing -> verify_existing)",
    "cache_root": "features.cache_root",
    "cache_memory_bytes": "features.cache_memory_bytes",
    "cache_storage_dtype": "features.cache_storage_dtype",
    "data.cache_dir": "features.cache_root",
    "data.cache_memory_bytes": "features.cache_memory_bytes",
    "data.fps": "features.fps",
    "data.max_frames": "features.max_frames",
}
"""Config keys that moved into the one ``features:`` section, with where they went (for error messages)."""


def legacy_key_hint(dotted_keys: list[str]) -> str:
    """`` (moved: fps -> features.fps, ...)`` for the keys of an old config layout, else ""."""
    moved = [f"{key} -> {LEGACY_KEYS[key]}" for key in dotted_keys if key in LEGACY_KEYS]
    return f" (moved into the shared features section: {'; '.join(moved)})" if moved else ""


@dataclass
class FeatureSpec:
    """Sampling, the partial-decode policy and the feature cache.

    The transform and encoder ids, the other parts of a cache key, come from the
    checkpoint's frame encoder, not from here.

    Attributes:
        fps: Frame sampling rate (official 1).
        max_frames: Frame cap per video (0 = none). When a video has no more sampled
            frames than the cap, the cap changes nothing and the features are stored under
            the uncapped key, so readers with different caps share them.
        max_missing_frames_fraction: Largest share of a video's sampled frames its decode
            may lose; beyond it the video fails with ``partial_decode`` (checked on cache
            hits too, since one entry may be read under several policies).
        cache_root: Path or fsspec URL of the shared feature cache ("" = no cache: every
            use decodes). The video manifest (content hashes) lives under it too.
        cache_memory_bytes: In-process cache tier per worker / replica (0 = none).
        cache_storage_dtype: ``float16`` or ``float32``.
        cache_quota_bytes: Byte budget of the shared tier (0 = unbounded); LRU eviction beyond it.
        shared_filesystem: ``cache_root`` is a local path every node mounts (NFS, Lustre);
            without it a local path is refused on a multi-node cluster.
    """

    fps: float = 1.0
    max_frames: int = 0
    max_missing_frames_fraction: float = DEFAULT_MAX_MISSING_FRAMES_FRACTION
    cache_root: str = ""
    cache_memory_bytes: int = 256 << 20
    cache_storage_dtype: str = "float16"
    cache_quota_bytes: int = 0
    shared_filesystem: bool = False

    def validate(self, where: str = "features") -> None:
        """Raise ``ValueError`` naming the first bad field (prefixed with ``where``)."""
        if not self.fps > 0:
            raise ValueError(f"{where}.fps must be > 0, got {self.fps}")
        if self.max_frames < 0:
            raise ValueError(f"{where}.max_frames must be >= 0 (0 = no cap), got {self.max_frames}")
        if not 0.0 <= self.max_missing_frames_fraction <= 1.0:
            raise ValueError(
                f"{where}.max_missing_frames_fraction must be in [0, 1], got {self.max_missing_frames_fraction}"
            )
        if self.cache_memory_bytes < 0 or self.cache_quota_bytes < 0:
            raise ValueError(f"{where}.cache_memory_bytes and {where}.cache_quota_bytes must be >= 0")
        if self.cache_storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"{where}.cache_storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.cache_storage_dtype!r}"
            )

    @property
    def frame_cap(self) -> int | None:
        """``max_frames`` as the decoder takes it (``None`` for no cap)."""
        return self.max_frames or None
