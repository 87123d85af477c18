"""The shared feature cache: frozen frame-encoder patch features per video.

Entries are keyed by :class:`d2vlm_ray.types.FeatureKey` (video content hash, sampling
rate, pixel transform, encoder id with a weights hash, frame cap applied) and live in two tiers:
an in-process LRU bounded by bytes, then a shared fsspec root holding one Parquet file
per entry plus a small JSON sidecar written last (see :mod:`d2vlm_ray.cache.store` for
the layout and the concurrency rules). An entry keeps the decode's warnings and missing
frame times, returned with every hit. :class:`FeatureSource` is the one way to get a
video's features under a :class:`FeatureSpec`; :class:`VideoManifest` hashes each video once.
Nothing here imports Ray.
"""

from d2vlm_ray.cache.features import CachedFeatures, FeatureCache, check_missing_fraction
from d2vlm_ray.cache.keys import SharedRootError, content_hash_counts, validate_shared_root, video_sha256
from d2vlm_ray.cache.manifest import VideoManifest, manifest_root
from d2vlm_ray.cache.source import (
    FeatureMissingError,
    FeatureSource,
    SourceResult,
    features_for_video,
    lookup_keys,
    storage_key,
)
from d2vlm_ray.cache.spec import DEFAULT_MAX_MISSING_FRAMES_FRACTION, FeatureSpec
from d2vlm_ray.cache.store import STORAGE_DTYPES, entry_nbytes

__all__ = [
    "DEFAULT_MAX_MISSING_FRAMES_FRACTION",
    "STORAGE_DTYPES",
    "CachedFeatures",
    "FeatureCache",
    "FeatureMissingError",
    "FeatureSource",
    "FeatureSpec",
    "SharedRootError",
    "SourceResult",
    "VideoManifest",
    "check_missing_fraction",
    "content_hash_counts",
    "entry_nbytes",
    "features_for_video",
    "lookup_keys",
    "manifest_root",
    "storage_key",
    "validate_shared_root",
    "video_sha256",
]
