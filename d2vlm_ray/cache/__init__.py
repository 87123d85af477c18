"""The shared feature cache: frozen frame-encoder patch features per video.

Entries are keyed by :class:`d2vlm_ray.types.FeatureKey` (video content hash, sampling
rate, pixel transform, encoder id with a weights hash, frame cap) and live in two tiers:
an in-process LRU bounded by bytes, then a shared fsspec root holding one Parquet file
per entry plus a small JSON sidecar written last (see :mod:`d2vlm_ray.cache.store` for
the layout and the concurrency rules). An entry keeps the decode's warnings and missing
frame times, returned with every hit. Nothing here imports Ray.
"""

from d2vlm_ray.cache.features import (
    DEFAULT_MAX_MISSING_FRAMES_FRACTION,
    CachedFeatures,
    FeatureCache,
    check_missing_fraction,
    feature_key,
    features_for_video,
)
from d2vlm_ray.cache.keys import SharedRootError, validate_shared_root, video_sha256
from d2vlm_ray.cache.store import STORAGE_DTYPES, entry_nbytes

__all__ = [
    "DEFAULT_MAX_MISSING_FRAMES_FRACTION",
    "STORAGE_DTYPES",
    "CachedFeatures",
    "FeatureCache",
    "SharedRootError",
    "check_missing_fraction",
    "entry_nbytes",
    "feature_key",
    "features_for_video",
    "validate_shared_root",
    "video_sha256",
]
