"""Typed service errors: each carries its HTTP status and a short machine-readable reason.

Raised by the Ray-free core (:mod:`d2vlm_ray.serving.core`, :mod:`d2vlm_ray.serving.media`)
and by the deployments; the HTTP layer turns them into ``{"detail", "reason"}`` bodies
with the status, and the offline CLI into a JSON error on stderr. They pickle with
their fields, so they cross Ray process boundaries intact (a replica's exception reaches
the caller wrapped in a ``RayTaskError`` whose ``cause`` is the original; see
:func:`unwrap_service_error`).
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service cannot fulfil, with the HTTP status that says why.

    Args:
        message: Human-readable detail (names the offending field where there is one).
        reason: Short machine-readable code, e.g. ``corrupt`` or ``scheme_not_allowed``.
        status_code: HTTP status; defaults to the class's.
        retry_after_s: Seconds a client should wait before retrying (503 only).
    """

    status_code: int = 500
    default_reason: str = "internal"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        status_code: int | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        if status_code is not None:
            self.status_code = status_code
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.reason, self.status_code, self.retry_after_s))

    def to_dict(self) -> dict[str, str]:
        """The JSON error body: ``{"detail": message, "reason": reason}``."""
        return {"detail": self.message, "reason": self.reason}


def _rebuild(
    cls: type[ServiceError], message: str, reason: str, status_code: int, retry_after_s: int | None
) -> ServiceError:
    return cls(message, reason=reason, status_code=status_code, retry_after_s=retry_after_s)


class InvalidRequest(ServiceError):
    """The request is well-formed JSON but its content is unusable (422)."""

    status_code = 422
    default_reason = "invalid_request"


class BadVideo(ServiceError):
    """The video cannot be read or decoded (422); ``reason`` is the decoder's reason."""

    status_code = 422
    default_reason = "corrupt"


class Forbidden(ServiceError):
    """The video reference points outside the media roots or uses a disallowed scheme (403)."""

    status_code = 403
    default_reason = "forbidden"


class TooLarge(ServiceError):
    """The video is longer than allowed, or the upload or body is too big (413)."""

    status_code = 413
    default_reason = "too_large"


class Overloaded(ServiceError):
    """The service is at capacity; retry after ``retry_after_s`` (503)."""

    status_code = 503
    default_reason = "overloaded"


class FeaturesUnavailable(ServiceError):
    """The features a Grounder was told to read are not in the shared cache (503)."""

    status_code = 503
    default_reason = "features_unavailable"


class ReplicaLost(ServiceError):
    """The replica working on the request died, and no healthy one took it over in time (503).

    The Ingress retries idempotent work (features, grounding, answering) on another
    replica first; this reaches the client only when the retries or the deadline ran out.
    """

    status_code = 503
    default_reason = "replica_unavailable"


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before it finished (504)."""

    status_code = 504
    default_reason = "deadline_exceeded"


def unwrap_service_error(exc: BaseException) -> ServiceError | None:
    """The :class:`ServiceError` behind ``exc`` (itself, or the ``cause`` of a Ray task error)."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, ServiceError):
            if type(current) is ServiceError or type(current).__module__ == __name__:
                return current
            # Ray's wrapper subclasses the cause's class; return the cause itself.
            cause = getattr(current, "cause", None)
            return cause if isinstance(cause, ServiceError) else current
        current = getattr(current, "cause", None) or current.__cause__
        seen += 1
    return None
