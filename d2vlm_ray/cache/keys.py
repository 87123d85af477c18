"""Cache-key ingredients: video content hashes and the shared-root check.

The feature cache is keyed by the *bytes* of a video (not its path), so the same clip
under two names, or copied to an object store, hits the same entry, and an edited file
under an unchanged name misses.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter, OrderedDict

import fsspec

_CHUNK_BYTES = 8 << 20
_MEMO_SIZE = 4096
_memo: OrderedDict[tuple[str, int, int], str] = OrderedDict()
_memo_lock = threading.Lock()
_hash_counts: Counter[str] = Counter()

_PROCESS_LOCAL_PROTOCOLS = ("memory",)
_NODE_LOCAL_PROTOCOLS = ("file", "local")


class SharedRootError(ValueError):
    """The cache root cannot serve as the shared tier of this cluster."""


def _local_path(source: str) -> str | None:
    """The filesystem path of a local source (plain path or ``file://``), else ``None``."""
    if "://" not in source:
        return source
    if source.startswith("file://"):
        return source[len("file://") :]
    return None


def local_file_stat(path: str) -> os.stat_result:
    """``os.stat`` of a local video file; a missing path or a directory is ``FileNotFoundError``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file {path!r}") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a file {path!r}")
    return st


def stream_sha256(source: str) -> str:
    """sha256 hex digest of all the bytes of ``source``, read in 8 MiB chunks (no memo).

    Every call reads the whole object (for a remote video: downloads it), so each call is
    counted per source; :func:`content_hash_counts` lets tests check that a video set is
    hashed once, not once per use.

    Raises:
        FileNotFoundError: If the source does not exist (or is a directory).
    """
    digest = hashlib.sha256()
    try:
        with fsspec.open(source, "rb") as handle:
            while chunk := handle.read(_CHUNK_BYTES):
                digest.update(chunk)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"video_sha256: no such file {source!r}") from None
    with _memo_lock:
        _hash_counts[source] += 1
    return digest.hexdigest()


def content_hash_counts() -> dict[str, int]:
    """How many times this process streamed each source through sha256 (a copy)."""
    with _memo_lock:
        return dict(_hash_counts)


def reset_hash_memo() -> None:
    """Forget the memoised local hashes and the per-source counts of this process.

    For tests that play several processes (a cache build, a trainer, an evaluator) in
    one: each stage then starts as a fresh process would, with only what it can read.
    """
    with _memo_lock:
        _memo.clear()
        _hash_counts.clear()


def video_sha256(source: str) -> str:
    """sha256 hex digest of a video's bytes, streamed (local path or fsspec URL).

    Local files are memoised by ``(path, size, mtime_ns)`` so a Serve replica that sees the
    same file twice hashes it once; remote objects are hashed on every call.

    Args:
        source: Local path or fsspec URL (``s3://``, ``gs://``, ``memory://`` ...).

    Returns:
        The lowercase hex digest.

    Raises:
        FileNotFoundError: If the source does not exist (or is a directory).
    """
    source = str(source)
    local = _local_path(source)
    memo_key: tuple[str, int, int] | None = None
    if local is not None:
        st = local_file_stat(local)
        memo_key = (os.path.abspath(local), st.st_size, st.st_mtime_ns)
        with _memo_lock:
            if memo_key in _memo:
                _memo.move_to_end(memo_key)
                return _memo[memo_key]
    hex_digest = stream_sha256(source)
    if memo_key is not None:
        with _memo_lock:
            _memo[memo_key] = hex_digest
            while len(_memo) > _MEMO_SIZE:
                _memo.popitem(last=False)
    return hex_digest


def validate_shared_root(root: str, num_nodes: int, *, shared_filesystem: bool = False) -> None:
    """Refuse a cache root that the nodes of a multi-node cluster would not share.

    ``memory://`` lives inside one process, and a plain path is on each node's own disk:
    on a cluster of more than one node, workers would each fill a private cache and the
    Serve replicas would never see what the cache job built. A local path is accepted when
    the caller states that it is a mount shared by every node (NFS, Lustre, FSx ...).

    Args:
        root: The cache root (path or fsspec URL).
        num_nodes: Number of alive nodes in the cluster (1 for a laptop / single VM).
        shared_filesystem: The local path is a network mount present on every node.

    Raises:
        SharedRootError: If the root cannot be shared across ``num_nodes`` nodes.
        ValueError: If ``num_nodes`` is not positive.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
    protocol = fsspec.utils.get_protocol(str(root))
    if num_nodes == 1:
        return
    if protocol in _PROCESS_LOCAL_PROTOCOLS:
        raise SharedRootError(
            f"features.cache_root={root!r}: memory:// is private to one process and cannot be the shared cache "
            f"of a {num_nodes}-node cluster; use an object store URL (s3://, gs://, abfs://) or a shared mount"
        )
    if protocol in _NODE_LOCAL_PROTOCOLS and not shared_filesystem:
        raise SharedRootError(
            f"features.cache_root={root!r} is a node-local path on a {num_nodes}-node cluster; use an object "
            "store URL, or set features.shared_filesystem=true if it is a network mount present on every node"
        )
