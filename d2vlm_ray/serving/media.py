"""Which videos a request may name: local paths under media roots, or URLs of allowed schemes.

A served model must not become a file reader for the whole machine, so a ``video`` given
as a path is resolved (symlinks and ``..`` included) and must lie under one of the
configured media roots; ``file://`` URLs follow the same rule. Other URLs are accepted by
scheme only (``s3``, ``gs``, ... as configured); access control there is the object
store's. Uploads bypass this check: their bytes arrive with the request.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from d2vlm_ray.serving.errors import Forbidden, InvalidRequest

_LOCAL_SCHEMES = ("file", "local")


@dataclass(frozen=True)
class MediaPolicy:
    """Rules for video references in requests.

    Attributes:
        media_roots: Directories whose files may be served (absolute after resolution).
        allowed_schemes: URL schemes accepted (lower case); ``file`` URLs must still lie
            under a media root.
    """

    media_roots: tuple[str, ...] = ()
    allowed_schemes: tuple[str, ...] = field(default=("file", "s3", "gs"))

    @classmethod
    def create(cls, media_roots: Sequence[str], allowed_schemes: Sequence[str]) -> MediaPolicy:
        """Build a policy, resolving each root to its real absolute path."""
        roots = tuple(os.path.realpath(os.path.abspath(os.path.expanduser(r))) for r in media_roots)
        return cls(media_roots=roots, allowed_schemes=tuple(s.lower() for s in allowed_schemes))

    def _under_root(self, path: str) -> str:
        """The real path of ``path`` if it lies under a media root, else raise 403."""
        if not self.media_roots:
            raise Forbidden("video: local paths are disabled (no media_roots configured)", reason="path_not_allowed")
        candidates = [path] if os.path.isabs(path) else [os.path.join(root, path) for root in self.media_roots]
        # realpath resolves symlinks and "..", so a link out of a root is caught too.
        allowed = [real for real in map(os.path.realpath, candidates) if self._inside(real)]
        if not allowed:
            raise Forbidden("video: the path is outside the configured media roots", reason="path_not_allowed")
        # The first existing match wins; if none exists the decoder reports "not_found".
        return next((real for real in allowed if os.path.exists(real)), allowed[0])

    def _inside(self, real: str) -> bool:
        return any(real.startswith(root.rstrip(os.sep) + os.sep) for root in self.media_roots)

    def resolve(self, video: str) -> str:
        """Check a video reference and return what the decoder should open.

        Relative paths are looked up under each media root in order.

        Raises:
            InvalidRequest: If the reference is empty or malformed.
            Forbidden: For a path outside the media roots or a URL of a disallowed scheme.
        """
        video = video.strip()
        if not video:
            raise InvalidRequest("video: must not be empty", reason="empty_video")
        if "\x00" in video:
            raise InvalidRequest("video: contains a NUL byte", reason="bad_video_ref")
        if "://" not in video:
            return self._under_root(os.path.expanduser(video) if video.startswith("~") else video)
        scheme = video.split("://", 1)[0].lower()
        if scheme not in self.allowed_schemes:
            allowed = ", ".join(self.allowed_schemes) or "none"
            message = f"video: URL scheme {scheme!r} is not allowed (allowed: {allowed})"
            raise Forbidden(message, reason="scheme_not_allowed")
        if scheme in _LOCAL_SCHEMES:
            path = video.split("://", 1)[1]
            if not os.path.isabs(path):
                raise InvalidRequest("video: a file:// URL needs an absolute path", reason="bad_video_ref")
            return self._under_root(path)
        return video
